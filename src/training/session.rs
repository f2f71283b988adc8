//! The evaluation of one class during training: scores of the test and normal training inputs,
//! the AUCs, the best model kept in `model.mtad` with its score files, the tables and
//! `progress.json` rewritten, and the per-epoch losses reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::DataLoader;
use burn::module::Module;

use super::inputs::{ErrorSlot, InputSet};
use super::model::{InputBatch, MtadModel};
use super::strategy::{AtomicCheckpointer, CHECKPOINT_PARTS, ClassSession, EpochLosses};
use crate::config::{Protocol, TrainConfig};
use crate::output::artifact::{ARTIFACT_FILE, Artifact, NormalScores};
use crate::output::run_folder::{
    BestRecord, ClassProgress, Decision, EvalRecord, PartialEpoch, write_progress,
};
use crate::output::scores::{TEST_SCORES, TRAIN_SCORES, write_scores};
use crate::output::tables::write_tables;
use crate::output::write_atomic;
use crate::progress::Progress;
use crate::scoring::evaluation::{
    AUPRO_MAX_FPR, ClassEvaluation, Normaliser, RawScores, column_names, evaluate, has_both_labels,
    image_nor,
};
use crate::scoring::metrics::rates_at;
use crate::scoring::pixel::PixelTruth;
use crate::scoring::threshold::{Calibration, HELD_OUT, TRAINING};
use crate::teachers::{TeacherChoice, TeacherStatistics};
use crate::{Error, Result};

/// Evaluation, outputs and progress of one class during training.
pub(crate) struct Session {
    pub(crate) config: TrainConfig,
    pub(crate) out: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) checkpoint_dir: PathBuf,
    pub(crate) progress: ClassProgress,
    pub(crate) test_loader: Arc<dyn DataLoader<InputBatch>>,
    pub(crate) norm_loader: Arc<dyn DataLoader<InputBatch>>,
    /// The held-out normal inputs (none when nothing is held out).
    pub(crate) holdout_loader: Option<Arc<dyn DataLoader<InputBatch>>>,
    pub(crate) test_set: Arc<InputSet>,
    pub(crate) norm_set: Arc<InputSet>,
    pub(crate) norm_items: Vec<usize>,
    pub(crate) holdout_items: Vec<usize>,
    pub(crate) test_groups: Vec<usize>,
    pub(crate) test_labels: Vec<u8>,
    /// Each test image's folder (`good` or its defect type; CIFAR-10: its class).
    pub(crate) test_defects: Vec<String>,
    pub(crate) stats: Option<Arc<TeacherStatistics>>,
    pub(crate) pixels: Option<Arc<PixelTruth>>,
    /// The full cut (patch offsets, image side, patch side) of full-cut data, for the pixel
    /// threshold.
    pub(crate) cut: Option<super::class_data::PatchLayout>,
    pub(crate) batch_errors: ErrorSlot,
    pub(crate) plain: bool,
}

/// The pixel AUROC and AUPRO of the `nor` heatmaps of `test`, where the class has masks.
pub(crate) fn pixel_metrics(
    pixels: Option<&PixelTruth>,
    test: &RawScores,
    normaliser: &Normaliser,
) -> Result<(Option<f64>, Option<f64>)> {
    let Some(p) = pixels else {
        return Ok((None, None));
    };
    let nor: Vec<f64> = (0..test.len()).map(|i| normaliser.score(test, i)).collect();
    Ok((Some(p.auroc(&nor)?), Some(p.aupro(&nor, AUPRO_MAX_FPR)?)))
}

/// A class's evaluation of `test` where its labels have both classes: the 69 columns, `nor`,
/// the pixel metrics and `nor`'s image metrics.
pub(crate) fn full_evaluation(
    test: &RawScores,
    (groups, labels, defects): (&[usize], &[u8], &[String]),
    normaliser: &Normaliser,
    pixels: Option<&PixelTruth>,
    rec_only: bool,
) -> Result<Option<ClassEvaluation>> {
    if !has_both_labels(labels) {
        return Ok(None);
    }
    let mut evaluation = evaluate(test, groups, labels, normaliser)?;
    evaluation.rec_only = rec_only;
    (evaluation.pixel_nor, evaluation.pixel_aupro) = pixel_metrics(pixels, test, normaliser)?;
    let nor = image_nor(test, groups, labels.len(), normaliser);
    evaluation.add_nor_metrics(&nor, labels, defects)?;
    Ok(Some(evaluation))
}

/// The normal training inputs' scores with the image of each input (inputs of one image are
/// consecutive), for the artifact's thresholds.
fn normal_scores(set: &InputSet, items: &[usize], scores: RawScores) -> NormalScores {
    let mut groups = Vec::with_capacity(items.len());
    let mut images = 0;
    for (row, &input) in items.iter().enumerate() {
        if row == 0 || set.inputs[items[row - 1]].0 != set.inputs[input].0 {
            images += 1;
        }
        groups.push(images - 1);
    }
    NormalScores {
        groups,
        images,
        scores,
    }
}

/// Scores of every input of a loader, on the host (`what` names them in the progress).
pub fn score_loader(
    model: &MtadModel,
    loader: &dyn DataLoader<InputBatch>,
    what: &str,
) -> Result<RawScores> {
    let mut scores = RawScores::default();
    let progress = Progress::start(&format!("scoring {what}"), loader.num_items() as u64);
    for batch in loader.iter() {
        let batch = batch.map_err(|e| Error::Training(format!("data loader: {e}")))?;
        let s = model.scores(batch).to_host()?;
        progress.advance(s.as_z.len() as u64);
        scores.extend(&s.as_z, &s.as_cossim, &s.as_rec);
    }
    Ok(scores)
}

impl Session {
    fn name(&self) -> &str {
        &self.progress.name
    }

    fn save_models(&self, model: &MtadModel, dir: &Path) -> Result<()> {
        let save = |bytes: std::result::Result<burn::tensor::Bytes, _>, file: &str| {
            let bytes: burn::tensor::Bytes = bytes.map_err(|e: burn::store::RecordError| {
                Error::Training(format!("saving {file}: {e}"))
            })?;
            write_atomic(&dir.join(file), &bytes)
        };
        save(
            model.student.clone().into_record().into_bytes(),
            "student.bpk",
        )?;
        save(
            model.decoder.clone().into_record().into_bytes(),
            "decoder.bpk",
        )?;
        if let Some(w) = &model.weighting {
            save(w.clone().into_record().into_bytes(), "weighting.bpk")?;
        }
        Ok(())
    }
}

impl Session {
    /// The operating point of this evaluation: calibrated on the held-out normals' scores
    /// (or the training normals' when nothing is held out), with its rates on the test set.
    fn decide(
        &self,
        calibration_scores: &NormalScores,
        normaliser: &Normaliser,
        test: &RawScores,
    ) -> Result<Decision> {
        let c = calibration_scores;
        let per_input: Vec<f64> = (0..c.scores.len())
            .map(|i| normaliser.score(&c.scores, i))
            .collect();
        let source = if self.holdout_items.is_empty() {
            TRAINING
        } else {
            HELD_OUT
        };
        let cut = self
            .cut
            .as_ref()
            .map(|(offsets, side, patch)| (offsets.as_slice(), *side, *patch));
        let calibration = Calibration::from_inputs(
            &per_input,
            (&c.groups, c.images),
            self.config.settings.fpr,
            source,
            cut,
        )?;
        let test_images = image_nor(test, &self.test_groups, self.test_labels.len(), normaliser);
        let (test_fpr, test_tpr) =
            rates_at(&test_images, &self.test_labels, calibration.threshold)?;
        Ok(Decision {
            calibration,
            test_fpr,
            test_tpr,
        })
    }
}

impl ClassSession for Session {
    fn evaluate(&mut self, model: &MtadModel, epoch: usize) -> Result<Option<f64>> {
        let started = Instant::now();
        let test = score_loader(model, self.test_loader.as_ref(), "the test inputs")?;
        let train = score_loader(
            model,
            self.norm_loader.as_ref(),
            "the normal training inputs",
        )?;
        let held = match &self.holdout_loader {
            Some(loader) => Some(score_loader(
                model,
                loader.as_ref(),
                "the held-out normal inputs",
            )?),
            None => None,
        };
        if let Some(e) = self.batch_errors.take() {
            return Err(e);
        }
        for (what, s) in [
            ("test", Some(&test)),
            ("normal training", Some(&train)),
            ("held-out", held.as_ref()),
        ] {
            if let Some(i) = s.and_then(RawScores::first_non_finite) {
                return Err(Error::Training(format!(
                    "class {}: the score of {what} input {i} is not finite at epoch {epoch}; \
                     the model diverged (lower --lr and rerun)",
                    self.name()
                )));
            }
        }
        let normaliser = Normaliser::fit(&train)?;
        let evaluation = full_evaluation(
            &test,
            (&self.test_groups, &self.test_labels, &self.test_defects),
            &normaliser,
            self.pixels.as_deref(),
            self.config.settings.teachers == TeacherChoice::None,
        )?;
        let calibration_scores = match held {
            Some(held) => normal_scores(&self.norm_set, &self.holdout_items, held),
            None => normal_scores(&self.norm_set, &self.norm_items, train.clone()),
        };
        let decision = self.decide(&calibration_scores, &normaliser, &test)?;
        if let Some(note) = &decision.calibration.note
            && self.progress.history.is_empty()
        {
            tracing::warn!("[{}] threshold: {note}", self.name());
        }
        let oracle = evaluation.as_ref().map(|e| e.oracle());
        self.progress.history.retain(|r| r.epoch < epoch);
        self.progress.history.push(EvalRecord {
            epoch,
            oracle: oracle.map(|o| o.0),
            nor: evaluation.as_ref().map(|e| e.nor),
        });
        let record = BestRecord {
            epoch,
            evaluation: evaluation.clone(),
            normaliser,
            decision: Some(decision),
        };
        // The reference's choice (tracked under both protocols, where labels exist).
        let improved = oracle.is_some_and(|(o, _)| {
            self.progress
                .best
                .as_ref()
                .and_then(|b| b.evaluation.as_ref())
                .is_none_or(|b| o > b.oracle().0)
        });
        if improved {
            self.progress.best = Some(record.clone());
        }
        let deploy = match self.config.protocol() {
            Protocol::Reference if evaluation.is_some() => improved,
            // The last evaluation (the reference protocol without test labels falls back to it).
            _ => true,
        };
        if deploy {
            let all: Vec<usize> = (0..self.test_set.len()).collect();
            let labels: Vec<u8> = self
                .test_groups
                .iter()
                .map(|&g| self.test_labels[g])
                .collect();
            write_scores(
                &self.dir.join(TEST_SCORES),
                &self.test_set.described(&all),
                &labels,
                &test,
            )?;
            write_scores(
                &self.dir.join(TRAIN_SCORES),
                &self.norm_set.described(&self.norm_items),
                &vec![0; self.norm_items.len()],
                &train,
            )?;
            Artifact::write(
                &self.dir.join(ARTIFACT_FILE),
                (self.progress.index, self.name()),
                &self.config,
                &record,
                model,
                self.stats.as_deref(),
                calibration_scores,
            )?;
            self.progress.deployed = Some(record.clone());
        }
        if self.config.settings.save_model {
            self.save_models(model, &self.dir.join(format!("epoch-{epoch}")))?;
        }
        write_tables(&self.out, &self.config, Some(&self.progress))?;
        if self.plain {
            let measured = match (&evaluation, oracle) {
                (Some(e), Some((oracle, column))) => format!(
                    "AUC oracle {oracle:.4} ({}), leakage-free nor {:.4}{}",
                    column_names()[column],
                    e.nor,
                    e.pixel_nor
                        .map_or(String::new(), |p| format!(", pixel AUROC (nor) {p:.4}"))
                ),
                _ => "no AUC (the test set lacks good or defect images)".to_string(),
            };
            let d = &record.decision.as_ref().expect("decided").calibration;
            tracing::info!(
                "[{}] epoch {epoch}: {measured}; threshold {:.4} at FPR {} on {} {}{} ({:.1} s)",
                self.name(),
                d.threshold,
                d.fpr,
                d.images,
                d.source,
                if deploy { "; deployed: saved" } else { "" },
                started.elapsed().as_secs_f64()
            );
        }
        Ok(oracle.map(|o| o.0))
    }

    fn checkpointed(
        &mut self,
        epoch: usize,
        partial: Option<PartialEpoch>,
        sha256: BTreeMap<String, String>,
    ) -> Result<()> {
        let previous = self.progress.checkpoint_epoch.replace(epoch);
        self.progress.partial = partial;
        self.progress.checkpoint_sha256 = sha256;
        write_progress(&self.dir, &self.progress)?;
        if let Some(old) = previous.filter(|&old| old != epoch) {
            for part in CHECKPOINT_PARTS {
                let path = AtomicCheckpointer::path(&self.checkpoint_dir, part, old);
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ClassProgress> {
        self.finish_class()
    }

    fn epoch_trained(&mut self, epoch: usize, losses: &EpochLosses) {
        if self.plain {
            let kd = losses
                .distillation
                .map_or(String::new(), |d| format!(", distillation {d:.4}"));
            tracing::info!(
                "[{}] epoch {epoch}/{}: loss {:.4} (reconstruction {:.4}{kd}), {} steps, {:.1} s",
                self.name(),
                self.config.settings.epochs,
                losses.total,
                losses.reconstruction,
                losses.steps,
                losses.seconds
            );
        }
    }
}

impl Session {
    fn finish_class(&mut self) -> Result<ClassProgress> {
        self.progress.complete = true;
        self.progress.checkpoint_epoch = None;
        self.progress.checkpoint_sha256.clear();
        self.progress.partial = None;
        write_progress(&self.dir, &self.progress)?;
        write_tables(&self.out, &self.config, Some(&self.progress))?;
        // A finished class is never resumed: its checkpoint (for vgg11 about 2 GB of weights
        // and Adam state) has served its purpose; model.mtad holds the best evaluation.
        if self.checkpoint_dir.exists() {
            std::fs::remove_dir_all(&self.checkpoint_dir)
                .map_err(|e| Error::io(&self.checkpoint_dir, e))?;
        }
        Ok(self.progress.clone())
    }
}

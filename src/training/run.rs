//! A whole training run: each class in turn through Burn's Learner with our evaluation
//! strategy (see `strategy`), its data from `class_data` and its evaluations from `session`.
//! Every file of the run folder is written through `crate::output`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::train::metric::LossMetric;
use burn::train::{Learner, SupervisedTraining, TrainingStrategy};
use mtad_kernels::adam::Adam;
use mtad_kernels::is_flex;

use super::cache::EmbeddingCache;
use super::class_data::{ClassData, TrainKind, cached_teachers};
use super::crop_batcher::{CropBatcher, CropTeachers, Prefetch};
use super::inputs::{CachedBatcher, CachedTeachers, EpochShuffled, ErrorSlot, mix};
use super::interrupt;
use super::model::{AucMetric, InputBatch, MtadModelConfig};
use super::prepare::{DataSet, Prepared};
use super::session::Session;
use super::strategy::{
    AtomicCheckpointer, CHECKPOINT_PARTS, ClassSession, EvalEveryStrategy, EvalSchedule,
    SaveCounter, SaveWhenAsked,
};
use crate::config::TrainConfig;
use crate::output::run_folder::{
    ClassProgress, PROGRESS_FILE, SideBySide, class_dir, read_progress,
};
use crate::scoring::evaluation::ClassEvaluation;
use crate::{Error, Result};

/// The result of one class.
#[derive(Debug, Clone)]
pub struct ClassResult {
    pub index: usize,
    pub name: String,
    /// The evaluation `model.mtad` holds (the run's protocol's choice).
    pub deployed_epoch: usize,
    /// Its evaluation (none when the test set lacks good or defect images).
    pub evaluation: Option<ClassEvaluation>,
    /// Both protocols' headline numbers.
    pub side_by_side: SideBySide,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub config: TrainConfig,
    pub classes: Vec<ClassResult>,
    /// Network inputs that went through the teachers in this run.
    pub teacher_inputs: u64,
    /// What the reference's way (teachers at every epoch and evaluation) would have needed.
    pub reference_teacher_inputs: u64,
    pub seconds: f64,
}

impl Prepared {
    /// Trains and evaluates every class in turn.
    pub fn run(self) -> Result<RunSummary> {
        let started = Instant::now();
        if !self.resume {
            // A covered directory may hold an older run's progress: it is not this run's.
            for &class in &self.config.class_indices {
                let path =
                    class_dir(&self.out, &self.config.class_names[class]).join(PROGRESS_FILE);
                if path.exists() {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        let before = self.teacher_inputs();
        let mut results = Vec::new();
        let mut reference_inputs = 0u64;
        let cifar_caches = match (&self.data, &self.runner) {
            (DataSet::Cifar(cifar), Some(runner)) => Some(self.cifar_caches(cifar, runner)?),
            _ => None,
        };
        for (position, &class) in self.config.class_indices.iter().enumerate() {
            let name = self.config.class_names[class].clone();
            tracing::info!(
                "== class {class} ({name}), {}/{}: student {}, {} epochs, evaluation every {} ==",
                position + 1,
                self.config.class_indices.len(),
                self.config.settings.student,
                self.config.settings.epochs,
                self.config.settings.eval_every
            );
            let data = match &self.data {
                DataSet::Cifar(cifar) => self.cifar_class(cifar, class, cifar_caches.as_ref())?,
                DataSet::Folder(categories) => self.folder_class(class, &categories[position])?,
            };
            let evals = EvalSchedule {
                epochs: self.config.settings.epochs,
                every: self.config.settings.eval_every,
            }
            .eval_epochs()
            .len() as u64;
            reference_inputs += data.reference_stats
                + data.reference_per_epoch * self.config.settings.epochs as u64
                + data.reference_per_eval * evals;
            results.push(self.train_class(class, &name, data)?);
        }
        let summary = RunSummary {
            out: self.out.clone(),
            config: self.config.clone(),
            classes: results,
            teacher_inputs: self.teacher_inputs() - before,
            reference_teacher_inputs: if self.runner.is_some() {
                reference_inputs
            } else {
                0
            },
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(summary)
    }

    fn teacher_inputs(&self) -> u64 {
        self.runner
            .as_ref()
            .map_or(0, |r| r.inputs_forwarded.load(Ordering::Relaxed))
    }

    fn train_class(&self, class: usize, name: &str, data: ClassData) -> Result<ClassResult> {
        let c = &self.config;
        let dir = class_dir(&self.out, name);
        let checkpoint_dir = dir.join("checkpoint");
        let previous = if self.resume {
            read_progress(&dir)?
        } else {
            None
        };
        if let Some(progress) = &previous
            && progress.complete
            && progress.deployed().is_some()
        {
            tracing::info!("{name}: already complete in {}: skipped", dir.display());
            return Ok(ClassResult::of(progress));
        }
        let resume_epoch = previous
            .as_ref()
            .and_then(|p| p.checkpoint_epoch)
            .filter(|&e| {
                CHECKPOINT_PARTS
                    .iter()
                    .all(|part| AtomicCheckpointer::path(&checkpoint_dir, part, e).is_file())
            });
        let progress = match (&previous, resume_epoch) {
            (Some(p), Some(_)) => p.clone(),
            _ => ClassProgress {
                index: class,
                name: name.to_string(),
                ..ClassProgress::default()
            },
        };
        if let Some(e) = resume_epoch {
            verify_checkpoint(&checkpoint_dir, e, &progress)?;
            match &progress.partial {
                Some(p) => tracing::info!(
                    "{name}: resuming from the checkpoint of epoch {e}, after its step {}",
                    p.steps
                ),
                None => tracing::info!("{name}: resuming from the checkpoint of epoch {e}"),
            }
        }
        let progress_partial = resume_epoch.and(progress.partial.clone());
        if let Some(signal) = interrupt::requested() {
            return Err(Error::Interrupted {
                signal,
                message: format!(
                    "stopped by {} before class {name} started; continue with `mtad train \
                     --resume --out {}`",
                    interrupt::signal_name(signal),
                    self.out.display()
                ),
            });
        }
        if let Some(stats) = &data.stats {
            stats.save(&dir.join("teacher_stats.bin"))?;
        }

        let training_device = self.device.clone().autodiff();
        let errors = ErrorSlot::default();
        let cached = |cache: &Option<Arc<EmbeddingCache>>| cached_teachers(cache, &data.stats);
        let epoch = Arc::new(AtomicUsize::new(0));
        let order_seed = mix(c.settings.seed, class as u64, 1);
        let train_dataset = EpochShuffled::new(data.train_items.clone(), order_seed, epoch.clone());
        let skip = train_dataset.skip();
        let items_per_step = c.batch_size();
        let train_loader: Arc<dyn DataLoader<InputBatch>> = match &data.train {
            TrainKind::Cached(set) => DataLoaderBuilder::new(CachedBatcher {
                set: set.clone(),
                teachers: cached(&data.norm_cache),
                errors: errors.clone(),
            })
            .batch_size(c.batch_size())
            .set_device(training_device.clone())
            .build(train_dataset),
            TrainKind::Crops { source, pool } => {
                let teachers = match (&self.runner, &data.stats, pool) {
                    (Some(_), Some(stats), Some((offsets, cache))) => CropTeachers::Pool {
                        offsets: offsets.clone(),
                        cached: CachedTeachers {
                            raw: cache.clone(),
                            stats: stats.clone(),
                        },
                    },
                    (Some(runner), Some(stats), None) => CropTeachers::OnTheFly {
                        runner: runner.clone(),
                        stats: stats.clone(),
                    },
                    _ => CropTeachers::None,
                };
                DataLoaderBuilder::new(CropBatcher {
                    source: source.clone(),
                    full: c.full_size,
                    side: c.settings.image_size,
                    crops: c.settings.crops_per_batch,
                    seed: mix(c.settings.seed, class as u64, 2),
                    teachers,
                    errors: errors.clone(),
                    on_device: !is_flex(&training_device),
                    prefetch: (!is_flex(&training_device))
                        .then(|| Arc::new(Prefetch::new(data.train_items.clone(), order_seed))),
                })
                .batch_size(c.batch_size())
                .set_device(training_device.clone())
                .build(train_dataset)
            }
        };
        let (test_loader, norm_loader, holdout_loader) = self.eval_loaders(&data, &errors);
        let norm_items = data.norm_items.clone();
        write_holdout_list(&dir, &data.holdout_names)?;

        let session = Session {
            config: c.clone(),
            out: self.out.clone(),
            dir: dir.clone(),
            checkpoint_dir: checkpoint_dir.clone(),
            progress,
            test_loader: test_loader.clone(),
            norm_loader,
            test_set: data.test_set.clone(),
            norm_set: data.norm_set.clone(),
            norm_items,
            holdout_loader,
            holdout_items: data.holdout_items.clone(),
            test_groups: data.test_groups.clone(),
            test_labels: data.test_labels.clone(),
            test_defects: data.test_defects.clone(),
            stats: data.stats.clone(),
            pixels: data.pixels.clone(),
            cut: data.cut.clone(),
            batch_errors: errors.clone(),
            plain: self.plain,
        };
        let session: Arc<Mutex<Box<dyn ClassSession>>> = Arc::new(Mutex::new(Box::new(session)));
        let saves = SaveCounter::default();
        let failure = ErrorSlot::default();
        let strategy = EvalEveryStrategy {
            device: training_device.clone(),
            schedule: EvalSchedule {
                epochs: c.settings.epochs,
                every: c.settings.eval_every,
            },
            epoch,
            session: session.clone(),
            saves: saves.clone(),
            batch_errors: errors.clone(),
            failure: failure.clone(),
            seed: mix(c.settings.seed, class as u64, 4),
            resume_partial: progress_partial,
            skip,
            items_per_step,
            checkpoint_every: c
                .settings
                .checkpoint_every
                .map(|m| std::time::Duration::from_secs_f64(m * 60.0)),
        };
        let label = format!("class {name}, student {}", c.settings.student);
        let mut training = SupervisedTraining::new(dir.join("burn"), train_loader, test_loader)
            .num_epochs(c.settings.epochs)
            .metric_train_numeric(LossMetric::new())
            .metric_valid_numeric(AucMetric::new("oracle"))
            .with_custom_checkpointers(
                AtomicCheckpointer::new(&checkpoint_dir, "model", saves.clone()),
                AtomicCheckpointer::new(&checkpoint_dir, "optim", saves.clone()),
                AtomicCheckpointer::new(&checkpoint_dir, "scheduler", saves.clone()),
            )
            .with_checkpointing_strategy(SaveWhenAsked)
            .with_application_logger(None)
            .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
            .label(&label);
        if self.plain {
            training = training.renderer(Box::new(super::renderer::QuietRenderer));
        }
        if let Some(e) = resume_epoch {
            training = training.checkpoint(e);
        }
        training_device.seed(mix(c.settings.seed, class as u64, 3));
        let model = MtadModelConfig::new(
            c.settings.student,
            c.settings.image_size,
            c.teacher_names.len(),
        )
        .init(&training_device)?;
        let optimizer = Adam::module_optimizer();
        let result = training.launch(Learner::new(model, optimizer, c.settings.lr));
        if let Some(e) = failure.take() {
            return Err(e);
        }
        if let Some(e) = result.error {
            return Err(Error::Training(format!("class {name}: {e}")));
        }
        if let Some(interruption) = result.interrupted {
            return Err(Error::Training(format!(
                "class {name}: training was stopped ({}); continue with --resume",
                interruption.reason.unwrap_or_else(|| "by request".into())
            )));
        }
        let mut session = session.lock().expect("class session");
        let progress = session.finish()?;
        if progress.deployed().is_none() {
            return Err(Error::Training(format!(
                "class {name}: no evaluation was made"
            )));
        }
        Ok(ClassResult::of(&progress))
    }
}

/// The held-out images of a class, one per line, in `<class>/holdout.txt` (removed when nothing
/// is held out).
pub(crate) const HOLDOUT_FILE: &str = "holdout.txt";

fn write_holdout_list(dir: &std::path::Path, names: &[String]) -> Result<()> {
    let path = dir.join(HOLDOUT_FILE);
    if names.is_empty() {
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut text = names.join("\n");
    text.push('\n');
    crate::output::write_atomic(&path, text.as_bytes())
}

impl ClassResult {
    /// A finished class's result from its progress (which has a deployed evaluation).
    fn of(progress: &ClassProgress) -> Self {
        let deployed = progress
            .deployed()
            .expect("a finished class has a deployed evaluation");
        Self {
            index: progress.index,
            name: progress.name.clone(),
            deployed_epoch: deployed.epoch,
            evaluation: deployed.evaluation.clone(),
            side_by_side: progress.side_by_side(),
        }
    }
}

/// Checks each file of the checkpoint of `epoch` against the sha256 recorded when it was
/// written (runs written before the digests were recorded are not checked).
fn verify_checkpoint(dir: &std::path::Path, epoch: usize, progress: &ClassProgress) -> Result<()> {
    for part in CHECKPOINT_PARTS {
        let path = AtomicCheckpointer::path(dir, part, epoch);
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(want) = progress.checkpoint_sha256.get(&name) else {
            continue;
        };
        if &crate::output::file_sha256_hex(&path)? != want {
            return Err(Error::invalid_file(
                &path,
                format!(
                    "the checkpoint is damaged (its sha256 is not the one recorded when it was \
                     written); remove the class folder {} to train this class again from the \
                     start with --resume",
                    dir.parent().unwrap_or(dir).display()
                ),
            ));
        }
    }
    Ok(())
}

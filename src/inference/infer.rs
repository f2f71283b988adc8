//! `mtad infer`: a trained run's dataset and teachers reopened, each class's best models from
//! its `model.mtad` score the test set again, and `<run>/infer/Eval_<student>.csv` is written
//! (the reference's inference script).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;

use crate::output::artifact::{ARTIFACT_FILE, Artifact};
use crate::output::lock::RunLock;
use crate::output::run_folder::{class_dir, read_config, read_progress};
use crate::output::tables::{EvalRow, eval_table_path, table_note, write_eval_table};
use crate::scoring::evaluation::Normaliser;
use crate::teachers::{TeacherChoice, WeightsLocation};
use crate::training::inputs::ErrorSlot;
use crate::training::prepare::{
    DataSet, Prepared, check_writable, invalid, load_teachers, open_dataset, teacher_identity,
};
use crate::training::session::{full_evaluation, score_loader};
use crate::{Error, Result};

impl Prepared {
    /// Reopens a trained run's dataset and teachers to score with its saved models (`mtad
    /// infer`). `data_root` replaces the one in `config.json` (the data moved); the teachers
    /// must be the ones the run was trained with.
    pub fn for_run(
        run: &Path,
        data_root: Option<PathBuf>,
        weights: &WeightsLocation,
        device: Device,
    ) -> Result<Self> {
        let mut config = read_config(run)?;
        // infer writes into the run folder: not while another process (a training) does.
        let lock = RunLock::acquire(run, "infer")?;
        if let Some(root) = data_root {
            config.settings.data_root = Some(root);
        }
        let spec: Vec<String> = config.class_indices.iter().map(usize::to_string).collect();
        let (data, class_names, _) =
            open_dataset(config.dataset(), config.data_root(), &spec.join(","))?;
        if class_names != config.class_names {
            return Err(invalid(format!(
                "{}: its classes are not those of the run ({} vs {})",
                config.data_root().display(),
                class_names.join(", "),
                config.class_names.join(", ")
            )));
        }
        let runner = load_teachers(&config.settings, weights, &device)?;
        let (names, sha256) = teacher_identity(runner.as_deref());
        if sha256 != config.teacher_sha256 {
            return Err(Error::Teacher {
                name: names.join(", "),
                message: format!(
                    "{} was trained with other teachers (sha256 {:?}, this binary has {:?}); its \
                     scores are only valid with those",
                    run.display(),
                    config.teacher_sha256,
                    sha256
                ),
            });
        }
        check_writable(&config.settings.cache_dir)?;
        Ok(Self {
            config,
            out: run.to_path_buf(),
            data,
            runner,
            device,
            plain: true,
            resume: false,
            _lock: lock,
        })
    }

    /// Scores every class's test inputs with its best models and saved teacher statistics,
    /// normalises with its normal training inputs, and writes `infer/Eval_<student>.csv`.
    pub fn infer(&self) -> Result<Vec<EvalRow>> {
        let cifar_caches = match (&self.data, &self.runner) {
            (DataSet::Cifar(cifar), Some(runner)) => Some(self.cifar_caches(cifar, runner)?),
            _ => None,
        };
        let mut rows = Vec::new();
        for (position, &class) in self.config.class_indices.iter().enumerate() {
            let name = self.config.class_names[class].clone();
            let dir = class_dir(&self.out, &name);
            let artifact = Artifact::read(&dir.join(ARTIFACT_FILE))?;
            let header = &artifact.header;
            self.config.check_model_fits(
                &artifact.path,
                &header.config,
                (header.class_index, &header.class_name),
                &name,
            )?;
            let mut data = match &self.data {
                DataSet::Cifar(cifar) => self.cifar_class(cifar, class, cifar_caches.as_ref())?,
                DataSet::Folder(categories) => self.folder_class(class, &categories[position])?,
            };
            data.stats = artifact.statistics(self.runner.as_deref())?.map(Arc::new);
            let model = artifact.model(&self.device)?;
            let deployed = &artifact.header.deployed;
            let errors = ErrorSlot::default();
            let (test_loader, norm_loader, _) = self.eval_loaders(&data, &errors);
            let test = score_loader(
                &model,
                test_loader.as_ref(),
                &format!("{name}'s test inputs"),
            )?;
            let train = score_loader(
                &model,
                norm_loader.as_ref(),
                &format!("{name}'s normal training inputs"),
            )?;
            if let Some(e) = errors.take() {
                return Err(e);
            }
            let normaliser = Normaliser::fit(&train)?;
            let evaluation = full_evaluation(
                &test,
                (&data.test_groups, &data.test_labels, &data.test_defects),
                &normaliser,
                data.pixels.as_deref(),
                self.config.settings.teachers == TeacherChoice::None,
            )?;
            match &evaluation {
                Some(e) => tracing::info!(
                    "[{name}] oracle {:.4}, nor {:.4}{} (deployed evaluation: epoch {})",
                    e.oracle().0,
                    e.nor,
                    e.pixel_nor
                        .map_or(String::new(), |p| format!(", pixel AUROC (nor) {p:.4}")),
                    deployed.epoch
                ),
                None => tracing::info!(
                    "[{name}] no AUC: the test set lacks good or defect images (deployed \
                     evaluation: epoch {})",
                    deployed.epoch
                ),
            }
            // Both protocols' numbers come from the training's evaluations.
            let side_by_side = read_progress(&dir)?.map(|p| p.side_by_side());
            rows.push(EvalRow {
                index: class,
                name,
                epoch: Some(deployed.epoch),
                evaluation,
                side_by_side,
            });
        }
        let path = eval_table_path(&self.out.join("infer"), self.config.settings.student);
        let unlabelled: Vec<&str> = rows
            .iter()
            .filter(|r| r.evaluation.is_none())
            .map(|r| r.name.as_str())
            .collect();
        write_eval_table(
            &path,
            table_note(&self.config, &unlabelled).as_deref(),
            &rows,
        )?;
        Ok(rows)
    }
}

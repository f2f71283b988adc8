//! The settings of a training run, declared once.
//!
//! [`TrainSettings`] is both the `mtad train` options (clap) and the settings part of a run's
//! `config.json` (serde): the same field names are the long flags (`eval_every` is
//! `--eval-every`), the keys of a `--config FILE` (TOML or JSON) and the keys of `config.json`.
//! [`TrainConfig`] is what a run resolved from them (class indices, geometry, teachers) and is
//! what `config.json` holds.

use std::path::{Path, PathBuf};

use clap::Args;
use clap::builder::RangedU64ValueParser;
use serde::{Deserialize, Serialize};

use crate::data::DatasetKind;
use crate::data::crops::{CROP_SIZE, CROPS_PER_BATCH};
use crate::students::StudentKind;
use crate::teachers::TeacherChoice;
use crate::{Error, Result};

mod batch;
mod protocol;
pub use batch::{check_batch_size, default_batch_size};
use protocol::default_fpr;
pub use protocol::{DEFAULT_FPR, DEFAULT_HOLDOUT, MAX_HOLDOUT, Protocol, check_decision_settings};

/// The most crop offsets `--crop-pool` may draw per image: their teacher embeddings are cached
/// (4 KB per teacher and crop), 1024 already being 12 MB per image with three teachers.
pub const MAX_CROP_POOL: usize = 1024;
/// Bounds of the other sizes a user chooses, checked before anything is allocated: inputs of
/// at most 512 pixels (the method uses 224), 1024 images and inputs per training step, 256
/// crops per MVTec image (the reference takes 16), a million epochs.
pub const MAX_IMAGE_SIZE: usize = 512;
pub const MAX_BATCH_SIZE: usize = 1024;
pub const MAX_CROPS_PER_BATCH: usize = 256;
pub const MAX_EPOCHS: usize = 1_000_000;

/// Every setting a user chooses for a training run.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
pub struct TrainSettings {
    /// What kind of dataset --data-root holds (required, here or in --config FILE).
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// The dataset's root folder (MVTec/folder: the folder of categories; CIFAR-10:
    /// cifar-10-batches-py, cifar-10-batches-bin or their parent). Required, here or in
    /// --config FILE.
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// Student architecture: resnet (resnet18), vgg (vgg11) or densenet (densenet121).
    #[arg(long, value_enum, default_value_t = StudentKind::Resnet)]
    pub student: StudentKind,
    /// Normal classes to train, one after the other: `all`, indices and ranges (`0-14`,
    /// `3,5-7`) or names (`bottle,screw`; CIFAR-10: `airplane,cat`; folder: category names).
    #[arg(long, default_value = "all")]
    pub classes: String,
    /// Training epochs per class.
    #[arg(long, default_value_t = 500, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_EPOCHS as u64))]
    pub epochs: usize,
    /// Evaluate (ROC AUC on the test set, keep the best models, checkpoint) every N epochs and
    /// at the last epoch.
    #[arg(long, default_value_t = 50, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub eval_every: usize,
    /// Images per training step. CIFAR-10: inputs per training and evaluation batch (default
    /// 32). MVTec/folder: full images per step (default the reference's 4), each cut at
    /// --crops-per-batch random offsets (4 x 16 = 64 inputs); larger batches keep a GPU busy.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_BATCH_SIZE as u64))]
    pub batch_size: Option<usize>,
    /// Adam learning rate (PyTorch defaults otherwise: betas 0.9/0.999, eps 1e-8).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the data order and the random crops (the networks' initialisation is random).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the network inputs. The method uses 224; smaller multiples of 32 (with
    /// --tiny-teachers) make quick CPU trials. MVTec images are resized and cut to scale
    /// (224 -> 1024 images, stride 200; 32 -> 148, stride 29).
    #[arg(long, default_value_t = 224, value_parser = RangedU64ValueParser::<usize>::new().range(32..=MAX_IMAGE_SIZE as u64))]
    pub image_size: usize,
    /// MVTec/folder, a REDUCED PROTOCOL for quick trials: draw N crop offsets once, shared by
    /// every image and every epoch, and cache their teacher embeddings, so the teachers never
    /// run during training (default: the reference's fresh random crops, teachers run on every
    /// batch). Flagged in the tables, config.json and the report.
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CROP_POOL as u64))]
    pub crop_pool: Option<usize>,
    /// MVTec/folder: random crops per training batch of 4 images (each offset cuts all 4).
    #[arg(long, default_value_t = CROPS_PER_BATCH, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CROPS_PER_BATCH as u64))]
    pub crops_per_batch: usize,
    /// Teachers: `all` (the method), `resnet152` (single-teacher ablation) or `none` (no-teacher
    /// ablation: an autoencoder scored by AS_rec).
    #[arg(long, value_enum, default_value_t = TeacherChoice::All)]
    pub teachers: TeacherChoice,
    /// Use the tiny random fixture teachers instead of the real ImageNet ones (quick CPU trials;
    /// every output of such a run says so).
    #[arg(long)]
    pub tiny_teachers: bool,
    /// Also keep the models of every evaluation in `<class>/epoch-<N>/` (the best evaluation's
    /// are always kept, with all scoring needs, in `<class>/model.mtad`).
    #[arg(long)]
    pub save_model: bool,
    /// Folder of the teacher-embedding caches, shared by runs.
    #[arg(long, value_name = "DIR", default_value = "models/cache")]
    pub cache_dir: PathBuf,
    /// Also write a checkpoint every MINUTES of training, at the end of the step where they are
    /// up (otherwise only at evaluations), so that a kill -9 or a preempted job loses at most
    /// that much; `--resume` continues from that step. May differ when resuming.
    #[arg(long, value_name = "MINUTES")]
    #[serde(default)]
    pub checkpoint_every: Option<f64>,
    /// How the deployed model and the threshold are decided. `label-free` (the default for
    /// `--dataset folder`): --holdout of the normal training images are set aside, the last
    /// evaluation is deployed and the threshold is calibrated on the held-out images; no test
    /// label decides anything. `reference` (the default for `mvtec` and `cifar10`): the
    /// reference's protocol, every training image trains and the evaluation with the best oracle
    /// AUC (chosen with the test labels) is deployed. Where test labels exist, both protocols'
    /// numbers are reported side by side.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Share of the normal training images set aside (seeded by --seed) before anything is
    /// fitted: they never train the student, decoder or weighting nor enter the teacher
    /// statistics, and the threshold is calibrated on their scores. Default: 0.2 with the
    /// label-free protocol, 0 (must be) with the reference protocol.
    #[arg(long, value_name = "FRACTION")]
    #[serde(default)]
    pub holdout: Option<f64>,
    /// Operating point: the threshold is the score that this share of the held-out normal
    /// images exceed (0.01: about 1 in 100 good parts flagged). `detect --fpr` moves it later.
    #[arg(long, value_name = "RATE", default_value_t = DEFAULT_FPR)]
    #[serde(default = "default_fpr")]
    pub fpr: f64,
}

impl TrainSettings {
    /// The settings' names: the keys of `--config FILE` and the flags' ids.
    pub fn keys() -> Vec<String> {
        let value = serde_json::to_value(Self::tiny_folder(Path::new("."), Path::new(".")))
            .expect("settings serialise");
        value
            .as_object()
            .expect("settings are an object")
            .keys()
            .cloned()
            .collect()
    }

    /// A quick CPU trial on a folder dataset: every class, the tiny teachers, 32x32 inputs,
    /// 4 crops per batch, 3 epochs evaluated at the end (the demo and the tests start here).
    pub fn tiny_folder(data_root: &Path, cache_dir: &Path) -> Self {
        Self {
            dataset: Some(DatasetKind::Folder),
            data_root: Some(data_root.to_path_buf()),
            student: StudentKind::Resnet,
            classes: "all".into(),
            epochs: 3,
            eval_every: 3,
            batch_size: None,
            lr: 1e-3,
            seed: 0,
            image_size: 32,
            crop_pool: None,
            crops_per_batch: 4,
            teachers: TeacherChoice::All,
            tiny_teachers: true,
            save_model: false,
            cache_dir: cache_dir.to_path_buf(),
            checkpoint_every: None,
            protocol: None,
            holdout: None,
            fpr: DEFAULT_FPR,
        }
    }

    /// These settings with `file`'s values for every key that `explicit` does not name (the
    /// flags given on the command line win over the file). `file` holds TOML or JSON (by its
    /// extension; JSON otherwise); keys that are not settings are refused, except the resolved
    /// fields of a run's `config.json` when `allow_run_config` is set.
    pub fn merged_with_file(
        &self,
        file: &Path,
        explicit: &dyn Fn(&str) -> bool,
        allow_run_config: bool,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let values: serde_json::Map<String, serde_json::Value> = if file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
        {
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| Error::invalid_file(file, e.to_string()))?;
            serde_json::to_value(table)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .ok_or_else(|| Error::invalid_file(file, "not a table of settings"))?
        } else {
            serde_json::from_str(&text).map_err(|e| Error::invalid_file(file, e.to_string()))?
        };
        let keys = Self::keys();
        let resolved = TrainConfig::resolved_keys();
        let mut merged = serde_json::to_value(self).expect("settings serialise");
        let object = merged.as_object_mut().expect("settings are an object");
        for (key, value) in values {
            let key = key.replace('-', "_");
            if keys.contains(&key) {
                if !explicit(&key) {
                    object.insert(key, value);
                }
            } else if !(allow_run_config && resolved.contains(&key.as_str())) {
                return Err(Error::invalid_file(
                    file,
                    format!("`{key}` is not a setting (settings: {})", keys.join(", ")),
                ));
            }
        }
        serde_json::from_value(merged).map_err(|e| Error::invalid_file(file, e.to_string()))
    }
}

/// Every setting of a run, with what was resolved from them; saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The settings as chosen (`dataset` and `data_root` are always set in a run's config).
    #[serde(flatten)]
    pub settings: TrainSettings,
    /// The classes to train, as indices into `class_names`.
    pub class_indices: Vec<usize>,
    /// Every class of the dataset, in index order.
    pub class_names: Vec<String>,
    /// MVTec/folder: side of the resized images (1024) and full-cut stride (200).
    pub full_size: usize,
    pub stride: usize,
    /// CIFAR: side of the resize before the centre crop (256).
    pub cifar_resize: usize,
    pub teacher_names: Vec<String>,
    pub teacher_sha256: Vec<String>,
    /// The sha256 of the data the run trains and evaluates on (every file's path and content:
    /// see `training::prepare::data_sha256`); `--resume` refuses data that changed. Empty in
    /// runs written before it was recorded.
    #[serde(default)]
    pub data_sha256: String,
    /// How the deployed evaluation was chosen ([`Protocol::selection`]); empty in runs written
    /// before it was recorded (they used the reference's).
    #[serde(default)]
    pub deployed: String,
    /// Images per training step, resolved from `--batch-size` and the dataset; 0 in runs
    /// written before MVTec/folder steps could take other than the reference's 4.
    #[serde(default)]
    pub images_per_step: usize,
    /// How the run deviates from the method ([`TrainConfig::reduced`]; empty: it does not), as
    /// the tables' first line says it.
    #[serde(default)]
    pub notes: String,
    pub device: String,
    /// `mtad` version that wrote the run.
    pub version: String,
}

impl TrainConfig {
    /// The sizes that follow from `--image-size`: MVTec/folder's resized image side and
    /// full-cut stride (224 -> 1024 and 200), and CIFAR-10's resize before the crop (256).
    pub fn derived_sizes(image_size: usize) -> (usize, usize, usize) {
        use crate::data::crops::{CROP_SIZE, STRIDE};
        let stride = ((image_size * STRIDE) as f64 / CROP_SIZE as f64).round() as usize;
        let full_size = image_size + 4 * stride;
        let cifar_resize = ((image_size * 256) as f64 / CROP_SIZE as f64).round() as usize;
        (full_size, stride, cifar_resize)
    }

    /// Checks a config read from a file (`config.json`, a model's header) before anything is
    /// sized from it: the bounded settings within their bounds, the derived sizes those of its
    /// image size, classes and teachers consistent. The error says which value is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = &self.settings;
        if s.image_size < 32 || s.image_size % 32 != 0 || s.image_size > MAX_IMAGE_SIZE {
            return Err(format!(
                "image_size {} is not a multiple of 32 up to {MAX_IMAGE_SIZE}",
                s.image_size
            ));
        }
        let derived = Self::derived_sizes(s.image_size);
        if (self.full_size, self.stride, self.cifar_resize) != derived {
            return Err(format!(
                "full_size, stride, cifar_resize ({}, {}, {}) are not those of image_size {} \
                 ({}, {}, {})",
                self.full_size,
                self.stride,
                self.cifar_resize,
                s.image_size,
                derived.0,
                derived.1,
                derived.2
            ));
        }
        if s.crops_per_batch == 0 || s.crops_per_batch > MAX_CROPS_PER_BATCH {
            return Err(format!(
                "crops_per_batch {} is not from 1 to {MAX_CROPS_PER_BATCH}",
                s.crops_per_batch
            ));
        }
        check_batch_size(s.batch_size, s.crops_per_batch, self.dataset())?;
        if s.crop_pool
            .is_some_and(|n| !(1..=MAX_CROP_POOL).contains(&n))
        {
            return Err(format!("crop_pool is not from 1 to {MAX_CROP_POOL}"));
        }
        if s.epochs == 0 || s.epochs > MAX_EPOCHS || s.eval_every == 0 {
            return Err("epochs or eval_every out of range".into());
        }
        check_decision_settings(s)?;
        if self.class_names.is_empty()
            || self
                .class_indices
                .iter()
                .any(|&c| c >= self.class_names.len())
        {
            return Err("class_indices do not index class_names".into());
        }
        if self.teacher_names.len() != self.teacher_sha256.len() || self.teacher_names.len() > 3 {
            return Err("teacher_names and teacher_sha256 do not match".into());
        }
        Ok(())
    }

    /// The kind of dataset (present in every config a run wrote or read: see `read_config`).
    pub fn dataset(&self) -> DatasetKind {
        self.settings
            .dataset
            .expect("a run's config names its dataset (checked when it is made or read)")
    }

    /// Images per training step (`--batch-size`, or the dataset's default).
    pub fn batch_size(&self) -> usize {
        self.settings
            .batch_size
            .unwrap_or(default_batch_size(self.dataset()))
    }

    /// The run's protocol (runs written before it was recorded used the reference's).
    pub fn protocol(&self) -> Protocol {
        self.settings.protocol.unwrap_or_default()
    }

    /// The share of normal training images held out (0 in runs written before it existed).
    pub fn holdout(&self) -> f64 {
        self.settings.holdout.unwrap_or(0.0)
    }

    /// The dataset's root folder (present in every run's config, as `dataset`).
    pub fn data_root(&self) -> &Path {
        self.settings
            .data_root
            .as_deref()
            .expect("a run's config names its data root (checked when it is made or read)")
    }

    /// The keys of `config.json` that are resolved, not chosen.
    pub fn resolved_keys() -> [&'static str; 13] {
        [
            "deployed",
            "images_per_step",
            "notes",
            "class_indices",
            "class_names",
            "full_size",
            "stride",
            "cifar_resize",
            "teacher_names",
            "teacher_sha256",
            "data_sha256",
            "device",
            "version",
        ]
    }

    /// Refuses a model trained for something else than this run: another class, dataset, image
    /// size or teachers (`what` names the model file in the error).
    pub fn check_model_fits(
        &self,
        what: &Path,
        model: &TrainConfig,
        (class_index, class_name): (usize, &str),
        expected_class: &str,
    ) -> Result<()> {
        let mut differences = Vec::new();
        if class_name != expected_class {
            differences.push(format!(
                "class {class_name} (index {class_index}), not {expected_class}"
            ));
        }
        if model.dataset() != self.dataset() {
            differences.push(format!(
                "dataset {}, not {}",
                model.dataset().name(),
                self.dataset().name()
            ));
        }
        if model.settings.image_size != self.settings.image_size {
            differences.push(format!(
                "image size {}, not {}",
                model.settings.image_size, self.settings.image_size
            ));
        }
        if model.teacher_sha256 != self.teacher_sha256 {
            differences.push(format!(
                "teachers {:?}, not {:?}",
                model.teacher_names, self.teacher_names
            ));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_file(
                what,
                format!(
                    "this model was trained for {}: it does not belong to this run (retrain the \
                     class, or use the model's own run folder)",
                    differences.join(", ")
                ),
            ))
        }
    }

    /// Whether this run deviates from the method's teachers or resolution, said in every output.
    pub fn reduced(&self) -> Option<String> {
        let s = &self.settings;
        let mut notes = Vec::new();
        if s.tiny_teachers {
            notes.push("TINY RANDOM TEACHERS (not the ImageNet ones)".to_string());
        }
        if s.crops_per_batch != CROPS_PER_BATCH && self.dataset() != DatasetKind::Cifar10 {
            notes.push(format!(
                "{} crops per batch (the method uses {CROPS_PER_BATCH})",
                s.crops_per_batch
            ));
        }
        if s.image_size != CROP_SIZE {
            notes.push(format!(
                "reduced image size {} (the method uses {CROP_SIZE})",
                s.image_size
            ));
        }
        if let Some(n) = s.crop_pool
            && self.dataset() != DatasetKind::Cifar10
        {
            notes.push(format!(
                "REDUCED PROTOCOL: --crop-pool {n} (the same {n} crop offsets for every image \
                 and epoch; the method draws fresh random crops every batch)"
            ));
        }
        if self.holdout() > 0.0 {
            notes.push(format!(
                "{:.0}% of the normal training images held out (label-free protocol)",
                self.holdout() * 100.0
            ));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// Settings that must match for `--resume` to continue a run: the names of those that
    /// differ.
    pub fn resumable_from(&self, other: &TrainConfig) -> std::result::Result<(), String> {
        let mut a = self.clone();
        let mut b = other.clone();
        for c in [&mut a, &mut b] {
            c.device = String::new();
            c.version = String::new();
            // Compared on its own, with its own message (see `prepare`).
            c.data_sha256 = String::new();
            c.settings.cache_dir = PathBuf::new();
            c.settings.data_root = None;
            c.settings.checkpoint_every = None;
            // Derived from the settings compared (and absent in older runs).
            c.deployed = String::new();
            c.notes = String::new();
            c.images_per_step = 0;
        }
        if a == b {
            Ok(())
        } else {
            let ja = serde_json::to_value(&a).unwrap_or_default();
            let jb = serde_json::to_value(&b).unwrap_or_default();
            let differing: Vec<String> = ja
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| jb.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            Err(differing.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_file_fills_what_the_flags_do_not_give() {
        let dir = tempfile::tempdir().unwrap();
        let base = TrainSettings::tiny_folder(Path::new("data"), Path::new("cache"));
        let toml = write(
            dir.path(),
            "run.toml",
            "epochs = 7\nstudent = \"vgg\"\neval-every = 2\ndata_root = \"/d\"\n",
        );
        let explicit = |k: &str| k == "epochs";
        let merged = base.merged_with_file(&toml, &explicit, false).unwrap();
        assert_eq!(merged.epochs, 3, "a flag on the command line wins");
        assert_eq!(merged.student, StudentKind::Vgg);
        assert_eq!(merged.eval_every, 2);
        assert_eq!(merged.data_root, Some(PathBuf::from("/d")));
        let json = write(dir.path(), "run.json", r#"{"lr": 0.5, "seed": 9}"#);
        let merged = base.merged_with_file(&json, &|_| false, false).unwrap();
        assert_eq!((merged.lr, merged.seed), (0.5, 9));
    }

    #[test]
    fn the_resolved_keys_are_config_json_s_keys_beside_the_settings() {
        let config = TrainConfig {
            settings: TrainSettings::tiny_folder(Path::new("d"), Path::new("c")),
            class_indices: vec![0],
            class_names: vec!["a".into()],
            full_size: 148,
            stride: 29,
            cifar_resize: 37,
            teacher_names: Vec::new(),
            teacher_sha256: Vec::new(),
            data_sha256: String::new(),
            deployed: String::new(),
            images_per_step: 4,
            notes: String::new(),
            device: String::new(),
            version: String::new(),
        };
        let value = serde_json::to_value(&config).unwrap();
        let mut written: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        let mut expected = TrainSettings::keys();
        expected.extend(TrainConfig::resolved_keys().map(String::from));
        written.sort();
        expected.sort();
        assert_eq!(written, expected);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = TrainSettings::tiny_folder(Path::new("data"), Path::new("cache"));
        let typo = write(dir.path(), "typo.toml", "epoch = 7\n");
        let err = base
            .merged_with_file(&typo, &|_| false, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("typo.toml") && err.contains("`epoch`"),
            "{err}"
        );
        let bad = write(dir.path(), "bad.json", r#"{"epochs": "many"}"#);
        let err = base
            .merged_with_file(&bad, &|_| false, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.json"), "{err}");
        let resolved = write(dir.path(), "config.json", r#"{"class_names": ["a"]}"#);
        assert!(base.merged_with_file(&resolved, &|_| false, false).is_err());
        assert!(base.merged_with_file(&resolved, &|_| false, true).is_ok());
    }
}

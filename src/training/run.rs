//! A whole training run: checks every input before training starts, then trains and evaluates
//! each class through the Learner, and writes the run directory:
//!
//! ```text
//! <out>/config.json                 every setting, the teachers and their sha256s
//! <out>/finTS_<student>.csv         Normal Class, Class Name, Epoch, AUC (oracle), nor
//! <out>/Eval_<student>.csv          per class: the 69 columns, nor, oracle; then a mean row
//! <out>/<class>/teacher_stats.bin   the class's teacher normalisation
//! <out>/<class>/model.mtad          the best evaluation's models, statistics, normalisation and
//!                                   threshold in one file (see `artifact`)
//! <out>/<class>/scores_test.csv     per test input: path, patch, label, AS_z, AS_cossim, AS_rec
//! <out>/<class>/scores_train.csv    the same for the normal training inputs (for nor)
//! <out>/<class>/progress.json       evaluations so far and the latest checkpoint
//! <out>/<class>/checkpoint/         model/optim/scheduler-<epoch>.bpk (no teacher weights),
//!                                   removed when the class is finished
//! <out>/<class>/burn/               Burn's training logs
//! ```
//!
//! Every file is written atomically.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::module::Module;
use burn::prelude::*;
use burn::train::metric::LossMetric;
use burn::train::{Learner, SupervisedTraining, TrainingStrategy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::artifact::{ARTIFACT_FILE, Artifact, NormalScores};
use super::cache::{CacheOutcome, EmbeddingCache, cache_key};
use super::inputs::{
    CachedBatcher, CachedTeachers, CropBatcher, CropTeachers, EpochShuffled, ErrorSlot,
    ImageSource, InputSet, Listed, TeacherRunner, mix,
};
use super::model::{AucMetric, InputBatch, MtadModel, MtadModelConfig};
use super::strategy::{
    AtomicCheckpointer, CHECKPOINT_PARTS, ClassSession, EpochLosses, EvalEveryStrategy,
    EvalSchedule, SaveCounter, SaveWhenAsked,
};
use crate::cli::DatasetKind;
use crate::data::cifar::{self, Cifar10, CifarSplit};
use crate::data::crops::{CROP_SIZE, CROPS_PER_BATCH, FullCut, IMAGE_SIZE, STRIDE, random_offsets};
use crate::data::folder::{Category, FolderDataset};
use crate::data::mvtec::{self, parse_class_list};
use crate::output::write_atomic;
use crate::scoring::evaluation::{ClassEvaluation, Normaliser, RawScores, column_names, evaluate};
use crate::scoring::pixel::{Mask, PixelTruth};
use crate::students::{EMBEDDING_DIM, StudentKind};
use crate::teachers::{
    StatisticsAccumulator, TeacherEnsemble, TeacherFamily, TeacherSize, TeacherStatistics,
    WeightsLocation, hex,
};
use crate::{Error, Result};
use mtad_kernels::adam::Adam;

/// Images per MVTec training batch (the reference's `batch_size=4`).
pub const MVTEC_IMAGES_PER_BATCH: usize = 4;

/// Which teachers a run distils from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TeacherChoice {
    /// resnet152, vgg19 and densenet201 with the learned softmax weighting (the method).
    #[default]
    All,
    /// resnet152 alone, no weighting (the reference's single-teacher ablation).
    Resnet152,
    /// No teacher: student and decoder form an autoencoder scored by AS_rec (ablation).
    None,
}

impl TeacherChoice {
    pub fn families(self) -> Vec<TeacherFamily> {
        match self {
            Self::All => TeacherFamily::ALL.to_vec(),
            Self::Resnet152 => vec![TeacherFamily::Resnet],
            Self::None => Vec::new(),
        }
    }
}

/// Every setting of a run; saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub dataset: DatasetKind,
    pub data_root: PathBuf,
    pub student: StudentKind,
    /// The classes to train, as indices into `class_names`.
    pub classes: Vec<usize>,
    /// Every class of the dataset, in index order.
    pub class_names: Vec<String>,
    pub epochs: usize,
    pub eval_every: usize,
    /// CIFAR-10 batch size (training and evaluation).
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Side of the network inputs (224 in the method).
    pub image_size: usize,
    /// MVTec/folder: side of the resized images (1024) and full-cut stride (200).
    pub full_size: usize,
    pub stride: usize,
    /// CIFAR: side of the resize before the centre crop (256).
    pub cifar_resize: usize,
    /// MVTec/folder: random crops per training batch of 4 images (16).
    pub crops_per_batch: usize,
    pub crop_pool: Option<usize>,
    pub teachers: TeacherChoice,
    pub tiny_teachers: bool,
    pub teacher_names: Vec<String>,
    pub teacher_sha256: Vec<String>,
    pub save_model: bool,
    pub device: String,
    pub cache_dir: PathBuf,
    /// `mtad` version that wrote the run.
    pub version: String,
}

impl TrainConfig {
    /// Whether this run deviates from the method's teachers or resolution, said in every output.
    pub fn reduced(&self) -> Option<String> {
        let mut notes = Vec::new();
        if self.tiny_teachers {
            notes.push("TINY RANDOM TEACHERS (not the ImageNet ones)".to_string());
        }
        if self.crops_per_batch != CROPS_PER_BATCH && self.dataset != DatasetKind::Cifar10 {
            notes.push(format!(
                "{} crops per batch (the method uses {CROPS_PER_BATCH})",
                self.crops_per_batch
            ));
        }
        if self.image_size != CROP_SIZE {
            notes.push(format!(
                "reduced image size {} (the method uses {CROP_SIZE})",
                self.image_size
            ));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// Settings that must match for `--resume` to continue a run.
    fn resumable_from(&self, other: &TrainConfig) -> std::result::Result<(), String> {
        let mut a = self.clone();
        let mut b = other.clone();
        for c in [&mut a, &mut b] {
            c.device = String::new();
            c.version = String::new();
            c.cache_dir = PathBuf::new();
            c.data_root = PathBuf::new();
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

/// What the user asked for; [`prepare`] checks it and resolves it into a [`TrainConfig`].
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub dataset: DatasetKind,
    pub data_root: PathBuf,
    pub student: StudentKind,
    pub classes: String,
    pub epochs: usize,
    pub eval_every: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub image_size: usize,
    pub crop_pool: Option<usize>,
    /// MVTec/folder: random crops per training batch of 4 images (the reference: 16).
    pub crops_per_batch: usize,
    pub teachers: TeacherChoice,
    pub tiny_teachers: bool,
    pub teacher_weights: WeightsLocation,
    pub save_model: bool,
    pub out: PathBuf,
    pub cover: bool,
    pub resume: bool,
    pub cache_dir: PathBuf,
    pub device: Device,
    pub device_name: String,
    /// Print plain progress lines (otherwise Burn's TUI shows progress on a terminal).
    pub plain: bool,
}

impl TrainRequest {
    /// A quick CPU trial on a folder dataset: every class, the tiny teachers, 32x32 inputs,
    /// 4 crops per batch, 3 epochs evaluated at the end, plain progress lines; the fields are
    /// public to change any of it (the demo and the tests start from this).
    pub fn tiny_folder(data_root: &Path, out: &Path, cache_dir: &Path, device: Device) -> Self {
        Self {
            dataset: DatasetKind::Folder,
            data_root: data_root.to_path_buf(),
            student: StudentKind::Resnet,
            classes: "all".into(),
            epochs: 3,
            eval_every: 3,
            batch_size: 32,
            lr: 1e-3,
            seed: 0,
            image_size: 32,
            crop_pool: None,
            crops_per_batch: 4,
            teachers: TeacherChoice::All,
            tiny_teachers: true,
            teacher_weights: WeightsLocation::Build,
            save_model: false,
            out: out.to_path_buf(),
            cover: false,
            resume: false,
            cache_dir: cache_dir.to_path_buf(),
            device_name: format!("{device:?}"),
            device,
            plain: true,
        }
    }
}

/// The result of one class.
#[derive(Debug, Clone)]
pub struct ClassResult {
    pub index: usize,
    pub name: String,
    pub best_epoch: usize,
    pub evaluation: ClassEvaluation,
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

/// A checked run, ready to train.
pub struct Prepared {
    pub config: TrainConfig,
    pub out: PathBuf,
    data: DataSet,
    runner: Option<Arc<TeacherRunner>>,
    device: Device,
    plain: bool,
    resume: bool,
}

enum DataSet {
    Cifar(Arc<Cifar10>),
    Folder(Vec<Category>),
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Checks everything a run needs before any training: options, dataset, classes, teachers and
/// output directory. Errors name what is wrong.
pub fn prepare(request: TrainRequest) -> Result<Prepared> {
    let r = &request;
    if r.epochs == 0 {
        return Err(invalid("--epochs must be at least 1"));
    }
    if r.eval_every == 0 {
        return Err(invalid("--eval-every must be at least 1"));
    }
    if r.batch_size < 2 {
        return Err(invalid(
            "--batch-size must be at least 2 (batch norm needs two inputs)",
        ));
    }
    if !(r.lr.is_finite() && r.lr > 0.0) {
        return Err(invalid(format!("--lr {} must be a positive number", r.lr)));
    }
    if r.image_size < 32 || r.image_size % 32 != 0 {
        return Err(invalid(format!(
            "--image-size {} must be a multiple of 32 (the decoder doubles a 1/32 grid five times)",
            r.image_size
        )));
    }
    if r.crops_per_batch == 0 {
        return Err(invalid("--crops-per-batch must be at least 1"));
    }
    if r.crop_pool == Some(0) {
        return Err(invalid("--crop-pool must be at least 1"));
    }
    if r.image_size != CROP_SIZE && !r.tiny_teachers && r.teachers != TeacherChoice::None {
        return Err(invalid(format!(
            "--image-size {} needs --tiny-teachers: the ImageNet teachers see {CROP_SIZE}x{CROP_SIZE} inputs",
            r.image_size
        )));
    }
    // Geometry, scaled from the reference's 224 / 1024 / 200 / 256.
    let image_size = r.image_size;
    let stride = ((image_size * STRIDE) as f64 / CROP_SIZE as f64).round() as usize;
    let full_size = image_size + 4 * stride;
    debug_assert!(image_size != CROP_SIZE || full_size == IMAGE_SIZE);
    let cifar_resize = ((image_size * 256) as f64 / CROP_SIZE as f64).round() as usize;

    let (data, class_names, classes) = open_dataset(r.dataset, &r.data_root, &r.classes)?;
    let runner = load_teachers(r.teachers, r.tiny_teachers, &r.teacher_weights, &r.device)?;
    let (teacher_names, teacher_sha256) = teacher_identity(runner.as_deref());

    let config = TrainConfig {
        dataset: r.dataset,
        data_root: r.data_root.clone(),
        student: r.student,
        classes,
        class_names,
        epochs: r.epochs,
        eval_every: r.eval_every,
        batch_size: r.batch_size,
        lr: r.lr,
        seed: r.seed,
        image_size,
        full_size,
        stride,
        cifar_resize,
        crops_per_batch: r.crops_per_batch,
        crop_pool: r.crop_pool,
        teachers: r.teachers,
        tiny_teachers: r.tiny_teachers,
        teacher_names,
        teacher_sha256,
        save_model: r.save_model,
        device: r.device_name.clone(),
        cache_dir: r.cache_dir.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };

    // Output directory.
    let out = if r.resume {
        let saved = read_config(&r.out)?;
        config.resumable_from(&saved).map_err(|fields| {
            invalid(format!(
                "--resume {}: the run was started with other settings ({fields}); give the same \
                 options as the first time, or start a new run",
                r.out.display()
            ))
        })?;
        r.out.clone()
    } else if r.cover || !r.out.exists() {
        r.out.clone()
    } else {
        // The reference's behaviour: a numeric suffix rather than overwriting.
        let base = r.out.display().to_string();
        (1..)
            .map(|n| PathBuf::from(format!("{base}_{n}")))
            .find(|p| !p.exists())
            .expect("some suffix is free")
    };
    check_writable(&out)?;
    check_writable(&r.cache_dir)?;
    write_json(&out.join("config.json"), &config)?;

    Ok(Prepared {
        config,
        out,
        data,
        runner,
        device: r.device.clone(),
        plain: r.plain,
        resume: r.resume,
    })
}

/// Opens a dataset and resolves `--classes`: the data, every class name, the chosen indices.
fn open_dataset(
    kind: DatasetKind,
    root: &Path,
    spec: &str,
) -> Result<(DataSet, Vec<String>, Vec<usize>)> {
    match kind {
        DatasetKind::Cifar10 => {
            let cifar = Cifar10::open(root)?;
            let classes = parse_class_list(spec, &cifar::CLASSES)?;
            for &c in &classes {
                cifar.one_class(c)?;
            }
            let names = cifar::CLASSES.iter().map(|s| s.to_string()).collect();
            Ok((DataSet::Cifar(Arc::new(cifar)), names, classes))
        }
        DatasetKind::Mvtec | DatasetKind::Folder => {
            let folder = FolderDataset::open(root)?;
            let names: Vec<String> = if kind == DatasetKind::Mvtec {
                mvtec::CATEGORIES.iter().map(|s| s.to_string()).collect()
            } else {
                folder.categories.clone()
            };
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let classes = parse_class_list(spec, &refs)?;
            let categories = classes
                .iter()
                .map(|&c| {
                    let category = folder.category(&names[c])?;
                    check_category(&folder.root, &category)?;
                    Ok(category)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((DataSet::Folder(categories), names, classes))
        }
    }
}

/// The teachers of a run, `None` for the no-teacher ablation.
pub(crate) fn load_teachers(
    choice: TeacherChoice,
    tiny: bool,
    weights: &WeightsLocation,
    device: &Device,
) -> Result<Option<Arc<TeacherRunner>>> {
    let families = choice.families();
    if families.is_empty() {
        return Ok(None);
    }
    let size = if tiny {
        TeacherSize::Tiny
    } else {
        TeacherSize::Full
    };
    let ensemble = TeacherEnsemble::load(size, &families, weights, device)?;
    Ok(Some(Arc::new(TeacherRunner::new(ensemble, device.clone()))))
}

/// The teachers' names and sha256s, in order.
fn teacher_identity(runner: Option<&TeacherRunner>) -> (Vec<String>, Vec<String>) {
    match runner {
        Some(runner) => (runner.names().to_vec(), runner.sha256s().to_vec()),
        None => (Vec::new(), Vec::new()),
    }
}

fn check_category(root: &Path, category: &Category) -> Result<()> {
    let err = |m: String| Error::Dataset {
        root: root.to_path_buf(),
        message: format!("category {}: {m}", category.name),
    };
    if category.train.len() < 2 {
        return Err(err(format!(
            "{} training images; at least 2 are needed",
            category.train.len()
        )));
    }
    let labels = category.test_labels();
    if !labels.contains(&0) || !labels.contains(&1) {
        return Err(err(
            "the test set needs both good and defect images for a ROC AUC".into(),
        ));
    }
    Ok(())
}

fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".mtad-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Training(format!("{}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid_file(path, e.to_string()))
}

/// The `config.json` of a run directory.
pub fn read_config(run: &Path) -> Result<TrainConfig> {
    let path = run.join("config.json");
    if !path.is_file() {
        return Err(invalid(format!(
            "{} is not a run directory (no config.json)",
            run.display()
        )));
    }
    read_json(&path)
}

/// One evaluation of a class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub epoch: usize,
    /// The oracle AUC (max over the 69 columns) and the leakage-free AUC.
    pub oracle: f64,
    pub nor: f64,
}

/// The best evaluation of a class, with what scoring needs besides the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub epoch: usize,
    pub evaluation: ClassEvaluation,
    pub normaliser: Normaliser,
}

/// `progress.json` of a class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassProgress {
    pub index: usize,
    pub name: String,
    /// The latest complete checkpoint.
    pub checkpoint_epoch: Option<usize>,
    pub history: Vec<EvalRecord>,
    pub best: Option<BestRecord>,
    pub complete: bool,
}

/// A class's folder name in the run directory.
pub fn class_dir(out: &Path, name: &str) -> PathBuf {
    out.join(name)
}

fn read_progress(dir: &Path) -> Result<Option<ClassProgress>> {
    let path = dir.join("progress.json");
    if !path.exists() {
        return Ok(None);
    }
    read_json(&path).map(Some)
}

/// A class's data, ready for loaders.
struct ClassData {
    /// Training items: input indices (CIFAR) or image indices (MVTec crops).
    train_items: Vec<usize>,
    train: TrainKind,
    /// The normal training inputs scored for `nor`.
    norm_set: Arc<InputSet>,
    norm_items: Vec<usize>,
    norm_cache: Option<Arc<EmbeddingCache>>,
    test_set: Arc<InputSet>,
    test_cache: Option<Arc<EmbeddingCache>>,
    /// Image of each test input, and each test image's label.
    test_groups: Vec<usize>,
    test_labels: Vec<u8>,
    stats: Option<Arc<TeacherStatistics>>,
    /// Pixel ground truth of the test set, where masks exist.
    pixels: Option<Arc<PixelTruth>>,
    eval_batch: usize,
    /// For the reference-way count: inputs per training epoch, per evaluation, for statistics.
    reference_per_epoch: u64,
    reference_per_eval: u64,
    reference_stats: u64,
}

enum TrainKind {
    Cached(Arc<InputSet>),
    Crops {
        source: Arc<ImageSource>,
        pool: Option<(Arc<Vec<(usize, usize)>>, Arc<EmbeddingCache>)>,
    },
}

impl Prepared {
    /// Trains and evaluates every class in turn.
    pub fn run(self) -> Result<RunSummary> {
        let started = Instant::now();
        if !self.resume {
            // A covered directory may hold an older run's progress: it is not this run's.
            for &class in &self.config.classes {
                let path =
                    class_dir(&self.out, &self.config.class_names[class]).join("progress.json");
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
        for (position, &class) in self.config.classes.iter().enumerate() {
            let name = self.config.class_names[class].clone();
            println!(
                "\n== class {class} ({name}), {}/{}: student {}, {} epochs, evaluation every {} ==",
                position + 1,
                self.config.classes.len(),
                self.config.student,
                self.config.epochs,
                self.config.eval_every
            );
            let data = match &self.data {
                DataSet::Cifar(cifar) => self.cifar_class(cifar, class, cifar_caches.as_ref())?,
                DataSet::Folder(categories) => self.folder_class(&categories[position])?,
            };
            let evals = EvalSchedule {
                epochs: self.config.epochs,
                every: self.config.eval_every,
            }
            .eval_epochs()
            .len() as u64;
            reference_inputs += data.reference_stats
                + data.reference_per_epoch * self.config.epochs as u64
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

    fn teacher_key(&self) -> String {
        format!(
            "teachers {:?} {:?}",
            self.config.teacher_names, self.config.teacher_sha256
        )
    }

    /// Loads or builds the raw-output cache of an input set.
    fn cached(
        &self,
        runner: &TeacherRunner,
        set: &InputSet,
        file: &str,
        description: &str,
    ) -> Result<Arc<EmbeddingCache>> {
        let key = cache_key(&format!("{}; {description}", self.teacher_key()));
        let path = self.config.cache_dir.join(file);
        let batch = if set.side >= 128 { 32 } else { 256 };
        let (cache, outcome) = EmbeddingCache::load_or_build(
            &path,
            key,
            set.len(),
            runner.len(),
            EMBEDDING_DIM,
            || runner.raw_set(set, batch, file),
        )?;
        let how = match outcome {
            CacheOutcome::Reused => "reused",
            CacheOutcome::Built => "built",
            CacheOutcome::RebuiltStale => "rebuilt (it was for other teachers or data)",
            CacheOutcome::RebuiltCorrupt => "rebuilt (the file was damaged)",
        };
        println!(
            "  teacher-embedding cache {}: {} inputs, {how}",
            path.display(),
            set.len()
        );
        Ok(Arc::new(cache))
    }

    /// Builds (or checks) every teacher-output cache of the run's CIFAR-10 classes, then frees
    /// the teachers' weights: nothing else needs them. Returns the test set's cache.
    fn cifar_caches(&self, cifar: &Cifar10, runner: &TeacherRunner) -> Result<Arc<EmbeddingCache>> {
        let test = self.cifar_test_cache(cifar, runner)?;
        for &class in &self.config.classes {
            let split = cifar.one_class(class)?;
            self.cifar_train_cache(cifar, class, &split.train, runner)?;
        }
        runner.release();
        Ok(test)
    }

    /// The cache of a class's training images' teacher outputs.
    fn cifar_train_cache(
        &self,
        cifar: &Cifar10,
        class: usize,
        images: &[usize],
        runner: &TeacherRunner,
    ) -> Result<Arc<EmbeddingCache>> {
        let what = (format!("train class {class}"), format!("train{class}"));
        self.cifar_cache(&cifar.train, Some(images), what, runner)
    }

    /// The cache of the CIFAR-10 test set's teacher outputs, shared by every class.
    fn cifar_test_cache(
        &self,
        cifar: &Cifar10,
        runner: &TeacherRunner,
    ) -> Result<Arc<EmbeddingCache>> {
        let what = ("test".to_string(), "test".to_string());
        self.cifar_cache(&cifar.test, None, what, runner)
    }

    /// The teacher-output cache of `split`'s images (`only` those, or all); `what`: how the
    /// description and the file name call them.
    fn cifar_cache(
        &self,
        split: &Arc<CifarSplit>,
        only: Option<&[usize]>,
        (described, tag): (String, String),
        runner: &TeacherRunner,
    ) -> Result<Arc<EmbeddingCache>> {
        let set = self.cifar_set(split, only);
        let description = format!(
            "cifar10 {described} sha256 {}; resize {} crop {}",
            split_digest(split),
            self.config.cifar_resize,
            self.config.image_size
        );
        let file = format!(
            "cifar10-{tag}-{}-{}.emb",
            self.config.image_size,
            &hex(&cache_key(&description))[..12]
        );
        self.cached(runner, &set, &file, &description)
    }

    /// The images of `split` (those listed in `only`, in its order, or all) as network inputs.
    fn cifar_set(&self, split: &Arc<CifarSplit>, only: Option<&[usize]>) -> InputSet {
        let source = Arc::new(ImageSource::Cifar {
            split: split.clone(),
            resize: self.config.cifar_resize,
            crop: self.config.image_size,
        });
        let mut set = InputSet::whole(source, self.config.image_size);
        if let Some(only) = only {
            set.inputs = only.iter().map(|&i| (i, None)).collect();
        }
        set
    }

    /// A class's data: its training images (their teacher outputs cached once per class) and
    /// the whole test set (`test_cache`, shared by the classes).
    fn cifar_class(
        &self,
        cifar: &Cifar10,
        class: usize,
        test_cache: Option<&Arc<EmbeddingCache>>,
    ) -> Result<ClassData> {
        let split = cifar.one_class(class)?;
        let train_set = Arc::new(self.cifar_set(&cifar.train, Some(&split.train)));
        let test_set = Arc::new(self.cifar_set(&cifar.test, None));
        let train_cache = match &self.runner {
            Some(runner) => Some(self.cifar_train_cache(cifar, class, &split.train, runner)?),
            None => None,
        };
        let items: Vec<usize> = (0..split.train.len()).collect();
        let stats = match &train_cache {
            Some(cache) => Some(Arc::new(self.statistics(cache, &items)?)),
            None => None,
        };
        let test_cache = test_cache.cloned();
        let n_train = split.train.len() as u64;
        let n_test = split.test.len() as u64;
        Ok(ClassData {
            train_items: items.clone(),
            train: TrainKind::Cached(train_set.clone()),
            norm_set: train_set,
            norm_items: items,
            norm_cache: train_cache,
            test_groups: (0..split.test.len()).collect(),
            test_labels: split.test_labels,
            test_set,
            test_cache,
            stats,
            pixels: None,
            eval_batch: self.config.batch_size,
            reference_per_epoch: n_train,
            reference_per_eval: n_test,
            reference_stats: n_train,
        })
    }

    fn folder_class(&self, category: &Category) -> Result<ClassData> {
        let c = &self.config;
        let cut = FullCut::new(c.full_size, c.image_size, c.stride)?;
        let patches = cut.patch_count();
        let train_source = Arc::new(ImageSource::files(category.train.clone(), c.full_size));
        let test_paths: Vec<PathBuf> = category.test.iter().map(|t| t.path.clone()).collect();
        let test_source = Arc::new(ImageSource::files(test_paths.clone(), c.full_size));
        let norm_set = Arc::new(InputSet::full_cut(train_source.clone(), &cut));
        let test_set = Arc::new(InputSet::full_cut(test_source, &cut));
        let geometry = format!(
            "resize {} crop {} stride {}",
            c.full_size, c.image_size, c.stride
        );
        let (norm_cache, test_cache, pool) = match &self.runner {
            Some(runner) => {
                let describe = |what: &str, paths: &[PathBuf]| {
                    format!("folder {what} {}; {geometry}", files_digest(paths))
                };
                let file = |what: &str, description: &str| {
                    format!(
                        "{}-{what}-{}-{}.emb",
                        category.name,
                        c.image_size,
                        &hex(&cache_key(description))[..12]
                    )
                };
                let d = describe("train full cut", &category.train);
                let norm = self.cached(runner, &norm_set, &file("train", &d), &d)?;
                let d = describe("test full cut", &test_paths);
                let test = self.cached(runner, &test_set, &file("test", &d), &d)?;
                let pool = match c.crop_pool {
                    Some(n) => {
                        let mut rng = crate::data::crops::SeededRng::new(mix(c.seed, 0x9001, 0));
                        let offsets = Arc::new(random_offsets(
                            c.full_size,
                            c.full_size,
                            c.image_size,
                            n,
                            &mut rng,
                        )?);
                        let set = InputSet {
                            source: train_source.clone(),
                            inputs: (0..train_source.len())
                                .flat_map(|i| offsets.iter().map(move |&o| (i, Some(o))))
                                .collect(),
                            side: c.image_size,
                        };
                        let d = format!(
                            "{} pool {offsets:?}",
                            describe("train pool", &category.train)
                        );
                        let cache =
                            self.cached(runner, &set, &file(&format!("pool{n}"), &d), &d)?;
                        Some((offsets, cache))
                    }
                    None => None,
                };
                (Some(norm), Some(test), pool)
            }
            None => (None, None, None),
        };
        let stats = match &norm_cache {
            Some(cache) => {
                let all: Vec<usize> = (0..norm_set.len()).collect();
                Some(Arc::new(self.statistics(cache, &all)?))
            }
            None => None,
        };
        let n_train = category.train.len() as u64;
        let masks: Vec<Mask> = category
            .test
            .iter()
            .map(|t| match (&t.mask, t.label) {
                (_, 0) => Mask::Normal,
                (Some(path), _) => Mask::File(path.clone()),
                (None, _) => Mask::Missing,
            })
            .collect();
        let patch_inputs: Vec<(usize, (usize, usize))> = test_set
            .inputs
            .iter()
            .map(|&(image, offset)| (image, offset.unwrap_or((0, 0))))
            .collect();
        let pixels = PixelTruth::build(&patch_inputs, &masks, c.full_size, c.image_size)?;
        Ok(ClassData {
            train_items: (0..category.train.len()).collect(),
            train: TrainKind::Crops {
                source: train_source,
                pool,
            },
            norm_items: (0..norm_set.len()).collect(),
            norm_set,
            norm_cache,
            test_groups: (0..test_set.len()).map(|i| i / patches).collect(),
            test_labels: category.test_labels(),
            test_set,
            test_cache,
            stats,
            pixels: pixels.map(Arc::new),
            eval_batch: MVTEC_IMAGES_PER_BATCH * patches,
            // The reference: 16 crops per image per epoch (64 per batch of 4).
            reference_per_epoch: n_train * c.crops_per_batch as u64,
            reference_per_eval: (category.test.len() * patches) as u64,
            reference_stats: n_train * patches as u64,
        })
    }

    /// Loaders of a class's test inputs and of its normal training inputs (for `nor`), in order.
    fn eval_loaders(
        &self,
        data: &ClassData,
        errors: &ErrorSlot,
    ) -> (
        Arc<dyn DataLoader<InputBatch>>,
        Arc<dyn DataLoader<InputBatch>>,
    ) {
        let loader =
            |set: &Arc<InputSet>, cache: &Option<Arc<EmbeddingCache>>, items: Vec<usize>| {
                DataLoaderBuilder::new(CachedBatcher {
                    set: set.clone(),
                    teachers: cached_teachers(cache, &data.stats),
                    errors: errors.clone(),
                })
                .batch_size(data.eval_batch)
                .set_device(self.device.clone())
                .build(Listed(items))
            };
        (
            loader(
                &data.test_set,
                &data.test_cache,
                (0..data.test_set.len()).collect(),
            ),
            loader(&data.norm_set, &data.norm_cache, data.norm_items.clone()),
        )
    }

    fn statistics(&self, cache: &EmbeddingCache, items: &[usize]) -> Result<TeacherStatistics> {
        let k = cache.teachers;
        let mut acc = StatisticsAccumulator::new(k, EMBEDDING_DIM);
        for chunk in items.chunks(256) {
            let per_teacher: Vec<Vec<f32>> = (0..k)
                .map(|t| {
                    chunk
                        .iter()
                        .flat_map(|&i| cache.get(i, t).to_vec())
                        .collect()
                })
                .collect();
            let rows: Vec<(usize, &[f32])> = per_teacher
                .iter()
                .map(|v| (chunk.len(), v.as_slice()))
                .collect();
            acc.update_host(&rows)?;
        }
        acc.finish(
            self.config.teacher_names.clone(),
            self.config.teacher_sha256.clone(),
        )
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
            && let Some(best) = &progress.best
        {
            println!("  already complete in {}: skipped", dir.display());
            return Ok(ClassResult {
                index: class,
                name: name.to_string(),
                best_epoch: best.epoch,
                evaluation: best.evaluation.clone(),
            });
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
            println!("  resuming from the checkpoint of epoch {e}");
        }
        if let Some(stats) = &data.stats {
            stats.save(&dir.join("teacher_stats.bin"))?;
        }

        let training_device = self.device.clone().autodiff();
        let errors = ErrorSlot::default();
        let cached = |cache: &Option<Arc<EmbeddingCache>>| cached_teachers(cache, &data.stats);
        let epoch = Arc::new(AtomicUsize::new(0));
        let train_dataset = EpochShuffled::new(
            data.train_items.clone(),
            mix(c.seed, class as u64, 1),
            epoch.clone(),
        );
        let train_loader: Arc<dyn DataLoader<InputBatch>> = match &data.train {
            TrainKind::Cached(set) => DataLoaderBuilder::new(CachedBatcher {
                set: set.clone(),
                teachers: cached(&data.norm_cache),
                errors: errors.clone(),
            })
            .batch_size(c.batch_size)
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
                    side: c.image_size,
                    crops: c.crops_per_batch,
                    seed: mix(c.seed, class as u64, 2),
                    teachers,
                    errors: errors.clone(),
                })
                .batch_size(MVTEC_IMAGES_PER_BATCH)
                .set_device(training_device.clone())
                .build(train_dataset)
            }
        };
        let (test_loader, norm_loader) = self.eval_loaders(&data, &errors);
        let norm_items = data.norm_items.clone();

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
            test_groups: data.test_groups.clone(),
            test_labels: data.test_labels.clone(),
            stats: data.stats.clone(),
            pixels: data.pixels.clone(),
            batch_errors: errors.clone(),
            plain: self.plain,
        };
        let session: Arc<Mutex<Box<dyn ClassSession>>> = Arc::new(Mutex::new(Box::new(session)));
        let saves = SaveCounter::default();
        let failure = ErrorSlot::default();
        let strategy = EvalEveryStrategy {
            device: training_device.clone(),
            schedule: EvalSchedule {
                epochs: c.epochs,
                every: c.eval_every,
            },
            epoch,
            session: session.clone(),
            saves: saves.clone(),
            batch_errors: errors.clone(),
            failure: failure.clone(),
            seed: mix(c.seed, class as u64, 4),
        };
        let label = format!("class {name}, student {}", c.student);
        let mut training = SupervisedTraining::new(dir.join("burn"), train_loader, test_loader)
            .num_epochs(c.epochs)
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
        training_device.seed(mix(c.seed, class as u64, 3));
        let model = MtadModelConfig::new(c.student, c.image_size, c.teacher_names.len())
            .init(&training_device)?;
        let optimizer = Adam::module_optimizer();
        let result = training.launch(Learner::new(model, optimizer, c.lr));
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
        let best = progress
            .best
            .ok_or_else(|| Error::Training(format!("class {name}: no evaluation was made")))?;
        Ok(ClassResult {
            index: class,
            name: name.to_string(),
            best_epoch: best.epoch,
            evaluation: best.evaluation,
        })
    }
}

fn cached_teachers(
    cache: &Option<Arc<EmbeddingCache>>,
    stats: &Option<Arc<TeacherStatistics>>,
) -> Option<CachedTeachers> {
    cache
        .as_ref()
        .zip(stats.as_ref())
        .map(|(raw, stats)| CachedTeachers {
            raw: raw.clone(),
            stats: stats.clone(),
        })
}

fn split_digest(split: &CifarSplit) -> String {
    let mut h = Sha256::new();
    h.update(&split.images);
    h.update(&split.labels);
    hex(&h.finalize())
}

/// Identity of a list of files for cache keys: path, size and modification time of each.
fn files_digest(paths: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for p in paths {
        h.update(p.display().to_string().as_bytes());
        if let Ok(meta) = std::fs::metadata(p) {
            h.update(meta.len().to_le_bytes());
            if let Ok(modified) = meta.modified()
                && let Ok(since) = modified.duration_since(std::time::UNIX_EPOCH)
            {
                h.update(since.as_nanos().to_le_bytes());
            }
        }
    }
    hex(&h.finalize())
}

/// Evaluation, outputs and progress of one class during training.
struct Session {
    config: TrainConfig,
    out: PathBuf,
    dir: PathBuf,
    checkpoint_dir: PathBuf,
    progress: ClassProgress,
    test_loader: Arc<dyn DataLoader<InputBatch>>,
    norm_loader: Arc<dyn DataLoader<InputBatch>>,
    test_set: Arc<InputSet>,
    norm_set: Arc<InputSet>,
    norm_items: Vec<usize>,
    test_groups: Vec<usize>,
    test_labels: Vec<u8>,
    stats: Option<Arc<TeacherStatistics>>,
    pixels: Option<Arc<PixelTruth>>,
    batch_errors: ErrorSlot,
    plain: bool,
}

/// The pixel AUROC of the `nor` heatmaps of `test`, where the class has masks.
fn pixel_auroc(
    pixels: Option<&PixelTruth>,
    test: &RawScores,
    normaliser: &Normaliser,
) -> Result<Option<f64>> {
    pixels
        .map(|p| {
            let nor: Vec<f64> = (0..test.len()).map(|i| normaliser.score(test, i)).collect();
            p.auroc(&nor)
        })
        .transpose()
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

/// Scores of every input of a loader, on the host.
pub fn score_loader(model: &MtadModel, loader: &dyn DataLoader<InputBatch>) -> Result<RawScores> {
    let mut scores = RawScores::default();
    for batch in loader.iter() {
        let batch = batch.map_err(|e| Error::Training(format!("data loader: {e}")))?;
        let s = model.scores(batch).to_host()?;
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

    fn write_scores(
        &self,
        path: &Path,
        set: &InputSet,
        items: &[usize],
        labels: Option<(&[usize], &[u8])>,
        s: &RawScores,
    ) -> Result<()> {
        let mut text = String::from("input,path,patch_y,patch_x,label,AS_z,AS_cossim,AS_rec\n");
        for (row, &input) in items.iter().enumerate() {
            let (image, offset) = set.inputs[input];
            let (y, x) = offset.map_or((String::new(), String::new()), |(y, x)| {
                (y.to_string(), x.to_string())
            });
            let label = labels.map_or(0, |(groups, l)| l[groups[row]]);
            text.push_str(&format!(
                "{row},{},{y},{x},{label},{:e},{:e},{:e}\n",
                csv_field(&set.source.name(image)),
                s.as_z[row],
                s.as_cossim[row],
                s.as_rec[row]
            ));
        }
        write_atomic(path, text.as_bytes())
    }
}

/// The inputs of a score file: `(path, patch y, patch x)` and label of each row.
pub struct ScoreFile {
    pub inputs: Vec<(String, String, String)>,
    pub labels: Vec<u8>,
    pub scores: RawScores,
}

/// Reads a `scores_test.csv` or `scores_train.csv` written by a run.
pub fn read_scores(path: &Path) -> Result<ScoreFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, m: &str| Error::invalid_file(path, format!("line {line}: {m}"));
    let mut file = ScoreFile {
        inputs: Vec::new(),
        labels: Vec::new(),
        scores: RawScores::default(),
    };
    for (n, line) in text.lines().enumerate().skip(1) {
        let rest = line
            .split_once(',')
            .map(|(_, rest)| rest)
            .ok_or_else(|| bad(n + 1, "too few fields"))?;
        let fields: Vec<&str> = rest.rsplitn(7, ',').collect();
        if fields.len() != 7 {
            return Err(bad(n + 1, "too few fields"));
        }
        let number = |s: &str| s.parse::<f64>().map_err(|_| bad(n + 1, "not a number"));
        let raw_path = fields[6];
        let path = match raw_path.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => raw_path.to_string(),
        };
        file.inputs
            .push((path, fields[5].to_string(), fields[4].to_string()));
        file.labels
            .push(fields[3].parse().map_err(|_| bad(n + 1, "bad label"))?);
        file.scores.extend(
            &[number(fields[2])?],
            &[number(fields[1])?],
            &[number(fields[0])?],
        );
    }
    Ok(file)
}

impl ScoreFile {
    /// Image index of each input (inputs of one image are consecutive) and each image's label.
    pub fn image_groups(&self) -> (Vec<usize>, Vec<u8>) {
        let file = self;
        let mut groups = Vec::with_capacity(file.inputs.len());
        let mut labels = Vec::new();
        for (i, (path, _, _)) in file.inputs.iter().enumerate() {
            if i == 0 || file.inputs[i - 1].0 != *path {
                labels.push(file.labels[i]);
            }
            groups.push(labels.len() - 1);
        }
        (groups, labels)
    }
}

pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl ClassSession for Session {
    fn evaluate(&mut self, model: &MtadModel, epoch: usize) -> Result<f64> {
        let started = Instant::now();
        let test = score_loader(model, self.test_loader.as_ref())?;
        let train = score_loader(model, self.norm_loader.as_ref())?;
        if let Some(e) = self.batch_errors.take() {
            return Err(e);
        }
        for (what, s) in [("test", &test), ("normal training", &train)] {
            if let Some(i) = s.first_non_finite() {
                return Err(Error::Training(format!(
                    "class {}: the score of {what} input {i} is not finite at epoch {epoch}; \
                     the model diverged (lower --lr and rerun)",
                    self.name()
                )));
            }
        }
        let normaliser = Normaliser::fit(&train)?;
        let mut evaluation = evaluate(&test, &self.test_groups, &self.test_labels, &normaliser)?;
        evaluation.pixel_nor = pixel_auroc(self.pixels.as_deref(), &test, &normaliser)?;
        let (oracle, column) = evaluation.oracle();
        self.progress.history.retain(|r| r.epoch < epoch);
        self.progress.history.push(EvalRecord {
            epoch,
            oracle,
            nor: evaluation.nor,
        });
        let improved = self
            .progress
            .best
            .as_ref()
            .is_none_or(|b| oracle > b.evaluation.oracle().0);
        if improved {
            let record = BestRecord {
                epoch,
                evaluation: evaluation.clone(),
                normaliser,
            };
            let all: Vec<usize> = (0..self.test_set.len()).collect();
            self.write_scores(
                &self.dir.join("scores_test.csv"),
                &self.test_set,
                &all,
                Some((&self.test_groups, &self.test_labels)),
                &test,
            )?;
            self.write_scores(
                &self.dir.join("scores_train.csv"),
                &self.norm_set,
                &self.norm_items,
                None,
                &train,
            )?;
            Artifact::write(
                &self.dir.join(ARTIFACT_FILE),
                (self.progress.index, self.name()),
                &self.config,
                &record,
                model,
                self.stats.as_deref(),
                normal_scores(&self.norm_set, &self.norm_items, train),
            )?;
            self.progress.best = Some(record);
        }
        if self.config.save_model {
            self.save_models(model, &self.dir.join(format!("epoch-{epoch}")))?;
        }
        write_tables(&self.out, &self.config, Some(&self.progress))?;
        if self.plain {
            println!(
                "  [{}] epoch {epoch}: AUC oracle {oracle:.4} ({}), leakage-free nor {:.4}{}{} ({:.1} s)",
                self.name(),
                column_names()[column],
                evaluation.nor,
                evaluation
                    .pixel_nor
                    .map_or(String::new(), |p| format!(", pixel AUROC (nor) {p:.4}")),
                if improved { ", best so far: saved" } else { "" },
                started.elapsed().as_secs_f64()
            );
        }
        Ok(oracle)
    }

    fn checkpointed(&mut self, epoch: usize) -> Result<()> {
        let previous = self.progress.checkpoint_epoch.replace(epoch);
        write_json(&self.dir.join("progress.json"), &self.progress)?;
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
            println!(
                "  [{}] epoch {epoch}/{}: loss {:.4} (reconstruction {:.4}{kd}), {} steps, {:.1} s",
                self.name(),
                self.config.epochs,
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
        write_json(&self.dir.join("progress.json"), &self.progress)?;
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

/// Rewrites `finTS_<student>.csv` and `Eval_<student>.csv` from every class's progress (with
/// `current` in place of what is on disk for its class).
pub fn write_tables(
    out: &Path,
    config: &TrainConfig,
    current: Option<&ClassProgress>,
) -> Result<()> {
    let mut classes = Vec::new();
    for &c in &config.classes {
        let name = &config.class_names[c];
        let progress = match current {
            Some(p) if p.index == c => Some(p.clone()),
            _ => read_progress(&class_dir(out, name))?,
        };
        if let Some(p) = progress {
            classes.push(p);
        }
    }
    let note = config
        .reduced()
        .map_or(String::new(), |n| format!("# {n}\n"));
    let mut fin = format!("{note}Normal Class,Class Name,Epoch,AUC,nor\n");
    for p in &classes {
        for r in &p.history {
            fin.push_str(&format!(
                "{},{},{},{:.6},{:.6}\n",
                p.index,
                csv_field(&p.name),
                r.epoch,
                r.oracle,
                r.nor
            ));
        }
    }
    write_atomic(
        &out.join(format!("finTS_{}.csv", config.student)),
        fin.as_bytes(),
    )?;

    let rows: Vec<EvalRow> = classes
        .iter()
        .filter_map(|p| {
            p.best.as_ref().map(|b| EvalRow {
                index: p.index,
                name: p.name.clone(),
                epoch: Some(b.epoch),
                evaluation: b.evaluation.clone(),
            })
        })
        .collect();
    let eval = eval_table(&note, &rows);
    write_atomic(
        &out.join(format!("Eval_{}.csv", config.student)),
        eval.as_bytes(),
    )
}

/// One class's row of an `Eval_<student>.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub index: usize,
    pub name: String,
    /// The evaluation's epoch (none for an ensemble).
    pub epoch: Option<usize>,
    pub evaluation: ClassEvaluation,
}

/// The text of an `Eval_<student>.csv`: a `note` line or nothing, the header, one row per class
/// (the 69 columns, nor, oracle, and the pixel AUROC of nor where masks exist) and a mean row.
pub(crate) fn eval_table(note: &str, rows: &[EvalRow]) -> String {
    let columns = column_names();
    let pixel = rows.iter().any(|r| r.evaluation.pixel_nor.is_some());
    let mut text = format!(
        "{note}Normal Class,Class Name,Epoch,{},nor,oracle (reference protocol){}\n",
        columns.join(","),
        if pixel { ",pixel AUROC (nor)" } else { "" }
    );
    let line = |index: &str, name: &str, epoch: &str, aucs: &[f64], nor: f64, oracle: f64, p| {
        let aucs: Vec<String> = aucs.iter().map(|a| format!("{a:.6}")).collect();
        let pixel_nor = match (pixel, p) {
            (false, _) => String::new(),
            (true, Some(p)) => format!(",{p:.6}"),
            (true, None) => ",".to_string(),
        };
        format!(
            "{index},{},{epoch},{},{nor:.6},{oracle:.6}{pixel_nor}\n",
            csv_field(name),
            aucs.join(",")
        )
    };
    for r in rows {
        let e = &r.evaluation;
        text.push_str(&line(
            &r.index.to_string(),
            &r.name,
            &r.epoch.map_or(String::new(), |e| e.to_string()),
            &e.aucs,
            e.nor,
            e.oracle().0,
            e.pixel_nor,
        ));
    }
    if !rows.is_empty() {
        let mean = |f: &dyn Fn(&ClassEvaluation) -> Option<f64>| {
            let values: Vec<f64> = rows.iter().filter_map(|r| f(&r.evaluation)).collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let aucs: Vec<f64> = (0..columns.len())
            .map(|i| mean(&|e| Some(e.aucs[i])).unwrap_or(f64::NAN))
            .collect();
        text.push_str(&line(
            "mean",
            &format!("mean of {} classes", rows.len()),
            "",
            &aucs,
            mean(&|e| Some(e.nor)).unwrap_or(f64::NAN),
            mean(&|e| Some(e.oracle().0)).unwrap_or(f64::NAN),
            mean(&|e| e.pixel_nor),
        ));
    }
    text
}

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
        if let Some(root) = data_root {
            config.data_root = root;
        }
        let spec: Vec<String> = config.classes.iter().map(usize::to_string).collect();
        let (data, class_names, _) =
            open_dataset(config.dataset, &config.data_root, &spec.join(","))?;
        if class_names != config.class_names {
            return Err(invalid(format!(
                "{}: its classes are not those of the run ({} vs {})",
                config.data_root.display(),
                class_names.join(", "),
                config.class_names.join(", ")
            )));
        }
        let runner = load_teachers(config.teachers, config.tiny_teachers, weights, &device)?;
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
        check_writable(&config.cache_dir)?;
        Ok(Self {
            config,
            out: run.to_path_buf(),
            data,
            runner,
            device,
            plain: true,
            resume: false,
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
        for (position, &class) in self.config.classes.iter().enumerate() {
            let name = self.config.class_names[class].clone();
            let dir = class_dir(&self.out, &name);
            let artifact = Artifact::read(&dir.join(ARTIFACT_FILE))?;
            if artifact.header.config.teacher_sha256 != self.config.teacher_sha256 {
                return Err(Error::invalid_file(
                    &artifact.path,
                    "trained with other teachers than its run's config.json says",
                ));
            }
            let mut data = match &self.data {
                DataSet::Cifar(cifar) => self.cifar_class(cifar, class, cifar_caches.as_ref())?,
                DataSet::Folder(categories) => self.folder_class(&categories[position])?,
            };
            data.stats = artifact.statistics(self.runner.as_deref())?.map(Arc::new);
            let model = artifact.model(&self.device)?;
            let best = &artifact.header.best;
            let errors = ErrorSlot::default();
            let (test_loader, norm_loader) = self.eval_loaders(&data, &errors);
            let test = score_loader(&model, test_loader.as_ref())?;
            let train = score_loader(&model, norm_loader.as_ref())?;
            if let Some(e) = errors.take() {
                return Err(e);
            }
            let normaliser = Normaliser::fit(&train)?;
            let mut evaluation =
                evaluate(&test, &data.test_groups, &data.test_labels, &normaliser)?;
            evaluation.pixel_nor = pixel_auroc(data.pixels.as_deref(), &test, &normaliser)?;
            println!(
                "  [{name}] oracle {:.4}, nor {:.4}{} (best evaluation: epoch {})",
                evaluation.oracle().0,
                evaluation.nor,
                evaluation
                    .pixel_nor
                    .map_or(String::new(), |p| format!(", pixel AUROC (nor) {p:.4}")),
                best.epoch
            );
            rows.push(EvalRow {
                index: class,
                name,
                epoch: Some(best.epoch),
                evaluation,
            });
        }
        let note = self
            .config
            .reduced()
            .map_or(String::new(), |n| format!("# {n}\n"));
        let path = self
            .out
            .join("infer")
            .join(format!("Eval_{}.csv", self.config.student));
        write_atomic(&path, eval_table(&note, &rows).as_bytes())?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_files_read_back_with_quoted_paths_and_image_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores_test.csv");
        let text = "input,path,patch_y,patch_x,label,AS_z,AS_cossim,AS_rec\n\
                    0,\"a,b.png\",0,0,1,1e0,2e0,3e-1\n\
                    1,\"a,b.png\",0,4,1,4e0,5e0,6e-1\n\
                    2,c.png,0,0,0,7e0,8e0,9e-1\n";
        std::fs::write(&path, text).unwrap();
        let file = read_scores(&path).unwrap();
        assert_eq!(file.inputs[1], ("a,b.png".into(), "0".into(), "4".into()));
        assert_eq!(file.scores.as_z, [1.0, 4.0, 7.0]);
        assert_eq!(file.scores.as_rec, [0.3, 0.6, 0.9]);
        assert_eq!(file.image_groups(), (vec![0, 0, 1], vec![1, 0]));
        std::fs::write(&path, "header\n0,x,1\n").unwrap();
        assert!(read_scores(&path).is_err());
    }
}

//! Everything a run checks and opens before training starts: options, dataset and classes,
//! teachers, output and cache folders; the result is a [`Prepared`] run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;

use super::teacher_runner::TeacherRunner;
use crate::config::{
    DEFAULT_HOLDOUT, MAX_CROP_POOL, MAX_CROPS_PER_BATCH, MAX_EPOCHS, MAX_IMAGE_SIZE, Protocol,
    TrainConfig, TrainSettings, check_batch_size, default_batch_size,
};
use crate::data::DatasetKind;
use crate::data::cifar::{self, Cifar10};
use crate::data::crops::{CROP_SIZE, IMAGE_SIZE, MVTEC_IMAGES_PER_BATCH};
use crate::data::folder::{Category, FolderDataset};
use crate::data::mvtec::{self, parse_class_list};
use crate::output::lock::RunLock;
use crate::output::remove_stale_temporaries;
use crate::output::run_folder::{read_config, write_config};
use crate::teachers::{TeacherChoice, TeacherEnsemble, TeacherSize, WeightsLocation};
use crate::{Error, Result};

/// What the user asked for; [`prepare`] checks it and resolves it into a [`TrainConfig`].
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub settings: TrainSettings,
    pub teacher_weights: WeightsLocation,
    pub out: PathBuf,
    pub cover: bool,
    pub resume: bool,
    pub device: Device,
    pub device_name: String,
    /// Print plain progress lines (otherwise Burn's TUI shows progress on a terminal).
    pub plain: bool,
}

impl TrainRequest {
    /// A quick CPU trial on a folder dataset ([`TrainSettings::tiny_folder`]) written to `out`,
    /// with plain progress lines; the fields are public to change any of it.
    pub fn tiny_folder(data_root: &Path, out: &Path, cache_dir: &Path, device: Device) -> Self {
        Self {
            settings: TrainSettings::tiny_folder(data_root, cache_dir),
            teacher_weights: WeightsLocation::Build,
            out: out.to_path_buf(),
            cover: false,
            resume: false,
            device_name: format!("{device:?}"),
            device,
            plain: true,
        }
    }
}

/// A checked run, ready to train.
pub struct Prepared {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub(crate) data: DataSet,
    pub(crate) runner: Option<Arc<TeacherRunner>>,
    pub(crate) device: Device,
    pub(crate) plain: bool,
    pub(crate) resume: bool,
    /// The run folder's lock, held until the run ends.
    pub(crate) _lock: RunLock,
}

pub(crate) enum DataSet {
    Cifar(Arc<Cifar10>),
    Folder(Vec<Category>),
}

pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Checks everything a run needs before any training: options, dataset, classes, teachers and
/// output directory. Errors name what is wrong.
pub fn prepare(request: TrainRequest) -> Result<Prepared> {
    let mut request = request;
    // A run written before the protocols were recorded used the reference's: resumed, it
    // keeps it.
    if request.resume
        && request.settings.protocol.is_none()
        && read_config(&request.out).is_ok_and(|c| c.settings.protocol.is_none())
    {
        request.settings.protocol = Some(Protocol::Reference);
    }
    // A MVTec/folder run written before `--batch-size` applied to it trained on the reference's
    // 4 images per step, whatever its `batch_size` said: resumed, it keeps them.
    if request.resume
        && let Ok(saved) = read_config(&request.out)
        && saved.images_per_step == 0
        && saved.dataset() != DatasetKind::Cifar10
        && request.settings.batch_size == saved.settings.batch_size
    {
        request.settings.batch_size = Some(MVTEC_IMAGES_PER_BATCH);
    }
    let r = &request;
    let s = &r.settings;
    let dataset = s.dataset.ok_or_else(|| {
        invalid("--dataset is missing: give it, or a --config FILE that sets `dataset`")
    })?;
    let data_root = s.data_root.clone().ok_or_else(|| {
        invalid("--data-root is missing: give it, or a --config FILE that sets `data_root`")
    })?;
    if s.epochs == 0 {
        return Err(invalid("--epochs must be at least 1"));
    }
    if s.eval_every == 0 {
        return Err(invalid("--eval-every must be at least 1"));
    }
    if s.epochs > MAX_EPOCHS {
        return Err(invalid(format!(
            "--epochs {}: at most {MAX_EPOCHS}",
            s.epochs
        )));
    }
    if !(s.lr.is_finite() && s.lr > 0.0) {
        return Err(invalid(format!("--lr {} must be a positive number", s.lr)));
    }
    if s.image_size < 32 || s.image_size % 32 != 0 || s.image_size > MAX_IMAGE_SIZE {
        return Err(invalid(format!(
            "--image-size {} must be a multiple of 32 (the decoder doubles a 1/32 grid five \
             times), at most {MAX_IMAGE_SIZE}",
            s.image_size
        )));
    }
    if let Some(m) = s.checkpoint_every
        && !(m.is_finite() && m > 0.0)
    {
        return Err(invalid(format!(
            "--checkpoint-every {m}: a positive number of minutes"
        )));
    }
    if s.crops_per_batch == 0 || s.crops_per_batch > MAX_CROPS_PER_BATCH {
        return Err(invalid(format!(
            "--crops-per-batch {}: from 1 to {MAX_CROPS_PER_BATCH}",
            s.crops_per_batch
        )));
    }
    check_batch_size(s.batch_size, s.crops_per_batch, dataset).map_err(invalid)?;
    if let Some(n) = s.crop_pool
        && !(1..=MAX_CROP_POOL).contains(&n)
    {
        return Err(invalid(format!(
            "--crop-pool {n}: from 1 to {MAX_CROP_POOL} offsets per image"
        )));
    }
    crate::config::check_decision_settings(s).map_err(invalid)?;
    if s.image_size != CROP_SIZE && !s.tiny_teachers && s.teachers != TeacherChoice::None {
        return Err(invalid(format!(
            "--image-size {} needs --tiny-teachers: the ImageNet teachers see {CROP_SIZE}x{CROP_SIZE} inputs",
            s.image_size
        )));
    }
    // Geometry, scaled from the reference's 224 / 1024 / 200 / 256.
    let image_size = s.image_size;
    let (full_size, stride, cifar_resize) = TrainConfig::derived_sizes(image_size);
    debug_assert!(image_size != CROP_SIZE || full_size == IMAGE_SIZE);

    let (data, class_names, class_indices) = open_dataset(dataset, &data_root, &s.classes)?;
    let runner = load_teachers(s, &r.teacher_weights, &r.device)?;
    let (teacher_names, teacher_sha256) = teacher_identity(runner.as_deref());

    if let DataSet::Folder(categories) = &data {
        let holdout = settings_holdout(s, dataset);
        for category in categories {
            super::class_data::holdout_split(category.train.len(), holdout, 0)
                .map_err(|e| invalid(format!("category {}: {e}", category.name)))?;
        }
    }
    let data_sha256 = data_sha256(&data, &data_root)?;
    let mut settings = s.clone();
    settings.dataset = Some(dataset);
    settings.data_root = Some(data_root);
    settings.protocol = Some(s.protocol.unwrap_or(Protocol::default_for(dataset)));
    settings.holdout = Some(settings_holdout(s, dataset));
    settings.batch_size = Some(s.batch_size.unwrap_or(default_batch_size(dataset)));
    let protocol = settings.protocol.unwrap_or_default();
    let images_per_step = settings.batch_size.unwrap_or_default();
    let config = TrainConfig {
        settings,
        class_indices,
        class_names,
        full_size,
        stride,
        cifar_resize,
        teacher_names,
        teacher_sha256,
        data_sha256,
        deployed: protocol.selection().to_string(),
        images_per_step,
        notes: String::new(),
        device: r.device_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let config = TrainConfig {
        notes: config.reduced().unwrap_or_default(),
        ..config
    };

    // Output directory.
    let out = if r.resume {
        let mut saved = read_config(&r.out)?;
        if saved.settings.protocol.is_none() {
            saved.settings.protocol = Some(Protocol::Reference);
            saved.settings.holdout = Some(saved.holdout());
        }
        if saved.images_per_step == 0 && saved.dataset() != DatasetKind::Cifar10 {
            saved.settings.batch_size = Some(MVTEC_IMAGES_PER_BATCH);
        }
        config.resumable_from(&saved).map_err(|fields| {
            invalid(format!(
                "--resume {}: the run was started with other settings ({fields}); give the same \
                 options as the first time (or none: they are read from its config.json), or \
                 start a new run",
                r.out.display()
            ))
        })?;
        if !saved.data_sha256.is_empty() && saved.data_sha256 != config.data_sha256 {
            return Err(Error::Dataset {
                root: config.data_root().to_path_buf(),
                message: format!(
                    "the data changed since the run in {} started (files added, removed or \
                     edited: its sha256 was {}, it is now {}); resuming would mix two datasets. \
                     Restore the data, or start a new run",
                    r.out.display(),
                    saved.data_sha256,
                    config.data_sha256
                ),
            });
        }
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
    // From here on the folder is this process's alone (until `Prepared` is dropped).
    let lock = RunLock::acquire(&out, "train")?;
    if r.resume {
        let removed = remove_stale_temporaries(&out, 2)?;
        if removed > 0 {
            tracing::info!(
                "removed {removed} temporary file(s) that the interrupted run left in {}",
                out.display()
            );
        }
    }
    check_writable(&s.cache_dir)?;
    write_config(&out, &config)?;

    Ok(Prepared {
        config,
        out,
        data,
        runner,
        device: r.device.clone(),
        plain: r.plain,
        resume: r.resume,
        _lock: lock,
    })
}

/// The share held out: `--holdout`, or its protocol's default.
fn settings_holdout(s: &TrainSettings, dataset: DatasetKind) -> f64 {
    s.holdout
        .unwrap_or(match s.protocol.unwrap_or(Protocol::default_for(dataset)) {
            Protocol::Reference => 0.0,
            Protocol::LabelFree => DEFAULT_HOLDOUT,
        })
}

/// Opens a dataset and resolves `--classes`: the data, every class name, the chosen indices.
pub(crate) fn open_dataset(
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
pub fn load_teachers(
    settings: &TrainSettings,
    weights: &WeightsLocation,
    device: &Device,
) -> Result<Option<Arc<TeacherRunner>>> {
    let families = settings.teachers.families();
    if families.is_empty() {
        return Ok(None);
    }
    let size = if settings.tiny_teachers {
        TeacherSize::Tiny
    } else {
        TeacherSize::Full
    };
    let ensemble = TeacherEnsemble::load(size, &families, weights, device)?;
    Ok(Some(Arc::new(TeacherRunner::new(ensemble, device.clone()))))
}

/// The teachers' names and sha256s, in order.
pub(crate) fn teacher_identity(runner: Option<&TeacherRunner>) -> (Vec<String>, Vec<String>) {
    match runner {
        Some(runner) => (runner.names().to_vec(), runner.sha256s().to_vec()),
        None => (Vec::new(), Vec::new()),
    }
}

fn check_category(root: &Path, category: &Category) -> Result<()> {
    category.check_trainable().map_err(|m| Error::Dataset {
        root: root.to_path_buf(),
        message: format!("category {}: {m}", category.name),
    })
}

pub(crate) fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".mtad-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    Ok(())
}

/// The sha256 of the data a run uses: CIFAR-10's decoded training and test batches; for
/// MVTec/folder data, every training, test and mask file of the chosen classes, by path
/// (relative to `root`) and content. Each file is also decoded in full, in parallel, so that
/// a damaged image in any class stops the run before its first class starts.
pub(crate) fn data_sha256(data: &DataSet, root: &Path) -> Result<String> {
    use rayon::prelude::*;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match data {
        DataSet::Cifar(cifar) => {
            for split in [&cifar.train, &cifar.test] {
                h.update(Sha256::digest(&split.images));
                h.update(Sha256::digest(&split.labels));
            }
        }
        DataSet::Folder(categories) => {
            let files: Vec<&Path> = categories
                .iter()
                .flat_map(|c| {
                    let test = c
                        .test
                        .iter()
                        .flat_map(|t| std::iter::once(t.path.as_path()).chain(t.mask.as_deref()));
                    c.train.iter().map(PathBuf::as_path).chain(test)
                })
                .collect();
            let digests: Vec<String> = files
                .par_iter()
                .map(|path| crate::data::folder::check_image(path))
                .collect::<Result<_>>()?;
            for (path, digest) in files.iter().zip(digests) {
                let relative = path.strip_prefix(root).unwrap_or(path);
                h.update(relative.to_string_lossy().as_bytes());
                h.update([0]);
                h.update(digest.as_bytes());
            }
        }
    }
    Ok(crate::teachers::hex(&h.finalize()))
}

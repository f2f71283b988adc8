//! A class's data for training and evaluation: its input sets, the teacher-embedding caches
//! (built once per distinct input and shared by runs), the teachers' normalisation statistics
//! and the evaluation loaders.

use std::path::PathBuf;
use std::sync::Arc;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use sha2::{Digest, Sha256};

use super::cache::{CacheOutcome, EmbeddingCache, cache_key};
use super::inputs::{CachedBatcher, CachedTeachers, ErrorSlot, ImageSource, InputSet, Listed, mix};
use super::model::InputBatch;
use super::prepare::Prepared;
use super::teacher_runner::TeacherRunner;
use crate::Result;
use crate::data::cifar::{Cifar10, CifarSplit};
use crate::data::crops::{FullCut, MVTEC_IMAGES_PER_BATCH, random_offsets};
use crate::data::folder::Category;
use crate::scoring::pixel::{Mask, PixelTruth};
use crate::students::EMBEDDING_DIM;
use crate::teachers::{StatisticsAccumulator, TeacherStatistics, hex};

/// Full-cut images' patch layout: the patch offsets, the image's side, the patch side.
pub(crate) type PatchLayout = (Vec<(usize, usize)>, usize, usize);

/// A class's data, ready for loaders.
pub(crate) struct ClassData {
    /// Training items: input indices (CIFAR) or image indices (MVTec crops).
    pub(crate) train_items: Vec<usize>,
    pub(crate) train: TrainKind,
    /// The normal training inputs scored for `nor` (`norm_items`: those that train) and the
    /// held-out normal inputs (`holdout_items`, of the same set: never fitted on).
    pub(crate) norm_set: Arc<InputSet>,
    pub(crate) norm_items: Vec<usize>,
    pub(crate) holdout_items: Vec<usize>,
    /// The held-out images, one line each (a path relative to the data root, or a CIFAR-10
    /// training index), for `<class>/holdout.txt`.
    pub(crate) holdout_names: Vec<String>,
    pub(crate) norm_cache: Option<Arc<EmbeddingCache>>,
    pub(crate) test_set: Arc<InputSet>,
    pub(crate) test_cache: Option<Arc<EmbeddingCache>>,
    /// Image of each test input, and each test image's label.
    pub(crate) test_groups: Vec<usize>,
    pub(crate) test_labels: Vec<u8>,
    /// Each test image's folder (`good` or its defect type; CIFAR-10: its class name).
    pub(crate) test_defects: Vec<String>,
    /// Full-cut data: the patch offsets, the resized image's side and the patch side.
    pub(crate) cut: Option<PatchLayout>,
    pub(crate) stats: Option<Arc<TeacherStatistics>>,
    /// Pixel ground truth of the test set, where masks exist.
    pub(crate) pixels: Option<Arc<PixelTruth>>,
    pub(crate) eval_batch: usize,
    /// For the reference-way count: inputs per training epoch, per evaluation, for statistics.
    pub(crate) reference_per_epoch: u64,
    pub(crate) reference_per_eval: u64,
    pub(crate) reference_stats: u64,
}

pub(crate) enum TrainKind {
    Cached(Arc<InputSet>),
    Crops {
        source: Arc<ImageSource>,
        pool: Option<(Arc<Vec<(usize, usize)>>, Arc<EmbeddingCache>)>,
    },
}

impl Prepared {
    fn teacher_key(&self) -> String {
        format!(
            "teachers {:?} {:?}",
            self.config.teacher_names, self.config.teacher_sha256
        )
    }

    /// Loads or builds the raw-output cache of an input set.
    pub(crate) fn cached(
        &self,
        runner: &TeacherRunner,
        set: &InputSet,
        file: &str,
        description: &str,
    ) -> Result<Arc<EmbeddingCache>> {
        let key = cache_key(&format!("{}; {description}", self.teacher_key()));
        let path = self.config.settings.cache_dir.join(file);
        // Large batches keep a GPU busy; on the CPU, 32 inputs of 224 already do.
        let gpu = !mtad_kernels::is_flex(&runner.device);
        let batch = match (set.side >= 128, gpu) {
            (true, false) => 32,
            (true, true) => 128,
            (false, _) => 256,
        };
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
        tracing::info!(
            "teacher-embedding cache {}: {} inputs, {how}",
            path.display(),
            set.len()
        );
        Ok(Arc::new(cache))
    }

    /// Builds (or checks) every teacher-output cache of the run's CIFAR-10 classes, then frees
    /// the teachers' weights: nothing else needs them. Returns the test set's cache.
    pub(crate) fn cifar_caches(
        &self,
        cifar: &Cifar10,
        runner: &TeacherRunner,
    ) -> Result<Arc<EmbeddingCache>> {
        let test = self.cifar_test_cache(cifar, runner)?;
        for &class in &self.config.class_indices {
            let split = cifar.one_class(class)?;
            self.cifar_train_cache(cifar, class, &split.train, runner)?;
        }
        runner.release();
        Ok(test)
    }

    /// The cache of a class's training images' teacher outputs.
    pub(crate) fn cifar_train_cache(
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
    pub(crate) fn cifar_test_cache(
        &self,
        cifar: &Cifar10,
        runner: &TeacherRunner,
    ) -> Result<Arc<EmbeddingCache>> {
        let what = ("test".to_string(), "test".to_string());
        self.cifar_cache(&cifar.test, None, what, runner)
    }

    /// The teacher-output cache of `split`'s images (`only` those, or all); `what`: how the
    /// description and the file name call them.
    pub(crate) fn cifar_cache(
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
            self.config.settings.image_size
        );
        let file = format!(
            "cifar10-{tag}-{}-{}.emb",
            self.config.settings.image_size,
            &hex(&cache_key(&description))[..12]
        );
        self.cached(runner, &set, &file, &description)
    }

    /// The images of `split` (those listed in `only`, in its order, or all) as network inputs.
    pub(crate) fn cifar_set(&self, split: &Arc<CifarSplit>, only: Option<&[usize]>) -> InputSet {
        let source = Arc::new(ImageSource::Cifar {
            split: split.clone(),
            resize: self.config.cifar_resize,
            crop: self.config.settings.image_size,
        });
        let mut set = InputSet::whole(source, self.config.settings.image_size);
        if let Some(only) = only {
            set.inputs = only.iter().map(|&i| (i, None)).collect();
        }
        set
    }

    /// A class's data: its training images (their teacher outputs cached once per class) and
    /// the whole test set (`test_cache`, shared by the classes).
    pub(crate) fn cifar_class(
        &self,
        cifar: &Cifar10,
        class: usize,
        test_cache: Option<&Arc<EmbeddingCache>>,
    ) -> Result<ClassData> {
        let split = cifar.one_class(class)?;
        let (fit, held) = holdout_split(
            split.train.len(),
            self.config.holdout(),
            mix(self.config.settings.seed, class as u64, 5),
        )?;
        let train_set = Arc::new(self.cifar_set(&cifar.train, Some(&split.train)));
        let test_set = Arc::new(self.cifar_set(&cifar.test, None));
        let train_cache = match &self.runner {
            Some(runner) => Some(self.cifar_train_cache(cifar, class, &split.train, runner)?),
            None => None,
        };
        let stats = match &train_cache {
            Some(cache) => Some(Arc::new(self.statistics(cache, &fit)?)),
            None => None,
        };
        let test_cache = test_cache.cloned();
        let n_train = split.train.len() as u64;
        let n_test = split.test.len() as u64;
        Ok(ClassData {
            train_items: fit.clone(),
            train: TrainKind::Cached(train_set.clone()),
            norm_set: train_set,
            norm_items: fit,
            holdout_names: held
                .iter()
                .map(|&i| format!("cifar10 training image {}", split.train[i]))
                .collect(),
            holdout_items: held,
            norm_cache: train_cache,
            test_groups: (0..split.test.len()).collect(),
            test_defects: split
                .test
                .iter()
                .zip(&split.test_labels)
                .map(|(&i, &l)| match l {
                    0 => crate::data::folder::GOOD.to_string(),
                    _ => self.config.class_names[cifar.test.labels[i] as usize].clone(),
                })
                .collect(),
            cut: None,
            test_labels: split.test_labels,
            test_set,
            test_cache,
            stats,
            pixels: None,
            eval_batch: self.config.batch_size(),
            reference_per_epoch: n_train,
            reference_per_eval: n_test,
            reference_stats: n_train,
        })
    }

    pub(crate) fn folder_class(&self, class: usize, category: &Category) -> Result<ClassData> {
        let c = &self.config;
        let cut = FullCut::new(c.full_size, c.settings.image_size, c.stride)?;
        let patches = cut.patch_count();
        let (fit, held) = holdout_split(
            category.train.len(),
            c.holdout(),
            mix(c.settings.seed, class as u64, 5),
        )?;
        let inputs_of = |images: &[usize]| -> Vec<usize> {
            images
                .iter()
                .flat_map(|&i| i * patches..(i + 1) * patches)
                .collect()
        };
        let train_source = Arc::new(ImageSource::files(category.train.clone(), c.full_size));
        let test_paths: Vec<PathBuf> = category.test.iter().map(|t| t.path.clone()).collect();
        let test_source = Arc::new(ImageSource::files(test_paths.clone(), c.full_size));
        let norm_set = Arc::new(InputSet::full_cut(train_source.clone(), &cut));
        let test_set = Arc::new(InputSet::full_cut(test_source, &cut));
        let geometry = format!(
            "resize {} crop {} stride {}",
            c.full_size, c.settings.image_size, c.stride
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
                        c.settings.image_size,
                        &hex(&cache_key(description))[..12]
                    )
                };
                let d = describe("train full cut", &category.train);
                let norm = self.cached(runner, &norm_set, &file("train", &d), &d)?;
                let d = describe("test full cut", &test_paths);
                let test = self.cached(runner, &test_set, &file("test", &d), &d)?;
                let pool = match c.settings.crop_pool {
                    Some(n) => {
                        let mut rng =
                            crate::data::crops::SeededRng::new(mix(c.settings.seed, 0x9001, 0));
                        let offsets = Arc::new(random_offsets(
                            c.full_size,
                            c.full_size,
                            c.settings.image_size,
                            n,
                            &mut rng,
                        )?);
                        let set = InputSet {
                            source: train_source.clone(),
                            inputs: (0..train_source.len())
                                .flat_map(|i| offsets.iter().map(move |&o| (i, Some(o))))
                                .collect(),
                            side: c.settings.image_size,
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
        let norm_items = inputs_of(&fit);
        let stats = match &norm_cache {
            Some(cache) => Some(Arc::new(self.statistics(cache, &norm_items)?)),
            None => None,
        };
        let n_train = fit.len() as u64;
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
        let pixels = PixelTruth::build(&patch_inputs, &masks, c.full_size, c.settings.image_size)?;
        let root = c.data_root();
        Ok(ClassData {
            holdout_names: held
                .iter()
                .map(|&i| {
                    let path = &category.train[i];
                    path.strip_prefix(root)
                        .unwrap_or(path)
                        .display()
                        .to_string()
                })
                .collect(),
            holdout_items: inputs_of(&held),
            train_items: fit,
            train: TrainKind::Crops {
                source: train_source,
                pool,
            },
            norm_items,
            norm_set,
            norm_cache,
            test_groups: (0..test_set.len()).map(|i| i / patches).collect(),
            test_labels: category.test_labels(),
            test_defects: category.test.iter().map(|t| t.defect.clone()).collect(),
            cut: Some((cut.offsets(), c.full_size, c.settings.image_size)),
            test_set,
            test_cache,
            stats,
            pixels: pixels.map(Arc::new),
            eval_batch: MVTEC_IMAGES_PER_BATCH * patches,
            // The reference: 16 crops per image per epoch (64 per batch of 4).
            reference_per_epoch: n_train * c.settings.crops_per_batch as u64,
            reference_per_eval: (category.test.len() * patches) as u64,
            reference_stats: n_train * patches as u64,
        })
    }

    /// Loaders of a class's test inputs, of its normal training inputs (for `nor`) and of its
    /// held-out normal inputs (none when nothing is held out), in order.
    #[allow(clippy::type_complexity)]
    pub(crate) fn eval_loaders(
        &self,
        data: &ClassData,
        errors: &ErrorSlot,
    ) -> (
        Arc<dyn DataLoader<InputBatch>>,
        Arc<dyn DataLoader<InputBatch>>,
        Option<Arc<dyn DataLoader<InputBatch>>>,
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
            (!data.holdout_items.is_empty())
                .then(|| loader(&data.norm_set, &data.norm_cache, data.holdout_items.clone())),
        )
    }

    pub(crate) fn statistics(
        &self,
        cache: &EmbeddingCache,
        items: &[usize],
    ) -> Result<TeacherStatistics> {
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
}

/// Splits `n` normal training images into those that train and those held out: a seeded
/// `fraction` of them (rounded, at least one when the fraction is not 0), each list in image
/// order. At least 2 images must be left to train.
pub(crate) fn holdout_split(
    n: usize,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if fraction <= 0.0 {
        return Ok(((0..n).collect(), Vec::new()));
    }
    let held = ((fraction * n as f64).round() as usize).max(1);
    if n < held + 2 {
        return Err(crate::Error::InvalidArgument(format!(
            "--holdout {fraction}: {n} normal training images are too few to hold {held} out \
             and train on at least 2; add images, or use --holdout 0 (the threshold is then \
             calibrated on the training images, which flags new normal images more often)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::data::crops::SeededRng::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut out: Vec<usize> = order[..held].to_vec();
    out.sort_unstable();
    let fit = (0..n).filter(|i| out.binary_search(i).is_err()).collect();
    Ok((fit, out))
}

pub(crate) fn cached_teachers(
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

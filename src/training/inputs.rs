//! The inputs of a run as the Learner sees them: where images come from, the lists of network
//! inputs (whole images or crops), the teachers that turn them into embeddings, and the Burn
//! datasets and batchers that make [`InputBatch`]es.
//!
//! A batcher cannot return an error to Burn's data loader, so a failure inside one (an image
//! that became unreadable during the run) is put in an [`ErrorSlot`] that the training loop
//! checks before every optimizer step; the batch itself is then zeros and is never used.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::prelude::*;
use rayon::prelude::*;

use super::cache::EmbeddingCache;
use super::model::InputBatch;
use super::teacher_runner::z_scores_host;
use crate::data::FloatImage;
use crate::data::cifar::{self, CifarSplit};
use crate::data::crops::{FullCut, SeededRng};
use crate::data::folder::load_image;
use crate::data::transform::crop;
use crate::students::EMBEDDING_DIM;
use crate::teachers::TeacherStatistics;
use crate::{Error, Result};

/// Where the images of a split come from.
pub enum ImageSource {
    /// CIFAR images: 32x32 planar bytes, resized to `resize` and centre-cropped to `crop`.
    Cifar {
        split: Arc<CifarSplit>,
        resize: usize,
        crop: usize,
    },
    /// Image files, decoded and resized to `size` x `size`; kept in memory after the first
    /// decode when `memory` is set (small datasets), decoded again each time otherwise.
    Files {
        paths: Vec<PathBuf>,
        size: usize,
        memory: Option<Vec<OnceLock<Arc<FloatImage>>>>,
    },
}

/// Images kept in memory when all of them fit in this many bytes.
pub const MEMORY_BUDGET: usize = 2 << 30;

impl ImageSource {
    /// Image files at `size`, kept in memory when they fit in [`MEMORY_BUDGET`].
    pub fn files(paths: Vec<PathBuf>, size: usize) -> Self {
        let bytes = paths.len().saturating_mul(3 * size * size * 4);
        let memory =
            (bytes <= MEMORY_BUDGET).then(|| paths.iter().map(|_| OnceLock::new()).collect());
        Self::Files {
            paths,
            size,
            memory,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Cifar { split, .. } => split.len(),
            Self::Files { paths, .. } => paths.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as the networks see it (before any crop).
    pub fn image(&self, i: usize) -> Result<Arc<FloatImage>> {
        match self {
            Self::Cifar {
                split,
                resize,
                crop,
            } => Ok(Arc::new(cifar::preprocess(split.image(i), *resize, *crop)?)),
            Self::Files {
                paths,
                size,
                memory,
            } => {
                let path = &paths[i];
                match memory {
                    Some(slots) => {
                        if let Some(image) = slots[i].get() {
                            return Ok(image.clone());
                        }
                        let image = Arc::new(load_image(path, *size)?);
                        Ok(slots[i].get_or_init(|| image).clone())
                    }
                    None => Ok(Arc::new(load_image(path, *size)?)),
                }
            }
        }
    }

    /// A short name of image `i` for score files: its path, or `cifar[i]`.
    pub fn name(&self, i: usize) -> String {
        match self {
            Self::Cifar { .. } => format!("cifar[{i}]"),
            Self::Files { paths, .. } => paths[i].display().to_string(),
        }
    }
}

/// A list of network inputs: whole images or crops of them, all `side` x `side`.
pub struct InputSet {
    pub source: Arc<ImageSource>,
    /// `(image, crop offset (y, x))` of each input; `None`: the whole image.
    pub inputs: Vec<(usize, Option<(usize, usize)>)>,
    pub side: usize,
}

impl InputSet {
    /// Every image whole (CIFAR).
    pub fn whole(source: Arc<ImageSource>, side: usize) -> Self {
        let inputs = (0..source.len()).map(|i| (i, None)).collect();
        Self {
            source,
            inputs,
            side,
        }
    }

    /// The full cut of every image, image-major (MVTec: 25 patches per image).
    pub fn full_cut(source: Arc<ImageSource>, cut: &FullCut) -> Self {
        let offsets = cut.offsets();
        let inputs = (0..source.len())
            .flat_map(|i| offsets.iter().map(move |&o| (i, Some(o))))
            .collect();
        Self {
            source,
            inputs,
            side: cut.crop,
        }
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Each of `items`' image name and patch offset, for the score files.
    pub fn described(&self, items: &[usize]) -> Vec<(String, Option<(usize, usize)>)> {
        items
            .iter()
            .map(|&i| {
                let (image, offset) = self.inputs[i];
                (self.source.name(image), offset)
            })
            .collect()
    }

    /// The inputs at `indices`, each distinct image decoded once, in parallel.
    pub fn load(&self, indices: &[usize]) -> Result<Vec<FloatImage>> {
        let mut images: Vec<usize> = indices.iter().map(|&i| self.inputs[i].0).collect();
        images.sort_unstable();
        images.dedup();
        let decoded = images
            .par_iter()
            .map(|&i| self.source.image(i).map(|img| (i, img)))
            .collect::<Result<Vec<_>>>()?;
        indices
            .par_iter()
            .map(|&input| {
                let (image, offset) = self.inputs[input];
                let at = decoded
                    .binary_search_by_key(&image, |(i, _)| *i)
                    .expect("every image was decoded");
                let full = &decoded[at].1;
                match offset {
                    Some((y, x)) => crop(full, y, x, self.side, self.side),
                    None => Ok(full.as_ref().clone()),
                }
            })
            .collect()
    }
}

/// `[N, 3, S, S]` from equally sized images.
pub fn images_tensor(images: &[FloatImage], device: &Device) -> Tensor<4> {
    let [c, h, w] = images.first().map_or([3, 1, 1], FloatImage::shape);
    let mut data = Vec::with_capacity(images.len() * c * h * w);
    for image in images {
        data.extend_from_slice(&image.data);
    }
    Tensor::from_data(TensorData::new(data, [images.len(), c, h, w]), device)
}

/// The first error a batcher met; the training loop checks it before each optimizer step.
#[derive(Clone, Default)]
pub struct ErrorSlot(Arc<Mutex<Option<Error>>>);

impl ErrorSlot {
    pub fn set(&self, error: Error) {
        let mut slot = self.0.lock().expect("error slot");
        if slot.is_none() {
            *slot = Some(error);
        }
    }

    pub fn take(&self) -> Option<Error> {
        self.0.lock().expect("error slot").take()
    }
}

/// One training item: which input or image, and where it sits in which epoch (this seeds the
/// random crops, so a resumed run draws the same crops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainItem {
    pub index: usize,
    pub epoch: usize,
    pub position: usize,
}

/// A training set whose order is a seeded shuffle of its items, a new one each epoch; the
/// training loop sets the epoch before iterating. Reproducible after a resume, unlike a
/// shuffle whose random state lives in the data loader.
pub struct EpochShuffled {
    items: Vec<usize>,
    seed: u64,
    epoch: Arc<AtomicUsize>,
    /// How many of the epoch's first items to leave out (set by the training loop when it
    /// finishes an epoch that a signal stopped; 0 otherwise).
    skip: Arc<AtomicUsize>,
    order: Mutex<(usize, Arc<Vec<usize>>)>,
}

impl EpochShuffled {
    pub fn new(items: Vec<usize>, seed: u64, epoch: Arc<AtomicUsize>) -> Self {
        Self {
            items,
            seed,
            epoch,
            skip: Arc::default(),
            order: Mutex::new((usize::MAX, Arc::new(Vec::new()))),
        }
    }

    /// The set's skip counter, shared with the training loop.
    pub fn skip(&self) -> Arc<AtomicUsize> {
        self.skip.clone()
    }

    /// The items in epoch `epoch`'s order (Fisher-Yates on a SplitMix64 stream).
    pub fn order(items: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
        let mut order = items.to_vec();
        let mut rng = SeededRng::new(mix(seed, epoch as u64, 0x5348_5546));
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }
}

/// A seed for one purpose, from the run's seed and numbers that identify the purpose.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut rng = SeededRng::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(32));
    rng.next_u64()
}

impl Dataset<TrainItem> for EpochShuffled {
    fn get(&self, index: usize) -> std::result::Result<TrainItem, DatasetError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let order = {
            let mut cached = self.order.lock().expect("epoch order");
            if cached.0 != epoch {
                *cached = (epoch, Arc::new(Self::order(&self.items, self.seed, epoch)));
            }
            cached.1.clone()
        };
        let position = index + self.skip.load(Ordering::SeqCst);
        order
            .get(position)
            .map(|&i| TrainItem {
                index: i,
                epoch,
                position,
            })
            .ok_or_else(|| out_of_range(index, self.len()))
    }

    fn len(&self) -> usize {
        self.items
            .len()
            .saturating_sub(self.skip.load(Ordering::SeqCst))
    }
}

/// The error of a dataset index past the end.
pub fn out_of_range(index: usize, len: usize) -> DatasetError {
    DatasetError::new(std::io::Error::other(format!(
        "item {index} of a dataset of {len}"
    )))
}

/// The given indices, in order: evaluation sets (every test input, a class's training inputs).
pub struct Listed(pub Vec<usize>);

impl Dataset<usize> for Listed {
    fn get(&self, index: usize) -> std::result::Result<usize, DatasetError> {
        self.0
            .get(index)
            .copied()
            .ok_or_else(|| out_of_range(index, self.0.len()))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Teacher z-scores of a set's inputs, computed from cached raw outputs.
#[derive(Clone)]
pub struct CachedTeachers {
    pub raw: Arc<EmbeddingCache>,
    pub stats: Arc<TeacherStatistics>,
}

impl CachedTeachers {
    pub(crate) fn z(&self, indices: &[usize]) -> Vec<f32> {
        let k = self.raw.teachers;
        let mut raw = Vec::with_capacity(indices.len() * k * EMBEDDING_DIM);
        for &i in indices {
            for t in 0..k {
                raw.extend_from_slice(self.raw.get(i, t));
            }
        }
        z_scores_host(&raw, &self.stats)
    }
}

/// Batches of inputs of an [`InputSet`] with their teachers' z-scores from the cache.
#[derive(Clone)]
pub struct CachedBatcher {
    pub set: Arc<InputSet>,
    pub teachers: Option<CachedTeachers>,
    pub errors: ErrorSlot,
}

impl CachedBatcher {
    fn make(&self, indices: &[usize], device: &Device) -> Result<InputBatch> {
        let images = self.set.load(indices)?;
        let teachers = self.teachers.as_ref().map(|t| {
            let k = t.raw.teachers;
            Tensor::from_data(
                TensorData::new(t.z(indices), [indices.len(), k, EMBEDDING_DIM]),
                device,
            )
        });
        Ok(InputBatch {
            images: images_tensor(&images, device),
            teachers,
        })
    }

    fn batch_or_zeros(&self, indices: &[usize], device: &Device) -> InputBatch {
        self.make(indices, device).unwrap_or_else(|e| {
            self.errors.set(e);
            zeros_batch(
                indices.len(),
                self.set.side,
                self.teachers.as_ref().map(|t| t.raw.teachers),
                device,
            )
        })
    }
}

pub(crate) fn zeros_batch(
    n: usize,
    side: usize,
    teachers: Option<usize>,
    device: &Device,
) -> InputBatch {
    InputBatch {
        images: Tensor::zeros([n, 3, side, side], device),
        teachers: teachers.map(|k| Tensor::zeros([n, k, EMBEDDING_DIM], device)),
    }
}

impl Batcher<usize, InputBatch> for CachedBatcher {
    fn batch(&self, items: Vec<usize>, device: &Device) -> InputBatch {
        self.batch_or_zeros(&items, device)
    }
}

impl Batcher<TrainItem, InputBatch> for CachedBatcher {
    fn batch(&self, items: Vec<TrainItem>, device: &Device) -> InputBatch {
        let indices: Vec<usize> = items.iter().map(|i| i.index).collect();
        self.batch_or_zeros(&indices, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_change_with_the_epoch() {
        let items: Vec<usize> = (10..30).collect();
        let a = EpochShuffled::order(&items, 7, 1);
        let b = EpochShuffled::order(&items, 7, 2);
        assert_ne!(a, b);
        assert_eq!(a, EpochShuffled::order(&items, 7, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, items);

        let epoch = Arc::new(AtomicUsize::new(3));
        let dataset = EpochShuffled::new(items.clone(), 7, epoch.clone());
        let first: Vec<usize> = (0..20).map(|i| dataset.get(i).unwrap().index).collect();
        assert_eq!(first, EpochShuffled::order(&items, 7, 3));
        assert!(dataset.get(20).is_err());
        epoch.store(4, Ordering::SeqCst);
        assert_eq!(dataset.get(0).unwrap().epoch, 4);
    }

    #[test]
    fn full_cut_sets_are_image_major_and_load_crops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8 * 6, y as u8 * 6, 0]))
            .save(&path)
            .unwrap();
        let source = Arc::new(ImageSource::files(vec![path.clone(), path], 40));
        let cut = FullCut::new(40, 32, 4).unwrap();
        let set = InputSet::full_cut(source.clone(), &cut);
        assert_eq!(set.len(), 2 * 9);
        assert_eq!(set.inputs[9], (1, Some((0, 0))));
        let loaded = set.load(&[1, 10]).unwrap();
        let full = source.image(0).unwrap();
        assert_eq!(loaded[0], crop(&full, 0, 4, 32, 32).unwrap());
        assert_eq!(loaded[0], loaded[1]);
    }

    #[test]
    fn z_scores_use_each_teachers_statistics() {
        let stats = TeacherStatistics {
            teachers: vec!["a".into(), "b".into()],
            teacher_sha256: vec!["0".into(), "1".into()],
            count: 2,
            mean: vec![vec![1.0; EMBEDDING_DIM], vec![-1.0; EMBEDDING_DIM]],
            std: vec![vec![2.0; EMBEDDING_DIM], vec![0.5; EMBEDDING_DIM]],
        };
        let raw = vec![3.0f32; 2 * EMBEDDING_DIM];
        let z = z_scores_host(&raw, &stats);
        assert_eq!(z[0], 1.0);
        assert_eq!(z[EMBEDDING_DIM], 8.0);
    }
}

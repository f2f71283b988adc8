//! The MVTec/folder training batches: images of the epoch's order, cut at random crop offsets
//! (the reference's way), with their teachers' z-scores. On the CPU backend the crops are cut
//! on the host; on a GPU backend they are cut, and the teachers run, on the device, and the
//! next step's images are decoded while the device computes.

use std::sync::{Arc, Mutex};

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;
use rayon::prelude::*;

use super::inputs::{
    CachedTeachers, EpochShuffled, ErrorSlot, ImageSource, TrainItem, images_tensor, mix,
    zeros_batch,
};
use super::model::InputBatch;
use super::teacher_runner::{TeacherRunner, z_scores_host};
use crate::data::FloatImage;
use crate::data::crops::{SeededRng, random_offsets};
use crate::data::transform::crop;
use crate::students::EMBEDDING_DIM;
use crate::teachers::TeacherStatistics;
use crate::{Error, Result};

/// Where the random training crops' teacher embeddings come from.
#[derive(Clone)]
pub enum CropTeachers {
    /// The no-teacher ablation.
    None,
    /// The teachers run on every batch's crops (the reference's way).
    OnTheFly {
        runner: Arc<TeacherRunner>,
        stats: Arc<TeacherStatistics>,
    },
    /// `--crop-pool N`: N crop offsets drawn once, shared by every image, their embeddings
    /// cached (input `image * N + j` of the cache is image `image` at `offsets[j]`); each batch
    /// draws its crops from the pool.
    Pool {
        offsets: Arc<Vec<(usize, usize)>>,
        cached: CachedTeachers,
    },
}

/// The reference's MVTec training batches: `images` images, `crops` random offsets each
/// applied to all of them, offset-major (64 crops of 224 from 4 images of 1024).
#[derive(Clone)]
pub struct CropBatcher {
    pub source: Arc<ImageSource>,
    /// Side of the full images.
    pub full: usize,
    /// Side of the crops.
    pub side: usize,
    pub crops: usize,
    pub seed: u64,
    pub teachers: CropTeachers,
    pub errors: ErrorSlot,
    /// Cut the crops and run the teachers on the device (GPU backends): the batch's full images
    /// are uploaded once and nothing is read back. Otherwise crops are cut on the host, as the
    /// CPU backend's kernels want them.
    pub on_device: bool,
    /// Decodes the next step's images in the background while this one computes (GPU
    /// backends); `None`: images are decoded when their step comes.
    pub prefetch: Option<Arc<Prefetch>>,
}

/// The training order's next images, decoded on another thread while the device computes.
/// It changes when images are decoded, never which: a step's images come from the same order.
pub struct Prefetch {
    /// The training items and the seed of their per-epoch order ([`EpochShuffled::order`]).
    items: Vec<usize>,
    seed: u64,
    pending: Mutex<Option<Pending>>,
}

type Pending = (
    Vec<usize>,
    std::thread::JoinHandle<Result<Vec<Arc<FloatImage>>>>,
);

impl Prefetch {
    pub fn new(items: Vec<usize>, seed: u64) -> Self {
        Self {
            items,
            seed,
            pending: Mutex::new(None),
        }
    }

    /// The images of the step after `items`: as many, next in their epoch's order.
    fn next(&self, items: &[TrainItem]) -> Vec<usize> {
        let Some(last) = items.last() else {
            return Vec::new();
        };
        EpochShuffled::order(&self.items, self.seed, last.epoch)
            .into_iter()
            .skip(last.position + 1)
            .take(items.len())
            .collect()
    }

    /// The images of `items`: those decoded ahead if they are these, else decoded now; then
    /// starts decoding the `items.len()` images that follow in the epoch's order.
    fn images(
        &self,
        source: &Arc<ImageSource>,
        items: &[TrainItem],
    ) -> Result<Vec<Arc<FloatImage>>> {
        let wanted: Vec<usize> = items.iter().map(|i| i.index).collect();
        let ahead = self.pending.lock().ok().and_then(|mut p| p.take());
        let images = match ahead {
            Some((indices, handle)) if indices == wanted => handle
                .join()
                .map_err(|_| Error::Training("the image prefetch thread panicked".into()))??,
            _ => decode(source, &wanted)?,
        };
        {
            let next = self.next(items);
            if !next.is_empty() {
                let source = source.clone();
                let indices = next.clone();
                let handle = std::thread::spawn(move || decode(&source, &indices));
                if let Ok(mut pending) = self.pending.lock() {
                    *pending = Some((next, handle));
                }
            }
        }
        Ok(images)
    }
}

fn decode(source: &ImageSource, indices: &[usize]) -> Result<Vec<Arc<FloatImage>>> {
    indices.par_iter().map(|&i| source.image(i)).collect()
}

/// The crops of `full` (`[n, c, h, w]`) at `offsets`, offset-major (`offsets[0]` of every image
/// first), cut on `full`'s device.
pub fn crops_on_device(full: Tensor<4>, offsets: &[(usize, usize)], side: usize) -> Tensor<4> {
    let [n, c, _, _] = full.dims();
    let crops: Vec<Tensor<4>> = offsets
        .iter()
        .map(|&(y, x)| full.clone().slice([0..n, 0..c, y..y + side, x..x + side]))
        .collect();
    Tensor::cat(crops, 0)
}

impl CropBatcher {
    /// The batch with its crops cut, and its teachers run, on the device.
    fn make_on_device(
        &self,
        images: &[Arc<FloatImage>],
        offsets: &[(usize, usize)],
        runner: &TeacherRunner,
        stats: &TeacherStatistics,
        device: &Device,
    ) -> Result<InputBatch> {
        let [c, h, w] = images.first().map_or([3, 1, 1], |i| i.shape());
        let mut data = Vec::with_capacity(images.len() * c * h * w);
        for image in images {
            data.extend_from_slice(&image.data);
        }
        let plain = device.clone().without_autodiff();
        let full = Tensor::<4>::from_data(TensorData::new(data, [images.len(), c, h, w]), &plain);
        let crops = crops_on_device(full, offsets, self.side);
        let z = runner.z_on_device(crops.clone(), stats)?;
        let lift = |t: Tensor<4>| {
            if device.is_autodiff() {
                t.autodiff()
            } else {
                t
            }
        };
        Ok(InputBatch {
            images: lift(crops),
            teachers: Some(if device.is_autodiff() {
                z.autodiff()
            } else {
                z
            }),
        })
    }

    fn make(&self, items: &[TrainItem], device: &Device) -> Result<InputBatch> {
        let first = items.first().copied().unwrap_or(TrainItem {
            index: 0,
            epoch: 0,
            position: 0,
        });
        let mut rng = SeededRng::new(mix(self.seed, first.epoch as u64, first.position as u64));
        let (offsets, pool_indices) = match &self.teachers {
            CropTeachers::Pool { offsets, .. } => {
                let picks: Vec<usize> = (0..self.crops)
                    .map(|_| rng.below(offsets.len() as u64) as usize)
                    .collect();
                (picks.iter().map(|&j| offsets[j]).collect(), Some(picks))
            }
            _ => (
                random_offsets(self.full, self.full, self.side, self.crops, &mut rng)?,
                None,
            ),
        };
        let images = match &self.prefetch {
            Some(prefetch) => prefetch.images(&self.source, items)?,
            None => items
                .par_iter()
                .map(|item| self.source.image(item.index))
                .collect::<Result<Vec<_>>>()?,
        };
        if let (true, CropTeachers::OnTheFly { runner, stats }) = (self.on_device, &self.teachers) {
            return self.make_on_device(&images, &offsets, runner, stats, device);
        }
        let crops = offsets
            .par_iter()
            .flat_map_iter(|&(y, x)| {
                images
                    .iter()
                    .map(move |image| crop(image, y, x, self.side, self.side))
            })
            .collect::<Result<Vec<_>>>()?;
        let n = crops.len();
        let teachers = match &self.teachers {
            CropTeachers::None => None,
            CropTeachers::OnTheFly { runner, stats } => {
                let raw = runner.raw(&crops)?;
                Some((z_scores_host(&raw, stats), runner.len()))
            }
            CropTeachers::Pool { cached, offsets } => {
                let picks = pool_indices.expect("pool picks");
                let indices: Vec<usize> = picks
                    .iter()
                    .flat_map(|&j| items.iter().map(move |item| item.index * offsets.len() + j))
                    .collect();
                Some((cached.z(&indices), cached.raw.teachers))
            }
        };
        Ok(InputBatch {
            images: images_tensor(&crops, device),
            teachers: teachers
                .map(|(z, k)| Tensor::from_data(TensorData::new(z, [n, k, EMBEDDING_DIM]), device)),
        })
    }
}

impl Batcher<TrainItem, InputBatch> for CropBatcher {
    fn batch(&self, items: Vec<TrainItem>, device: &Device) -> InputBatch {
        self.make(&items, device).unwrap_or_else(|e| {
            self.errors.set(e);
            let k = match &self.teachers {
                CropTeachers::None => None,
                CropTeachers::OnTheFly { runner, .. } => Some(runner.len()),
                CropTeachers::Pool { cached, .. } => Some(cached.raw.teachers),
            };
            zeros_batch(items.len() * self.crops, self.side, k, device)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_predicts_each_next_step_of_the_epoch_order() {
        use burn::data::dataset::Dataset;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let items: Vec<usize> = (10..21).collect();
        let epoch = Arc::new(AtomicUsize::new(3));
        let order = EpochShuffled::new(items.clone(), 77, epoch.clone());
        let prefetch = Prefetch::new(items, 77);
        for e in [3, 4] {
            epoch.store(e, Ordering::SeqCst);
            let steps: Vec<Vec<TrainItem>> = (0..order.len())
                .map(|i| order.get(i).unwrap())
                .collect::<Vec<_>>()
                .chunks(4)
                .map(<[TrainItem]>::to_vec)
                .collect();
            assert_eq!(steps.len(), 3);
            for pair in steps.windows(2) {
                let want: Vec<usize> = pair[1].iter().map(|i| i.index).collect();
                assert_eq!(prefetch.next(&pair[0]), want, "epoch {e}");
            }
            assert!(prefetch.next(&steps[2]).is_empty());
        }
    }

    #[test]
    fn crops_cut_on_the_device_are_the_host_crops_offset_major() {
        let device = Device::flex();
        let images: Vec<FloatImage> = (0..3)
            .map(|i| FloatImage {
                channels: 3,
                height: 20,
                width: 20,
                data: (0..3 * 20 * 20).map(|v| (v * 7 + i * 13) as f32).collect(),
            })
            .collect();
        let offsets = [(0, 0), (3, 11), (12, 4)];
        let want: Vec<f32> = offsets
            .iter()
            .flat_map(|&(y, x)| images.iter().map(move |im| crop(im, y, x, 8, 8).unwrap()))
            .flat_map(|c| c.data)
            .collect();
        let got = crops_on_device(images_tensor(&images, &device), &offsets, 8);
        assert_eq!(got.dims(), [9, 3, 8, 8]);
        assert_eq!(got.into_data().try_into_vec::<f32>().unwrap(), want);
    }
}

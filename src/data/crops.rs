//! Crops of the 1024x1024 MVTec images (METHOD.md):
//! - training: each batch of 4 images becomes 16 random 224x224 crops per image, each random
//!   offset shared by the 4 images (64 crops, offset-major: the reference concatenates
//!   `RandomCrop(batch)` 16 times);
//! - statistics and testing, the "full cut": 224x224 crops at stride 200, offsets 0, 200, ...,
//!   800 in each direction, 25 patches per image, rows outer and columns inner as the
//!   reference's loops; the image score is the max over its patches.

use rayon::prelude::*;

use super::{FloatImage, transform::crop};
use crate::{Error, Result};

/// The reference's sizes.
pub const IMAGE_SIZE: usize = 1024;
pub const CROP_SIZE: usize = 224;
pub const STRIDE: usize = 200;
pub const CROPS_PER_BATCH: usize = 16;
/// Images per MVTec training batch (the reference's `batch_size=4`).
pub const MVTEC_IMAGES_PER_BATCH: usize = 4;

/// A small seeded generator (SplitMix64): the same seed gives the same crops everywhere.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, without modulo bias; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The full cut's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullCut {
    pub image_size: usize,
    pub crop: usize,
    pub stride: usize,
}

impl Default for FullCut {
    fn default() -> Self {
        Self {
            image_size: IMAGE_SIZE,
            crop: CROP_SIZE,
            stride: STRIDE,
        }
    }
}

impl FullCut {
    /// A full cut of `crop` x `crop` patches at `stride` over `image_size` x `image_size` images.
    pub fn new(image_size: usize, crop: usize, stride: usize) -> Result<Self> {
        let cut = Self {
            image_size,
            crop,
            stride,
        };
        cut.validate()?;
        Ok(cut)
    }

    /// Checks the geometry (the fields are public, so a cut may be built without [`Self::new`]).
    pub fn validate(&self) -> Result<()> {
        if self.crop == 0 || self.stride == 0 || self.crop > self.image_size {
            return Err(Error::InvalidArgument(format!(
                "full cut: crops of {} at stride {} do not fit images of {}",
                self.crop, self.stride, self.image_size
            )));
        }
        Ok(())
    }

    /// Offsets along one axis: Python's `range(0, size - crop + 1, stride)`; empty for an
    /// invalid geometry.
    pub fn axis_offsets(&self) -> Vec<usize> {
        if self.validate().is_err() {
            return Vec::new();
        }
        (0..=self.image_size - self.crop)
            .step_by(self.stride)
            .collect()
    }

    /// Patch offsets `(y, x)`, rows outer, columns inner: the order of [`Self::patches`], so
    /// that patch `i`'s score belongs at `offsets()[i]` in the image.
    pub fn offsets(&self) -> Vec<(usize, usize)> {
        let axis = self.axis_offsets();
        axis.iter()
            .flat_map(|&y| axis.iter().map(move |&x| (y, x)))
            .collect()
    }

    /// Patches per image (25 for the reference).
    pub fn patch_count(&self) -> usize {
        self.axis_offsets().len().pow(2)
    }

    /// The patches of one image, in [`FullCut::offsets`] order, cut in parallel.
    pub fn patches(&self, image: &FloatImage) -> Result<Vec<FloatImage>> {
        self.validate()?;
        if image.height != self.image_size || image.width != self.image_size {
            return Err(Error::InvalidArgument(format!(
                "full cut expects {0}x{0} images, got {1}x{2}",
                self.image_size, image.height, image.width
            )));
        }
        self.offsets()
            .into_par_iter()
            .map(|(y, x)| crop(image, y, x, self.crop, self.crop))
            .collect()
    }
}

/// `count` random crop offsets `(y, x)` for `height` x `width` images, each uniform in
/// `0..=height - crop` and `0..=width - crop` (torchvision `RandomCrop`'s
/// `torch.randint(0, h - th + 1)`, y drawn before x).
pub fn random_offsets(
    height: usize,
    width: usize,
    crop_size: usize,
    count: usize,
    rng: &mut SeededRng,
) -> Result<Vec<(usize, usize)>> {
    if crop_size == 0 || crop_size > height || crop_size > width {
        return Err(Error::InvalidArgument(format!(
            "random crops of {crop_size} do not fit {height}x{width} images"
        )));
    }
    Ok((0..count)
        .map(|_| {
            let y = rng.below((height - crop_size + 1) as u64) as usize;
            let x = rng.below((width - crop_size + 1) as u64) as usize;
            (y, x)
        })
        .collect())
}

/// Random training crops of a batch: `count` offsets ([`random_offsets`]), each applied to
/// every image; the result is offset-major (`count * batch.len()` crops: for each offset, the
/// images in batch order), as the reference's `torch.cat` of `RandomCrop(batch)` calls.
/// The reference uses batches of 4, 16 offsets and crops of 224 ([`CROPS_PER_BATCH`],
/// [`CROP_SIZE`]).
pub fn random_crops(
    batch: &[FloatImage],
    crop_size: usize,
    count: usize,
    rng: &mut SeededRng,
) -> Result<Vec<FloatImage>> {
    let Some(first) = batch.first() else {
        return Ok(Vec::new());
    };
    if batch
        .iter()
        .any(|i| i.height != first.height || i.width != first.width)
    {
        return Err(Error::InvalidArgument(
            "random crops: the images of a batch must have one size".to_string(),
        ));
    }
    let offsets = random_offsets(first.height, first.width, crop_size, count, rng)?;
    offsets
        .par_iter()
        .flat_map_iter(|&(y, x)| {
            batch
                .iter()
                .map(move |image| crop(image, y, x, crop_size, crop_size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(size: usize, tag: f32) -> FloatImage {
        let mut image = FloatImage::zeros(3, size, size);
        for (i, v) in image.data.iter_mut().enumerate() {
            *v = tag + i as f32;
        }
        image
    }

    #[test]
    fn the_reference_full_cut_has_25_patches() {
        let cut = FullCut::default();
        assert_eq!(cut.axis_offsets(), vec![0, 200, 400, 600, 800]);
        let offsets = cut.offsets();
        assert_eq!(offsets.len(), 25);
        assert_eq!(offsets[1], (0, 200));
        assert_eq!(offsets[5], (200, 0));
        assert_eq!(offsets[24], (800, 800));
    }

    #[test]
    fn patches_come_from_their_offsets() {
        let cut = FullCut::new(64, 24, 20).unwrap();
        assert_eq!(cut.axis_offsets(), vec![0, 20, 40]);
        let image = numbered(64, 0.0);
        let patches = cut.patches(&image).unwrap();
        assert_eq!(patches.len(), 9);
        for (patch, (y, x)) in patches.iter().zip(cut.offsets()) {
            assert_eq!(patch.get(2, 3, 5), image.get(2, y + 3, x + 5));
        }
        assert!(cut.patches(&numbered(32, 0.0)).is_err());
        assert!(FullCut::new(16, 24, 20).is_err());
        assert!(FullCut::new(64, 24, 0).is_err());
        // Built by hand with a bad geometry: errors and empty offsets, no panic.
        let bad = FullCut {
            image_size: 16,
            crop: 24,
            stride: 0,
        };
        assert!(bad.offsets().is_empty());
        assert!(bad.patches(&numbered(16, 0.0)).is_err());
    }

    #[test]
    fn a_stride_that_does_not_divide_leaves_the_last_pixels_out_like_the_reference() {
        // range(0, 128 - 32 + 1, 24) = 0, 24, 48, 72, 96: the last offset ends at 128 exactly.
        let cut = FullCut::new(128, 32, 24).unwrap();
        assert_eq!(cut.axis_offsets(), vec![0, 24, 48, 72, 96]);
        assert_eq!(cut.patch_count(), 25);
        // range(0, 100 - 32 + 1, 24) = 0, 24, 48: columns 80..100 are in no patch.
        assert_eq!(
            FullCut::new(100, 32, 24).unwrap().axis_offsets(),
            vec![0, 24, 48]
        );
    }

    #[test]
    fn random_crops_share_offsets_across_the_batch_and_are_seeded() {
        let batch: Vec<_> = (0..4).map(|i| numbered(40, 1e5 * i as f32)).collect();
        let crops = random_crops(&batch, 16, 16, &mut SeededRng::new(7)).unwrap();
        assert_eq!(crops.len(), 64);
        for offset in 0..16 {
            let group = &crops[offset * 4..offset * 4 + 4];
            for (i, c) in group.iter().enumerate() {
                // Same position in every image of the group: same value less the image's tag.
                assert_eq!(c.get(0, 0, 0) - 1e5 * i as f32, group[0].get(0, 0, 0));
            }
        }
        let again = random_crops(&batch, 16, 16, &mut SeededRng::new(7)).unwrap();
        assert_eq!(crops, again);
        let other = random_crops(&batch, 16, 16, &mut SeededRng::new(8)).unwrap();
        assert_ne!(crops, other);
        assert!(random_crops(&batch, 41, 1, &mut SeededRng::new(0)).is_err());
        // The crops are the windows at the drawn offsets.
        let offsets = random_offsets(40, 40, 16, 16, &mut SeededRng::new(7)).unwrap();
        for (i, &(y, x)) in offsets.iter().enumerate() {
            assert!(y <= 24 && x <= 24);
            assert_eq!(crops[i * 4 + 2].get(1, 3, 4), batch[2].get(1, y + 3, x + 4));
        }
        let mixed = [numbered(40, 0.0), numbered(32, 0.0)];
        assert!(random_crops(&mixed, 16, 1, &mut SeededRng::new(0)).is_err());
    }

    #[test]
    fn offsets_reach_both_ends_of_their_range() {
        let offsets = random_offsets(10, 12, 8, 400, &mut SeededRng::new(3)).unwrap();
        let ys: std::collections::BTreeSet<_> = offsets.iter().map(|o| o.0).collect();
        let xs: std::collections::BTreeSet<_> = offsets.iter().map(|o| o.1).collect();
        assert_eq!(ys, (0..=2).collect());
        assert_eq!(xs, (0..=4).collect());
        // A crop as large as the image has the single offset 0.
        let offsets = random_offsets(8, 8, 8, 5, &mut SeededRng::new(3)).unwrap();
        assert!(offsets.iter().all(|&o| o == (0, 0)));
        assert!(random_offsets(8, 8, 0, 1, &mut SeededRng::new(3)).is_err());
    }

    #[test]
    fn offsets_cover_the_whole_range_uniformly() {
        let mut rng = SeededRng::new(1);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[rng.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (900..1100).contains(&n)), "{seen:?}");
    }
}

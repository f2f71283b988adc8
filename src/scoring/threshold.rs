//! Decision thresholds calibrated on normal images' scores, at a false-positive rate.
//!
//! The label-free protocol calibrates on held-out normal images: the model was never fitted on
//! them, so the share of new normal images above the threshold is about the asked rate. A
//! threshold taken on the images the model was trained on flags new normal images more often
//! (their scores are lower than unseen images'): that is what `--holdout 0` falls back to, and
//! it says so.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Threshold that about `rate` of the normal `scores` exceed: the value with
/// `floor(rate * n)` scores strictly above it.
pub fn calibrate(scores: &[f64], rate: f64) -> Result<f64> {
    if scores.is_empty() {
        return Err(Error::InvalidArgument(
            "no normal scores to calibrate a threshold on".into(),
        ));
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let above = ((rate * sorted.len() as f64).floor() as usize).min(sorted.len() - 1);
    Ok(sorted[above])
}

/// Which normal images a threshold was calibrated on.
pub const HELD_OUT: &str = "held-out normal images";
pub const TRAINING: &str = "normal training images";

/// A calibrated operating point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The asked false-positive rate.
    pub fpr: f64,
    /// Image threshold on the score (`nor`): above it, an image is anomalous.
    pub threshold: f64,
    /// [`HELD_OUT`] or [`TRAINING`], and how many images.
    pub source: String,
    pub images: usize,
    /// Pixel threshold on the heatmaps at the same rate of normal pixels (full-cut models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_threshold: Option<f64>,
    /// What limits this calibration (too few images for the rate, training images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Calibration {
    /// Calibrates on `image_scores` (one per normal image of `source`) at `fpr`; `pixels`: the
    /// per-image patch maps for the pixel threshold, where the model has them.
    pub fn new(
        image_scores: &[f64],
        fpr: f64,
        source: &str,
        pixels: Option<&PixelMaps>,
    ) -> Result<Self> {
        let threshold = calibrate(image_scores, fpr)?;
        let n = image_scores.len();
        let mut notes = Vec::new();
        if source == TRAINING {
            notes.push(
                "calibrated on the images the model was trained on (no held-out normals): new \
                 normal images exceed it more often than the rate; train with --holdout to \
                 calibrate on unseen ones"
                    .to_string(),
            );
        }
        if fpr * (n as f64) < 1.0 {
            notes.push(format!(
                "{n} {source} are too few for a false-positive rate of {fpr} (it needs at least \
                 {} images): the threshold is their highest score",
                (1.0 / fpr).ceil()
            ));
        }
        Ok(Self {
            fpr,
            threshold,
            source: source.to_string(),
            images: n,
            pixel_threshold: pixels.map(|p| p.threshold(fpr)).transpose()?,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        })
    }
}

/// The patch layout of full-cut images: the patch offsets, the image's side, the patch side.
pub type Cut<'a> = (&'a [(usize, usize)], usize, usize);

impl Calibration {
    /// Calibrates on normal images' per-input scores (`groups[i]`: input `i`'s image, of
    /// `images`; an image's inputs consecutive), with the pixel threshold where `cut` gives
    /// the images' patch layout.
    pub fn from_inputs(
        per_input: &[f64],
        (groups, images): (&[usize], usize),
        fpr: f64,
        source: &str,
        cut: Option<Cut<'_>>,
    ) -> Result<Self> {
        let pixels = cut
            .map(|(offsets, side, patch)| {
                let per_image: Vec<Vec<f64>> = per_input
                    .chunks(offsets.len().max(1))
                    .map(<[f64]>::to_vec)
                    .collect();
                PixelMaps::new(&per_image, offsets, side, patch)
            })
            .transpose()?;
        let image_scores = super::evaluation::group_max(per_input, groups, images);
        Self::new(&image_scores, fpr, source, pixels.as_ref())
    }
}

/// The heatmap of one image: each pixel of the `side` x `side` image takes the max score of the
/// `patch` x `patch` patches (at `offsets`) covering it; uncovered pixels are -inf.
pub fn patch_map(
    scores: &[f64],
    offsets: &[(usize, usize)],
    side: usize,
    patch: usize,
) -> Vec<f64> {
    let mut map = vec![f64::NEG_INFINITY; side * side];
    for (&s, &(y0, x0)) in scores.iter().zip(offsets) {
        for y in y0..(y0 + patch).min(side) {
            for v in &mut map[y * side + x0..y * side + (x0 + patch).min(side)] {
                *v = v.max(s);
            }
        }
    }
    map
}

/// The heatmaps of normal images, as distinct values with their pixel counts.
#[derive(Debug, Clone, Default)]
pub struct PixelMaps {
    values: Vec<(f64, u64)>,
}

impl PixelMaps {
    /// From each image's patch scores (`scores[g]`: image `g`'s patches, at `offsets`): each
    /// cell of the patch grid counts its area at the max score of the patches covering it.
    pub fn new(
        images: &[Vec<f64>],
        offsets: &[(usize, usize)],
        side: usize,
        patch: usize,
    ) -> Result<Self> {
        let cells = super::pixel::patch_cells(offsets, side, patch);
        let mut values = Vec::with_capacity(images.len() * cells.len());
        for scores in images {
            if scores.len() != offsets.len() {
                return Err(Error::InvalidArgument(format!(
                    "an image has {} patch scores, its cut {} patches",
                    scores.len(),
                    offsets.len()
                )));
            }
            for (covering, area) in &cells {
                let v = super::pixel::cover_max(covering, scores);
                if v.is_finite() {
                    values.push((v, *area));
                }
            }
        }
        Ok(Self { values })
    }

    /// The pixel threshold that `rate` of these pixels exceed (as [`calibrate`] over every
    /// pixel).
    pub fn threshold(&self, rate: f64) -> Result<f64> {
        let total: u64 = self.values.iter().map(|v| v.1).sum();
        if total == 0 {
            return Err(Error::InvalidArgument(
                "no normal pixels to calibrate a pixel threshold on".into(),
            ));
        }
        let mut sorted = self.values.clone();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
        let rank = ((rate * total as f64).floor() as u64).min(total - 1);
        let mut seen = 0;
        for (v, n) in sorted {
            seen += n;
            if seen > rank {
                return Ok(v);
            }
        }
        unreachable!("the rank is below the total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_threshold_flags_about_one_percent() {
        let scores: Vec<f64> = (0..200).map(f64::from).collect();
        let t = calibrate(&scores, 0.01).unwrap();
        assert_eq!(scores.iter().filter(|&&s| s > t).count(), 2);
        // Fewer than 100 images: none of them is flagged.
        assert_eq!(calibrate(&[3.0, 1.0, 2.0], 0.01).unwrap(), 3.0);
        assert!(calibrate(&[], 0.01).is_err());
    }

    #[test]
    fn too_few_images_and_training_images_are_said() {
        let c = Calibration::new(&[1.0, 2.0, 3.0], 0.01, HELD_OUT, None).unwrap();
        assert_eq!(c.threshold, 3.0);
        let note = c.note.unwrap();
        assert!(
            note.contains("too few") && note.contains("100 images"),
            "{note}"
        );
        let scores: Vec<f64> = (0..100).map(f64::from).collect();
        assert!(
            Calibration::new(&scores, 0.01, HELD_OUT, None)
                .unwrap()
                .note
                .is_none()
        );
        let c = Calibration::new(&scores, 0.01, TRAINING, None).unwrap();
        assert!(c.note.unwrap().contains("trained on"));
    }

    #[test]
    fn the_pixel_threshold_is_the_quantile_of_every_pixel() {
        // A 4x4 image, 2x2 patches at the four corners: 4 pixels per score.
        let offsets = [(0, 0), (0, 2), (2, 0), (2, 2)];
        let maps = PixelMaps::new(&[vec![1.0, 2.0, 3.0, 4.0]], &offsets, 4, 2).unwrap();
        assert!(PixelMaps::new(&[vec![1.0]], &offsets, 4, 2).is_err());
        // 16 pixels, rate 0.25: 4 may be above -> the threshold is 3 (4 pixels at 4).
        assert_eq!(maps.threshold(0.25).unwrap(), 3.0);
        assert_eq!(maps.threshold(0.0).unwrap(), 4.0);
        assert_eq!(maps.threshold(0.99).unwrap(), 1.0);
        // The cells equal the painted heatmap, pixel by pixel.
        let offsets = [(0, 0), (0, 3), (3, 0), (3, 3), (1, 2)];
        let scores = vec![0.5, 2.0, 1.5, 1.0, 3.0];
        let map = patch_map(&scores, &offsets, 7, 4);
        let painted: Vec<f64> = map.iter().copied().filter(|v| v.is_finite()).collect();
        let cells = PixelMaps::new(&[scores], &offsets, 7, 4).unwrap();
        for rate in [0.0, 0.05, 0.2, 0.5, 0.9] {
            assert_eq!(
                cells.threshold(rate).unwrap(),
                calibrate(&painted, rate).unwrap(),
                "{rate}"
            );
        }
        // Overlapping patches take the max.
        let map = patch_map(&[1.0, 5.0], &[(0, 0), (1, 1)], 3, 2);
        assert_eq!(
            map,
            [
                1.0,
                1.0,
                f64::NEG_INFINITY,
                1.0,
                5.0,
                5.0,
                f64::NEG_INFINITY,
                5.0,
                5.0
            ]
        );
        assert!(PixelMaps::default().threshold(0.1).is_err());
    }
}

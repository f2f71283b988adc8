//! Pixel-level ROC AUC of the patch-score heatmaps, where ground-truth masks exist.
//!
//! The heatmap of an image (as `mtad detect` draws it) gives each pixel of the resized image the
//! max score of the full-cut patches covering it. It is constant on the cells cut out by the
//! patch borders, so the pixel AUROC over every pixel of every test image is computed exactly
//! from, per cell, the patches covering it and its counts of defect and normal mask pixels:
//! a weighted ROC AUC (ties count 1/2, as for the image AUROC) with no per-pixel score maps.
//!
//! Masks are resized to the image's resized side with nearest-neighbour sampling; a mask pixel
//! above 127 is a defect pixel. Normal (`good`) test images count as all-normal pixels. Defect
//! images without a mask are left out of the pixel AUROC (the dataset check lists them).
//!
//! The AUPRO (MVTec AD's per-region overlap, integrated up to a false positive rate) is computed
//! from the same cells: each cell also counts its defect pixels per ground-truth region (the
//! 8-connected components of each resized mask). [`aupro_maps`] is the same metric on per-pixel
//! maps, a port of MVTec AD's evaluation code (`compute_pro` and `trapezoid`).

use std::path::PathBuf;

use crate::{Error, Result};

mod pro;

pub use pro::aupro_maps;
use pro::{ProItem, label_regions, pro_area};

/// A region of one image covered by the same patches.
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    /// Indices of the inputs (patches) covering it.
    inputs: Vec<usize>,
    defect: u64,
    normal: u64,
    /// Its defect pixels per ground-truth region: `(region, pixels)`, regions numbered over the
    /// whole test set.
    regions: Vec<(u32, u64)>,
}

/// The ground truth of a test set at pixel level.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelTruth {
    cells: Vec<Cell>,
    /// The size in pixels of each ground-truth region (the pixels the cells count).
    region_sizes: Vec<u64>,
    /// Test images left out: defect images without a mask.
    pub left_out: usize,
}

/// The mask of one test image.
#[derive(Debug, Clone, PartialEq)]
pub enum Mask {
    /// A normal image: every pixel is normal.
    Normal,
    /// A defect image's mask file.
    File(PathBuf),
    /// A defect image without a mask: left out.
    Missing,
}

impl PixelTruth {
    /// `inputs[i] = (image, (y, x))`: the image and patch offset of input `i` in the resized
    /// `side` x `side` image; patches are `patch` x `patch`; `masks` per image.
    /// `None` when no image has a mask of a defect (no pixel AUROC to compute).
    pub fn build(
        inputs: &[(usize, (usize, usize))],
        masks: &[Mask],
        side: usize,
        patch: usize,
    ) -> Result<Option<Self>> {
        if !masks.iter().any(|m| matches!(m, Mask::File(_))) {
            return Ok(None);
        }
        let mut per_image: Vec<Vec<(usize, (usize, usize))>> = vec![Vec::new(); masks.len()];
        for (i, &(image, offset)) in inputs.iter().enumerate() {
            per_image
                .get_mut(image)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("input {i}: image {image} has no mask entry"))
                })?
                .push((i, offset));
        }
        let mut cells = Vec::new();
        let mut region_sizes = Vec::new();
        let mut left_out = 0;
        for (image, mask) in masks.iter().enumerate() {
            let labels = match mask {
                Mask::Normal => None,
                Mask::File(path) => {
                    let (labels, count) = label_regions(&read_mask(path, side)?, side, side);
                    let first = u32::try_from(region_sizes.len())
                        .ok()
                        .filter(|f| f.checked_add(count).is_some())
                        .ok_or_else(|| {
                            Error::InvalidArgument("too many ground-truth regions".into())
                        })?;
                    region_sizes.resize(region_sizes.len() + count as usize, 0);
                    Some((labels, first))
                }
                Mask::Missing => {
                    left_out += 1;
                    continue;
                }
            };
            let image_cells = image_cells(
                &per_image[image],
                labels.as_ref().map(|(l, first)| (l.as_slice(), *first)),
                side,
                patch,
            );
            for cell in &image_cells {
                for &(region, pixels) in &cell.regions {
                    region_sizes[region as usize] += pixels;
                }
            }
            cells.extend(image_cells);
        }
        Ok(Some(Self {
            cells,
            region_sizes,
            left_out,
        }))
    }

    /// Pixel AUROC of per-input scores (a pixel's score: the max of its covering patches').
    pub fn auroc(&self, per_input: &[f64]) -> Result<f64> {
        let mut weighted: Vec<(f64, u64, u64)> = self
            .cells
            .iter()
            .map(|c| {
                let score = cover_max(&c.inputs, per_input);
                (score, c.defect, c.normal)
            })
            .collect();
        weighted_roc_auc(&mut weighted)
    }

    /// AUPRO of per-input scores (a pixel's score: the max of its covering patches') up to the
    /// false positive rate `max_fpr` (MVTec AD uses 0.3), normalised by `max_fpr`: equal to
    /// [`aupro_maps`] of the per-pixel heatmaps, computed from the cells. Errors when there is
    /// no ground-truth region or no normal pixel, on a score that is not finite, or when
    /// `max_fpr` is not in (0, 1].
    pub fn aupro(&self, per_input: &[f64], max_fpr: f64) -> Result<f64> {
        let mut items: Vec<ProItem> = self
            .cells
            .iter()
            .map(|c| {
                let score = cover_max(&c.inputs, per_input);
                let overlap = c
                    .regions
                    .iter()
                    .map(|&(r, pixels)| pixels as f64 / self.region_sizes[r as usize] as f64)
                    .sum();
                ProItem {
                    score,
                    normal: c.normal,
                    overlap,
                }
            })
            .collect();
        pro_area(&mut items, self.region_sizes.len(), max_fpr)
    }
}

/// The defect pixels of a mask resized (nearest) to `side` x `side`.
fn read_mask(path: &std::path::Path, side: usize) -> Result<Vec<bool>> {
    let mask = crate::data::folder::open_image(path)?
        .decode()
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .to_luma8();
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let mut out = vec![false; side * side];
    for y in 0..side {
        let sy = ((y * h) / side).min(h - 1);
        for x in 0..side {
            let sx = ((x * w) / side).min(w - 1);
            out[y * side + x] = mask.get_pixel(sx as u32, sy as u32).0[0] > 127;
        }
    }
    Ok(out)
}

/// A pixel's score: the max of the scores of the patches (inputs) covering it.
pub(crate) fn cover_max(covering: &[usize], per_input: &[f64]) -> f64 {
    covering
        .iter()
        .map(|&i| per_input[i])
        .fold(f64::NEG_INFINITY, f64::max)
}

/// The cells of an image cut by patches at `offsets` (an image without a mask): for each
/// cell, the indices of the patches covering it and its area in pixels. Cells no patch covers
/// are left out.
pub(crate) fn patch_cells(
    offsets: &[(usize, usize)],
    side: usize,
    patch: usize,
) -> Vec<(Vec<usize>, u64)> {
    let patches: Vec<(usize, (usize, usize))> = offsets.iter().copied().enumerate().collect();
    image_cells(&patches, None, side, patch)
        .into_iter()
        .map(|c| (c.inputs, c.normal))
        .collect()
}

/// The cells of one image: the grid cut by every patch border.
fn image_cells(
    patches: &[(usize, (usize, usize))],
    labels: Option<(&[u32], u32)>,
    side: usize,
    patch: usize,
) -> Vec<Cell> {
    let borders = |axis: fn(&(usize, usize)) -> usize| {
        let mut b: Vec<usize> = vec![0, side];
        for (_, o) in patches {
            b.push(axis(o).min(side));
            b.push((axis(o) + patch).min(side));
        }
        b.sort_unstable();
        b.dedup();
        b
    };
    let ys = borders(|o| o.0);
    let xs = borders(|o| o.1);
    let mut cells = Vec::new();
    for y in ys.windows(2) {
        for x in xs.windows(2) {
            let inputs: Vec<usize> = patches
                .iter()
                .filter(|(_, (py, px))| {
                    *py <= y[0] && y[1] <= py + patch && *px <= x[0] && x[1] <= px + patch
                })
                .map(|&(i, _)| i)
                .collect();
            // A cell no patch covers has no score; the full cut covers the whole image.
            if inputs.is_empty() {
                continue;
            }
            let area = ((y[1] - y[0]) * (x[1] - x[0])) as u64;
            // Its defect pixels per region (labels 1.. of the image's regions, numbered from
            // `first` over the test set).
            let mut regions: Vec<(u32, u64)> = Vec::new();
            if let Some((labels, first)) = labels {
                for r in y[0]..y[1] {
                    for &l in labels[r * side + x[0]..r * side + x[1]]
                        .iter()
                        .filter(|&&l| l > 0)
                    {
                        let region = first + l - 1;
                        match regions.iter_mut().find(|(id, _)| *id == region) {
                            Some((_, n)) => *n += 1,
                            None => regions.push((region, 1)),
                        }
                    }
                }
            }
            let marked: u64 = regions.iter().map(|&(_, n)| n).sum();
            cells.push(Cell {
                inputs,
                defect: marked,
                normal: area - marked,
                regions,
            });
        }
    }
    cells
}

/// ROC AUC of scored groups `(score, positives, negatives)`, ties counted 1/2: equal to
/// [`roc_auc`](super::roc_auc) of every sample listed one by one.
pub fn weighted_roc_auc(groups: &mut [(f64, u64, u64)]) -> Result<f64> {
    if let Some(g) = groups.iter().find(|g| !g.0.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "pixel AUROC: a score is {} (not finite)",
            g.0
        )));
    }
    let positives: u64 = groups.iter().map(|g| g.1).sum();
    let negatives: u64 = groups.iter().map(|g| g.2).sum();
    if positives == 0 || negatives == 0 {
        return Err(Error::InvalidArgument(
            "pixel AUROC is undefined without both defect and normal pixels".into(),
        ));
    }
    groups.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut below, mut area, mut start) = (0f64, 0f64, 0);
    while start < groups.len() {
        let mut end = start;
        let (mut pos, mut neg) = (0f64, 0f64);
        while end < groups.len() && groups[end].0 == groups[start].0 {
            pos += groups[end].1 as f64;
            neg += groups[end].2 as f64;
            end += 1;
        }
        area += pos * (below + 0.5 * neg);
        below += neg;
        start = end;
    }
    Ok(area / (positives as f64 * negatives as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::roc_auc;

    #[test]
    fn weighted_auc_equals_the_auc_of_the_expanded_samples() {
        let mut groups = vec![
            (0.3, 2, 1),
            (0.1, 0, 3),
            (0.3, 1, 2),
            (0.9, 4, 0),
            (0.5, 0, 1),
        ];
        let (mut scores, mut labels) = (Vec::new(), Vec::new());
        for &(s, p, n) in &groups {
            for _ in 0..p {
                scores.push(s);
                labels.push(1);
            }
            for _ in 0..n {
                scores.push(s);
                labels.push(0);
            }
        }
        let expected = roc_auc(&scores, &labels).unwrap();
        let got = weighted_roc_auc(&mut groups).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert!(weighted_roc_auc(&mut [(1.0, 3, 0)]).is_err());
    }

    /// A 6x6 image cut by 4x4 patches at (0,0) and (2,2); its defect pixels are the 2x2 block
    /// at rows 4..6, cols 4..6 (only patch 1 covers it).
    fn two_patch_layout() -> PixelTruth {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let mut mask = image::GrayImage::new(6, 6);
        for y in 4..6 {
            for x in 4..6 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        mask.save(&path).unwrap();
        let inputs = [(0, (0, 0)), (0, (2, 2))];
        PixelTruth::build(&inputs, &[Mask::File(path)], 6, 4)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn pixel_auroc_counts_every_pixel_under_the_max_of_its_patches() {
        // A 6x6 image, 4x4 patches at (0,0) and (2,2): borders 0,2,4,6 cut nine 2x2 cells,
        // of which (0..2, 4..6) and (4..6, 0..2) no patch covers.
        let truth = two_patch_layout();
        // Scores [1, 2]: the 4 defect pixels score 2; normal pixels: 12 covered by patch 0
        // only score 1, 4 covered by both and 8 by patch 1 only score 2.
        // AUC = (12 + 0.5 * 12) / (4 * 24) * 4 = 0.75.
        let auc = truth.auroc(&[1.0, 2.0]).unwrap();
        // Normal pixels: covered by patch 0 only: 16 - 4 = 12 at score 1; by patch 1: 12 at 2.
        // AUC = P(defect > normal) + 1/2 P(tie) = 12/24 + 0.5 * 12/24 = 0.75.
        assert!((auc - 0.75).abs() < 1e-12, "{auc}");
        // Scores [2, 1]: the defect scores 1, tied with the 8 patch-1-only normal pixels and
        // below the other 16: AUC = 0.5 * 8 / 24.
        let auc = truth.auroc(&[2.0, 1.0]).unwrap();
        assert!((auc - 1.0 / 6.0).abs() < 1e-12, "{auc}");
        // A normal image adds only normal pixels; a defect image without a mask is left out.
        let truth = PixelTruth::build(
            &[(0, (0, 0)), (1, (0, 0))],
            &[Mask::Normal, Mask::Missing],
            6,
            4,
        )
        .unwrap();
        assert!(truth.is_none(), "no mask at all: no pixel AUROC");
    }

    #[test]
    fn cell_aupro_of_a_hand_worked_layout() {
        // The layout above: one region (the 2x2 block), 24 normal pixels. Scores [1, 2]: the
        // region and 12 normal pixels score 2, the other 12 score 1. Curve: (0, 0), (0.5, 1),
        // (1, 1), (1, 1). Up to 0.3: the PRO at 0.3 interpolates to 0.6, area 0.5 * 0.6 * 0.3
        // = 0.09, normalised 0.3. Up to 1: 0.25 + 0.5 = 0.75.
        let truth = two_patch_layout();
        let aupro = truth.aupro(&[1.0, 2.0], 0.3).unwrap();
        assert!((aupro - 0.3).abs() < 1e-12, "{aupro}");
        let aupro = truth.aupro(&[1.0, 2.0], 1.0).unwrap();
        assert!((aupro - 0.75).abs() < 1e-12, "{aupro}");
        assert!(truth.aupro(&[1.0, f64::NAN], 0.3).is_err());
        assert!(truth.aupro(&[1.0, 2.0], 0.0).is_err());
    }

    /// A small deterministic generator for the random layouts.
    fn generator(mut state: u64) -> impl FnMut() -> usize {
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        }
    }

    #[test]
    fn cell_aupro_equals_the_aupro_of_the_expanded_heatmaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut next = generator(7);
        for case in 0..8 {
            let side = 10 + next() % 12;
            let patch = 2 + next() % 6;
            let stride = 1 + next() % patch;
            // The full cut: every `stride`, and a last patch flush with the border.
            let mut offsets: Vec<usize> = (0..)
                .step_by(stride)
                .take_while(|&o| o + patch <= side)
                .collect();
            if offsets.last().unwrap() + patch < side {
                offsets.push(side - patch);
            }
            // Image 0 is good, image 2 of odd cases has no mask (left out), the rest masks.
            let images = 4;
            let mut masks = Vec::new();
            let mut defects: Vec<Option<Vec<bool>>> = Vec::new();
            for image in 0..images {
                if image == 0 {
                    masks.push(Mask::Normal);
                    defects.push(Some(vec![false; side * side]));
                    continue;
                }
                if image == 2 && case % 2 == 1 {
                    masks.push(Mask::Missing);
                    defects.push(None);
                    continue;
                }
                let mut defect = vec![false; side * side];
                for _ in 0..1 + next() % 3 {
                    let (y, x) = (next() % (side - 3), next() % (side - 3));
                    for r in y..y + 1 + next() % 4 {
                        for c in x..x + 1 + next() % 4 {
                            defect[r * side + c] = true;
                        }
                    }
                }
                // Lone pixels, some touching others only diagonally.
                for _ in 0..next() % 5 {
                    defect[next() % (side * side)] = true;
                }
                let mut png = image::GrayImage::new(side as u32, side as u32);
                for (i, &d) in defect.iter().enumerate() {
                    if d {
                        png.put_pixel((i % side) as u32, (i / side) as u32, image::Luma([255]));
                    }
                }
                let path = dir.path().join(format!("{case}-{image}.png"));
                png.save(&path).unwrap();
                masks.push(Mask::File(path));
                defects.push(Some(defect));
            }
            let mut inputs = Vec::new();
            for image in 0..images {
                for &oy in &offsets {
                    for &ox in &offsets {
                        inputs.push((image, (oy, ox)));
                    }
                }
            }
            // Few levels: ties within and across images.
            let levels = [3, 10, 1000][case % 3];
            let scores: Vec<f64> = inputs
                .iter()
                .map(|_| (next() % levels) as f64 / levels as f64)
                .collect();
            let truth = PixelTruth::build(&inputs, &masks, side, patch)
                .unwrap()
                .unwrap();
            // The heatmaps: each pixel the max of its covering patches.
            let (mut maps, mut truths) = (Vec::new(), Vec::new());
            for (image, defect) in defects.into_iter().enumerate() {
                let Some(defect) = defect else { continue };
                let mut map = vec![f64::NEG_INFINITY; side * side];
                for (i, &(_, (oy, ox))) in inputs.iter().enumerate().filter(|(_, p)| p.0 == image) {
                    for y in oy..oy + patch {
                        for x in ox..ox + patch {
                            map[y * side + x] = map[y * side + x].max(scores[i]);
                        }
                    }
                }
                maps.push(map);
                truths.push(defect);
            }
            for max_fpr in [0.3, 0.05, 1.0] {
                let cells = truth.aupro(&scores, max_fpr).unwrap();
                let pixels = aupro_maps(&maps, &truths, side, side, max_fpr).unwrap();
                assert!(
                    (cells - pixels).abs() < 1e-12,
                    "case {case}, max_fpr {max_fpr}: cells {cells} vs pixels {pixels}"
                );
            }
        }
    }
}

//! The AUPRO of MVTec AD: the per-region overlap (PRO) against the false positive rate of the
//! normal pixels, integrated up to a false positive rate and normalised by it. A port of MVTec
//! AD's evaluation code (`compute_pro`, `trapezoid`), shared by [`aupro_maps`] (per-pixel maps)
//! and [`PixelTruth::aupro`](super::PixelTruth::aupro) (the heatmaps' cells).

use crate::{Error, Result};

/// The 8-connected components of a `width` x `height` mask (true = defect, row-major), as
/// `scipy.ndimage.label` with a 3x3 structure of ones: per pixel 0 (not defect) or its region's
/// number, 1 to the count, numbered in the order of their first pixel; and the count.
pub(super) fn label_regions(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (y, x) = (p / width, p % width);
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let q = ny * width + nx;
                    if mask[q] && labels[q] == 0 {
                        labels[q] = count;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// A group of pixels with one score, for the PRO curve: how many of them are normal, and the
/// sum over them of `1 / (size of their region)` for their defect pixels.
pub(super) struct ProItem {
    pub(super) score: f64,
    pub(super) normal: u64,
    pub(super) overlap: f64,
}

/// The normalised area under the PRO curve of scored pixel groups, over `regions` ground-truth
/// regions, up to `max_fpr`: MVTec AD's `compute_pro` then `trapezoid(fprs, pros, max_fpr)`,
/// divided by `max_fpr`.
pub(super) fn pro_area(items: &mut [ProItem], regions: usize, max_fpr: f64) -> Result<f64> {
    if !(max_fpr > 0.0 && max_fpr <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "AUPRO: the largest false positive rate is {max_fpr}, it must be in (0, 1]"
        )));
    }
    if let Some(item) = items.iter().find(|i| !i.score.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "AUPRO: a score is {} (not finite)",
            item.score
        )));
    }
    let normal_total: u64 = items.iter().map(|i| i.normal).sum();
    if regions == 0 || normal_total == 0 {
        return Err(Error::InvalidArgument(
            "AUPRO is undefined without both a defect region and normal pixels".into(),
        ));
    }
    // Highest score first; one point per distinct score, after all the pixels tied at it.
    items.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut fprs = vec![0.0];
    let mut pros = vec![0.0];
    let (mut normal, mut overlap, mut start) = (0u64, 0f64, 0);
    while start < items.len() {
        let mut end = start;
        while end < items.len() && items[end].score == items[start].score {
            normal += items[end].normal;
            overlap += items[end].overlap;
            end += 1;
        }
        fprs.push((normal as f64 / normal_total as f64).min(1.0));
        pros.push((overlap / regions as f64).min(1.0));
        start = end;
    }
    fprs.push(1.0);
    pros.push(1.0);
    Ok(trapezoid(&fprs, &pros, max_fpr) / max_fpr)
}

/// MVTec AD's `trapezoid(x, y, x_max)`: the trapezoid-rule area under the points (`x` sorted,
/// non-decreasing, from 0 to 1) up to `x_max`; when `x_max` is not one of the `x`, the part from
/// the last `x` below it to `x_max` is added, with `y` linearly interpolated at `x_max`.
fn trapezoid(x: &[f64], y: &[f64], x_max: f64) -> f64 {
    let mut correction = 0.0;
    if !x.contains(&x_max) {
        // Python's bisect (bisect_right): the first index with x > x_max; 0 < ins < len.
        let ins = x.partition_point(|&v| v <= x_max);
        let y_interp =
            y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]));
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1]);
    }
    let kept: Vec<(f64, f64)> = x
        .iter()
        .zip(y)
        .filter(|&(&x, _)| x <= x_max)
        .map(|(&x, &y)| (x, y))
        .collect();
    kept.windows(2)
        .map(|w| 0.5 * (w[1].1 + w[0].1) * (w[1].0 - w[0].0))
        .sum::<f64>()
        + correction
}

/// AUPRO of per-pixel anomaly maps up to the false positive rate `max_fpr` (MVTec AD uses 0.3),
/// normalised by `max_fpr`, as MVTec AD's evaluation code (`compute_pro`, `trapezoid`):
/// `maps[i][y * width + x]` is pixel `(x, y)`'s score in image `i`, `masks[i]` its ground truth
/// (true = defect). The ground-truth regions are the 8-connected components of each mask; the
/// normal pixels are every non-defect pixel of every image. Over the thresholds `t` (each
/// distinct score, highest first) the false positive rate is the share of normal pixels scoring
/// at least `t`, the PRO the mean over the regions of their share of pixels scoring at least
/// `t`; the curve from (0, 0) to (1, 1) is integrated with the trapezoid rule up to `max_fpr`.
/// Errors on mismatched sizes, a score that is not finite, no region or no normal pixel, or
/// `max_fpr` not in (0, 1].
pub fn aupro_maps(
    maps: &[Vec<f64>],
    masks: &[Vec<bool>],
    width: usize,
    height: usize,
    max_fpr: f64,
) -> Result<f64> {
    if maps.len() != masks.len() {
        return Err(Error::InvalidArgument(format!(
            "AUPRO: {} anomaly maps but {} masks",
            maps.len(),
            masks.len()
        )));
    }
    let pixels = width * height;
    if let Some(i) = (0..maps.len()).find(|&i| maps[i].len() != pixels || masks[i].len() != pixels)
    {
        return Err(Error::InvalidArgument(format!(
            "AUPRO: image {i} has a map of {} and a mask of {} pixels, not {width} x {height}",
            maps[i].len(),
            masks[i].len()
        )));
    }
    let mut items = Vec::with_capacity(maps.len() * pixels);
    let mut regions = 0;
    for (map, mask) in maps.iter().zip(masks) {
        let (labels, count) = label_regions(mask, width, height);
        let mut sizes = vec![0u64; count as usize];
        for &l in labels.iter().filter(|&&l| l > 0) {
            sizes[l as usize - 1] += 1;
        }
        items.extend(map.iter().zip(&labels).map(|(&score, &l)| ProItem {
            score,
            normal: u64::from(l == 0),
            overlap: if l == 0 {
                0.0
            } else {
                1.0 / sizes[l as usize - 1] as f64
            },
        }));
        regions += count as usize;
    }
    pro_area(&mut items, regions, max_fpr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aupro_of_hand_worked_maps() {
        use std::slice::from_ref;
        // A 3 x 2 image; the defect pixels (0,0), (1,1), (2,1) are one 8-connected region of
        // 3 pixels (two regions under 4-connectivity); 3 normal pixels.
        //   scores  0.9 0.8 0.1      mask  1 0 0
        //           0.2 0.5 0.4            0 1 1
        // Curve: (0,0), (0,1/3) at 0.9, (1/3,1/3) at 0.8, (1/3,2/3) at 0.5, (1/3,1) at 0.4,
        // (2/3,1) at 0.2, (1,1) at 0.1, (1,1).
        let map = vec![0.9, 0.8, 0.1, 0.2, 0.5, 0.4];
        let mask = vec![true, false, false, false, true, true];
        let aupro = |maps: &[Vec<f64>], masks: &[Vec<bool>], max_fpr| {
            aupro_maps(maps, masks, 3, 2, max_fpr).unwrap()
        };
        let one = |max_fpr| aupro(from_ref(&map), from_ref(&mask), max_fpr);
        // Up to 0.3 (between 0 and 1/3, where the PRO is 1/3): 0.3 * 1/3, normalised: 1/3.
        // (Under 4-connectivity the first point would be (0, 1/2).)
        assert!((one(0.3) - 1.0 / 3.0).abs() < 1e-12, "{}", one(0.3));
        // Up to 2/3, one of the points: 1/9 + 1/3, normalised: 2/3.
        assert!((one(2.0 / 3.0) - 2.0 / 3.0).abs() < 1e-12);
        // The whole curve: 1/9 + 1/3 + 1/3.
        assert!((one(1.0) - 7.0 / 9.0).abs() < 1e-12);
        // A good image scoring 0 everywhere adds 6 normal pixels (9 in all): the points move
        // to (0,1/3), (1/9,1/3), (1/9,2/3), (1/9,1), (2/9,1), (1/3,1), (1,1). Up to 0.3:
        // 1/27 + 1/9 + (0.3 - 2/9) = 0.3 - 2/27, normalised 1 - 20/81 = 61/81.
        let maps = [map.clone(), vec![0.0; 6]];
        let masks = [mask.clone(), vec![false; 6]];
        let got = aupro(&maps, &masks, 0.3);
        assert!((got - 61.0 / 81.0).abs() < 1e-12, "{got}");
        // Errors: no region, no normal pixel, a score not finite, sizes that do not match.
        assert!(aupro_maps(from_ref(&map), &[vec![false; 6]], 3, 2, 0.3).is_err());
        assert!(aupro_maps(from_ref(&map), &[vec![true; 6]], 3, 2, 0.3).is_err());
        let mut bad = map.clone();
        bad[3] = f64::INFINITY;
        assert!(aupro_maps(&[bad], from_ref(&mask), 3, 2, 0.3).is_err());
        assert!(aupro_maps(from_ref(&map), from_ref(&mask), 2, 4, 0.3).is_err());
        assert!(aupro_maps(from_ref(&map), &[], 3, 2, 0.3).is_err());
        assert!(aupro_maps(&[map], &[mask], 3, 2, 1.5).is_err());
    }

    #[test]
    fn regions_are_8_connected() {
        // Diagonal neighbours join; a gap of one pixel separates.
        //   1 0 0 1
        //   0 1 0 0
        //   0 0 0 1
        let mask = [
            true, false, false, true, false, true, false, false, false, false, false, true,
        ];
        let (labels, count) = label_regions(&mask, 4, 3);
        assert_eq!(count, 3);
        assert_eq!(labels, [1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn aupro_equals_the_port_of_mvtec_ad_evaluation_code() {
        // tests/fixtures/metrics/make_metrics.py: MVTec AD's compute_pro and trapezoid.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics/metrics.json"
        ))
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = json["maps"].as_array().unwrap();
        assert!(!cases.is_empty());
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        for case in cases {
            let width = case["width"].as_u64().unwrap() as usize;
            let height = case["height"].as_u64().unwrap() as usize;
            let maps: Vec<Vec<f64>> = case["maps"]
                .as_array()
                .unwrap()
                .iter()
                .map(floats)
                .collect();
            let masks: Vec<Vec<bool>> = case["masks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().bytes().map(|b| b == b'1').collect())
                .collect();
            let regions: u32 = masks
                .iter()
                .map(|m| label_regions(m, width, height).1)
                .sum();
            assert_eq!(regions as u64, case["regions"].as_u64().unwrap());
            let expected = floats(&case["aupro"]);
            let official = floats(&case["aupro_official"]);
            for (i, max_fpr) in floats(&case["max_fpr"]).into_iter().enumerate() {
                let got = aupro_maps(&maps, &masks, width, height, max_fpr).unwrap();
                assert!(
                    (got - expected[i]).abs() < 1e-9,
                    "max_fpr {max_fpr}: ours {got}, the port's {}",
                    expected[i]
                );
                // The official code's float32 false positive rates move it by about 1e-8.
                assert!((got - official[i]).abs() < 1e-7);
            }
        }
    }
}

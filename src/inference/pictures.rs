//! `detect`'s pictures: the score heatmap and the reconstruction residual over the image, and
//! the binary defect mask.

use crate::data::FloatImage;
use crate::output::png_bytes;
use crate::scoring::threshold::patch_map;
use crate::{Error, Result};

/// The image (as the networks saw it) with the patch scores over it: each pixel takes the max
/// score of the patches covering it; scores at or above the threshold are red, lower ones fade
/// from yellow to transparent.
pub(crate) fn heatmap_png(
    image: &FloatImage,
    scores: &[f64],
    offsets: &[(usize, usize)],
    side: usize,
    threshold: f64,
) -> Result<Vec<u8>> {
    let map = patch_map(scores, offsets, image.height, side);
    let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
    overlay_png(image, &map, lo, threshold)
}

/// A binary mask at the image file's own `(width, height)`: white where the `side` x `side`
/// heatmap `map` (sampled nearest) is above `threshold`.
pub(crate) fn mask_png(
    map: &[f64],
    side: usize,
    (w, h): (usize, usize),
    threshold: f64,
) -> Result<Vec<u8>> {
    let mut mask = image::GrayImage::new(w as u32, h as u32);
    for y in 0..h {
        let sy = (y * side / h).min(side - 1);
        for x in 0..w {
            let sx = (x * side / w).min(side - 1);
            if map[sy * side + sx] > threshold {
                mask.put_pixel(x as u32, y as u32, image::Luma([255]));
            }
        }
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    mask.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Training(format!("encoding a mask: {e}")))?;
    Ok(bytes.into_inner())
}

/// The image with the student's reconstruction residual over it: per pixel, the squared error
/// averaged over the colour channels and over the patches covering it; red at the image's
/// largest residual, fading to transparent at its smallest.
/// `squared` is `[patches, side, side]` in input order.
pub(crate) fn residual_png(
    image: &FloatImage,
    squared: &[f32],
    offsets: &[(usize, usize)],
    side: usize,
) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let mut sum = vec![0f64; h * w];
    let mut count = vec![0u32; h * w];
    for (p, &(y0, x0)) in offsets.iter().enumerate() {
        for y in 0..side.min(h - y0) {
            for x in 0..side.min(w - x0) {
                let i = (y0 + y) * w + x0 + x;
                sum[i] += squared[(p * side + y) * side + x] as f64;
                count[i] += 1;
            }
        }
    }
    let map: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(&s, &n)| {
            if n > 0 {
                s / n as f64
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let finite = map.iter().copied().filter(|v| v.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    overlay_png(image, &map, lo, hi)
}

/// `image` (values in [-1, 1]) with `map` over it: at or above `high` red, between `low` and
/// `high` from transparent to yellow-orange, not finite: the image alone.
fn overlay_png(image: &FloatImage, map: &[f64], low: f64, high: f64) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let span = (high - low).max(1e-12);
    let mut rgb = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let base: Vec<f64> = (0..3)
                .map(|c| ((image.get(c, y, x) as f64 + 1.0) * 127.5).clamp(0.0, 255.0))
                .collect();
            let v = map[y * w + x];
            let t = if v.is_finite() {
                ((v - low) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (color, alpha) = if v.is_finite() && v >= high {
                ([255.0, 0.0, 0.0], 0.6)
            } else {
                ([255.0, 220.0 * (1.0 - t), 0.0], 0.5 * t)
            };
            let px: Vec<u8> = (0..3)
                .map(|c| (base[c] * (1.0 - alpha) + color[c] * alpha).round() as u8)
                .collect();
            rgb.put_pixel(x as u32, y as u32, image::Rgb([px[0], px[1], px[2]]));
        }
    }
    png_bytes(&rgb, "a heatmap")
}

//! The reference's preprocessing, exactly: torchvision's `ToTensor()` (u8 / 255), then
//! `Normalize(0.5, 0.5)` (to [-1, 1]), then `Resize` on the *tensor*, then `CenterCrop`.
//!
//! torchvision >= 0.17 resizes tensors with `antialias=True` by default, which calls PyTorch's
//! `_upsample_bilinear2d_aa`: a separable triangle filter whose support grows with the
//! down-scaling factor, with weights normalised per output pixel. [`resize_bilinear`] computes
//! those same weights (PyTorch's `_compute_weights_aa`). When upscaling (CIFAR 32 -> 256, most
//! MVTec images -> 1024) the filter's support is one input pixel and the result is plain
//! bilinear interpolation with half-pixel centres (`align_corners=False`), edges clamped; when
//! downscaling (folders of images larger than the target) it is the antialiased filter. One
//! implementation therefore matches torchvision in both directions.

use rayon::prelude::*;

use super::FloatImage;
use crate::{Error, Result};

/// The reference's CIFAR-10 pipeline: resize to 256x256, then centre-crop 224x224.
pub const CIFAR_RESIZE: usize = 256;
pub const CIFAR_CROP: usize = 224;

/// `ToTensor` + `Normalize(0.5, 0.5)`: interleaved 8-bit RGB (`[H, W, 3]`) -> `[3, H, W]` in
/// [-1, 1].
pub fn normalize_rgb8(rgb: &[u8], width: usize, height: usize) -> FloatImage {
    debug_assert_eq!(rgb.len(), width * height * 3);
    let mut image = FloatImage::zeros(3, height, width);
    let plane = width * height;
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            image.data[c * plane + i] = to_unit(px[c]);
        }
    }
    image
}

/// One 8-bit value through `ToTensor` and `Normalize(0.5, 0.5)`, in float32 as torch does.
fn to_unit(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

/// Resampling weights of one axis: for each output index, the first input index and the taps.
struct AxisWeights {
    start: Vec<usize>,
    taps: Vec<Vec<f32>>,
}

/// PyTorch's `_compute_weights_aa` for the bilinear (triangle) filter, `align_corners=False`.
fn axis_weights(input: usize, output: usize) -> AxisWeights {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(output);
    let mut taps = Vec::with_capacity(output);
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // C++ casts truncate toward zero; negatives are clamped to 0 just after.
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(input as i64) as usize;
        let mut weights: Vec<f64> = (xmin..xmax)
            .map(|j| {
                let x = ((j as f64 - center + 0.5) * invscale).abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            weights.iter_mut().for_each(|w| *w /= total);
        }
        start.push(xmin);
        taps.push(weights.into_iter().map(|w| w as f32).collect());
    }
    AxisWeights { start, taps }
}

/// torchvision `Resize((height, width))` on a float tensor (bilinear, antialias=True).
pub fn resize_bilinear(image: &FloatImage, height: usize, width: usize) -> Result<FloatImage> {
    if height == 0 || width == 0 || image.height == 0 || image.width == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize a {}x{} image to {height}x{width}",
            image.height, image.width
        )));
    }
    if image.height == height && image.width == width {
        return Ok(image.clone());
    }
    let (in_h, in_w) = (image.height, image.width);
    let horizontal = axis_weights(in_w, width);
    let vertical = axis_weights(in_h, height);
    // Horizontal pass: [C, in_h, in_w] -> [C, in_h, width].
    let mut wide = vec![0.0f32; image.channels * in_h * width];
    wide.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let src = &image.data[row * in_w..(row + 1) * in_w];
            for (x, o) in out.iter_mut().enumerate() {
                let s = horizontal.start[x];
                *o = horizontal.taps[x]
                    .iter()
                    .zip(&src[s..])
                    .map(|(w, v)| w * v)
                    .sum();
            }
        });
    // Vertical pass: [C, in_h, width] -> [C, height, width].
    let mut out = FloatImage::zeros(image.channels, height, width);
    out.data
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, dst)| {
            let (c, y) = (row / height, row % height);
            let plane = &wide[c * in_h * width..(c + 1) * in_h * width];
            dst.fill(0.0);
            for (k, w) in vertical.taps[y].iter().enumerate() {
                let src = &plane[(vertical.start[y] + k) * width..][..width];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += w * s;
                }
            }
        });
    Ok(out)
}

/// torchvision `CenterCrop((height, width))`: offsets `int(round((H - h) / 2))`.
pub fn center_crop(image: &FloatImage, height: usize, width: usize) -> Result<FloatImage> {
    if height > image.height || width > image.width {
        return Err(Error::InvalidArgument(format!(
            "cannot centre-crop {height}x{width} from a {}x{} image",
            image.height, image.width
        )));
    }
    let top = python_round((image.height - height) as f64 / 2.0);
    let left = python_round((image.width - width) as f64 / 2.0);
    crop(image, top, left, height, width)
}

/// Python's `round()`: halves go to the even neighbour.
fn python_round(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r as usize
}

/// The `height x width` window at (`top`, `left`).
pub fn crop(
    image: &FloatImage,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
) -> Result<FloatImage> {
    if top + height > image.height || left + width > image.width {
        return Err(Error::InvalidArgument(format!(
            "crop {height}x{width} at ({top}, {left}) does not fit a {}x{} image",
            image.height, image.width
        )));
    }
    let mut out = FloatImage::zeros(image.channels, height, width);
    for c in 0..image.channels {
        for y in 0..height {
            let src = ((c * image.height) + top + y) * image.width + left;
            let dst = (c * height + y) * width;
            out.data[dst..dst + width].copy_from_slice(&image.data[src..src + width]);
        }
    }
    Ok(out)
}

/// The reference's CIFAR-10 image: planar 8-bit RGB (1024 R, 1024 G, 1024 B for 32x32) ->
/// [-1, 1] -> resize to `resize` x `resize` -> centre-crop `crop_size`.
/// The reference uses `resize` 256 and `crop_size` 224 ([`CIFAR_RESIZE`], [`CIFAR_CROP`]).
pub fn cifar_image(
    planar_rgb: &[u8],
    side: usize,
    resize: usize,
    crop_size: usize,
) -> Result<FloatImage> {
    if planar_rgb.len() != 3 * side * side {
        return Err(Error::InvalidArgument(format!(
            "a {side}x{side} CIFAR image has {} bytes, got {}",
            3 * side * side,
            planar_rgb.len()
        )));
    }
    let image = FloatImage {
        channels: 3,
        height: side,
        width: side,
        data: planar_rgb.iter().map(|&v| to_unit(v)).collect(),
    };
    center_crop(
        &resize_bilinear(&image, resize, resize)?,
        crop_size,
        crop_size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(channels: usize, height: usize, width: usize) -> FloatImage {
        let mut image = FloatImage::zeros(channels, height, width);
        for (i, v) in image.data.iter_mut().enumerate() {
            *v = ((i * 37) % 101) as f32 / 50.0 - 1.0;
        }
        image
    }

    #[test]
    fn upscaling_is_half_pixel_bilinear_with_clamped_edges() {
        let image = FloatImage {
            channels: 1,
            height: 1,
            width: 2,
            data: vec![0.0, 1.0],
        };
        let out = resize_bilinear(&image, 1, 4).unwrap();
        // Output centres at input coordinates -0.25, 0.25, 0.75, 1.25.
        assert_eq!(out.data, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn downscaling_by_two_averages_pairs() {
        let image = FloatImage {
            channels: 1,
            height: 1,
            width: 4,
            data: vec![0.0, 1.0, 2.0, 3.0],
        };
        // Triangle filter of support 2 around centres 1.0 and 3.0 (input coordinates):
        // weights 0.25, 0.75, 0.75, 0.25 over 4 taps, clipped at the edges and renormalised.
        let out = resize_bilinear(&image, 1, 2).unwrap();
        let left = (0.75 * 0.0 + 0.75 * 1.0 + 0.25 * 2.0) / 1.75;
        let right = (0.25 * 1.0 + 0.75 * 2.0 + 0.75 * 3.0) / 1.75;
        assert!((out.data[0] - left).abs() < 1e-6, "{:?}", out.data);
        assert!((out.data[1] - right).abs() < 1e-6, "{:?}", out.data);
    }

    #[test]
    fn constant_images_stay_constant_and_same_size_is_identity() {
        let mut image = FloatImage::zeros(3, 13, 7);
        image.data.fill(0.3);
        for (h, w) in [(40, 21), (5, 3), (13, 7)] {
            let out = resize_bilinear(&image, h, w).unwrap();
            assert!(out.data.iter().all(|v| (v - 0.3).abs() < 1e-6));
        }
        let image = ramp(2, 9, 11);
        assert_eq!(resize_bilinear(&image, 9, 11).unwrap(), image);
    }

    #[test]
    fn center_crop_uses_python_rounding() {
        let image = ramp(1, 7, 6);
        let out = center_crop(&image, 4, 3).unwrap();
        // (7 - 4) / 2 = 1.5 -> 2 (even); (6 - 3) / 2 = 1.5 -> 2.
        assert_eq!(out.get(0, 0, 0), image.get(0, 2, 2));
        assert_eq!(python_round(2.5), 2);
        assert_eq!(python_round(16.0), 16);
        assert!(center_crop(&image, 8, 3).is_err());
    }

    #[test]
    fn cifar_image_checks_its_size() {
        assert!(cifar_image(&[0u8; 100], 32, 256, 224).is_err());
        let out = cifar_image(&[255u8; 3 * 32 * 32], 32, 64, 56).unwrap();
        assert_eq!((out.channels, out.height, out.width), (3, 56, 56));
        assert!(out.data.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn normalisation_maps_bytes_to_minus_one_one() {
        let image = normalize_rgb8(&[0, 255, 128, 10, 20, 30], 2, 1);
        assert_eq!(image.get(0, 0, 0), -1.0);
        assert_eq!(image.get(1, 0, 0), 1.0);
        assert!((image.get(2, 0, 0) - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);
        assert_eq!(image.get(0, 0, 1), to_unit(10));
    }
}

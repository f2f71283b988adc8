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
//! implementation therefore matches torchvision in both directions, to about one f32 rounding
//! (tests/data_pixels.rs).
//!
//! The weights are computed once per axis; the image is resized in parallel (rayon) over bands
//! of output rows, without a full-size intermediate image.

use rayon::prelude::*;

use super::FloatImage;
use crate::{Error, Result};

/// The reference's CIFAR-10 pipeline: resize to 256x256, then centre-crop 224x224.
pub const CIFAR_RESIZE: usize = 256;
pub const CIFAR_CROP: usize = 224;

/// `ToTensor` + `Normalize(0.5, 0.5)`: interleaved 8-bit RGB (`[H, W, 3]`) -> `[3, H, W]` in
/// [-1, 1].
pub fn normalize_rgb8(rgb: &[u8], width: usize, height: usize) -> Result<FloatImage> {
    if rgb.len() != width * height * 3 {
        return Err(Error::InvalidArgument(format!(
            "a {width}x{height} RGB image has {} bytes, got {}",
            width * height * 3,
            rgb.len()
        )));
    }
    let table = unit_table();
    let mut image = FloatImage::zeros(3, height, width);
    if width == 0 || height == 0 {
        return Ok(image);
    }
    let plane = width * height;
    // [3, H, W] split into its three planes, each filled row by row in parallel.
    let (r, gb) = image.data.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    r.par_chunks_mut(width)
        .zip(g.par_chunks_mut(width))
        .zip(b.par_chunks_mut(width))
        .zip(rgb.par_chunks(3 * width))
        .for_each(|(((r, g), b), src)| {
            for (x, px) in src.chunks_exact(3).enumerate() {
                r[x] = table[px[0] as usize];
                g[x] = table[px[1] as usize];
                b[x] = table[px[2] as usize];
            }
        });
    Ok(image)
}

/// One 8-bit value through `ToTensor` and `Normalize(0.5, 0.5)`, in float32 as torch does:
/// `v / 255` rounded to f32, then `(x - 0.5) / 0.5` in f32.
fn to_unit(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

/// [`to_unit`] of every byte value.
fn unit_table() -> [f32; 256] {
    std::array::from_fn(|v| to_unit(v as u8))
}

/// Resampling weights of one axis, `taps` per output index (zero-padded to the widest one):
/// output `i` is `sum_k weights[i * taps + k] * input[start[i] + k]`.
struct AxisWeights {
    start: Vec<usize>,
    taps: usize,
    weights: Vec<f32>,
}

/// PyTorch's `_compute_weights_aa` for the bilinear (triangle) filter, `align_corners=False`,
/// with `scale = input / output` as `interpolate(size=...)` computes it.
///
/// Computed in f32 as PyTorch does for float tensors: with f64 weights the outputs drift from
/// torchvision's by up to 5e-6, in f32 they agree to one rounding (1.2e-7).
fn axis_weights(input: usize, output: usize) -> AxisWeights {
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut ranges = Vec::with_capacity(output);
    for i in 0..output {
        let center = scale * (i as f32 + 0.5);
        // C++ casts truncate toward zero; negatives are clamped to 0 just after.
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(input as i64) as usize;
        let mut weights: Vec<f32> = (xmin..xmax)
            .map(|j| {
                let x = ((j as f32 - center + 0.5) * invscale).abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            })
            .collect();
        let total: f32 = weights.iter().sum();
        if total != 0.0 {
            weights.iter_mut().for_each(|w| *w /= total);
        }
        ranges.push((xmin, weights));
    }
    let taps = ranges
        .iter()
        .map(|(_, w)| w.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut start = Vec::with_capacity(output);
    let mut weights = vec![0.0f32; output * taps];
    for (i, (xmin, w)) in ranges.into_iter().enumerate() {
        // Near the right edge the window is shifted left so it stays inside the input; the
        // padding taps in front weigh 0 and add exactly nothing to the sum.
        let first = xmin.min(input.saturating_sub(taps));
        let pad = xmin - first;
        for (k, v) in w.iter().enumerate() {
            weights[i * taps + pad + k] = *v;
        }
        start.push(first);
    }
    AxisWeights {
        start,
        taps,
        weights,
    }
}

/// torchvision `Resize((height, width))` on a float tensor (bilinear, antialias=True).
///
/// Like PyTorch's separable kernel, the width is resampled first, then the height, and a pass
/// whose size does not change is skipped (it would be the identity).
pub fn resize_bilinear(image: &FloatImage, height: usize, width: usize) -> Result<FloatImage> {
    check_resize(image, height, width)?;
    if image.height == height && image.width == width {
        return Ok(image.clone());
    }
    Ok(resize_checked(image, height, width))
}

/// [`resize_bilinear`] taking the image, so that an image already at the target size is
/// returned without a copy.
pub fn resize_bilinear_owned(image: FloatImage, height: usize, width: usize) -> Result<FloatImage> {
    check_resize(&image, height, width)?;
    if image.height == height && image.width == width {
        return Ok(image);
    }
    Ok(resize_checked(&image, height, width))
}

fn check_resize(image: &FloatImage, height: usize, width: usize) -> Result<()> {
    if height == 0 || width == 0 || image.height == 0 || image.width == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize a {}x{} image to {height}x{width}",
            image.height, image.width
        )));
    }
    image.check()
}

/// Output rows per parallel task: small enough that a band's horizontally resized input rows
/// stay in cache, large enough that the rows shared with the next band are few.
const BAND_ROWS: usize = 32;

fn resize_checked(image: &FloatImage, height: usize, width: usize) -> FloatImage {
    let (in_h, in_w) = (image.height, image.width);
    let horizontal = (in_w != width).then(|| axis_weights(in_w, width));
    let vertical = (in_h != height).then(|| axis_weights(in_h, height));
    let mut out = FloatImage::zeros(image.channels, height, width);
    // Bands of output rows in parallel: each resizes, along the width, only the input rows its
    // vertical taps read (into a buffer of its own), then combines them along the height.
    // Same arithmetic, in the same order, as two full passes, without the full-size
    // intermediate image.
    out.data
        .par_chunks_mut(height * width)
        .zip(image.data.par_chunks(in_h * in_w))
        .for_each(|(out_plane, in_plane)| {
            out_plane
                .par_chunks_mut(BAND_ROWS * width)
                .enumerate()
                .for_each(|(band, dst)| {
                    let y0 = band * BAND_ROWS;
                    let rows = dst.len() / width;
                    let (lo, hi) = match &vertical {
                        Some(v) => (v.start[y0], v.start[y0 + rows - 1] + v.taps),
                        None => (y0, y0 + rows),
                    };
                    let src = &in_plane[lo * in_w..hi * in_w];
                    let wide = match &horizontal {
                        Some(h) => {
                            let mut wide = vec![0.0f32; (hi - lo) * width];
                            for (o, s) in wide.chunks_exact_mut(width).zip(src.chunks_exact(in_w)) {
                                horizontal_row(h, s, o);
                            }
                            std::borrow::Cow::Owned(wide)
                        }
                        None => std::borrow::Cow::Borrowed(src),
                    };
                    match &vertical {
                        Some(v) => {
                            for (r, row) in dst.chunks_exact_mut(width).enumerate() {
                                vertical_row(v, y0 + r, lo, &wide, row);
                            }
                        }
                        None => dst.copy_from_slice(&wide),
                    }
                });
        });
    out
}

/// One output row of the width pass: `out[x] = sum_k w[x, k] * src[start[x] + k]`, summed in
/// tap order as PyTorch does. The tap count is a constant for the usual 1 to 4 taps so that
/// the inner loop unrolls.
fn horizontal_row(axis: &AxisWeights, src: &[f32], out: &mut [f32]) {
    match axis.taps {
        1 => horizontal_row_n::<1>(axis, src, out),
        2 => horizontal_row_n::<2>(axis, src, out),
        3 => horizontal_row_n::<3>(axis, src, out),
        4 => horizontal_row_n::<4>(axis, src, out),
        _ => horizontal_row_dyn(axis, src, out),
    }
}

fn horizontal_row_n<const TAPS: usize>(axis: &AxisWeights, src: &[f32], out: &mut [f32]) {
    for (x, o) in out.iter_mut().enumerate() {
        let s = &src[axis.start[x]..axis.start[x] + TAPS];
        let w = &axis.weights[x * TAPS..x * TAPS + TAPS];
        let mut acc = s[0] * w[0];
        for k in 1..TAPS {
            acc += s[k] * w[k];
        }
        *o = acc;
    }
}

fn horizontal_row_dyn(axis: &AxisWeights, src: &[f32], out: &mut [f32]) {
    let taps = axis.taps;
    for (x, o) in out.iter_mut().enumerate() {
        let s = &src[axis.start[x]..axis.start[x] + taps];
        let w = &axis.weights[x * taps..(x + 1) * taps];
        let mut acc = s[0] * w[0];
        for k in 1..taps {
            acc += s[k] * w[k];
        }
        *o = acc;
    }
}

/// Output row `y` of the height pass from `rows`, which holds input rows from `first` on.
fn vertical_row(axis: &AxisWeights, y: usize, first: usize, rows: &[f32], out: &mut [f32]) {
    let width = out.len();
    let w = &axis.weights[y * axis.taps..(y + 1) * axis.taps];
    let row = |k: usize| &rows[(axis.start[y] + k - first) * width..][..width];
    for (d, s) in out.iter_mut().zip(row(0)) {
        *d = w[0] * s;
    }
    for (k, wk) in w.iter().enumerate().skip(1) {
        for (d, s) in out.iter_mut().zip(row(k)) {
            *d += wk * s;
        }
    }
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
    image.check()?;
    if top + height > image.height || left + width > image.width {
        return Err(Error::InvalidArgument(format!(
            "crop {height}x{width} at ({top}, {left}) does not fit a {}x{} image",
            image.height, image.width
        )));
    }
    // Filled by copying rows, without zeroing the buffer first.
    let mut data = Vec::with_capacity(image.channels * height * width);
    for c in 0..image.channels {
        for y in 0..height {
            let src = ((c * image.height) + top + y) * image.width + left;
            data.extend_from_slice(&image.data[src..src + width]);
        }
    }
    Ok(FloatImage {
        channels: image.channels,
        height,
        width,
        data,
    })
}

/// [`cifar_image`] with the reference's sizes: 32x32 -> 256x256 -> centre 224x224.
pub fn cifar_reference_image(planar_rgb: &[u8]) -> Result<FloatImage> {
    cifar_image(planar_rgb, 32, CIFAR_RESIZE, CIFAR_CROP)
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
        let out = cifar_reference_image(&[0u8; 3 * 32 * 32]).unwrap();
        assert_eq!(out.shape(), [3, 224, 224]);
        assert!(out.data.iter().all(|&v| v == -1.0));
        let out = cifar_image(&[255u8; 3 * 32 * 32], 32, 64, 56).unwrap();
        assert_eq!((out.channels, out.height, out.width), (3, 56, 56));
        assert!(out.data.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn normalisation_maps_bytes_to_minus_one_one() {
        let image = normalize_rgb8(&[0, 255, 128, 10, 20, 30], 2, 1).unwrap();
        assert_eq!(image.get(0, 0, 0), -1.0);
        assert_eq!(image.get(1, 0, 0), 1.0);
        assert!((image.get(2, 0, 0) - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);
        assert_eq!(image.get(0, 0, 1), to_unit(10));
        assert_eq!(image.get(2, 0, 1), to_unit(30));
        assert!(normalize_rgb8(&[0; 5], 2, 1).is_err());
    }

    /// The separable filter written out directly, per output pixel, in f64.
    fn direct_resize(image: &FloatImage, height: usize, width: usize) -> Vec<f64> {
        fn taps(input: usize, output: usize, i: usize) -> Vec<(usize, f64)> {
            let scale = input as f64 / output as f64;
            let support = scale.max(1.0);
            let center = scale * (i as f64 + 0.5);
            let lo = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let hi = ((center + support + 0.5).trunc() as i64).min(input as i64) as usize;
            let raw: Vec<(usize, f64)> = (lo..hi)
                .map(|j| {
                    let d = ((j as f64 + 0.5 - center) / support).abs();
                    (j, (1.0 - d).max(0.0))
                })
                .collect();
            let total: f64 = raw.iter().map(|t| t.1).sum();
            raw.into_iter().map(|(j, w)| (j, w / total)).collect()
        }
        let mut out = Vec::new();
        for c in 0..image.channels {
            for y in 0..height {
                for x in 0..width {
                    let mut v = 0.0;
                    for (j, wy) in taps(image.height, height, y) {
                        for (k, wx) in taps(image.width, width, x) {
                            v += wy * wx * image.get(c, j, k) as f64;
                        }
                    }
                    out.push(v);
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn fast_resize_equals_the_direct_formula(
            in_h in 1usize..40, in_w in 1usize..40, out_h in 1usize..50, out_w in 1usize..50,
        ) {
            let image = ramp(2, in_h, in_w);
            let fast = resize_bilinear(&image, out_h, out_w).unwrap();
            let owned = resize_bilinear_owned(image.clone(), out_h, out_w).unwrap();
            proptest::prop_assert_eq!(&fast, &owned);
            let direct = direct_resize(&image, out_h, out_w);
            proptest::prop_assert_eq!(fast.data.len(), direct.len());
            for (a, b) in fast.data.iter().zip(&direct) {
                proptest::prop_assert!((*a as f64 - b).abs() < 1e-5, "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let image = ramp(1, 4, 4);
        assert!(resize_bilinear(&image, 0, 3).is_err());
        let broken = FloatImage {
            data: vec![0.0; 3],
            ..image
        };
        assert!(resize_bilinear(&broken, 8, 8).is_err());
    }
}

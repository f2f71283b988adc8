//! Direct 3x3 same convolutions for few channels (the decoder's last blocks: 3-16 channels at
//! 112-224 pixels), without a patch matrix. With 8 channels, im2col writes and gemm packs a
//! 72-row matrix per image for products of only 8 rows; here each input row is read once per
//! output row and combined into all output channels' rows, which stay in the L1 cache.
//!
//! Row by row: `out[co, oy, ox] += w[co, ci, ky, kx] * x[ci, oy + ky - 1, ox + kx - 1]`, the
//! three `kx` as shifted multiply-adds over the row, and for the weight gradient the matching
//! dot products of output-gradient rows with shifted input rows.

use rayon::prelude::*;

use super::reduce::{PARTS, even_parts, tree_sum};
use crate::isa::{Capability, capability};
use crate::simd::dispatch_at;

/// Whether the direct kernels are used for a convolution of `cin` to `cout` channels of
/// `batch` images: few channels, and enough images to share among threads (one image each).
/// The choice depends on the shapes only, not on the thread count, so that a step computes
/// the same bits on any machine size.
pub fn applies(cin: usize, cout: usize, batch: usize) -> bool {
    cin * cout <= 256 && batch >= MIN_BATCH
}

const MIN_BATCH: usize = 8;

/// `out[ox] += w0 src[ox - 1] + w1 src[ox] + w2 src[ox + 1]`, zero outside the row: the three
/// taps of one kernel row in one pass.
#[inline(always)]
fn row_taps(out: &mut [f32], src: &[f32], [w0, w1, w2]: [f32; 3]) {
    let len = out.len();
    match len {
        0 => {}
        1 => out[0] += w1 * src[0],
        _ => {
            out[0] += w1 * src[0] + w2 * src[1];
            out[len - 1] += w0 * src[len - 2] + w1 * src[len - 1];
            let inner = &mut out[1..len - 1];
            let (a, b, c) = (&src[..len - 2], &src[1..len - 1], &src[2..len]);
            for i in 0..inner.len() {
                inner[i] += w0 * a[i] + w1 * b[i] + w2 * c[i];
            }
        }
    }
}

/// `sum a[i] * b[i]` in 16 float32 lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut lanes = [0.0f32; 16];
    let whole = len / 16 * 16;
    for i in (0..whole).step_by(16) {
        let (a, b) = (&a[i..i + 16], &b[i..i + 16]);
        for j in 0..16 {
            lanes[j] += a[j] * b[j];
        }
    }
    let tail: f32 = (whole..len).map(|i| a[i] * b[i]).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The dot products of a gradient row with the input row shifted by -1, 0 and +1 (zero
/// outside): the weight gradient of the three taps of one kernel row.
#[inline(always)]
fn row_dots(grad: &[f32], src: &[f32]) -> [f32; 3] {
    let len = grad.len();
    if len == 0 {
        return [0.0; 3];
    }
    [
        dot(&grad[1..], &src[..len - 1]),
        dot(grad, &src[..len]),
        dot(&grad[..len - 1], &src[1..len]),
    ]
}

/// Calls `f(oy, ci, ky, row)` for every output row `oy`, input channel `ci` and kernel row `ky`
/// whose input row `oy + ky - 1` of `x` [cin, h, w] lies inside the image.
#[inline(always)]
fn input_rows(x: &[f32], [cin, h, w]: [usize; 3], mut f: impl FnMut(usize, usize, usize, &[f32])) {
    for oy in 0..h {
        for ci in 0..cin {
            for ky in 0..3 {
                if let Some(iy) = (oy + ky).checked_sub(1).filter(|&iy| iy < h) {
                    f(oy, ci, ky, &x[(ci * h + iy) * w..][..w]);
                }
            }
        }
    }
}

/// One image: `x` [cin, h, w], `weight` [cout, cin, 3, 3] -> `out` [cout, h, w] (zeroed).
#[inline(always)]
fn forward_image(x: &[f32], weight: &[f32], out: &mut [f32], [cin, cout, h, w]: [usize; 4]) {
    input_rows(x, [cin, h, w], |oy, ci, ky, src| {
        for co in 0..cout {
            let row = &mut out[(co * h + oy) * w..][..w];
            let taps = &weight[((co * cin + ci) * 3 + ky) * 3..][..3];
            row_taps(row, src, [taps[0], taps[1], taps[2]]);
        }
    });
}

/// One image's contribution to the weight gradient `dw` [cout, cin, 3, 3] (float64), from `x`
/// [cin, h, w] and the output gradient `grad` [cout, h, w].
#[inline(always)]
fn weight_grad_image(x: &[f32], grad: &[f32], dw: &mut [f64], [cin, cout, h, w]: [usize; 4]) {
    input_rows(x, [cin, h, w], |oy, ci, ky, src| {
        for co in 0..cout {
            let row = &grad[(co * h + oy) * w..][..w];
            let taps = &mut dw[((co * cin + ci) * 3 + ky) * 3..][..3];
            for (tap, dot) in taps.iter_mut().zip(row_dots(row, src)) {
                *tap += dot as f64;
            }
        }
    });
}

/// `x` [n, cin, h, w], `weight` [cout, cin, 3, 3] -> [n, cout, h, w].
pub fn forward(x: &[f32], weight: &[f32], dims: [usize; 5]) -> Vec<f32> {
    forward_at(capability(), x, weight, dims)
}

fn forward_at(
    level: Capability,
    x: &[f32],
    weight: &[f32],
    [n, cin, cout, h, w]: [usize; 5],
) -> Vec<f32> {
    let mut out = vec![0.0f32; n * cout * h * w];
    if out.is_empty() {
        return out;
    }
    let dims = [cin, cout, h, w];
    out.par_chunks_mut(cout * h * w)
        .zip(x.par_chunks(cin * h * w))
        // Compiled for the instruction set of `level` (the crate itself is built for baseline
        // x86-64): the loops are vectorised by the compiler for AVX-512, AVX2 + FMA or NEON. No
        // float operation is reordered, so every level computes the same bits.
        .for_each(|(out, x)| dispatch_at(level, || forward_image(x, weight, out, dims)));
    out
}

/// The weight gradient [cout, cin, 3, 3] from `x` [n, cin, h, w] and `grad` [n, cout, h, w].
pub fn weight_grad(x: &[f32], grad: &[f32], dims: [usize; 5]) -> Vec<f32> {
    weight_grad_at(capability(), x, grad, dims)
}

fn weight_grad_at(
    level: Capability,
    x: &[f32],
    grad: &[f32],
    [n, cin, cout, h, w]: [usize; 5],
) -> Vec<f32> {
    let dims = [cin, cout, h, w];
    let size = cout * cin * 9;
    if n * h * w == 0 {
        return vec![0.0; size];
    }
    // The images in a fixed number of parts added in a fixed tree: the same bits on any thread
    // count (`reduce`).
    let parts = even_parts(n, PARTS);
    let dw = tree_sum(parts.len(), size, &|p, dw: &mut [f64]| {
        for i in parts[p].clone() {
            let x = &x[i * cin * h * w..][..cin * h * w];
            let grad = &grad[i * cout * h * w..][..cout * h * w];
            dispatch_at(level, || weight_grad_image(x, grad, dw, dims));
        }
    });
    dw.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The convolution and its weight gradient by their definitions.
    pub(crate) fn naive(
        x: &[f32],
        weight: &[f32],
        grad: &[f32],
        [n, cin, cout, h, w]: [usize; 5],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0f32; n * cout * h * w];
        let mut dw = vec![0.0f32; cout * cin * 9];
        for b in 0..n {
            for co in 0..cout {
                for ci in 0..cin {
                    for t in 0..9 {
                        let (ky, kx) = (t / 3, t % 3);
                        for oy in 0..h {
                            for ox in 0..w {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy == 0 || ix == 0 || iy > h || ix > w {
                                    continue;
                                }
                                let xv = x[((b * cin + ci) * h + iy - 1) * w + ix - 1];
                                let o = ((b * cout + co) * h + oy) * w + ox;
                                out[o] += weight[(co * cin + ci) * 9 + t] * xv;
                                dw[(co * cin + ci) * 9 + t] += grad[o] * xv;
                            }
                        }
                    }
                }
            }
        }
        (out, dw)
    }

    #[test]
    fn matches_the_definition() {
        let mut seed = 1u32;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        for dims in [
            [2, 1, 1, 1, 1],
            [3, 2, 3, 1, 9],
            [2, 3, 2, 7, 1],
            [4, 8, 3, 5, 37],
            [2, 16, 16, 6, 20],
        ] {
            let [n, cin, cout, h, w] = dims;
            let (x, weight, grad) = (
                random(n * cin * h * w),
                random(cout * cin * 9),
                random(n * cout * h * w),
            );
            let (want_out, want_dw) = naive(&x, &weight, &grad, dims);
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-4);
            // Every instruction set this CPU can run, not only the one the kernels use here.
            for level in crate::simd::levels() {
                let out = forward_at(level, &x, &weight, dims);
                assert!(close(&want_out, &out), "{level:?} {dims:?} forward");
                let dw = weight_grad_at(level, &x, &grad, dims);
                assert!(close(&want_dw, &dw), "{level:?} {dims:?} weight grad");
            }
        }
    }
}

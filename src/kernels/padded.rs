//! Direct 3x3 same convolutions with AVX-512, over zero-padded, flattened image planes, without
//! a patch matrix.
//!
//! Each channel of an image is copied once into a plane of width `W + 2` with a zero border (and
//! zeros after it). In that plane the output pixel `q = y (W + 2) + x` is
//! `sum_ci sum_t w[co, ci, t] * plane_ci[q + offset_t]`, with `offset_t = ky (W + 2) + kx` for
//! the nine taps `t = (ky, kx)`: a one-dimensional convolution over the flattened plane that
//! also computes two unused columns per row, which are cropped. The forward kernel keeps 8
//! output channels x 32 pixels in registers and runs over every input channel and tap (one
//! broadcast weight per 2 multiply-adds); the weight gradient keeps 2 output channels x 9 taps
//! and runs over every pixel. im2col would write and read 9 copies of the input per
//! convolution; here the input is copied once.
//!
//! The input gradient is this forward convolution of the padded output gradient with the flipped,
//! transposed weights ([`super::conv3x3`]). Used where the CPU has AVX-512 ([`available`]), for
//! the channel counts of [`forward_applies`] and [`weight_grad_applies`].

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output channels per forward block.
const CO_BLOCK: usize = 8;
/// Pixels per forward block: two vectors of 16.
const PX_BLOCK: usize = 32;
/// Input channels per pass of the forward kernel over an image.
const CI_CHUNK: usize = 16;

/// Whether the CPU has AVX-512 (foundation), which these kernels need.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the forward kernel takes a convolution to `cout` channels.
pub fn forward_applies(cout: usize) -> bool {
    cout > 0 && cout.is_multiple_of(CO_BLOCK) && available()
}

/// Whether the weight-gradient kernel is used for a convolution to `cout` channels at `h` x `w`
/// pixels: large images (for small ones, im2col and one matrix product per few images are
/// faster).
pub fn weight_grad_applies(cout: usize, h: usize, w: usize) -> bool {
    cout > 0 && cout.is_multiple_of(2) && h * w >= 56 * 56 && available()
}

/// The geometry of the padded planes of [H, W] images.
#[derive(Clone, Copy, Debug)]
struct Planes {
    h: usize,
    w: usize,
    /// Padded row width, `W + 2`.
    row: usize,
    /// Output positions computed per plane, `H (W + 2)` rounded up to [`PX_BLOCK`].
    positions: usize,
    /// Floats per padded plane: every read of a computed position stays inside its plane.
    stride: usize,
}

impl Planes {
    fn new(h: usize, w: usize) -> Self {
        let row = w + 2;
        let positions = (h * row).div_ceil(PX_BLOCK) * PX_BLOCK;
        // Reads reach `position + 2 row + 2 + 15`; whole rows of the padded image come first.
        let stride = (positions + 2 * row + 2 + 16).max((h + 2) * row);
        Self {
            h,
            w,
            row,
            positions,
            stride,
        }
    }

    /// The tap offsets `ky row + kx`, in the order of the 3x3 kernel's nine weights.
    fn offsets(&self) -> [usize; 9] {
        std::array::from_fn(|t| (t / 3) * self.row + t % 3)
    }

    /// `images` [N, C, H, W] in padded planes [N, C, stride]: zero borders and tails.
    fn pad(&self, images: &[f32], planes: usize) -> Vec<f32> {
        let (hw, w, row) = (self.h * self.w, self.w, self.row);
        let mut padded = vec![0.0f32; planes * self.stride];
        padded
            .par_chunks_mut(self.stride)
            .zip(images.par_chunks(hw))
            .for_each(|(dst, src)| {
                for (y, line) in src.chunks(w).enumerate() {
                    dst[(y + 1) * row + 1..][..w].copy_from_slice(line);
                }
            });
        padded
    }

    /// Copies the computed positions `src` [C, positions] of one image's channels into `dst`
    /// [C, H, W], leaving out the two padding columns of each row.
    fn crop(&self, src: &[f32], dst: &mut [f32]) {
        let hw = self.h * self.w;
        for (plane, out) in src.chunks(self.positions).zip(dst.chunks_mut(hw)) {
            for (y, line) in out.chunks_mut(self.w).enumerate() {
                line.copy_from_slice(&plane[y * self.row..][..self.w]);
            }
        }
    }
}

/// `out[n, co] = bias[co] + sum_ci conv3x3(x[n, ci], weight[co, ci])`, padding 1: `x` [N,
/// Cin, H, W] -> [N, Cout, H, W], `weight` [Cout, Cin, 3, 3], or with `flipped` the weight of
/// the transposed problem, [Cin, Cout, 3, 3], used flipped in space (the input gradient of a
/// convolution from Cout to Cin channels). Needs [`forward_applies`].
pub fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    flipped: bool,
    [n, cin, cout, h, w]: [usize; 5],
) -> Vec<f32> {
    assert!(forward_applies(cout));
    assert_eq!(weight.len(), cout * cin * 9);
    assert!(bias.is_none_or(|b| b.len() == cout));
    let planes = Planes::new(h, w);
    let hw = h * w;
    let mut out = vec![0.0f32; n * cout * hw];
    if out.is_empty() {
        return out;
    }
    if cin == 0 {
        // No input channel: the bias alone (the kernel would leave its buffer unwritten).
        for (i, plane) in out.chunks_mut(hw).enumerate() {
            plane.fill(bias.map_or(0.0, |b| b[i % cout]));
        }
        return out;
    }
    let padded = planes.pad(x, n * cin);
    // Weights per block of 8 output channels: [block][ci][tap][8], one broadcast each.
    let blocks = cout / CO_BLOCK;
    let mut packed = vec![0.0f32; cout * cin * 9];
    for co in 0..cout {
        let (block, lane) = (co / CO_BLOCK, co % CO_BLOCK);
        for ci in 0..cin {
            for t in 0..9 {
                packed[((block * cin + ci) * 9 + t) * CO_BLOCK + lane] = if flipped {
                    weight[(ci * cout + co) * 9 + 8 - t]
                } else {
                    weight[(co * cin + ci) * 9 + t]
                };
            }
        }
    }
    // Jobs (block, image), image-major so that each thread reuses an image's planes across the
    // blocks, or block-major where the weights are larger than an image (deep layers), so that it
    // reuses its blocks' weights across the images.
    let mut jobs: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(CO_BLOCK * hw)
        .enumerate()
        .map(|(i, chunk)| (i % blocks, i / blocks, chunk))
        .collect();
    if cout * 9 > planes.stride {
        jobs.sort_by_key(|&(block, image, _)| (block, image));
    }
    jobs.into_par_iter().for_each_init(
        || vec![0.0f32; CO_BLOCK * planes.positions],
        |tmp, (block, image, out)| {
            let x = &padded[image * cin * planes.stride..][..cin * planes.stride];
            let wb = &packed[block * cin * 9 * CO_BLOCK..][..cin * 9 * CO_BLOCK];
            // In chunks of input channels whose windows stay in the L1 cache.
            for start in (0..cin).step_by(CI_CHUNK) {
                let len = CI_CHUNK.min(cin - start);
                let x = &x[start * planes.stride..][..len * planes.stride];
                let wb = &wb[start * 9 * CO_BLOCK..][..len * 9 * CO_BLOCK];
                let start_with = if start > 0 {
                    Start::Accumulate
                } else {
                    match bias {
                        Some(bias) => Start::Bias(&bias[block * CO_BLOCK..][..CO_BLOCK]),
                        None => Start::Zero,
                    }
                };
                // SAFETY: `forward_applies` checked AVX-512.
                unsafe { forward_block(x, wb, tmp, len, start_with, &planes) };
            }
            planes.crop(tmp, out);
        },
    );
    out
}

/// What a forward block starts its sums from.
#[derive(Clone, Copy)]
enum Start<'a> {
    Zero,
    /// The block's 8 biases.
    Bias(&'a [f32]),
    /// The values in the output (a later chunk of input channels).
    Accumulate,
}

/// One block of 8 output channels of one image: `out` [8, positions] (= or +=, see [`Start`]) from `cin` channels of the padded image `x` [cin, stride] and the block's packed
/// weights for them [cin, 9, 8].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_block(
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    cin: usize,
    start: Start,
    planes: &Planes,
) {
    assert!(x.len() >= cin * planes.stride && weight.len() >= cin * 9 * CO_BLOCK);
    assert!(out.len() >= CO_BLOCK * planes.positions);
    let offsets = planes.offsets();
    let (xp, wp, op) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    for q in (0..planes.positions).step_by(PX_BLOCK) {
        // SAFETY: q + offset + 31 < stride for every q < positions (Planes::new), so the loads
        // stay in plane ci; the stores stay in row j of `out`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; CO_BLOCK];
            match start {
                Start::Zero => {}
                Start::Bias(bias) => {
                    for (acc, b) in acc.iter_mut().zip(bias) {
                        *acc = [_mm512_set1_ps(*b); 2];
                    }
                }
                Start::Accumulate => {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let o = op.add(j * planes.positions + q);
                        *acc = [_mm512_loadu_ps(o), _mm512_loadu_ps(o.add(16))];
                    }
                }
            }
            for ci in 0..cin {
                let xc = xp.add(ci * planes.stride + q);
                let wc = wp.add(ci * 9 * CO_BLOCK);
                for (t, offset) in offsets.iter().enumerate() {
                    let x0 = _mm512_loadu_ps(xc.add(*offset));
                    let x1 = _mm512_loadu_ps(xc.add(*offset + 16));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*wc.add(t * CO_BLOCK + j));
                        acc[0] = _mm512_fmadd_ps(wv, x0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(wv, x1, acc[1]);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                let o = op.add(j * planes.positions + q);
                _mm512_storeu_ps(o, acc[0]);
                _mm512_storeu_ps(o.add(16), acc[1]);
            }
        }
    }
}

/// The weight gradient of [`forward`]: `dW[co, ci, t] = sum_n sum_q grad[n, co, q] x[n, ci, q +
/// offset_t]`, [Cout, Cin, 3, 3], from `x` [N, Cin, H, W] and `grad` [N, Cout, H, W]. Needs
/// AVX-512 and an even `cout` ([`weight_grad_applies`] says where it is faster).
pub fn weight_grad(x: &[f32], grad: &[f32], [n, cin, cout, h, w]: [usize; 5]) -> Vec<f32> {
    assert!(cout.is_multiple_of(2) && available());
    let planes = Planes::new(h, w);
    let mut dw = vec![0.0f32; cout * cin * 9];
    if dw.is_empty() || n * h * w == 0 {
        return dw;
    }
    let xp = planes.pad(x, n * cin);
    // The padded gradient read from `row + 1` on is the gradient at the computed positions, with
    // zeros in the padding columns and after the last row: those positions add nothing.
    let gp = planes.pad(grad, n * cout);
    dw.par_chunks_mut(2 * cin * 9)
        .enumerate()
        .for_each(|(pair, dw)| {
            for image in 0..n {
                let g = &gp[(image * cout + 2 * pair) * planes.stride..][..2 * planes.stride];
                let x = &xp[image * cin * planes.stride..][..cin * planes.stride];
                for ci in 0..cin {
                    // SAFETY: `weight_grad_applies` checked AVX-512.
                    let sums = unsafe {
                        weight_grad_pair(g, &x[ci * planes.stride..][..planes.stride], &planes)
                    };
                    for (lane, sums) in sums.iter().enumerate() {
                        let row = &mut dw[lane * cin * 9 + ci * 9..][..9];
                        row.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
                    }
                }
            }
        });
    dw
}

/// `sum_q g_j[row + 1 + q] x[q + offset_t]` for the two padded gradient planes `g` [2, stride]
/// and the nine taps over one padded input plane `x` [stride].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_pair(g: &[f32], x: &[f32], planes: &Planes) -> [[f32; 9]; 2] {
    assert!(g.len() >= 2 * planes.stride && x.len() >= planes.stride);
    let offsets = planes.offsets();
    let (g0, g1, xp) = (
        g[planes.row + 1..].as_ptr(),
        g[planes.stride + planes.row + 1..].as_ptr(),
        x.as_ptr(),
    );
    // SAFETY: q + 15 + row + 1 < stride and q + offset + 15 < stride for q < positions.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 9]; 2];
        for q in (0..planes.positions).step_by(16) {
            let gv = [_mm512_loadu_ps(g0.add(q)), _mm512_loadu_ps(g1.add(q))];
            for (t, offset) in offsets.iter().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(q + offset));
                acc[0][t] = _mm512_fmadd_ps(gv[0], xv, acc[0][t]);
                acc[1][t] = _mm512_fmadd_ps(gv[1], xv, acc[1][t]);
            }
        }
        acc.map(|taps| taps.map(|v| _mm512_reduce_add_ps(v)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn forward_block(_: &[f32], _: &[f32], _: &mut [f32], _: usize, _: Start, _: &Planes) {
    unreachable!("AVX-512 kernels on a CPU without AVX-512")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_grad_pair(_: &[f32], _: &[f32], _: &Planes) -> [[f32; 9]; 2] {
    unreachable!("AVX-512 kernels on a CPU without AVX-512")
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;

    /// The definition, in float64.
    fn reference(x: &[f32], weight: &[f32], [n, cin, cout, h, w]: [usize; 5]) -> Vec<f32> {
        let mut out = vec![0.0f32; n * cout * h * w];
        for b in 0..n {
            for co in 0..cout {
                for y in 0..h {
                    for xx in 0..w {
                        let mut s = 0.0f64;
                        for ci in 0..cin {
                            for t in 0..9 {
                                let (iy, ix) =
                                    ((y + t / 3) as isize - 1, (xx + t % 3) as isize - 1);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((b * cin + ci) * h + iy as usize) * w + ix as usize];
                                s += xv as f64 * weight[(co * cin + ci) * 9 + t] as f64;
                            }
                        }
                        out[((b * cout + co) * h + y) * w + xx] = s as f32;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 + seed * 31) % 1999) as f32 / 1999.0 - 0.5)
            .collect()
    }

    #[test]
    fn forward_and_weight_grad_match_the_definition() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the kernels are not used, nothing to test");
            return;
        }
        for dims @ [n, cin, cout, h, w] in [
            [1, 1, 8, 1, 1],
            [2, 3, 16, 5, 7],
            [3, 5, 8, 9, 4],
            [1, 16, 8, 13, 17],
            [2, 8, 24, 7, 7],
            [1, 2, 2, 6, 33],
            [1, 20, 8, 5, 6],
            [2, 33, 16, 3, 4],
            [2, 0, 8, 3, 3],
        ] {
            let x = values(n * cin * h * w, 1);
            let weight = values(cout * cin * 9, 2);
            if forward_applies(cout) {
                let want = reference(&x, &weight, dims);
                let got = forward(&x, &weight, None, false, dims);
                let err = relative_error(&want, &got, 1e-6);
                assert!(err < 1e-5, "forward {dims:?}: {err}");
                // With a bias, and with the weight given transposed and flipped.
                let bias = values(cout, 4);
                let with_bias: Vec<f32> = want
                    .chunks(h * w)
                    .enumerate()
                    .flat_map(|(i, plane)| {
                        let b = bias[i % cout];
                        plane.iter().map(move |v| v + b)
                    })
                    .collect::<Vec<_>>();
                let mut transposed = vec![0.0f32; weight.len()];
                for co in 0..cout {
                    for ci in 0..cin {
                        for t in 0..9 {
                            transposed[(ci * cout + co) * 9 + 8 - t] =
                                weight[(co * cin + ci) * 9 + t];
                        }
                    }
                }
                let got = forward(&x, &transposed, Some(&bias), true, dims);
                let err = relative_error(&with_bias, &got, 1e-6);
                assert!(err < 1e-5, "forward with bias, flipped {dims:?}: {err}");
            }
            // dW[co, ci, t] = sum over the output of grad * d out / d w: the reference on
            // one-hot weights, dotted with the gradient.
            let grad = values(n * cout * h * w, 3);
            let got = weight_grad(&x, &grad, dims);
            let mut want = vec![0.0f32; cout * cin * 9];
            for (i, d) in want.iter_mut().enumerate() {
                let mut one_hot = vec![0.0f32; cout * cin * 9];
                one_hot[i] = 1.0;
                let out = reference(&x, &one_hot, dims);
                *d = out
                    .iter()
                    .zip(&grad)
                    .map(|(a, b)| (a * b) as f64)
                    .sum::<f64>() as f32;
            }
            let err = relative_error(&want, &got, 1e-6);
            assert!(err < 1e-5, "weight grad {dims:?}: {err}");
        }
    }
}

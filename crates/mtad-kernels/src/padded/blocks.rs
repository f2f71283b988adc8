//! The two inner kernels of [`super`], written once over pulp's SIMD types and run at the
//! level [`crate::simd`] dispatches: the forward block (output channels x positions in
//! registers, one broadcast weight per multiply-add of a row of positions) and the weight
//! gradient's sums for a pair of output channels over the taps of one input channel.
//!
//! How many sums stay in registers follows the level's registers: with AVX-512's 32 vectors of
//! 16 floats, 8 output channels x 32 or 48 positions (the kernel these replace, written with
//! AVX-512 intrinsics, did the same), and 2 channels x 9 taps for the weight gradient; with
//! AVX2's 16 vectors of 8, 4 channels x 16 or 24 positions (12 sums, 3 row loads and a
//! broadcast), and the 9 taps as 5 then 4 (10 sums); NEON (32 vectors of 4) and plain Rust
//! take 8 channels x 2 vectors and 9 taps.

use pulp::{Simd, WithSimd};

use super::{CO_BLOCK, Start, TAP_GROUP};
use crate::simd::{load, store};

/// One block of 8 output channels of one image: `out` [8, positions] (= or +=, see [`Start`])
/// from `cin` channels of `x` [cin, stride] and the block's packed weights for them [cin, taps,
/// 8], position `q` of a channel reading `x[q + offsets[t]]` for tap `t`. `positions` is a
/// multiple of 32 or of 48.
pub(super) struct ForwardBlock<'a> {
    pub x: &'a [f32],
    pub weight: &'a [f32],
    pub out: &'a mut [f32],
    pub cin: usize,
    pub start: Start<'a>,
    pub offsets: &'a [usize],
    pub positions: usize,
    pub stride: usize,
}

impl WithSimd for ForwardBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let wide = self.positions.is_multiple_of(3 * lanes);
        match (lanes, wide) {
            (16.., true) => self.run::<S, 8, 3>(simd),
            (16.., false) => self.run::<S, 8, 2>(simd),
            (8, true) => self.run::<S, 4, 3>(simd),
            (8, false) => self.run::<S, 4, 2>(simd),
            _ => self.run::<S, 8, 2>(simd),
        }
    }
}

impl ForwardBlock<'_> {
    /// `CO` output channels at a time (of the block's 8) x `V` vectors of positions.
    #[inline(always)]
    fn run<S: Simd, const CO: usize, const V: usize>(self, simd: S) {
        let Self {
            x,
            weight,
            out,
            cin,
            start,
            offsets,
            positions,
            stride,
        } = self;
        let lanes = S::F32_LANES;
        let taps = offsets.len();
        assert!(CO_BLOCK.is_multiple_of(CO));
        assert!(x.len() >= cin * stride && weight.len() >= cin * taps * CO_BLOCK);
        assert!(out.len() >= CO_BLOCK * positions && positions.is_multiple_of(V * lanes));
        assert!(offsets.iter().all(|o| positions + o <= stride));
        let (xp, wp, op) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
        let zero = simd.splat_f32s(0.0);
        for q in (0..positions).step_by(V * lanes) {
            for first in (0..CO_BLOCK).step_by(CO) {
                // SAFETY: q + offset + V lanes - 1 < positions + offset <= stride (asserted), so
                // the loads stay in channel ci; the stores stay in row j of `out`; the weights'
                // index is below cin taps 8.
                unsafe {
                    let mut acc = [[zero; V]; CO];
                    match start {
                        Start::Zero => {}
                        Start::Bias(bias) => {
                            for (j, acc) in acc.iter_mut().enumerate() {
                                *acc = [simd.splat_f32s(bias[first + j]); V];
                            }
                        }
                        Start::Accumulate => {
                            for (j, acc) in acc.iter_mut().enumerate() {
                                let o = op.add((first + j) * positions + q);
                                for (v, acc) in acc.iter_mut().enumerate() {
                                    *acc = load::<S>(o.add(v * lanes));
                                }
                            }
                        }
                    }
                    for ci in 0..cin {
                        let xc = xp.add(ci * stride + q);
                        let wc = wp.add(ci * taps * CO_BLOCK + first);
                        for (t, offset) in offsets.iter().enumerate() {
                            let mut xv = [zero; V];
                            for (v, xv) in xv.iter_mut().enumerate() {
                                *xv = load::<S>(xc.add(*offset + v * lanes));
                            }
                            for (j, acc) in acc.iter_mut().enumerate() {
                                let wv = simd.splat_f32s(*wc.add(t * CO_BLOCK + j));
                                for (acc, xv) in acc.iter_mut().zip(&xv) {
                                    *acc = simd.mul_add_e_f32s(wv, *xv, *acc);
                                }
                            }
                        }
                    }
                    for (j, acc) in acc.iter().enumerate() {
                        let o = op.add((first + j) * positions + q);
                        for (v, acc) in acc.iter().enumerate() {
                            store::<S>(o.add(v * lanes), *acc);
                        }
                    }
                }
            }
        }
    }
}

/// `sum_i sum_q g_j[i][q] x[i][q + offset_t]` for the two gradient planes `g_j` of a pair of
/// output channels (`positions` apart in `g`) and 9 taps of one input channel `x`, over
/// `images` images that are `g_step` and `x_step` floats apart. `positions` is a multiple of the lanes.
pub(super) struct PairSums<'a> {
    pub g: &'a [f32],
    pub x: &'a [f32],
    pub offsets: &'a [usize; TAP_GROUP],
    pub positions: usize,
    /// [images, g_step, x_step].
    pub images: [usize; 3],
}

impl WithSimd for PairSums<'_> {
    type Output = [[f32; TAP_GROUP]; 2];

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let Self {
            g,
            x,
            offsets,
            positions,
            images,
        } = self;
        let [count, g_step, x_step] = images;
        let last = count.saturating_sub(1);
        let reach = offsets.iter().max().unwrap() + positions;
        assert!(
            count == 0
                || (g.len() >= last * g_step + 2 * positions && x.len() >= last * x_step + reach)
        );
        assert!(positions.is_multiple_of(S::F32_LANES));
        if S::F32_LANES != 8 {
            return pair_sums(simd, g, x, *offsets, positions, images);
        }
        // 16 registers: 2 x 9 sums do not fit beside their operands; 2 x 5, then 2 x 4.
        let head: [usize; 5] = std::array::from_fn(|t| offsets[t]);
        let tail: [usize; 4] = std::array::from_fn(|t| offsets[5 + t]);
        let head = pair_sums(simd, g, x, head, positions, images);
        let tail = pair_sums(simd, g, x, tail, positions, images);
        [0, 1].map(|j| std::array::from_fn(|t| if t < 5 { head[j][t] } else { tail[j][t - 5] }))
    }
}

/// [`PairSums`] for `T` taps, its bounds checked by the caller.
#[inline(always)]
fn pair_sums<S: Simd, const T: usize>(
    simd: S,
    g: &[f32],
    x: &[f32],
    offsets: [usize; T],
    positions: usize,
    [images, g_step, x_step]: [usize; 3],
) -> [[f32; T]; 2] {
    let lanes = S::F32_LANES;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; T]; 2];
    // SAFETY: for q < positions (a multiple of the lanes) the loads stay in image i's planes
    // (asserted by the caller).
    unsafe {
        for i in 0..images {
            let (g0, xp) = (g.as_ptr().add(i * g_step), x.as_ptr().add(i * x_step));
            let g1 = g0.add(positions);
            for q in (0..positions).step_by(lanes) {
                let gv = [load::<S>(g0.add(q)), load::<S>(g1.add(q))];
                for (t, offset) in offsets.iter().enumerate() {
                    let xv = load::<S>(xp.add(q + offset));
                    acc[0][t] = simd.mul_add_e_f32s(gv[0], xv, acc[0][t]);
                    acc[1][t] = simd.mul_add_e_f32s(gv[1], xv, acc[1][t]);
                }
            }
        }
    }
    acc.map(|taps| taps.map(|v| simd.reduce_sum_f32s(v)))
}

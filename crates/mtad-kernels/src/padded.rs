//! Direct convolutions over zero-padded, flattened image planes, without a patch
//! matrix: any square kernel, stride and padding (the models use 3x3 with stride 1 or 2 and the
//! 7x7 stride-2 stems).
//!
//! Each channel of an image is copied once, with its zero border, into `s x s` phase planes
//! (`s` the stride): phase `(a, b)` holds the padded pixels `(s i + a, s j + b)` in rows of
//! `wp` values. Then the output pixel `(y, x)` at position `q = y wp + x` is `sum_ci sum_t
//! w[co, ci, t] * planes_ci[q + offset_t]`, with one constant offset per tap `t = (ky, kx)`
//! (its phase plane, `ky / s` rows and `kx / s` columns on): a one-dimensional convolution over
//! the flattened planes that also computes a few unused columns per row, which are cropped. For
//! stride 1 there is one phase, the padded image, and `offset_t = ky (W + 2p) + kx`. The forward
//! kernel keeps 8 output channels x 32 positions in registers and runs over every input channel
//! and tap (one broadcast weight per 2 multiply-adds); the weight gradient keeps 2 output
//! channels x 9 taps and runs over every position. im2col would write and read `k^2 / s^2`
//! copies of the input per convolution; here it is copied once.
//!
//! The input gradient is the same forward kernel, run once per phase of the input: the padded
//! output gradient convolved with the weights of the taps of that phase, flipped and transposed
//! (for stride 1, one pass with all of them). Used for the channel counts of [`forward_applies`]
//! and [`weight_grad_applies`]. The inner kernels ([`blocks`]) are written once over pulp's SIMD
//! types and run with the instruction set of [`crate::isa::capability`] (AVX-512, AVX2 + FMA,
//! NEON or plain Rust); the functions' `_at` forms take the level, for the tests.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{assume_written, unwritten, written};
use crate::isa::{Capability, capability};
use crate::simd::dispatch_at;

mod blocks;

/// Output channels per forward block.
const CO_BLOCK: usize = 8;
/// Positions per forward block (AVX-512: two vectors of 16), or [`WIDE_BLOCK`] where the
/// positions are a multiple of 48 (three vectors, 24 sums in registers: fewer loads per
/// multiply-add, about 10% faster on the AVX-512 development machine's planes of 56x56 and
/// more). Every level's blocks divide both ([`blocks`]).
const PX_BLOCK: usize = 32;
const WIDE_BLOCK: usize = 48;
/// Input channels per pass of the forward kernel over an image.
const CI_CHUNK: usize = 16;
/// Taps per pass of the weight-gradient kernel.
const TAP_GROUP: usize = 9;
/// Below this many positions per image, the weight gradient sums every image of an input channel
/// in one pass (one reduction per channel rather than per channel and image).
const SMALL_PLANE: usize = 1024;
/// Pairs of output channels per job of the weight gradient, at most.
const PAIRS_PER_JOB: usize = 4;
/// Input channels per block that a weight-gradient job's pairs go through together on large
/// planes (16 padded 56x56 planes are 216 kB).
const WG_CI_BLOCK: usize = 16;

/// Whether the forward kernel takes a convolution to `cout` channels (and the input gradient
/// one from `cout` channels).
pub fn forward_applies(cout: usize) -> bool {
    cout > 0 && cout.is_multiple_of(CO_BLOCK)
}

/// Whether the weight-gradient kernel takes a convolution to `cout` channels.
pub fn weight_grad_applies(cout: usize) -> bool {
    cout > 0 && cout.is_multiple_of(2)
}

/// A `k x k` convolution with stride `s` and zero padding `p` on every side of [H, W] images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub h: usize,
    pub w: usize,
}

impl Conv {
    /// The 3x3 convolution with stride 1 and padding 1.
    pub fn same3x3(h: usize, w: usize) -> Self {
        Self {
            k: 3,
            s: 1,
            p: 1,
            h,
            w,
        }
    }

    /// The output's height and width (0 where the kernel does not fit).
    pub fn output(&self) -> [usize; 2] {
        let side = |len: usize| {
            (len + 2 * self.p)
                .checked_sub(self.k)
                .map_or(0, |r| r / self.s + 1)
        };
        [side(self.h), side(self.w)]
    }

    fn taps(&self) -> usize {
        self.k * self.k
    }
}

/// Where the forward kernel reads and writes: input channels of `stride` floats, positions in
/// rows of `row`, `positions` computed per output channel, and one offset per tap.
#[derive(Clone, Debug)]
struct Layout {
    stride: usize,
    row: usize,
    positions: usize,
    offsets: Vec<usize>,
}

/// `len` rounded up to whole blocks of positions: of 48 unless that computes over 10% more
/// positions than blocks of 32 (small planes: 7x7 is 64 positions as 2 x 32, 96 as 2 x 48).
fn blocks_of(len: usize) -> usize {
    let (narrow, wide) = (
        len.div_ceil(PX_BLOCK) * PX_BLOCK,
        len.div_ceil(WIDE_BLOCK) * WIDE_BLOCK,
    );
    if wide * 10 <= narrow * 11 {
        wide
    } else {
        narrow
    }
}

impl Layout {
    /// The phase planes of the padded input of `conv`, as the forward pass and the weight
    /// gradient read them.
    fn input(conv: &Conv) -> Self {
        let Conv { k, s, p, h, w } = *conv;
        let (hp, wp) = ((h + 2 * p).div_ceil(s), (w + 2 * p).div_ceil(s));
        let phase = hp * wp;
        let offsets: Vec<usize> = (0..k * k)
            .map(|t| {
                let (ky, kx) = (t / k, t % k);
                ((ky % s) * s + kx % s) * phase + (ky / s) * wp + kx / s
            })
            .collect();
        let positions = blocks_of(conv.output()[0] * wp);
        // Reads reach `position + offset + 47` (or 31) for the last block of positions.
        let reach = positions + offsets.iter().max().copied().unwrap_or(0);
        Self {
            stride: (s * s * phase).max(reach),
            row: wp,
            positions,
            offsets,
        }
    }

    /// `images` [planes, H, W] in phase planes [planes, stride]: zero borders and tails.
    fn scatter(&self, conv: &Conv, images: &[f32], planes: usize) -> Vec<f32> {
        if conv.h * conv.w == 0 {
            return vec![0.0f32; planes * self.stride];
        }
        // Zeroed plane by plane on rayon's threads, not by the allocator on the calling thread.
        let mut out = unwritten(planes * self.stride);
        out.par_chunks_mut(self.stride)
            .zip(images.par_chunks(conv.h * conv.w))
            .for_each(|(dst, src)| {
                dst.fill(MaybeUninit::new(0.0));
                // SAFETY: just written.
                self.scatter_plane(conv, src, unsafe { assume_written(dst) })
            });
        // SAFETY: every plane of `stride` values was filled.
        unsafe { written(out) }
    }

    /// One image plane `src` [H, W] into its (zeroed) phase planes `dst`.
    fn scatter_plane(&self, conv: &Conv, src: &[f32], dst: &mut [f32]) {
        let Conv { s, p, h, w, .. } = *conv;
        let phase = (h + 2 * p).div_ceil(s) * self.row;
        for (y, line) in src.chunks(w).enumerate() {
            let (a, i) = ((y + p) % s, (y + p) / s);
            if s == 1 {
                dst[i * self.row + p..][..w].copy_from_slice(line);
                continue;
            }
            for (x, v) in line.iter().enumerate() {
                let (b, j) = ((x + p) % s, (x + p) / s);
                dst[(a * s + b) * phase + i * self.row + j] = *v;
            }
        }
    }
}

/// Weights packed per block of 8 output channels, [block][input channel][tap][8]: one broadcast
/// per weight in the kernel. `weight(co, ci, t)` gives the weight of tap `t` of `taps`.
fn pack(
    [cout, cin, taps]: [usize; 3],
    weight: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    let mut packed = vec![0.0f32; cout * cin * taps];
    packed
        .par_chunks_mut(CO_BLOCK * cin * taps)
        .enumerate()
        .for_each(|(block, packed)| {
            for lane in 0..CO_BLOCK {
                let co = block * CO_BLOCK + lane;
                for ci in 0..cin {
                    for t in 0..taps {
                        packed[(ci * taps + t) * CO_BLOCK + lane] = weight(co, ci, t);
                    }
                }
            }
        });
    packed
}

/// One pass of the forward kernel over a job: the taps' offsets, their packed weights (see
/// [`pack`]) and the positions it computes; `place` then writes the 8 computed rows (`positions`
/// apart) into the job's output, [8, output plane].
struct Pass<'a> {
    offsets: Vec<usize>,
    packed: Vec<f32>,
    positions: usize,
    place: Place<'a>,
}

/// Writes a pass's computed rows into a job's output.
type Place<'a> = Box<dyn Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync + 'a>;

/// Runs `passes` over every (block of 8 output channels, image) of `out` [N, cout, plane] from
/// `src` [N, cin, stride], each pass starting from `bias` (or zero) and summing every input
/// channel, with the SIMD instructions of `level`.
fn run(
    level: Capability,
    src: &[f32],
    [cin, cout, stride, plane]: [usize; 4],
    bias: Option<&[f32]>,
    passes: &[Pass],
    out: &mut [MaybeUninit<f32>],
) {
    let blocks = cout / CO_BLOCK;
    let taps = passes.iter().map(|p| p.offsets.len()).max().unwrap_or(0);
    let positions = passes.iter().map(|p| p.positions).max().unwrap_or(0);
    // Jobs (block, image), image-major so that each thread reuses an image's planes across the
    // blocks, or block-major where the weights are larger than an image (deep layers), so that it
    // reuses its blocks' weights across the images.
    let mut jobs: Vec<(usize, usize, &mut [MaybeUninit<f32>])> = out
        .chunks_mut(CO_BLOCK * plane)
        .enumerate()
        .map(|(i, chunk)| (i % blocks, i / blocks, chunk))
        .collect();
    if cout * taps > stride {
        jobs.sort_by_key(|&(block, image, _)| (block, image));
    }
    jobs.into_par_iter().for_each_init(
        || vec![0.0f32; CO_BLOCK * positions],
        |tmp, (block, image, out)| {
            let x = &src[image * cin * stride..][..cin * stride];
            for pass in passes {
                let taps = pass.offsets.len();
                let wb = &pass.packed[block * cin * taps * CO_BLOCK..][..cin * taps * CO_BLOCK];
                // In chunks of input channels whose windows stay in the L1 cache.
                for start in (0..cin).step_by(CI_CHUNK) {
                    let len = CI_CHUNK.min(cin - start);
                    let x = &x[start * stride..][..len * stride];
                    let wb = &wb[start * taps * CO_BLOCK..][..len * taps * CO_BLOCK];
                    let start_with = match (start, bias) {
                        (0, Some(bias)) => Start::Bias(&bias[block * CO_BLOCK..][..CO_BLOCK]),
                        (0, None) => Start::Zero,
                        _ => Start::Accumulate,
                    };
                    let block = blocks::ForwardBlock {
                        x,
                        weight: wb,
                        out: tmp,
                        cin: len,
                        start: start_with,
                        offsets: &pass.offsets,
                        positions: pass.positions,
                        stride,
                    };
                    dispatch_at(level, block);
                }
                (pass.place)(tmp, out);
            }
        },
    );
}

/// `out[n, co] = bias[co] + sum_ci conv(x[n, ci], weight[co, ci])`: `x` [N, Cin, H, W] ->
/// [N, Cout, Ho, Wo] ([`Conv::output`]), `weight` [Cout, Cin, k, k]. Needs
/// [`forward_applies`].
pub fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    conv: Conv,
    dims: [usize; 3],
) -> Vec<f32> {
    forward_at(capability(), x, weight, bias, conv, dims)
}

fn forward_at(
    level: Capability,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    conv: Conv,
    [n, cin, cout]: [usize; 3],
) -> Vec<f32> {
    assert!(forward_applies(cout));
    let taps = conv.taps();
    assert_eq!(weight.len(), cout * cin * taps);
    assert_eq!(x.len(), n * cin * conv.h * conv.w);
    assert!(bias.is_none_or(|b| b.len() == cout));
    let [ho, wo] = conv.output();
    let plane = ho * wo;
    let len = n * cout * plane;
    if cin == 0 || len == 0 {
        // No input channel: the bias alone (the kernel would leave its buffer unwritten).
        return (0..len)
            .map(|i| bias.map_or(0.0, |b| b[i / plane % cout]))
            .collect();
    }
    let mut out = unwritten(len);
    let layout = Layout::input(&conv);
    let src = layout.scatter(&conv, x, n * cin);
    let (row, positions) = (layout.row, layout.positions);
    let pass = Pass {
        packed: pack([cout, cin, taps], |co, ci, t| {
            weight[(co * cin + ci) * taps + t]
        }),
        offsets: layout.offsets,
        positions,
        // Keeps the first `wo` positions of each row of `row`.
        place: Box::new(move |tmp: &[f32], out: &mut [MaybeUninit<f32>]| {
            for (computed, out) in tmp.chunks(positions).zip(out.chunks_mut(plane)) {
                for (y, line) in out.chunks_mut(wo).enumerate() {
                    line.write_copy_of_slice(&computed[y * row..][..wo]);
                }
            }
        }),
    };
    run(
        level,
        &src,
        [cin, cout, layout.stride, plane],
        bias,
        &[pass],
        &mut out,
    );
    // SAFETY: every job's pass writes its 8 planes in full, `wo` values of each of `ho` rows.
    unsafe { written(out) }
}

/// The input rows (or columns) `i` of phase `a` whose padded position `s i + a` is in the
/// image, `p <= s i + a < p + len`: (first, count), or `None`.
fn phase_range(conv: &Conv, a: usize, len: usize) -> Option<(usize, usize)> {
    let first = conv.p.saturating_sub(a).div_ceil(conv.s);
    let last = (conv.p + len).checked_sub(a + 1)? / conv.s;
    (first <= last).then(|| (first, last - first + 1))
}

/// The input gradient of [`forward`]: `dx` [N, Cin, H, W] from the output gradient `grad` [N,
/// Cout, Ho, Wo] and `weight` [Cout, Cin, k, k]. Needs [`forward_applies`]`(cin)`.
///
/// `dx` at padded position `(s i + a, s j + b)` is `sum_co sum_(ky, kx) w[co, ci, ky, kx]
/// grad[co, i - ky / s, j - kx / s]` over the taps with `ky % s = a`, `kx % s = b`: per phase
/// `(a, b)`, a forward convolution of the zero-padded gradient with those taps' weights, flipped
/// and transposed.
pub fn input_grad(grad: &[f32], weight: &[f32], conv: Conv, dims: [usize; 3]) -> Vec<f32> {
    input_grad_at(capability(), grad, weight, conv, dims)
}

fn input_grad_at(
    level: Capability,
    grad: &[f32],
    weight: &[f32],
    conv: Conv,
    [n, cin, cout]: [usize; 3],
) -> Vec<f32> {
    assert!(forward_applies(cin));
    let Conv { k, s, p, h, w } = conv;
    let taps = conv.taps();
    assert_eq!(weight.len(), cout * cin * taps);
    let [ho, wo] = conv.output();
    assert_eq!(grad.len(), n * cout * ho * wo);
    let plane = h * w;
    let len = n * cin * plane;
    if len == 0 || cout == 0 || ho * wo == 0 {
        return vec![0.0; len];
    }
    // The gradient padded by `top` rows and `left` columns, so that every tap of every phase
    // reads at a non-negative offset, in rows of `row`.
    let reach = (k - 1) / s;
    let rows: Vec<_> = (0..s).filter_map(|a| phase_range(&conv, a, h)).collect();
    let cols: Vec<_> = (0..s).filter_map(|b| phase_range(&conv, b, w)).collect();
    let margin = |ranges: &[(usize, usize)]| {
        ranges
            .iter()
            .map(|(first, _)| reach.saturating_sub(*first))
            .max()
            .unwrap_or(0)
    };
    let (top, left) = (margin(&rows), margin(&cols));
    let end = |ranges: &[(usize, usize)]| ranges.iter().map(|(f, c)| f + c).max().unwrap_or(0);
    let row = (left + wo).max(end(&cols) + left);
    let height = (top + ho).max(end(&rows) + top);
    let mut passes = Vec::new();
    let mut reads = height * row;
    for a in 0..s {
        for b in 0..s {
            let (Some((i0, ri)), Some((j0, cj))) =
                (phase_range(&conv, a, h), phase_range(&conv, b, w))
            else {
                continue;
            };
            let phase_taps: Vec<(usize, usize)> = (0..k)
                .filter(|ky| ky % s == a)
                .flat_map(|ky| (0..k).filter(|kx| kx % s == b).map(move |kx| (ky, kx)))
                .collect();
            if phase_taps.is_empty() {
                continue;
            }
            let offsets: Vec<usize> = phase_taps
                .iter()
                .map(|&(ky, kx)| (i0 + top - ky / s) * row + j0 + left - kx / s)
                .collect();
            let positions = blocks_of(ri * row);
            reads = reads.max(positions + offsets.iter().max().unwrap());
            let packed = pack([cin, cout, phase_taps.len()], |ci, co, t| {
                let (ky, kx) = phase_taps[t];
                weight[(co * cin + ci) * taps + ky * k + kx]
            });
            // Position (ii, jj) of the pass is the input pixel ((i0 + ii) s + a - p, (j0 + jj) s
            // + b - p).
            let place = move |tmp: &[f32], out: &mut [MaybeUninit<f32>]| {
                for (computed, out) in tmp.chunks(positions).zip(out.chunks_mut(plane)) {
                    for ii in 0..ri {
                        let y = (i0 + ii) * s + a - p;
                        let line = &computed[ii * row..][..cj];
                        let x0 = j0 * s + b - p;
                        let dst = &mut out[y * w..(y + 1) * w];
                        if s == 1 {
                            dst[x0..x0 + cj].write_copy_of_slice(line);
                        } else {
                            for (jj, v) in line.iter().enumerate() {
                                dst[x0 + jj * s].write(*v);
                            }
                        }
                    }
                }
            };
            passes.push(Pass {
                offsets,
                packed,
                positions,
                place: Box::new(place),
            });
        }
    }
    let padded = padded_planes(grad, [n * cout, ho, wo], reads, |y| (y + top) * row + left);
    // Each phase's pass writes that phase's pixels. With a kernel narrower than the stride, some
    // phases have no tap, and their pixels a zero gradient.
    let mut dx = if k >= s {
        unwritten(len)
    } else {
        vec![MaybeUninit::new(0.0); len]
    };
    run(
        level,
        &padded,
        [cout, cin, reads, plane],
        None,
        &passes,
        &mut dx,
    );
    // SAFETY: every pixel belongs to one phase (`(y + p) % s`, `(x + p) % s`); with `k >= s`,
    // each phase has taps, and its pass writes every pixel of the phase (rows and columns of
    // `phase_range`); the other buffer starts zeroed.
    unsafe { written(dx) }
}

/// The `count` planes [H, W] of `planes` each in `len` zeroed values, row `y` from `start(y)` on,
/// zeroed and copied on rayon's threads.
fn padded_planes(
    planes: &[f32],
    [count, h, w]: [usize; 3],
    len: usize,
    start: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    assert_eq!(planes.len(), count * h * w);
    if h * w == 0 || len == 0 {
        return vec![0.0; count * len];
    }
    let mut out = unwritten(count * len);
    out.par_chunks_mut(len)
        .zip(planes.par_chunks(h * w))
        .for_each(|(dst, src)| {
            dst.fill(MaybeUninit::new(0.0));
            for (y, line) in src.chunks(w).enumerate() {
                dst[start(y)..][..w].write_copy_of_slice(line);
            }
        });
    // SAFETY: every plane of `len` values was filled.
    unsafe { written(out) }
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

/// The weight gradient of [`forward`]: `dW[co, ci, t] = sum_n sum_q grad[n, co, q] x[n, ci, q +
/// offset_t]` over the computed positions `q`, [Cout, Cin, k, k], from `x` [N, Cin, H, W] and
/// `grad` [N, Cout, Ho, Wo]. Needs [`weight_grad_applies`].
///
/// (One matrix product per tap, `dW_t [Cout, Cin] = G [Cout, positions] X_t [positions, Cin]`,
/// was no faster at stride 1 and 2-3x slower at stride 2, where the phase planes of the input are
/// 4 times the computed positions.)
pub fn weight_grad(x: &[f32], grad: &[f32], conv: Conv, dims: [usize; 3]) -> Vec<f32> {
    weight_grad_at(capability(), x, grad, conv, dims)
}

fn weight_grad_at(
    level: Capability,
    x: &[f32],
    grad: &[f32],
    conv: Conv,
    [n, cin, cout]: [usize; 3],
) -> Vec<f32> {
    assert!(weight_grad_applies(cout));
    let [ho, wo] = conv.output();
    assert_eq!(x.len(), n * cin * conv.h * conv.w);
    assert_eq!(grad.len(), n * cout * ho * wo);
    let taps = conv.taps();
    let mut dw = vec![0.0f32; cout * cin * taps];
    if dw.is_empty() || n * ho * wo == 0 {
        return dw;
    }
    let layout = Layout::input(&conv);
    let (stride, positions, row) = (layout.stride, layout.positions, layout.row);
    let xp = layout.scatter(&conv, x, n * cin);
    // The gradient at the computed positions, zero in the cropped columns and after the last
    // row: those positions add nothing.
    let gp = padded_planes(grad, [n * cout, ho, wo], positions, |y| y * row);
    // The taps in groups of 9, the last one filled up with tap 0 (its sums are dropped).
    let groups: Vec<[usize; TAP_GROUP]> = layout
        .offsets
        .chunks(TAP_GROUP)
        .map(|g| std::array::from_fn(|i| g.get(i).copied().unwrap_or(g[0])))
        .collect();
    let small = positions < SMALL_PLANE;
    // Jobs of a few pairs of output channels, each reading a block of input channels once for
    // all its pairs while the block is in the cache.
    let pair_len = 2 * cin * taps;
    let per_job = (cout / 2)
        .div_ceil(2 * rayon::current_num_threads())
        .clamp(1, PAIRS_PER_JOB);
    dw.par_chunks_mut(per_job * pair_len)
        .enumerate()
        .for_each(|(job, dw)| {
            let pairs = job * per_job..job * per_job + dw.len() / pair_len;
            let mut add = |pair: usize, ci: usize, group: usize, sums: [[f32; TAP_GROUP]; 2]| {
                let first = group * TAP_GROUP;
                let len = TAP_GROUP.min(taps - first);
                let dw = &mut dw[(pair - pairs.start) * pair_len..];
                for (lane, sums) in sums.iter().enumerate() {
                    let dst = &mut dw[lane * cin * taps + ci * taps + first..][..len];
                    dst.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
                }
            };
            // The pair's sums over one input channel's taps of `group` (see `blocks::PairSums`).
            let sums = |g: &[f32], x: &[f32], group: &[usize; TAP_GROUP], images: [usize; 3]| {
                let offsets = group;
                dispatch_at(
                    level,
                    blocks::PairSums {
                        g,
                        x,
                        offsets,
                        positions,
                        images,
                    },
                )
            };
            if small {
                // Every image at once: [image][2 channels of the pair] `cout` planes apart.
                for pair in pairs.clone() {
                    let g = &gp[2 * pair * positions..];
                    for ci in 0..cin {
                        for (index, group) in groups.iter().enumerate() {
                            let images = [n, cout * positions, cin * stride];
                            add(pair, ci, index, sums(g, &xp[ci * stride..], group, images));
                        }
                    }
                }
                return;
            }
            for image in 0..n {
                let x = &xp[image * cin * stride..];
                for block in (0..cin).step_by(WG_CI_BLOCK) {
                    for pair in pairs.clone() {
                        let g = &gp[(image * cout + 2 * pair) * positions..];
                        for ci in block..(block + WG_CI_BLOCK).min(cin) {
                            for (index, group) in groups.iter().enumerate() {
                                let images = [1, 0, 0];
                                add(pair, ci, index, sums(g, &x[ci * stride..], group, images));
                            }
                        }
                    }
                }
            }
        });
    dw
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;

    /// The definition in float64: `out[b, co, y, x] = sum w[co, ci, ky, kx] x[b, ci, s y + ky - p,
    /// s x + kx - p]`, and through `visit` every product's indices (output, input, weight).
    fn each_product(
        conv: &Conv,
        [n, cin, cout]: [usize; 3],
        mut visit: impl FnMut(usize, usize, usize),
    ) {
        let Conv { k, s, p, h, w } = *conv;
        let [ho, wo] = conv.output();
        for b in 0..n {
            for co in 0..cout {
                for y in 0..ho {
                    for xx in 0..wo {
                        let o = ((b * cout + co) * ho + y) * wo + xx;
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (s * y + ky, s * xx + kx);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= w {
                                        continue;
                                    }
                                    let i = ((b * cin + ci) * h + iy - p) * w + ix - p;
                                    visit(o, i, (co * cin + ci) * k * k + ky * k + kx);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 + seed * 31) % 1999) as f32 / 1999.0 - 0.5)
            .collect()
    }

    /// Every instruction set this CPU can run (`simd::levels`), not only the one the kernels
    /// use here: the AVX2 and portable forms are tested on an AVX-512 machine too.
    #[test]
    fn forward_and_gradients_match_the_definition() {
        // (k, s, p) of the models (3x3 same and stride 2, the 7x7 stem) and odd ones: a kernel
        // smaller than the stride, no padding, padding of the whole kernel.
        let convs = [
            (3, 1, 1),
            (3, 2, 1),
            (7, 2, 3),
            (1, 2, 0),
            (2, 2, 0),
            (5, 1, 2),
            (3, 3, 2),
            (3, 2, 0),
        ];
        // [n, cin, cout, h, w]: single pixels, odd sizes, more than 16 input channels (the
        // chunking), no input channel.
        let shapes = [
            [1, 1, 8, 1, 1],
            [2, 3, 16, 5, 7],
            [3, 5, 8, 9, 4],
            [1, 16, 8, 13, 17],
            [2, 8, 24, 7, 7],
            [1, 2, 2, 6, 33],
            [1, 20, 8, 5, 6],
            [2, 33, 16, 3, 4],
            [2, 0, 8, 3, 3],
            [1, 8, 8, 40, 40],
        ];
        for (k, s, p) in convs {
            for [n, cin, cout, h, w] in shapes {
                let conv = Conv { k, s, p, h, w };
                let [ho, wo] = conv.output();
                let dims = [n, cin, cout];
                let x = values(n * cin * h * w, 1);
                let weight = values(cout * cin * k * k, 2);
                let bias = values(cout, 4);
                let grad = values(n * cout * ho * wo, 3);
                let mut want = vec![0.0f64; n * cout * ho * wo];
                let mut want_dx = vec![0.0f64; x.len()];
                let mut want_dw = vec![0.0f64; weight.len()];
                each_product(&conv, dims, |o, i, t| {
                    want[o] += x[i] as f64 * weight[t] as f64;
                    want_dx[i] += grad[o] as f64 * weight[t] as f64;
                    want_dw[t] += grad[o] as f64 * x[i] as f64;
                });
                let plane = (ho * wo).max(1);
                let with_bias: Vec<f32> = want
                    .iter()
                    .enumerate()
                    .map(|(o, v)| (v + bias[(o / plane) % cout] as f64) as f32)
                    .collect();
                let f32s = |v: &[f64]| v.iter().map(|v| *v as f32).collect::<Vec<_>>();
                for level in crate::simd::levels() {
                    let case = format!("{level:?}: {k}x{k}/{s} pad {p}, {dims:?} {h}x{w}");
                    if forward_applies(cout) {
                        let got = forward_at(level, &x, &weight, None, conv, dims);
                        let err = relative_error(&f32s(&want), &got, 1e-6);
                        assert!(err < 1e-5, "forward {case}: {err}");
                        let got = forward_at(level, &x, &weight, Some(&bias), conv, dims);
                        let err = relative_error(&with_bias, &got, 1e-6);
                        assert!(err < 1e-5, "forward with bias {case}: {err}");
                    }
                    if forward_applies(cin) {
                        let got = input_grad_at(level, &grad, &weight, conv, dims);
                        let err = relative_error(&f32s(&want_dx), &got, 1e-6);
                        assert!(err < 1e-5, "input grad {case}: {err}");
                    }
                    if weight_grad_applies(cout) {
                        let got = weight_grad_at(level, &x, &grad, conv, dims);
                        let err = relative_error(&f32s(&want_dw), &got, 1e-6);
                        assert!(err < 1e-5, "weight grad {case}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_test_shapes_cover_both_weight_gradient_modes() {
        // Large planes take the per-image weight-gradient loop, small ones the all-images one.
        assert!(Layout::input(&Conv::same3x3(40, 40)).positions >= SMALL_PLANE);
        assert!(Layout::input(&Conv::same3x3(5, 7)).positions < SMALL_PLANE);
    }
}

//! 3x3 "same" convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 block
//! of outputs from the 4x4 block of inputs around it with 16 multiplications per input and
//! output channel instead of 36.
//!
//! With `U = G g G^T` (4x4, per output and input channel, from the 3x3 kernel `g`) and
//! `V = B^T d B` (4x4, per input channel and tile, from the tile's 4x4 inputs `d`), the 2x2
//! outputs of a tile are `A^T (sum_ci U ⊙ V) A`. The sum over the input channels is, for each of
//! the 16 positions, one matrix product `M = U [Cout, Cin] x V [Cin, tiles]`, done by `gemm` per
//! block of tiles small enough to stay in the cache; the transforms are cheap passes around it.
//!
//! The weight gradient ([`weight_grad`]) is the same algorithm transposed: per position, one
//! product of the transformed output gradients [Cout, tiles] and inputs [tiles, Cin].
//!
//! The products run at the same rate as the direct kernels of [`super::padded`], with 2.25 times
//! fewer multiplications; the results differ from the direct convolution by rounding only (the
//! transforms' coefficients are 0, ±1/2 and ±1), about 1e-6 relative. The transforms run
//! through [`crate::simd::dispatch`]: compiled for the CPU's instruction set (AVX2, AVX-512,
//! NEON) rather than baseline x86-64, with the same bits at every level (no float operation is
//! reordered).

use rayon::prelude::*;

use super::matmul::matmul;
use super::reduce::{PARTS, even_parts, tree_sum, with_scratch};
use super::{unwritten, written};
use crate::isa::{Capability, capability};
use crate::simd::dispatch;

/// The 16 positions of a 4x4 transformed tile.
const POSITIONS: usize = 16;

/// Whether the Winograd path is faster than the direct kernels of [`super::padded`]: measured
/// on the development machine (2 threads, batch 8), 1.25-1.64 times faster with 64 to 512
/// channels on planes of 14x14 to 224x224, and 1.3 times with 16 channels on 224x224, but 0.9
/// times with 512 channels on 7x7 (a 4x4 grid of tiles for 7 pixels wastes a quarter), and
/// 0.5-1.1 times with 32 or fewer output channels on smaller planes.
///
/// Below AVX-512 (AVX2 and the portable levels), where the padded kernel is slower and im2col +
/// gemm takes many channels on large planes ([`super::conv3x3`]), Winograd also takes 32
/// channels or more on planes of 28x28 and more. Measured on the AVX2 development machine
/// (`burn_gap --layers densenet121`, forward and backward, batch 8, two runs each, alternated):
/// densenet121's 128 to 32 channels at 56x56 took 34-36 ms against im2col's 45-56, at 28x28
/// 11 against 12.5-16.5, 32 to 32 at 56x56 11-13 against 15-16; its training step ran at
/// 3.89-3.90 images/s against 2.93-3.64 (batch 8) and 1.99 against 1.53-1.73 (batch 32).
pub fn applies(cin: usize, cout: usize, h: usize, w: usize) -> bool {
    let (channels, side) = (cin.min(cout), h.min(w));
    let avx2_wider = capability() < Capability::Avx512 && channels >= 32 && side >= 28;
    (channels >= 64 && side >= 14) || (channels >= 16 && side >= 224) || avx2_wider
}

/// Whether [`weight_grad`] is faster than the direct kernels of [`super::padded`] and im2col with
/// a matrix product. Measured on the development machine (2 threads, batch 8, forward and
/// backward of one convolution, alternated with the old paths): 0.84x the time with 64 channels
/// at 56x56, 0.83x with 128 at 28x28, 0.92x with 256 at 14x14 (0.88x at batch 32), 0.81x for the
/// decoder's 128 at 14x14, 0.84-0.95x for densenet121's 128 to 32 at 56x56 to 14x14 and 0.75x at
/// 7x7, 0.9-1.0x for 32 and 64 to 32 channels; but 1.06-1.2x with 512 channels at 7x7 and
/// 14x14, where each job's 16 Cout Cin sums outgrow the cache, and 1.1-1.6x with 16 or fewer
/// channels.
pub fn weight_grad_applies(cin: usize, cout: usize, h: usize, w: usize) -> bool {
    cin.min(cout) >= 32 && cin * cout <= 256 * 256 && h.min(w) >= 7
}

/// `U = G g G^T` for every (output, input) channel pair of `weight` [Cout, Cin, 3, 3]:
/// [Cout][16][Cin], one output channel per rayon job (for 512 channels, 4 million values).
fn transform_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = unwritten(cout * POSITIONS * cin);
    if cin == 0 {
        // SAFETY: nothing to write.
        return unsafe { written(u) };
    }
    u.par_chunks_mut(POSITIONS * cin)
        .zip(weight.par_chunks(cin * 9))
        .for_each(|(u, kernels)| {
            for (ci, g) in kernels.chunks(9).enumerate() {
                // t = G g: 4 rows of 3.
                let mut t = [[0.0f32; 3]; 4];
                for x in 0..3 {
                    let (a, b, c) = (g[x], g[3 + x], g[6 + x]);
                    t[0][x] = a;
                    t[1][x] = 0.5 * (a + b + c);
                    t[2][x] = 0.5 * (a - b + c);
                    t[3][x] = c;
                }
                for (y, [a, b, c]) in t.into_iter().enumerate() {
                    let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (x, value) in row.into_iter().enumerate() {
                        u[(y * 4 + x) * cin + ci] = std::mem::MaybeUninit::new(value);
                    }
                }
            }
        });
    // SAFETY: each output channel's chunk gets all 16 positions of each of its input channels.
    unsafe { written(u) }
}

/// A raw pointer to the output that the jobs write to disjoint parts of.
#[derive(Clone, Copy)]
struct Output(*mut std::mem::MaybeUninit<f32>);
// SAFETY: each job writes only the output rows of its own tile rows (see `forward`).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// `conv(x, weight) + bias` for `x` [N, Cin, H, W], `weight` [Cout, Cin, 3, 3], `bias` [Cout],
/// stride 1 and padding 1: [N, Cout, H, W].
pub fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    [n, cin, cout, h, w]: [usize; 5],
) -> Vec<f32> {
    assert_eq!(x.len(), n * cin * h * w);
    assert_eq!(weight.len(), cout * cin * 9);
    assert!(bias.is_none_or(|b| b.len() == cout));
    let mut out = unwritten(n * cout * h * w);
    if out.is_empty() {
        // SAFETY: nothing to write.
        return unsafe { written(out) };
    }
    let u = transform_weights(weight, cin, cout);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Tiles per block: the block's transformed inputs and products (16 (Cin + Cout) floats per
    // tile) within about 1.5 MB, and at least a few dozen columns for the products.
    let target = (1_500_000 / (4 * POSITIONS * (cin + cout))).clamp(32, 512);
    let blocks = blocks(n * th, (target / tw).max(1));
    let output = Output(out.as_mut_ptr());
    blocks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(v, m), rows| {
            let tiles = rows.len() * tw;
            v.resize(POSITIONS * cin * tiles, 0.0);
            m.resize(POSITIONS * cout * tiles, 0.0);
            dispatch(|| transform_inputs(x, v, rows.clone(), [cin, h, w, tiles]));
            for p in 0..POSITIONS {
                matmul(
                    [cout, tiles, cin],
                    &mut m[p * cout * tiles..][..cout * tiles],
                    false,
                    &u[p * cin..],
                    [POSITIONS * cin, 1],
                    &v[p * cin * tiles..][..cin * tiles],
                    [tiles, 1],
                    false,
                );
            }
            // SAFETY: tile rows `rows` are this job's alone, and with them the output rows
            // `2 ty` and `2 ty + 1` of their images, in every output channel.
            dispatch(|| unsafe { transform_outputs(m, bias, output, rows, [cout, h, w, tiles]) });
        },
    );
    // SAFETY: the blocks cover every tile row, and each tile writes its 2x2 outputs (those
    // inside the plane) in every output channel.
    unsafe { written(out) }
}

/// Consecutive blocks of `per_block` tile rows (the last one shorter) covering `tile_rows`.
fn blocks(tile_rows: usize, per_block: usize) -> Vec<std::ops::Range<usize>> {
    (0..tile_rows)
        .step_by(per_block)
        .map(|r| r..(r + per_block).min(tile_rows))
        .collect()
}

/// The weight gradient of [`forward`]: `dW` [Cout, Cin, 3, 3] from `x` [N, Cin, H, W] and the
/// output gradient `grad` [N, Cout, H, W], by the same F(2x2, 3x3) transposed.
///
/// The forward pass is the trilinear form `sum dY ⊙ A^T (U ⊙ V) A = sum (A dY A^T) ⊙ U ⊙ V`
/// over the tiles, so the gradient of `U = G g G^T` is `sum_tiles (A dY A^T) ⊙ V`, and that
/// of `g` is `G^T (.) G` of it. Per position, the sum over the tiles is one matrix product
/// `[Cout, tiles] x [tiles, Cin]`, accumulated block by block; each rayon job sums its blocks
/// into its own 16 Cout Cin floats, and the jobs' sums are added in a fixed tree.
pub fn weight_grad(x: &[f32], grad: &[f32], [n, cin, cout, h, w]: [usize; 5]) -> Vec<f32> {
    assert_eq!(x.len(), n * cin * h * w);
    assert_eq!(grad.len(), n * cout * h * w);
    let pairs = cout * cin;
    if pairs == 0 || n * h * w == 0 {
        return vec![0.0; pairs * 9];
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Blocks of about 2 MB of transformed tiles, more than the forward pass's: the products add
    // into the block's [Cout, Cin] sums, which longer products amortise (1 and 8 MB were slower
    // in a sweep). As many equal blocks as a multiple of the threads, so that their jobs, which
    // each sum all of their blocks, get even shares.
    let tile_rows = n * th;
    let target = (2_000_000 / (4 * POSITIONS * (cin + cout))).clamp(32, 2048);
    let count = tile_rows.div_ceil((target / tw).max(1)).div_ceil(PARTS) * PARTS;
    let blocks = blocks(tile_rows, tile_rows.div_ceil(count.min(tile_rows)));
    // A fixed number of jobs (not one per thread), each summing its blocks into its own
    // [16][Cout][Cin], added in a fixed tree: the same bits on any thread count (`reduce`).
    let jobs = even_parts(blocks.len(), PARTS);
    let job = |rows_of_job: &[std::ops::Range<usize>],
               m: &mut [f32],
               v: &mut Vec<f32>,
               g: &mut Vec<f32>| {
        for rows in rows_of_job {
            let tiles = rows.len() * tw;
            v.resize(POSITIONS * cin * tiles, 0.0);
            g.resize(POSITIONS * cout * tiles, 0.0);
            dispatch(|| transform_inputs(x, v, rows.clone(), [cin, h, w, tiles]));
            dispatch(|| transform_grads(grad, g, rows.clone(), [cout, h, w, tiles]));
            for p in 0..POSITIONS {
                matmul(
                    [cout, cin, tiles],
                    &mut m[p * pairs..][..pairs],
                    true,
                    &g[p * cout * tiles..][..cout * tiles],
                    [tiles, 1],
                    &v[p * cin * tiles..][..cin * tiles],
                    [1, tiles],
                    false,
                );
            }
        }
    };
    let sums = tree_sum(jobs.len(), POSITIONS * pairs, &|j, m: &mut [f32]| {
        // This thread's scratch buffers: the jobs' transformed tiles are not reallocated.
        with_scratch(|v| with_scratch(|g| job(&blocks[jobs[j].clone()], m, v, g)))
    });
    let mut dw = vec![0.0f32; pairs * 9];
    dw.par_chunks_mut(cin * 9)
        .enumerate()
        .for_each(|(co, kernels)| {
            for (ci, g) in kernels.chunks_mut(9).enumerate() {
                let at = |p: usize| sums[p * pairs + co * cin + ci];
                // G^T X: 3 rows of 4, then (.) G along each row.
                let mut t = [[0.0f32; 4]; 3];
                for q in 0..4 {
                    let (a, b, c, d) = (at(q), at(4 + q), at(8 + q), at(12 + q));
                    t[0][q] = a + 0.5 * (b + c);
                    t[1][q] = 0.5 * (b - c);
                    t[2][q] = 0.5 * (b + c) + d;
                }
                for (y, [a, b, c, d]) in t.into_iter().enumerate() {
                    g[3 * y] = a + 0.5 * (b + c);
                    g[3 * y + 1] = 0.5 * (b - c);
                    g[3 * y + 2] = 0.5 * (b + c) + d;
                }
            }
        });
    dw
}

/// `A dY A^T` for the 2x2 output-gradient tiles of tile rows `rows` (zero outside the plane),
/// into `g` [16][Cout][tiles], with `A^T` the output transform's [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn transform_grads(
    grad: &[f32],
    g: &mut [f32],
    rows: std::ops::Range<usize>,
    [cout, h, w, tiles]: [usize; 4],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // The four rows of `u`, zero from column w to 2 tw (written once: the loop below writes only
    // columns 0..w). A row outside the plane reads zeros.
    let width = 2 * tw;
    let mut u = vec![0.0f32; 4 * width];
    let zeros = vec![0.0f32; w];
    for (r, row) in rows.enumerate() {
        let (image, ty) = (row / th, row % th);
        for co in 0..cout {
            let plane = &grad[(image * cout + co) * h * w..][..h * w];
            let line = |k: usize| match 2 * ty + k {
                y if y < h => &plane[y * w..][..w],
                _ => &zeros[..],
            };
            let (r0, r1) = (line(0), line(1));
            // Vertically, A dY: the four rows of `u`.
            let (u0, rest) = u.split_at_mut(width);
            let (u1, rest) = rest.split_at_mut(width);
            let (u2, u3) = rest.split_at_mut(width);
            let (u0, u1, u2, u3) = (&mut u0[..w], &mut u1[..w], &mut u2[..w], &mut u3[..w]);
            for j in 0..w {
                u0[j] = r0[j];
                u1[j] = r0[j] + r1[j];
                u2[j] = r0[j] - r1[j];
                u3[j] = -r1[j];
            }
            // Horizontally, (.) A^T, per tile: position (i, k) of tile `tx` in row `i`.
            for (i, line) in u.chunks(width).enumerate() {
                for tx in 0..tw {
                    let [a, b] = [line[2 * tx], line[2 * tx + 1]];
                    let t = r * tw + tx;
                    let at = |k: usize| ((i * 4 + k) * cout + co) * tiles + t;
                    g[at(0)] = a;
                    g[at(1)] = a + b;
                    g[at(2)] = a - b;
                    g[at(3)] = -b;
                }
            }
        }
    }
}

/// `V = B^T d B` for the tiles of tile rows `rows` (global over the images), into `v`
/// [16][Cin][tiles].
#[inline(always)]
fn transform_inputs(
    x: &[f32],
    v: &mut [f32],
    rows: std::ops::Range<usize>,
    [cin, h, w, tiles]: [usize; 4],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // The four rows of `u` have a zero column on the left and zeros from column w + 1 to 2 tw + 2,
    // written once: the loop below writes only columns 1..=w. Rows outside the plane read zeros.
    let width = 2 * tw + 2;
    let mut u = vec![0.0f32; 4 * width];
    let zeros = vec![0.0f32; w];
    for (r, row) in rows.clone().enumerate() {
        let (image, ty) = (row / th, row % th);
        for ci in 0..cin {
            let plane = &x[(image * cin + ci) * h * w..][..h * w];
            let line = |k: usize| match (2 * ty + k).checked_sub(1) {
                Some(y) if y < h => &plane[y * w..][..w],
                _ => &zeros[..],
            };
            let (p0, p1, p2, p3) = (line(0), line(1), line(2), line(3));
            // Vertically, B^T d: the four rows of `u`.
            let (u0, rest) = u.split_at_mut(width);
            let (u1, rest) = rest.split_at_mut(width);
            let (u2, u3) = rest.split_at_mut(width);
            let (u0, u1) = (&mut u0[1..=w], &mut u1[1..=w]);
            let (u2, u3) = (&mut u2[1..=w], &mut u3[1..=w]);
            for j in 0..w {
                u0[j] = p0[j] - p2[j];
                u1[j] = p1[j] + p2[j];
                u2[j] = p2[j] - p1[j];
                u3[j] = p1[j] - p3[j];
            }
            // Horizontally, (.) B, per tile: position (i, k) of tile `tx` in row `i`.
            for (i, line) in u.chunks(width).enumerate() {
                for tx in 0..tw {
                    let [a, b, c, d] = [
                        line[2 * tx],
                        line[2 * tx + 1],
                        line[2 * tx + 2],
                        line[2 * tx + 3],
                    ];
                    let t = r * tw + tx;
                    let at = |k: usize| ((i * 4 + k) * cin + ci) * tiles + t;
                    v[at(0)] = a - c;
                    v[at(1)] = b + c;
                    v[at(2)] = c - b;
                    v[at(3)] = b - d;
                }
            }
        }
    }
}

/// `Y = A^T M A` (+ bias) for the tiles of tile rows `rows` from `m` [16][Cout][tiles], written
/// to the output's rows of those tiles.
///
/// # Safety
/// `output` points to [N, Cout, H, W] values, and no other thread writes the output rows of
/// tile rows `rows` meanwhile.
#[inline(always)]
unsafe fn transform_outputs(
    m: &[f32],
    bias: Option<&[f32]>,
    output: Output,
    rows: std::ops::Range<usize>,
    [cout, h, w, tiles]: [usize; 4],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // The four outputs of each tile of a tile row: [(0, 0), (0, 1), (1, 0), (1, 1)][tx].
    let mut y = vec![0.0f32; 4 * tw];
    let mut line = vec![0.0f32; 2 * tw];
    for co in 0..cout {
        let b = bias.map_or(0.0, |b| b[co]);
        for (r, row) in rows.clone().enumerate() {
            let (image, ty) = (row / th, row % th);
            let m: [&[f32]; POSITIONS] =
                std::array::from_fn(|p| &m[(p * cout + co) * tiles + r * tw..][..tw]);
            let (y00, rest) = y.split_at_mut(tw);
            let (y01, rest) = rest.split_at_mut(tw);
            let (y10, y11) = rest.split_at_mut(tw);
            // Over the tiles of the row at once (vectorised): s0 = m0 + m1 + m2 and
            // s1 = m1 - m2 - m3 down each column j of the 4x4 tile, then the same across.
            for t in 0..tw {
                let s0 = |j: usize| m[j][t] + m[4 + j][t] + m[8 + j][t];
                let s1 = |j: usize| m[4 + j][t] - m[8 + j][t] - m[12 + j][t];
                y00[t] = s0(0) + s0(1) + s0(2) + b;
                y01[t] = s0(1) - s0(2) - s0(3) + b;
                y10[t] = s1(0) + s1(1) + s1(2) + b;
                y11[t] = s1(1) - s1(2) - s1(3) + b;
            }
            for (a, (left, right)) in [(&*y00, &*y01), (&*y10, &*y11)].into_iter().enumerate() {
                let oy = 2 * ty + a;
                if oy >= h {
                    continue;
                }
                for ((pair, l), r) in line.chunks_mut(2).zip(left).zip(right) {
                    pair[0] = *l;
                    pair[1] = *r;
                }
                let at = ((image * cout + co) * h + oy) * w;
                // SAFETY: row `oy` of plane (image, co) is inside the output and this job's (the
                // caller's guarantee); `line` holds at least `w` values.
                unsafe {
                    let dst = output.0.add(at).cast::<f32>();
                    std::ptr::copy_nonoverlapping(line.as_ptr(), dst, w);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let device = burn::prelude::Device::flex();
        super::super::uniform([len], [-1.0, 1.0], seed, &device)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// The convolution by its definition (`direct`'s tests), plus the bias.
    fn reference(x: &[f32], weight: &[f32], bias: Option<&[f32]>, dims: [usize; 5]) -> Vec<f32> {
        let [n, _, cout, h, w] = dims;
        let grad = vec![0.0; n * cout * h * w];
        let (mut out, _) = super::super::direct::tests::naive(x, weight, &grad, dims);
        if let Some(bias) = bias {
            for (i, v) in out.iter_mut().enumerate() {
                *v += bias[i / (h * w) % cout];
            }
        }
        out
    }

    #[test]
    fn matches_the_direct_convolution_on_even_odd_and_tiny_planes() {
        // Odd sides leave half tiles; 2x3 has one row of tiles; the block sizes cut across
        // images where planes are small.
        for dims in [
            [2, 16, 24, 8, 8],
            [3, 17, 16, 7, 5],
            [1, 20, 18, 2, 3],
            [5, 16, 16, 3, 3],
            [1, 32, 40, 30, 30],
        ] {
            let [n, cin, cout, h, w] = dims;
            let x = values(n * cin * h * w, 1);
            let weight = values(cout * cin * 9, 2);
            let bias = values(cout, 3);
            for bias in [None, Some(&bias[..])] {
                let want = reference(&x, &weight, bias, dims);
                let error = relative_error(&want, &forward(&x, &weight, bias, dims), 0.0);
                assert!(
                    error < 1e-5,
                    "{dims:?} bias {}: error {error}",
                    bias.is_some()
                );
            }
        }
    }

    #[test]
    fn weight_grad_matches_the_definition_on_even_odd_and_tiny_planes() {
        for dims in [
            [2, 16, 24, 8, 8],
            [3, 17, 16, 7, 5],
            [1, 20, 18, 2, 3],
            [5, 16, 16, 3, 3],
            [1, 3, 2, 1, 1],
            [2, 32, 40, 30, 30],
        ] {
            let [n, cin, cout, h, w] = dims;
            let x = values(n * cin * h * w, 1);
            let grad = values(n * cout * h * w, 4);
            let weight = vec![0.0; cout * cin * 9];
            let (_, want) = super::super::direct::tests::naive(&x, &weight, &grad, dims);
            let error = relative_error(&want, &weight_grad(&x, &grad, dims), 0.0);
            assert!(error < 1e-5, "{dims:?}: error {error}");
        }
        assert!(
            weight_grad(&[], &[], [0, 4, 4, 8, 8])
                .iter()
                .all(|&v| v == 0.0)
        );
        assert_eq!(weight_grad(&[], &[], [2, 4, 4, 0, 8]).len(), 4 * 4 * 9);
    }

    #[test]
    fn applies_where_it_was_measured_faster() {
        assert!(applies(64, 64, 56, 56) && applies(512, 512, 14, 14));
        assert!(applies(16, 16, 224, 224) && !applies(32, 16, 112, 112));
        assert!(!applies(512, 512, 7, 7));
        assert!(!applies(8, 64, 224, 224) && !applies(128, 32, 14, 14));
        // Below AVX-512, also 32 channels or more on planes of 28x28 and more.
        let avx512 = capability() >= Capability::Avx512;
        assert_eq!(applies(128, 32, 56, 56), !avx512);
        assert_eq!(applies(32, 32, 28, 28), !avx512);
        assert!(weight_grad_applies(128, 32, 7, 7) && weight_grad_applies(256, 256, 14, 14));
        assert!(!weight_grad_applies(512, 512, 14, 14) && !weight_grad_applies(32, 16, 56, 56));
        assert!(!weight_grad_applies(64, 64, 4, 4));
    }
}

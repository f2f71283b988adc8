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
//! The products run at the same rate as the direct kernels of [`super::padded`], with 2.25 times
//! fewer multiplications; the results differ from the direct convolution by rounding only (the
//! transforms' coefficients are 0, ±1/2 and ±1), about 1e-6 relative.

use rayon::prelude::*;

use super::conv3x3::matmul;
use super::{unwritten, written};

/// The 16 positions of a 4x4 transformed tile.
const POSITIONS: usize = 16;

/// Whether the Winograd path is faster than the direct kernels of [`super::padded`]: measured
/// on the development machine (2 threads, batch 8), 1.25-1.64 times faster with 64 to 512
/// channels on planes of 14x14 to 224x224, and 1.3 times with 16 channels on 224x224, but 0.9
/// times with 512 channels on 7x7 (a 4x4 grid of tiles for 7 pixels wastes a quarter), and
/// 0.5-1.1 times with 32 or fewer output channels on smaller planes.
pub fn applies(cin: usize, cout: usize, h: usize, w: usize) -> bool {
    let (channels, side) = (cin.min(cout), h.min(w));
    (channels >= 64 && side >= 14) || (channels >= 16 && side >= 224)
}

/// `U = G g G^T` for every (output, input) channel pair of `weight` [Cout, Cin, 3, 3]:
/// [Cout][16][Cin], one output channel per rayon job (for 512 channels, 4 million values).
fn transform_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; cout * POSITIONS * cin];
    if cin == 0 {
        return u;
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
                        u[(y * 4 + x) * cin + ci] = value;
                    }
                }
            }
        });
    u
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
    let rows_per_block = (target / tw).max(1);
    let tile_rows = n * th;
    let blocks: Vec<std::ops::Range<usize>> = (0..tile_rows)
        .step_by(rows_per_block)
        .map(|r| r..(r + rows_per_block).min(tile_rows))
        .collect();
    let output = Output(out.as_mut_ptr());
    blocks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(v, m), rows| {
            let tiles = rows.len() * tw;
            v.resize(POSITIONS * cin * tiles, 0.0);
            m.resize(POSITIONS * cout * tiles, 0.0);
            transform_inputs(x, v, rows.clone(), [cin, h, w, tiles]);
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
            unsafe { transform_outputs(m, bias, output, rows, [cout, h, w, tiles]) };
        },
    );
    // SAFETY: the blocks cover every tile row, and each tile writes its 2x2 outputs (those
    // inside the plane) in every output channel.
    unsafe { written(out) }
}

/// `V = B^T d B` for the tiles of tile rows `rows` (global over the images), into `v`
/// [16][Cin][tiles].
fn transform_inputs(
    x: &[f32],
    v: &mut [f32],
    rows: std::ops::Range<usize>,
    [cin, h, w, tiles]: [usize; 4],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Four input rows, zero-padded by one on the left and to 2 tw + 2 columns.
    let width = 2 * tw + 2;
    let mut padded = vec![0.0f32; 4 * width];
    let mut u = vec![0.0f32; 4 * width];
    for (r, row) in rows.clone().enumerate() {
        let (image, ty) = (row / th, row % th);
        for ci in 0..cin {
            let plane = &x[(image * cin + ci) * h * w..][..h * w];
            for (k, line) in padded.chunks_mut(width).enumerate() {
                line.fill(0.0);
                let y = (2 * ty + k).wrapping_sub(1);
                if y < h {
                    line[1..=w].copy_from_slice(&plane[y * w..][..w]);
                }
            }
            let (p0, rest) = padded.split_at(width);
            let (p1, rest) = rest.split_at(width);
            let (p2, p3) = rest.split_at(width);
            // Vertically, B^T d: the four rows of `u`.
            let (u0, rest) = u.split_at_mut(width);
            let (u1, rest) = rest.split_at_mut(width);
            let (u2, u3) = rest.split_at_mut(width);
            for j in 0..width {
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
                let got = forward(&x, &weight, bias, dims);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let error = want
                    .iter()
                    .zip(&got)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                    / scale;
                assert!(
                    error < 1e-5,
                    "{dims:?} bias {}: error {error}",
                    bias.is_some()
                );
            }
        }
    }

    #[test]
    fn applies_where_it_was_measured_faster() {
        assert!(applies(64, 64, 56, 56) && applies(512, 512, 14, 14));
        assert!(applies(16, 16, 224, 224) && !applies(32, 16, 112, 112));
        assert!(!applies(512, 512, 7, 7));
        assert!(!applies(128, 32, 56, 56) && !applies(8, 64, 224, 224));
    }
}

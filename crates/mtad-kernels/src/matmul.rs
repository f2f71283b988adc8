//! Matrix products on gemm (the flex backend's own matrix kernels, AVX2/AVX-512/NEON chosen at
//! run time) for the convolutions, and the bias they add: one home for what the 3x3, 1x1,
//! strided and Winograd paths share.

use std::mem::MaybeUninit;

/// Whether to run the chunks on rayon's threads (single-threaded products) rather than in turn
/// with multi-threaded products.
pub(crate) fn parallel_chunks(chunks: usize) -> bool {
    chunks >= rayon::current_num_threads()
}

/// `dst (+)= lhs x rhs` for row-major `dst` [m, n]; `lhs` and `rhs` are given by their row and
/// column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    shape: [usize; 3],
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: [usize; 2],
    rhs: &[f32],
    rhs_strides: [usize; 2],
    parallel: bool,
) {
    // SAFETY: same layout; `gemm_into` writes only initialised floats into `dst` (so it stays
    // valid as `[f32]`), and `dst` is initialised where gemm reads it to accumulate.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_into(
        shape,
        dst,
        accumulate,
        [lhs, rhs],
        [lhs_strides, rhs_strides],
        parallel,
    );
}

/// `dst = lhs x rhs` as [`matmul`], into a buffer nothing has written yet: gemm only writes it.
pub(crate) fn matmul_to(
    shape: [usize; 3],
    dst: &mut [MaybeUninit<f32>],
    lhs: &[f32],
    lhs_strides: [usize; 2],
    rhs: &[f32],
    rhs_strides: [usize; 2],
    parallel: bool,
) {
    gemm_into(
        shape,
        dst,
        false,
        [lhs, rhs],
        [lhs_strides, rhs_strides],
        parallel,
    );
}

/// [`matmul`] and [`matmul_to`]: gemm reads `dst` only where `accumulate` is set, and the
/// callers pass an initialised `dst` then.
fn gemm_into(
    [m, n, k]: [usize; 3],
    dst: &mut [MaybeUninit<f32>],
    accumulate: bool,
    [lhs, rhs]: [&[f32]; 2],
    [[lhs_rs, lhs_cs], [rhs_rs, rhs_cs]]: [[usize; 2]; 2],
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    assert!(k == 0 || n == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    if !accumulate && k == 0 {
        // An empty sum: gemm would leave `dst` as it is.
        dst[..m * n].fill(MaybeUninit::new(0.0));
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices; it
    // reads `dst` only when `accumulate` is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out[n, c] += bias[c]` for the planes of `hw` values of `out` [N, C, H, W].
pub(crate) fn add_bias(out: &mut [f32], bias: Option<&[f32]>, hw: usize) {
    let Some(bias) = bias.filter(|b| !b.is_empty()) else {
        return;
    };
    for (i, plane) in out.chunks_mut(hw.max(1)).enumerate() {
        let b = bias[i % bias.len()];
        plane.iter_mut().for_each(|v| *v += b);
    }
}

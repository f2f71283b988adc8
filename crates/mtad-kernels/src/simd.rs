//! The kernels' SIMD code is written once, over `pulp`'s [`Simd`] types (as `gemm`'s is), and
//! compiled for each instruction set: AVX-512 (`pulp::x86::V4`, 16 floats per vector), AVX2 +
//! FMA (`V3`, 8), NEON on Arm (`pulp::Arch`, 4) and plain Rust (`Scalar`, 1). [`dispatch`]
//! runs a kernel with the level [`crate::isa::capability`] chooses; [`dispatch_at`] with a given
//! one, so that the tests run every level the machine can execute ([`levels`]).
//!
//! A kernel is a [`WithSimd`] whose `with_simd` and the functions it calls are
//! `#[inline(always)]`: pulp compiles it inside a function with the level's target features, so
//! its vector operations (and the loops the compiler vectorises) use that level's instructions.
//! Closures in the hot loops are avoided: one that is not inlined would run without them.

use pulp::{Simd, WithSimd};

use crate::isa::{Capability, capability, detected};

/// Runs `op` with the instruction set the kernels use ([`capability`]).
pub fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
    dispatch_at(capability(), op)
}

/// Runs `op` with the SIMD level `level`, or the best below it that the CPU has. `Default` is
/// the portable code: NEON on aarch64, plain Rust on x86-64.
pub fn dispatch_at<Op: WithSimd>(level: Capability, op: Op) -> Op::Output {
    #[cfg(target_arch = "x86_64")]
    {
        use pulp::x86::{V3, V4};
        if level >= Capability::Avx512
            && let Some(simd) = V4::try_new()
        {
            return Simd::vectorize(simd, op);
        }
        if level >= Capability::Avx2
            && let Some(simd) = V3::try_new()
        {
            return Simd::vectorize(simd, op);
        }
        Simd::vectorize(pulp::Scalar::new(), op)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        pulp::Arch::new().dispatch(op)
    }
}

/// The levels this machine can run, lowest first: what the tests compare with the definitions.
pub fn levels() -> Vec<Capability> {
    [Capability::Default, Capability::Avx2, Capability::Avx512]
        .into_iter()
        .filter(|level| *level <= detected())
        .collect()
}

/// `S::F32_LANES` floats from `ptr` (any alignment).
///
/// # Safety
/// `ptr` must be valid for reading that many floats.
#[inline(always)]
pub unsafe fn load<S: Simd>(ptr: *const f32) -> S::f32s {
    // SAFETY: the caller's; `f32s` is plain data of `F32_LANES` floats.
    unsafe { (ptr as *const S::f32s).read_unaligned() }
}

/// `value` to `S::F32_LANES` floats at `ptr` (any alignment).
///
/// # Safety
/// `ptr` must be valid for writing that many floats.
#[inline(always)]
pub unsafe fn store<S: Simd>(ptr: *mut f32, value: S::f32s) {
    // SAFETY: the caller's.
    unsafe { (ptr as *mut S::f32s).write_unaligned(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sum of products over a slice, in vectors.
    struct Dot<'a>(&'a [f32], &'a [f32]);

    impl WithSimd for Dot<'_> {
        type Output = (usize, f32);

        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> (usize, f32) {
            let lanes = S::F32_LANES;
            let mut acc = simd.splat_f32s(0.0);
            for i in (0..self.0.len() / lanes * lanes).step_by(lanes) {
                // SAFETY: i + lanes <= len.
                let (a, b) = unsafe {
                    (
                        load::<S>(self.0[i..].as_ptr()),
                        load::<S>(self.1[i..].as_ptr()),
                    )
                };
                acc = simd.mul_add_e_f32s(a, b, acc);
            }
            (lanes, simd.reduce_sum_f32s(acc))
        }
    }

    #[test]
    fn every_level_the_cpu_has_runs_with_its_own_vectors() {
        let a: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let b = vec![0.5f32; 64];
        let want: f32 = a.iter().sum::<f32>() * 0.5;
        let mut widths = Vec::new();
        for level in levels() {
            let (lanes, sum) = dispatch_at(level, Dot(&a, &b));
            assert_eq!(sum, want, "{level:?}");
            widths.push(lanes);
        }
        // Wider vectors at each higher level (on x86-64: 1, 8, 16 floats).
        assert!(widths.windows(2).all(|w| w[0] < w[1]), "{widths:?}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(widths[0], 1);
        // On Arm, the portable level is NEON's 4 floats.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(widths, [4]);
        assert_eq!(dispatch(Dot(&a, &b)).1, want);
    }
}

//! Our own CPU kernels for the layers that dominate a training step, as Burn backend extensions
//! on flex (and autodiff over flex) with hand-written backward passes. Every other backend, and
//! flex with another dtype than float32, keeps Burn's own operations: the functions here check
//! the device and fall back.
//!
//! [`adam`] is the optimizer's step fused into one pass over each parameter on flex.
//!
//! Measured per layer by the application's `cargo bench --bench burn_gap -- --layers` (see
//! this crate's `README.md` for the design and the figures).

pub mod adam;
mod autodiff;
pub mod batch_norm;
pub mod cat;
pub mod conv1x1;
pub mod conv3x3;
mod direct;
pub mod fused;
pub mod isa;
pub(crate) mod matmul;
mod padded;
pub mod pool;
mod reduce;
pub mod simd;
pub mod strided;
pub mod upsample;
mod winograd;

use std::mem::MaybeUninit;

use rayon::prelude::*;

use burn::backend::{DType, DispatchDevice};
use burn::prelude::*;
use burn_flex::{FlexTensor, Layout};

/// Whether `device` is the CPU backend, with or without autodiff.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

fn dims4(tensor: &FlexTensor) -> [usize; 4] {
    let shape = tensor.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// `tensor` in contiguous float32 storage (a copy if it is a strided view).
fn contiguous_f32(tensor: &FlexTensor) -> FlexTensor {
    let tensor = tensor.to_contiguous();
    assert!(
        tensor.as_slice::<f32>().is_some(),
        "the CPU kernels take float32"
    );
    tensor
}

/// A buffer for `len` floats that its caller writes in full before reading any. Unlike
/// `vec![0.0; len]`, nothing clears it first: calloc zeroes the memory the heap hands out again,
/// a pass over the whole buffer (4-6% of a resnet18 training step in `perf`).
///
/// In the crate's own tests and in debug builds, it is filled with NaN, so that a value a kernel
/// leaves unwritten shows in its results.
fn unwritten(len: usize) -> Vec<MaybeUninit<f32>> {
    if cfg!(any(test, debug_assertions)) {
        return vec![MaybeUninit::new(f32::NAN); len];
    }
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialisation, and the capacity holds `len`.
    unsafe { buffer.set_len(len) };
    buffer
}

/// Planes of `plane` values per rayon job, so that a job covers about `values` values and small
/// planes (7x7) are not one job each.
fn planes_per_job(plane: usize, values: usize) -> usize {
    (values / plane.max(1)).max(1)
}

/// A part of an [`unwritten`] buffer as the floats its caller wrote there.
///
/// # Safety
/// Every value of `part` has been written.
unsafe fn assume_written(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller wrote every value.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `buffer` as the floats its caller wrote.
///
/// # Safety
/// Every value of `buffer` has been written.
unsafe fn written(buffer: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut buffer = std::mem::ManuallyDrop::new(buffer);
    let (pointer, len, capacity) = (buffer.as_mut_ptr(), buffer.len(), buffer.capacity());
    // SAFETY: same allocation, layout and length; the caller wrote every value.
    unsafe { Vec::from_raw_parts(pointer.cast::<f32>(), len, capacity) }
}

/// `grad` [N, C, plane] as [C, N plane]: each channel's planes side by side (the left operand
/// of a weight gradient's matrix product over several images).
fn channel_rows(grad: &[f32], channels: usize, plane: usize) -> Vec<f32> {
    if grad.is_empty() {
        return Vec::new();
    }
    let columns = grad.len() / channels;
    let mut rows = unwritten(grad.len());
    rows.par_chunks_mut(columns)
        .enumerate()
        .for_each(|(c, row)| {
            for (b, part) in row.chunks_mut(plane).enumerate() {
                part.write_copy_of_slice(&grad[(b * channels + c) * plane..][..plane]);
            }
        });
    // SAFETY: each row of `columns` values is N copied planes.
    unsafe { written(rows) }
}

fn flex_f32(values: Vec<f32>, dims: [usize; 4]) -> FlexTensor {
    FlexTensor::new(
        burn::backend::Bytes::from_elems(values),
        Layout::contiguous(Shape::from(dims.to_vec())),
        DType::F32,
    )
}

/// Deterministic values in [lo, hi) for the tests: the device's seeded generator is shared by
/// the tests running in parallel, so two draws under one seed may differ.
#[cfg(test)]
fn uniform<const D: usize>(
    dims: [usize; D],
    [lo, hi]: [f32; 2],
    seed: u32,
    device: &Device,
) -> Tensor<D> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    let len = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            lo + (hi - lo) * ((state >> 8) as f32 / (1u32 << 24) as f32)
        })
        .collect();
    Tensor::from_data(TensorData::new(values, dims), device)
}

/// Largest difference between `want` and `got` relative to the largest magnitude of `want`, or
/// to `floor` where that is larger (for results that are cancellations near 0).
#[cfg(test)]
fn relative_error(want: &[f32], got: &[f32], floor: f32) -> f32 {
    assert_eq!(want.len(), got.len());
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    let worst = want
        .iter()
        .zip(got)
        .fold(0.0f32, |m, (a, b)| match (a.is_nan(), b.is_nan()) {
            (false, false) => m.max((a - b).abs()),
            (true, true) => m,
            // A NaN on one side only (`max` would skip it).
            _ => f32::INFINITY,
        });
    worst / scale
}

//! Bilinear x2 upsampling with aligned corners on the CPU backend, forward and backward: the
//! decoder's five upsamplings.
//!
//! Burn's CPU `interpolate` took 2-2.7x PyTorch's time for these, forward and backward (`cargo
//! bench --bench burn_gap -- --layers`). Here each output row blends two input rows, then each
//! output pixel two pixels of that blend; the backward pass runs the same taps the other way.
//! [`upsample2x`] is for flex float32 tensors; the decoder keeps its gathers and blends on the
//! other backends.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous_f32, dims4, flex_f32, unwritten, written};

/// The kernels, on flex and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait UpsampleBackend: Backend {
    /// `x` [N, C, H, W] -> [N, C, 2H, 2W].
    fn upsample2x(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input gradient [N, C, H, W] from the output gradient [N, C, 2H, 2W].
    fn upsample2x_backward(grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The two input positions and the weight of the second for each of the `2 n` outputs along an
/// axis of `n`: output `i` reads position `i (n - 1) / (2 n - 1)`.
fn taps(n: usize) -> Vec<(usize, usize, f32)> {
    let out = 2 * n;
    let scale = if n > 1 {
        (n - 1) as f32 / (out - 1) as f32
    } else {
        0.0
    };
    (0..out)
        .map(|i| {
            let source = scale * i as f32;
            let low = (source.floor() as usize).min(n - 1);
            (low, (low + 1).min(n - 1), source - low as f32)
        })
        .collect()
}

/// Upsamples every plane of `x` [planes, H, W] to [planes, 2H, 2W].
fn forward(x: &[f32], [planes, h, w]: [usize; 3]) -> Vec<f32> {
    let len = planes * 4 * h * w;
    if len == 0 {
        return Vec::new();
    }
    let mut out = unwritten(len);
    let (rows, cols) = (taps(h), taps(w));
    out.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each_init(
            || vec![0.0f32; w],
            |blend, (out, plane)| {
                for (line, &(y0, y1, wy)) in out.chunks_mut(2 * w).zip(&rows) {
                    let (r0, r1) = (&plane[y0 * w..][..w], &plane[y1 * w..][..w]);
                    for ((b, a), c) in blend.iter_mut().zip(r0).zip(r1) {
                        *b = a + (c - a) * wy;
                    }
                    for (o, &(x0, x1, wx)) in line.iter_mut().zip(&cols) {
                        o.write(blend[x0] + (blend[x1] - blend[x0]) * wx);
                    }
                }
            },
        );
    // SAFETY: each plane's `2 H` rows of `2 W` values are written (one tap pair per row and
    // column).
    unsafe { written(out) }
}

/// The input gradient [planes, H, W] from `grad` [planes, 2H, 2W].
fn backward(grad: &[f32], [planes, h, w]: [usize; 3]) -> Vec<f32> {
    let mut dx = vec![0.0f32; planes * h * w];
    if dx.is_empty() {
        return dx;
    }
    let (rows, cols) = (taps(h), taps(w));
    dx.par_chunks_mut(h * w)
        .zip(grad.par_chunks(4 * h * w))
        .for_each_init(
            || vec![0.0f32; w],
            |blend, (dx, grad)| {
                for (line, &(y0, y1, wy)) in grad.chunks(2 * w).zip(&rows) {
                    blend.fill(0.0);
                    for (g, &(x0, x1, wx)) in line.iter().zip(&cols) {
                        blend[x0] += g * (1.0 - wx);
                        blend[x1] += g * wx;
                    }
                    for (d, b) in dx[y0 * w..][..w].iter_mut().zip(blend.iter()) {
                        *d += b * (1.0 - wy);
                    }
                    for (d, b) in dx[y1 * w..][..w].iter_mut().zip(blend.iter()) {
                        *d += b * wy;
                    }
                }
            },
        );
    dx
}

impl UpsampleBackend for Flex {
    fn upsample2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous_f32(&x);
        let [n, c, h, w] = dims4(&x);
        flex_f32(
            forward(x.as_slice::<f32>().unwrap(), [n * c, h, w]),
            [n, c, 2 * h, 2 * w],
        )
    }

    fn upsample2x_backward(grad: FlexTensor) -> FlexTensor {
        let grad = contiguous_f32(&grad);
        let [n, c, h2, w2] = dims4(&grad);
        let (h, w) = (h2 / 2, w2 / 2);
        flex_f32(
            backward(grad.as_slice::<f32>().unwrap(), [n * c, h, w]),
            [n, c, h, w],
        )
    }
}

#[derive(Debug)]
struct UpsampleGrad;

impl<B: UpsampleBackend> Backward<B, 1> for UpsampleGrad {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::upsample2x_backward(grad));
        }
    }
}

impl<B: UpsampleBackend, C: CheckpointStrategy> UpsampleBackend for Autodiff<B, C> {
    fn upsample2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let out = B::upsample2x(x.into_primitive());
        match UpsampleGrad.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiable itself; the result is a constant.
    fn upsample2x_backward(grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::upsample2x_backward(grad.into_primitive()))
    }
}

/// [`UpsampleBackend::upsample2x`] on a float32 tensor on flex (with or without autodiff): the
/// caller checks the device.
pub fn upsample2x(x: Tensor<4>) -> Tensor<4> {
    assert_eq!(
        x.dtype(),
        burn::tensor::DType::F32,
        "the kernel takes float32"
    );
    Tensor::from_dispatch(<Dispatch as UpsampleBackend>::upsample2x(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Output and input gradient under a random linear loss, through Burn's `interpolate` or
    /// ours.
    fn forward_backward(x: &Tensor<4>, ours: bool) -> [Vec<f32>; 2] {
        let x = x.clone().require_grad();
        let [_, _, h, w] = x.dims();
        let y = if ours {
            upsample2x(x.clone())
        } else {
            let options = InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(true)
                .with_output_size([2 * h, 2 * w]);
            interpolate(x.clone(), options)
        };
        let probe = super::super::uniform(y.dims(), [0.0, 1.0], 9, &y.device());
        let grads = (y.clone() * probe).sum().backward();
        [values(y), values(x.grad(&grads).unwrap())]
    }

    #[test]
    fn matches_burns_bilinear_interpolation_forward_and_backward() {
        let device = Device::flex().autodiff();
        // The decoder's 7 -> 14 ... and odd, single-pixel and rectangular planes.
        for [n, c, h, w] in [
            [2, 3, 7, 7],
            [1, 2, 1, 1],
            [1, 1, 1, 5],
            [3, 2, 4, 9],
            [1, 4, 28, 28],
        ] {
            device.seed((h * 31 + w) as u64);
            let x = Tensor::random([n, c, h, w], Distribution::Default, &device);
            let want = forward_backward(&x, false);
            let got = forward_backward(&x, true);
            for (what, (a, b)) in ["output", "input grad"].iter().zip(want.iter().zip(&got)) {
                let err = relative_error(a, b, 1e-6);
                assert!(err < 1e-5, "{h}x{w} {what}: {err}");
            }
        }
    }
}

//! Max pooling on the CPU backend, forward and backward: the 3x3 stride-2 pooling after the
//! stems of the resnets and densenets, and the 2x2 pooling of the vggs.
//!
//! Burn's CPU backend (flex) took 2.4x PyTorch's time for the resnet18 stem's pooling, forward
//! and backward (`cargo bench --bench burn_gap -- --layers`). Here the forward pass keeps the
//! position of each window's maximum within its plane (as float32, exact below 2^24 pixels), and
//! the backward pass adds each output's gradient at that position. [`max_pool2d`] routes flex
//! float32 tensors here and leaves every other backend, dtype and option (dilation, ceil mode)
//! to Burn.
//!
//! The 2x2 stride-2 average pooling of densenet121's transitions has its own kernels too
//! ([`avg_pool2d`]): Burn's took 1.4-2.7x PyTorch's time forward and backward (`cargo bench
//! --bench burn_gap -- --layers densenet121`), with its input gradient zeroed on the calling
//! thread.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::pool::{AvgPool2d, MaxPool2d};
use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous_f32, dims4, flex_f32, is_flex, planes_per_job, unwritten, written};

/// The pooling window: kernel, stride and padding (on both sides) per axis, [height, width].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
}

impl Window {
    /// The output's height and width for an input of `h` x `w` (0 where the window does not
    /// fit).
    fn output(&self, h: usize, w: usize) -> [usize; 2] {
        let side = |len: usize, axis: usize| {
            (len + 2 * self.padding[axis])
                .checked_sub(self.kernel[axis])
                .map_or(0, |r| r / self.stride[axis] + 1)
        };
        [side(h, 0), side(w, 1)]
    }
}

/// The kernels, on flex and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait MaxPoolBackend: Backend {
    /// `x` [N, C, H, W] -> (pooled [N, C, Ho, Wo], the position `y W + x` of each output's
    /// maximum in its input plane, as float32).
    #[allow(clippy::type_complexity)]
    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The input gradient [N, C, H, W] from the output gradient and the positions of
    /// [`MaxPoolBackend::max_pool`].
    fn max_pool_backward(
        grad: FloatTensor<Self>,
        positions: FloatTensor<Self>,
        input: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// Whether `v` replaces `best` as a window's maximum: larger, or a NaN (which then stays), so
/// that the first maximum in scan order wins, as in PyTorch.
#[inline(always)]
fn beats(v: f32, best: f32) -> bool {
    v > best || (v.is_nan() && !best.is_nan())
}

/// Pools every plane of `x` [planes, H, W]: (maxima, their positions).
///
/// (Splitting each window into a pass along the rows and one down the columns, so that both run
/// along the output rows and vectorise, was no faster on the development machine.)
fn pool(x: &[f32], [planes, h, w]: [usize; 3], window: Window) -> (Vec<f32>, Vec<f32>) {
    let [ho, wo] = window.output(h, w);
    let len = planes * ho * wo;
    if len == 0 {
        return (Vec::new(), Vec::new());
    }
    let (mut out, mut at) = (unwritten(len), unwritten(len));
    let [kh, kw] = window.kernel;
    let [sh, sw] = window.stride;
    let [ph, pw] = window.padding;
    // The input columns (rows) of each output column's (row's) window, clipped to the image.
    let clip = |o: usize, s: usize, k: usize, p: usize, len: usize| {
        (
            (o * s).saturating_sub(p),
            (o * s + k).saturating_sub(p).min(len),
        )
    };
    let columns: Vec<(usize, usize)> = (0..wo).map(|ox| clip(ox, sw, kw, pw, w)).collect();
    out.par_chunks_mut(ho * wo)
        .zip(at.par_chunks_mut(ho * wo))
        .zip(x.par_chunks(h * w))
        .for_each(|((out, at), plane)| {
            for oy in 0..ho {
                let (top, bottom) = clip(oy, sh, kh, ph, h);
                let out = &mut out[oy * wo..][..wo];
                let at = &mut at[oy * wo..][..wo];
                for (ox, &(left, right)) in columns.iter().enumerate() {
                    // Row-major scan from the window's first pixel in the image.
                    let (mut best, mut best_at) = (plane[top * w + left], top * w + left);
                    for y in top..bottom {
                        for (x, &v) in plane[y * w + left..y * w + right].iter().enumerate() {
                            if beats(v, best) {
                                (best, best_at) = (v, y * w + left + x);
                            }
                        }
                    }
                    out[ox].write(best);
                    at[ox].write(best_at as f32);
                }
            }
        });
    // SAFETY: every output row of every plane is written, `wo` values each.
    unsafe { (written(out), written(at)) }
}

/// `dx` [planes, H, W]: each output's gradient added at its maximum's position.
fn unpool(grad: &[f32], positions: &[f32], [planes, h, w]: [usize; 3]) -> Vec<f32> {
    let mut dx = vec![0.0f32; planes * h * w];
    let per_plane = grad.len() / planes.max(1);
    if dx.is_empty() || per_plane == 0 {
        return dx;
    }
    dx.par_chunks_mut(h * w)
        .zip(
            grad.par_chunks(per_plane)
                .zip(positions.par_chunks(per_plane)),
        )
        .for_each(|(dx, (grad, positions))| {
            for (g, at) in grad.iter().zip(positions) {
                dx[*at as usize] += g;
            }
        });
    dx
}

impl MaxPoolBackend for Flex {
    fn max_pool(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> (FlexTensor, FlexTensor) {
        assert_eq!(x.dtype(), DType::F32, "max_pool2d routes float32 only");
        let x = contiguous_f32(&x);
        let [n, c, h, w] = dims4(&x);
        assert!(h * w < 1 << 24, "plane positions must be exact in float32");
        let window = Window {
            kernel,
            stride,
            padding,
        };
        let (out, at) = pool(x.as_slice::<f32>().unwrap(), [n * c, h, w], window);
        let [ho, wo] = window.output(h, w);
        (flex_f32(out, [n, c, ho, wo]), flex_f32(at, [n, c, ho, wo]))
    }

    fn max_pool_backward(
        grad: FlexTensor,
        positions: FlexTensor,
        [h, w]: [usize; 2],
    ) -> FlexTensor {
        let (grad, positions) = (contiguous_f32(&grad), contiguous_f32(&positions));
        let [n, c, _, _] = dims4(&grad);
        let dx = unpool(
            grad.as_slice::<f32>().unwrap(),
            positions.as_slice::<f32>().unwrap(),
            [n * c, h, w],
        );
        flex_f32(dx, [n, c, h, w])
    }
}

#[derive(Debug)]
struct MaxPoolGrad;

impl<B: Backend> Backward<B, 1> for MaxPoolGrad
where
    B: MaxPoolBackend,
{
    /// The positions of the maxima and the input's height and width.
    type State = (FloatTensor<B>, [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let (positions, input) = ops.state;
            grads.register::<B>(parent.id, B::max_pool_backward(grad, positions, input));
        }
    }
}

impl<B: MaxPoolBackend, C: CheckpointStrategy> MaxPoolBackend for Autodiff<B, C> {
    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = burn::backend::TensorMetadata::shape(&x);
        let input = [shape[2], shape[3]];
        let node = x.node();
        let (out, positions) = B::max_pool(x.into_primitive(), kernel, stride, padding);
        let output = match MaxPoolGrad.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((positions.clone(), input), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (output, Self::from_inner(positions))
    }

    /// Not differentiable itself; the result is a constant.
    fn max_pool_backward(
        grad: FloatTensor<Self>,
        positions: FloatTensor<Self>,
        input: [usize; 2],
    ) -> FloatTensor<Self> {
        Self::from_inner(B::max_pool_backward(
            grad.into_primitive(),
            positions.into_primitive(),
            input,
        ))
    }
}

/// `pool.forward(x)`, through [`MaxPoolBackend`] for float32 tensors on flex (with or without
/// autodiff) and pooling without dilation or ceil mode, with the same padding on both sides of
/// each axis; Burn's own pooling otherwise.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let padding = match pool.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    };
    let plain = |[top, left]: [usize; 2]| {
        pool.dilation == [1, 1]
            && !pool.ceil_mode
            && top < pool.kernel_size[0]
            && left < pool.kernel_size[1]
            && pool.stride.iter().all(|s| *s > 0)
    };
    let Some(padding) = padding.filter(|p| plain(*p)) else {
        return pool.forward(x);
    };
    if !is_flex(&x.device()) || x.dtype() != burn::tensor::DType::F32 {
        return pool.forward(x);
    }
    let (out, _) = <Dispatch as MaxPoolBackend>::max_pool(
        x.into_dispatch(),
        pool.kernel_size,
        pool.stride,
        padding,
    );
    Tensor::from_dispatch(out)
}

/// 2x2 average pooling with stride 2 and no padding, on flex and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait AvgPoolBackend: Backend {
    /// `x` [N, C, H, W] -> [N, C, H / 2, W / 2]: the mean of each 2x2 window (an odd last row
    /// or column is left out).
    fn avg_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input gradient [N, C, H, W] of [`AvgPoolBackend::avg_pool2x2`] from the output
    /// gradient: a quarter of each output's gradient on its window, zero on a left-out row or
    /// column.
    fn avg_pool2x2_backward(grad: FloatTensor<Self>, input: [usize; 2]) -> FloatTensor<Self>;
}

impl AvgPoolBackend for Flex {
    fn avg_pool2x2(x: FlexTensor) -> FlexTensor {
        assert_eq!(x.dtype(), DType::F32, "avg_pool2d routes float32 only");
        let x = contiguous_f32(&x);
        let [n, c, h, w] = dims4(&x);
        let (ho, wo) = (h / 2, w / 2);
        let xs = x.as_slice::<f32>().unwrap();
        let mut out = unwritten(n * c * ho * wo);
        if ho * wo > 0 {
            out.par_chunks_mut(ho * wo)
                .zip(xs.par_chunks(h * w))
                .with_min_len(planes_per_job(h * w, 4096))
                .for_each(|(out, plane)| {
                    for (oy, out) in out.chunks_mut(wo).enumerate() {
                        let (top, bottom) =
                            (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                        for (ox, v) in out.iter_mut().enumerate() {
                            let sum =
                                top[2 * ox] + top[2 * ox + 1] + bottom[2 * ox] + bottom[2 * ox + 1];
                            v.write(sum * 0.25);
                        }
                    }
                });
        }
        // SAFETY: every output row of every plane is written (none when the output is empty).
        flex_f32(unsafe { written(out) }, [n, c, ho, wo])
    }

    fn avg_pool2x2_backward(grad: FlexTensor, [h, w]: [usize; 2]) -> FlexTensor {
        let grad = contiguous_f32(&grad);
        let [n, c, ho, wo] = dims4(&grad);
        assert_eq!(
            [ho, wo],
            [h / 2, w / 2],
            "avg_pool2x2_backward: mismatched shapes"
        );
        let gs = grad.as_slice::<f32>().unwrap();
        let mut dx = unwritten(n * c * h * w);
        if h * w > 0 {
            dx.par_chunks_mut(h * w)
                .enumerate()
                .with_min_len(planes_per_job(h * w, 4096))
                .for_each(|(i, dx)| {
                    let g = &gs[i * ho * wo..][..ho * wo];
                    for (y, row) in dx.chunks_mut(w).enumerate() {
                        if y / 2 >= ho {
                            row.fill(std::mem::MaybeUninit::new(0.0));
                            continue;
                        }
                        let g = &g[y / 2 * wo..][..wo];
                        for (x, v) in row.iter_mut().enumerate() {
                            v.write(if x / 2 < wo { g[x / 2] * 0.25 } else { 0.0 });
                        }
                    }
                });
        }
        // SAFETY: every row of every plane is written.
        flex_f32(unsafe { written(dx) }, [n, c, h, w])
    }
}

#[derive(Debug)]
struct AvgPoolGrad;

impl<B: AvgPoolBackend> Backward<B, 1> for AvgPoolGrad {
    /// The input's height and width.
    type State = [usize; 2];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, B::avg_pool2x2_backward(grad, ops.state));
        }
    }
}

impl<B: AvgPoolBackend, C: CheckpointStrategy> AvgPoolBackend for Autodiff<B, C> {
    fn avg_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::backend::TensorMetadata::shape(&x);
        let input = [shape[2], shape[3]];
        let node = x.node();
        let out = B::avg_pool2x2(x.into_primitive());
        match AvgPoolGrad.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(input, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiable itself (only the backward pass uses it).
    fn avg_pool2x2_backward(grad: FloatTensor<Self>, input: [usize; 2]) -> FloatTensor<Self> {
        Self::from_inner(B::avg_pool2x2_backward(grad.into_primitive(), input))
    }
}

/// `pool.forward(x)`, through [`AvgPoolBackend`] for 2x2 pooling with stride 2 and no padding
/// (floor mode) of float32 tensors on flex (with or without autodiff); Burn's own pooling
/// otherwise.
pub fn avg_pool2d(pool: &AvgPool2d, x: Tensor<4>) -> Tensor<4> {
    let unpadded = matches!(
        pool.padding,
        PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
    );
    let ours = pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && unpadded
        && !pool.ceil_mode
        && is_flex(&x.device())
        && x.dtype() == burn::tensor::DType::F32;
    if !ours {
        return pool.forward(x);
    }
    Tensor::from_dispatch(<Dispatch as AvgPoolBackend>::avg_pool2x2(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;
    use burn::nn::pool::{AvgPool2dConfig, MaxPool2dConfig};
    use burn::tensor::Distribution;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Output and input gradient under a random linear loss, through Burn's pooling or ours.
    fn forward_backward(pool: &MaxPool2d, x: &Tensor<4>, ours: bool) -> [Vec<f32>; 2] {
        let x = x.clone().require_grad();
        let y = if ours {
            max_pool2d(pool, x.clone())
        } else {
            pool.forward(x.clone())
        };
        let probe = super::super::uniform(y.dims(), [0.0, 1.0], 5, &y.device());
        let grads = (y.clone() * probe).sum().backward();
        [values(y), values(x.grad(&grads).unwrap())]
    }

    #[test]
    fn matches_burns_max_pooling_forward_and_backward() {
        let device = Device::flex().autodiff();
        // (kernel, stride, padding): the stems' 3x3/2 pad 1, the vggs' 2x2/2, overlapping
        // windows at stride 1, a rectangular window.
        for (kernel, stride, [ph, pw]) in [
            ([3, 3], [2, 2], [1, 1]),
            ([2, 2], [2, 2], [0, 0]),
            ([3, 3], [1, 1], [1, 1]),
            ([3, 2], [2, 1], [1, 0]),
        ] {
            let padding = PaddingConfig2d::Explicit(ph, pw, ph, pw);
            let pool = MaxPool2dConfig::new(kernel)
                .with_strides(stride)
                .with_padding(padding)
                .init();
            for [n, c, h, w] in [[2, 3, 9, 9], [1, 4, 8, 11], [3, 2, 5, 4], [1, 1, 1, 2]] {
                if h + 2 * ph < kernel[0] || w + 2 * pw < kernel[1] {
                    continue; // The window does not fit.
                }
                device.seed((n * 100 + h) as u64);
                let x = Tensor::random([n, c, h, w], Distribution::Default, &device);
                let want = forward_backward(&pool, &x, false);
                let got = forward_backward(&pool, &x, true);
                for (what, (a, b)) in ["output", "input grad"].iter().zip(want.iter().zip(&got)) {
                    assert_eq!(a.len(), b.len(), "{kernel:?}/{stride:?} {h}x{w} {what}");
                    let err = relative_error(a, b, 1e-6);
                    assert!(err < 1e-6, "{kernel:?}/{stride:?} {h}x{w} {what}: {err}");
                }
            }
        }
    }

    #[test]
    fn matches_burns_average_pooling_forward_and_backward() {
        let device = Device::flex().autodiff();
        let pool = AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
        for (i, [n, c, h, w]) in [[2, 3, 8, 8], [1, 4, 7, 9], [3, 2, 1, 5], [8, 130, 7, 7]]
            .into_iter()
            .enumerate()
        {
            let x = super::super::uniform([n, c, h, w], [-1.0, 1.0], i as u32, &device);
            let run = |ours: bool| {
                let x = x.clone().require_grad();
                let y = if ours {
                    avg_pool2d(&pool, x.clone())
                } else {
                    pool.forward(x.clone())
                };
                let probe = super::super::uniform(y.dims(), [0.0, 1.0], 5, &y.device());
                let grads = (y.clone() * probe).sum().backward();
                [values(y), values(x.grad(&grads).unwrap())]
            };
            let (want, got) = (run(false), run(true));
            for (what, (a, b)) in ["output", "input grad"].iter().zip(want.iter().zip(&got)) {
                assert_eq!(a.len(), b.len(), "{h}x{w} {what}");
                let err = relative_error(a, b, 1e-6);
                assert!(err < 1e-6, "{h}x{w} {what}: {err}");
            }
        }
        // Padding is Burn's: the same result as its own pooling.
        let padded = AvgPool2dConfig::new([2, 2])
            .with_strides([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init();
        let x = Tensor::<4>::random([1, 2, 5, 5], Distribution::Default, &device);
        assert_eq!(
            values(avg_pool2d(&padded, x.clone())),
            values(padded.forward(x))
        );
    }

    #[test]
    fn takes_the_first_of_equal_maxima_and_leaves_other_options_to_burn() {
        // Equal values: the gradient goes to the first one of the window, as in PyTorch.
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::ones([1, 1, 2, 2], &device).require_grad();
        let pool = MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
        let grads = max_pool2d(&pool, x.clone()).sum().backward();
        assert_eq!(values(x.grad(&grads).unwrap()), [1.0, 0.0, 0.0, 0.0]);
        // Ceil mode is Burn's: the same result as its own pooling.
        let ceil = MaxPool2dConfig::new([2, 2])
            .with_strides([2, 2])
            .with_ceil_mode(true)
            .init();
        let x = Tensor::<4>::random([1, 2, 5, 5], Distribution::Default, &device);
        assert_eq!(
            values(max_pool2d(&ceil, x.clone())),
            values(ceil.forward(x))
        );
    }
}

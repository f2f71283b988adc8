//! 1x1 convolutions (stride 1, no padding, no groups) on the CPU backend, forward and backward,
//! as one matrix product per image in NCHW layout: `Y_n [Cout, HW] = W [Cout, Cin] X_n [Cin,
//! HW]`, `dX_n = W^T dY_n` and `dW = sum_n dY_n X_n^T`.
//!
//! These are the bottlenecks of the densenets (student and teacher) and of resnet152. Burn's CPU
//! backend computes their input gradient as a transposed convolution and their weight gradient
//! as a convolution with the output gradient as its kernel, 3-5x slower than PyTorch (256 to
//! 128 channels at 56x56, batch 8, forward and backward: 298 ms in flex, 108 ms here, about 90
//! ms in PyTorch on the 2-core development machine). [`conv2d`](super::conv3x3::conv2d) routes
//! 1x1 stride-1 convolutions here on flex and leaves every other case to Burn.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::autodiff::{self, ConvGradients};
use super::matmul::{add_bias, matmul, matmul_to, parallel_chunks};
use super::reduce::{PARTS, even_parts, tree_sum};
use super::{assume_written, contiguous_f32, dims4, flex_f32, unwritten, written};

/// The kernels, on the backends that have them: flex, and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait Conv1x1Backend: Backend {
    /// `x` [N, Cin, H, W], `weight` [Cout, Cin, 1, 1] -> [N, Cout, H, W].
    fn conv1x1(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`Conv1x1Backend::conv1x1`] plus `bias` [Cout], in the same pass.
    fn conv1x1_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// d loss / d weight [Cout, Cin, 1, 1] from `x` and the output gradient `grad`.
    fn conv1x1_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// d loss / d x [N, Cin, H, W] from the output gradient `grad` and the weight.
    fn conv1x1_input_grad(grad: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn options() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [0, 0], [1, 1], 1)
}

/// Runs `job(image, chunk)` for each image's `chunk` of `out` (`per_image` values each), on
/// rayon's threads with single-threaded products when there are enough images, else in turn with
/// multi-threaded products (the `bool` passed to `job`).
fn per_image<T: Send>(out: &mut [T], per_image: usize, job: impl Fn(usize, &mut [T], bool) + Sync) {
    let images = out.len() / per_image.max(1);
    if parallel_chunks(images) {
        out.par_chunks_mut(per_image)
            .enumerate()
            .for_each(|(i, chunk)| job(i, chunk, false));
    } else {
        for (i, chunk) in out.chunks_mut(per_image.max(1)).enumerate() {
            job(i, chunk, true);
        }
    }
}

fn flex_forward(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
    let f32_bias = bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || !f32_bias {
        return Flex::conv2d(x, weight, bias, options());
    }
    let bias = bias.map(|b| contiguous_f32(&b));
    let bias = bias.as_ref().map(|b| b.as_slice::<f32>().unwrap());
    let (x, weight) = (contiguous_f32(&x), contiguous_f32(&weight));
    let [n, cin, h, w] = dims4(&x);
    let cout = dims4(&weight)[0];
    let hw = h * w;
    let (xs, ws) = (
        x.as_slice::<f32>().unwrap(),
        weight.as_slice::<f32>().unwrap(),
    );
    let mut out = unwritten(n * cout * hw);
    if !out.is_empty() {
        per_image(&mut out, cout * hw, |i, out, threads| {
            let x = &xs[i * cin * hw..][..cin * hw];
            let shape = [cout, hw, cin];
            matmul_to(shape, out, ws, [cin, 1], x, [hw, 1], threads);
            // SAFETY: the product wrote every value of the image.
            add_bias(unsafe { assume_written(out) }, bias, hw);
        });
    }
    // SAFETY: the images' products cover `out`.
    flex_f32(unsafe { written(out) }, [n, cout, h, w])
}

impl Conv1x1Backend for Flex {
    fn conv1x1(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        flex_forward(x, weight, None)
    }

    fn conv1x1_bias(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        flex_forward(x, weight, Some(bias))
    }

    fn conv1x1_weight_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let [n, cin, h, w] = dims4(&x);
        let cout = dims4(&grad)[1];
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            let weight = FlexTensor::zeros(Shape::from(vec![cout, cin, 1, 1]), x.dtype());
            return Flex::conv2d_weight_backward(x, weight, grad, options());
        }
        let (x, grad) = (contiguous_f32(&x), contiguous_f32(&grad));
        let (xs, gs) = (
            x.as_slice::<f32>().unwrap(),
            grad.as_slice::<f32>().unwrap(),
        );
        let hw = h * w;
        // dW [Cout, Cin] += dY_n [Cout, HW] x X_n^T [HW, Cin]
        let product = |dw: &mut [f32], i: usize, threads: bool| {
            let (g, x) = (
                &gs[i * cout * hw..][..cout * hw],
                &xs[i * cin * hw..][..cin * hw],
            );
            matmul([cout, cin, hw], dw, true, g, [hw, 1], x, [1, hw], threads);
        };
        // The images in a fixed number of parts added in a fixed tree: the same bits on any
        // thread count (`reduce`). Products run multi-threaded where parts are fewer than threads.
        let parts = if hw == 0 {
            Vec::new()
        } else {
            even_parts(n, PARTS)
        };
        let threads = parts.len() < rayon::current_num_threads();
        let dw = tree_sum(parts.len(), cout * cin, &|p, dw: &mut [f32]| {
            parts[p].clone().for_each(|i| product(dw, i, threads));
        });
        flex_f32(dw, [cout, cin, 1, 1])
    }

    fn conv1x1_input_grad(grad: FlexTensor, weight: FlexTensor) -> FlexTensor {
        if grad.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            let [n, _, h, w] = dims4(&grad);
            let cin = dims4(&weight)[1];
            let x = FlexTensor::zeros(Shape::from(vec![n, cin, h, w]), grad.dtype());
            return Flex::conv2d_x_backward(x, weight, grad, options());
        }
        let (grad, weight) = (contiguous_f32(&grad), contiguous_f32(&weight));
        let [n, cout, h, w] = dims4(&grad);
        let cin = dims4(&weight)[1];
        let hw = h * w;
        let (gs, ws) = (
            grad.as_slice::<f32>().unwrap(),
            weight.as_slice::<f32>().unwrap(),
        );
        let mut dx = unwritten(n * cin * hw);
        if !dx.is_empty() {
            // dX_n [Cin, HW] = W^T [Cin, Cout] x dY_n [Cout, HW]
            per_image(&mut dx, cin * hw, |i, dx, threads| {
                let g = &gs[i * cout * hw..][..cout * hw];
                matmul_to([cin, hw, cout], dx, ws, [1, cin], g, [hw, 1], threads);
            });
        }
        // SAFETY: the images' products cover `dx`.
        flex_f32(unsafe { written(dx) }, [n, cin, h, w])
    }
}

/// The gradients of the 1x1 convolution, for [`autodiff::conv`].
#[derive(Debug)]
struct OneByOne;

impl<B: Conv1x1Backend> ConvGradients<B> for OneByOne {
    fn weight_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        _: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv1x1_weight_grad(x, grad)
    }

    fn input_grad(
        &self,
        _: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv1x1_input_grad(grad, weight)
    }
}

impl<B: Conv1x1Backend, C: CheckpointStrategy> Conv1x1Backend for Autodiff<B, C> {
    fn conv1x1(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::conv::<B, C, OneByOne>(OneByOne, x, weight, None, |x, w, _| B::conv1x1(x, w))
    }

    fn conv1x1_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        autodiff::conv::<B, C, OneByOne>(OneByOne, x, weight, Some(bias), |x, w, b| {
            B::conv1x1_bias(x, w, b.expect("a bias"))
        })
    }

    /// Not differentiable itself; the result is a constant.
    fn conv1x1_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::conv1x1_weight_grad(
            x.into_primitive(),
            grad.into_primitive(),
        ))
    }

    /// Not differentiable itself; the result is a constant.
    fn conv1x1_input_grad(grad: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::conv1x1_input_grad(
            grad.into_primitive(),
            weight.into_primitive(),
        ))
    }
}

/// `x` [N, Cin, H, W] through the 1x1 convolution `weight` [Cout, Cin, 1, 1] (+ `bias`), on flex
/// tensors ([`super::conv3x3::conv2d`] checks that).
pub fn conv1x1(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => <Dispatch as Conv1x1Backend>::conv1x1_bias(x, weight, bias.into_dispatch()),
        None => <Dispatch as Conv1x1Backend>::conv1x1(x, weight),
    })
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;

    fn values(t: FlexTensor) -> Vec<f32> {
        contiguous_f32(&t).as_slice::<f32>().unwrap().to_vec()
    }

    /// The weight gradient sums over every image, however rayon splits the batch (one thread:
    /// one fold over all images; more: pieces).
    #[test]
    fn the_weight_gradient_sums_every_image_on_any_number_of_threads() {
        let [n, cin, cout, h, w] = [6, 3, 4, 5, 3];
        let x: Vec<f32> = (0..n * cin * h * w).map(|i| (i % 7) as f32 - 3.0).collect();
        let g: Vec<f32> = (0..n * cout * h * w)
            .map(|i| (i % 5) as f32 * 0.5)
            .collect();
        let want = values(Flex::conv2d_weight_backward(
            flex_f32(x.clone(), [n, cin, h, w]),
            FlexTensor::zeros(Shape::from(vec![cout, cin, 1, 1]), DType::F32),
            flex_f32(g.clone(), [n, cout, h, w]),
            options(),
        ));
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| {
                values(Flex::conv1x1_weight_grad(
                    flex_f32(x.clone(), [n, cin, h, w]),
                    flex_f32(g.clone(), [n, cout, h, w]),
                ))
            });
            let err = relative_error(&want, &got, 1e-6);
            assert!(err < 1e-5, "{threads} threads: {err}");
        }
    }
}

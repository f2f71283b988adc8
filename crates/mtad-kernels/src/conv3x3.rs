//! 3x3 "same" convolutions (stride 1, padding 1, no groups) on the CPU backend, forward and
//! backward: with AVX-512, the direct kernels of [`super::padded`] where the channel counts
//! allow; else im2col + matrix products in NCHW layout, or for few channels the direct kernels
//! of [`super::direct`].
//!
//! These are most of the convolutions of the students and teachers and all of the decoder's,
//! and most of a training step's time on the CPU. Burn's CPU backend (flex) computes the input
//! gradient with a transposed convolution and the weight gradient as a convolution whose kernel
//! is the output gradient, both several times slower than its forward pass (`cargo bench --bench
//! burn_gap -- --layers`). Here the input gradient is the forward kernel applied to the output
//! gradient with the flipped, transposed weights (exact for stride 1 and padding 1), and the
//! weight gradient is a sum over the pixels of each image (in [`super::padded`]) or a
//! well-shaped matrix product per image (per few images when they are small):
//! `dW += dY_n [Cout, HW] x im2col(x_n)^T [HW, 9 Cin]`.
//!
//! [`conv2d`] is what the models (and, through `build.rs`, the generated teachers) call: it
//! takes this path, [`super::conv1x1`] for 1x1 convolutions or [`super::strided`] for other
//! square ones (the stride-2 convolutions and the 7x7 stems), for flex tensors (with
//! or without autodiff) and float32, and Burn's own `Conv2d::forward` for every other backend,
//! shape and dtype, so wgpu and CUDA are untouched.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::ops::{ConvOptions, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::s;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::autodiff::{self, ConvGradients};
use super::matmul::{add_bias, matmul, parallel_chunks};
use super::padded::{self, Conv};
use super::reduce::tree_sum;
use super::{channel_rows, contiguous_f32, dims4, direct, flex_f32, is_flex, winograd};
use crate::isa::{Capability, capability};

/// Whether the weight gradient is the padded kernel's sum over the pixels rather than im2col and
/// one matrix product per few images: for images of 14x14 and more with few channels. Measured
/// on the development machine (batch 8): the padded kernel was 15-35% faster for 32 and 64
/// channels at 28x28 and 56x56 and 96 at 28x28, even with 128 at 28x28, and 15-30% slower for
/// 128 and 256 channels at 56x56, 256 and 512 at 28x28, 256 at 14x14. At 14x14 it took 0.51x
/// the time for 128 to 32 channels (densenet121's), 0.65x for 64 to 64, 0.92x for 128 to 64 and
/// 1.16x for 128 to 128; at 7x7, 1.19x for 128 to 32 and 2.4-2.7x for 256 and 512 channels.
/// Winograd's weight gradient ([`winograd::weight_grad_applies`]) is checked first, so this
/// takes the rest: fewer than 32 channels (in the models), or planes narrower than 7 pixels.
fn padded_weight_grad(hw: usize, cin: usize, cout: usize) -> bool {
    hw >= 14 * 14 && cin * cout < 128 * 128 && padded::weight_grad_applies(cout)
}

/// Whether a 3x3 convolution from `cin` to `cout` channels on planes of `hw` pixels takes im2col
/// and one matrix product rather than the padded kernel (forward, and input gradient with the
/// channels swapped).
///
/// With AVX-512: with 512 channels or more on 7x7 and smaller, where the padded kernel's blocks
/// of 32 positions compute 64 for the 49 of a 7x7 plane. Measured on the AVX-512 development
/// machine (2 threads, forward and backward of one convolution, alternated with the padded
/// kernel): 0.95x the time at batch 8 and 0.91x at batch 32 for 512 channels at 7x7 (resnet18's
/// last stage), but 1.0-1.1x for 256.
///
/// With AVX2 (and the portable levels), the padded kernel holds 12 sums in its 16 registers
/// rather than 24 in 32, and gemm's AVX2 products are the better choice for many channels on
/// large planes too: also for more than 16 x 16 channel pairs on planes larger than 14x14.
/// Measured on the AVX2 development machine (`burn_gap --layers`, forward and backward, batch 8,
/// per convolution): the padded kernel took 71 ms against im2col's 48 for densenet121's 128 to
/// 32 channels at 56x56, 18-19 against 14 at 28x28 and 17-19 against 15 for 32 to 32 at 56x56,
/// but 5.2-5.5 against 6.0 for 128 to 32 at 14x14, 1.6-2.2 against 2.9 at 7x7, 6.5 against 9.4
/// for 128 to 64 at 14x14, 20-22 against 41 (the direct kernel) for 16 to 16 at 112x112 and 77
/// against 116-135 for 8 to 8 at 224x224. (Winograd, checked first, now takes 32 channels or
/// more on planes of 28x28 and more below AVX-512: [`winograd::applies`].)
fn gemm_rather_than_padded(cin: usize, cout: usize, hw: usize) -> bool {
    let small_planes = hw <= 7 * 7 && cin >= 512 && cout >= 512;
    if capability() >= Capability::Avx512 {
        return small_planes;
    }
    small_planes || (cin * cout > 16 * 16 && hw > 14 * 14)
}

/// The two kernels, on the backends that have them: flex, and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait Conv3x3Backend: Backend {
    /// `x` [N, Cin, H, W], `weight` [Cout, Cin, 3, 3] -> [N, Cout, H, W], padding 1, no bias.
    fn conv3x3(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`Conv3x3Backend::conv3x3`] plus `bias` [Cout] on every output channel, in the same pass
    /// where the kernel allows.
    fn conv3x3_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The gradient of [`Conv3x3Backend::conv3x3`] with respect to its weight, [Cout, Cin, 3, 3],
    /// from the input `x` and the output gradient `grad` [N, Cout, H, W].
    fn conv3x3_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of [`Conv3x3Backend::conv3x3`] with respect to its input, [N, Cin, H, W],
    /// from the output gradient `grad` and the weight: the same convolution of `grad` with the
    /// weight flipped in space and with its channel axes swapped (exact for stride 1, padding 1).
    fn conv3x3_input_grad(grad: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Burn's options for the same convolution, used where the tensors are not float32.
fn same_options() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
}

/// `cols[(c * 9 + ky * 3 + kx) * stride + oy * W + ox] = x[c, oy + ky - 1, ox + kx - 1]`, zero
/// outside the image: the 3x3 patches of one [C, H, W] image as H W columns of a matrix with 9 C
/// rows `stride` apart (the columns of several images side by side when `stride` > H W).
fn im2col(x: &[f32], channels: usize, h: usize, w: usize, cols: &mut [f32], stride: usize) {
    let hw = h * w;
    for c in 0..channels {
        let plane = &x[c * hw..(c + 1) * hw];
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut cols[(c * 9 + ky * 3 + kx) * stride..][..hw];
                for oy in 0..h {
                    let dst = &mut row[oy * w..(oy + 1) * w];
                    let Some(iy) = (oy + ky).checked_sub(1).filter(|&iy| iy < h) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * w..(iy + 1) * w];
                    match kx {
                        0 => {
                            dst[0] = 0.0;
                            dst[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => dst.copy_from_slice(src),
                        _ => {
                            dst[..w - 1].copy_from_slice(&src[1..]);
                            dst[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// The batch in chunks of consecutive images whose patch matrices are built side by side, so
/// that small images still give the matrix products about [`MIN_COLUMNS`] columns or more.
fn chunks(batch: usize, hw: usize) -> Vec<std::ops::Range<usize>> {
    let count = (batch * hw / MIN_COLUMNS).clamp(1, batch.max(1));
    let per_chunk = batch.div_ceil(count).max(1);
    (0..batch)
        .step_by(per_chunk)
        .map(|start| start..(start + per_chunk).min(batch))
        .collect()
}

const MIN_COLUMNS: usize = 1024;

/// The patch matrix [9 C, images x H W] of `images` of the batch `x` [N, C, H, W].
fn chunk_cols(
    x: &[f32],
    [channels, h, w]: [usize; 3],
    images: &std::ops::Range<usize>,
    cols: &mut Vec<f32>,
) {
    let hw = h * w;
    let stride = images.len() * hw;
    cols.resize(channels * 9 * stride, 0.0);
    if stride == 0 {
        return;
    }
    // Per channel (its 9 rows) on rayon's threads: with few chunks the products are
    // multi-threaded, and the patch matrix was built on one thread in between.
    cols.par_chunks_mut(9 * stride)
        .enumerate()
        .for_each(|(c, rows)| {
            for (i, b) in images.clone().enumerate() {
                let plane = &x[(b * channels + c) * hw..][..hw];
                im2col(plane, 1, h, w, &mut rows[i * hw..], stride);
            }
        });
}

/// `conv3x3(x, weight) + bias` on flex tensors.
fn flex_forward(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
    let f32_bias = bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || !f32_bias {
        return Flex::conv2d(x, weight, bias, same_options());
    }
    let bias = bias.map(|b| contiguous_f32(&b));
    let bias = bias.as_ref().map(|b| b.as_slice::<f32>().unwrap());
    let (x, weight) = (contiguous_f32(&x), contiguous_f32(&weight));
    let [n, cin, h, w] = dims4(&x);
    let cout = dims4(&weight)[0];
    let (hw, k) = (h * w, cin * 9);
    let xs = x.as_slice::<f32>().unwrap();
    let ws = weight.as_slice::<f32>().unwrap();
    if winograd::applies(cin, cout, h, w) {
        let out = winograd::forward(xs, ws, bias, [n, cin, cout, h, w]);
        return flex_f32(out, [n, cout, h, w]);
    }
    if padded::forward_applies(cout) && !gemm_rather_than_padded(cin, cout, hw) {
        let out = padded::forward(xs, ws, bias, Conv::same3x3(h, w), [n, cin, cout]);
        return flex_f32(out, [n, cout, h, w]);
    }
    if direct::applies(cin, cout, n) {
        let mut out = direct::forward(xs, ws, [n, cin, cout, h, w]);
        add_bias(&mut out, bias, hw);
        return flex_f32(out, [n, cout, h, w]);
    }
    let mut out = vec![0.0f32; n * cout * hw];
    if out.is_empty() {
        return flex_f32(out, [n, cout, h, w]);
    }
    let chunks = chunks(n, hw);
    let parallel = parallel_chunks(chunks.len());
    // out [Cout, images x HW] = W [Cout, 9 Cin] x cols [9 Cin, images x HW], written
    // straight into the output for one image, through `tmp` and reordered to
    // [images, Cout, HW] for several.
    let run = |(cols, tmp): &mut (Vec<f32>, Vec<f32>),
               images: &std::ops::Range<usize>,
               out: &mut [f32]| {
        chunk_cols(xs, [cin, h, w], images, cols);
        let columns = images.len() * hw;
        if images.len() == 1 {
            matmul(
                [cout, hw, k],
                out,
                false,
                ws,
                [k, 1],
                cols,
                [hw, 1],
                !parallel,
            );
            return;
        }
        tmp.resize(cout * columns, 0.0);
        matmul(
            [cout, columns, k],
            tmp,
            false,
            ws,
            [k, 1],
            cols,
            [columns, 1],
            !parallel,
        );
        for (i, image) in out.chunks_mut(cout * hw).enumerate() {
            for (co, plane) in image.chunks_mut(hw).enumerate() {
                plane.copy_from_slice(&tmp[co * columns + i * hw..][..hw]);
            }
        }
    };
    let mut jobs: Vec<(&std::ops::Range<usize>, &mut [f32])> = Vec::new();
    let mut rest = out.as_mut_slice();
    for images in &chunks {
        let (head, tail) = rest.split_at_mut(images.len() * cout * hw);
        jobs.push((images, head));
        rest = tail;
    }
    if parallel {
        jobs.into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |buffers, (images, out)| run(buffers, images, out),
        );
    } else {
        let mut buffers = (Vec::new(), Vec::new());
        for (images, out) in jobs {
            run(&mut buffers, images, out);
        }
    }
    add_bias(&mut out, bias, hw);
    flex_f32(out, [n, cout, h, w])
}

impl Conv3x3Backend for Flex {
    fn conv3x3(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        flex_forward(x, weight, None)
    }

    fn conv3x3_bias(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        flex_forward(x, weight, Some(bias))
    }

    fn conv3x3_weight_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let [n, cin, h, w] = dims4(&x);
        let cout = dims4(&grad)[1];
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            let weight = FlexTensor::zeros(Shape::from(vec![cout, cin, 3, 3]), x.dtype());
            return Flex::conv2d_weight_backward(x, weight, grad, same_options());
        }
        let (x, grad) = (contiguous_f32(&x), contiguous_f32(&grad));
        let (hw, k) = (h * w, cin * 9);
        let xs = x.as_slice::<f32>().unwrap();
        let gs = grad.as_slice::<f32>().unwrap();
        if winograd::weight_grad_applies(cin, cout, h, w) {
            let dw = winograd::weight_grad(xs, gs, [n, cin, cout, h, w]);
            return flex_f32(dw, [cout, cin, 3, 3]);
        }
        if padded_weight_grad(h * w, cin, cout) {
            let dw = padded::weight_grad(xs, gs, Conv::same3x3(h, w), [n, cin, cout]);
            return flex_f32(dw, [cout, cin, 3, 3]);
        }
        if direct::applies(cin, cout, n) {
            let dw = direct::weight_grad(xs, gs, [n, cin, cout, h, w]);
            return flex_f32(dw, [cout, cin, 3, 3]);
        }
        let chunks = if hw == 0 { Vec::new() } else { chunks(n, hw) };
        // Products run multi-threaded where the chunks are fewer than the threads.
        let threads = !parallel_chunks(chunks.len());
        // dW [Cout, 9 Cin] += dY [Cout, images x HW] x cols^T [images x HW, 9 Cin], per chunk;
        // the chunks (a function of the shapes) are added in a fixed tree, so that the result
        // has the same bits on any thread count (`reduce`).
        let dw = tree_sum(chunks.len(), cout * k, &|c, dw: &mut [f32]| {
            let images = &chunks[c];
            let mut cols = Vec::new();
            chunk_cols(xs, [cin, h, w], images, &mut cols);
            let columns = images.len() * hw;
            let g = &gs[images.start * cout * hw..images.end * cout * hw];
            let reordered;
            let lhs = if images.len() == 1 {
                g
            } else {
                reordered = channel_rows(g, cout, hw);
                &reordered[..]
            };
            let shape = [cout, k, columns];
            matmul(
                shape,
                dw,
                true,
                lhs,
                [columns, 1],
                &cols,
                [1, columns],
                threads,
            );
        });
        flex_f32(dw, [cout, cin, 3, 3])
    }

    fn conv3x3_input_grad(grad: FlexTensor, weight: FlexTensor) -> FlexTensor {
        if weight.dtype() != DType::F32 {
            let flipped = Flex::float_flip(Flex::float_swap_dims(weight, 0, 1), &[2, 3]);
            return Self::conv3x3(grad, flipped);
        }
        let weight = contiguous_f32(&weight);
        let [cout, cin, _, _] = dims4(&weight);
        let ws = weight.as_slice::<f32>().unwrap();
        let [_, _, h, w] = dims4(&grad);
        // With Winograd's products, the forward convolution of the flipped weights below.
        let winograd = winograd::applies(cout, cin, h, w);
        // The input gradient is the convolution from `cout` channels to `cin`.
        let gemm = gemm_rather_than_padded(cout, cin, h * w);
        if padded::forward_applies(cin) && grad.dtype() == DType::F32 && !winograd && !gemm {
            let grad = contiguous_f32(&grad);
            let n = dims4(&grad)[0];
            let gs = grad.as_slice::<f32>().unwrap();
            let dx = padded::input_grad(gs, ws, Conv::same3x3(h, w), [n, cin, cout]);
            return flex_f32(dx, [n, cin, h, w]);
        }
        // W'[ci, co, 8 - t] = W[co, ci, t] for the 9 taps t of a 3x3 kernel.
        let mut flipped = vec![0.0f32; ws.len()];
        if cout > 0 {
            flipped
                .par_chunks_mut(cout * 9)
                .enumerate()
                .for_each(|(ci, kernels)| {
                    for (co, dst) in kernels.chunks_mut(9).enumerate() {
                        let taps = &ws[(co * cin + ci) * 9..][..9];
                        dst.iter_mut()
                            .zip(taps.iter().rev())
                            .for_each(|(d, t)| *d = *t);
                    }
                });
        }
        Self::conv3x3(grad, flex_f32(flipped, [cin, cout, 3, 3]))
    }
}

/// The gradients of the 3x3 same convolution, for [`autodiff::conv`].
#[derive(Debug)]
struct Same3x3;

impl<B: Conv3x3Backend> ConvGradients<B> for Same3x3 {
    fn weight_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        _: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv3x3_weight_grad(x, grad)
    }

    fn input_grad(
        &self,
        _: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv3x3_input_grad(grad, weight)
    }
}

impl<B: Conv3x3Backend, C: CheckpointStrategy> Conv3x3Backend for Autodiff<B, C> {
    fn conv3x3(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::conv::<B, C, Same3x3>(Same3x3, x, weight, None, |x, w, _| B::conv3x3(x, w))
    }

    fn conv3x3_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        autodiff::conv::<B, C, Same3x3>(Same3x3, x, weight, Some(bias), |x, w, b| {
            B::conv3x3_bias(x, w, b.expect("a bias"))
        })
    }

    /// Not differentiable itself; the result is a constant.
    fn conv3x3_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::conv3x3_weight_grad(
            x.into_primitive(),
            grad.into_primitive(),
        ))
    }

    /// Not differentiable itself; the result is a constant.
    fn conv3x3_input_grad(grad: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::conv3x3_input_grad(
            grad.into_primitive(),
            weight.into_primitive(),
        ))
    }
}

/// [`Conv3x3Backend::conv3x3`] on tensors: `x` [N, Cin, H, W], `weight` [Cout, Cin, 3, 3].
/// Only for flex tensors; [`conv2d`] checks that.
pub fn conv3x3(x: Tensor<4>, weight: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Conv3x3Backend>::conv3x3(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

/// Whether `conv` is a 3x3 convolution with stride 1, padding 1 on every side, no dilation and
/// no groups.
fn is_same_3x3(conv: &Conv2d) -> bool {
    let padded = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => {
            [*top, *left, *bottom, *right] == [1, 1, 1, 1]
        }
        PaddingConfig2d::Same => true,
        PaddingConfig2d::Valid => false,
    };
    conv.kernel_size == [3, 3]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && padded
}

/// The stride of `conv` if it is a 1x1 convolution with the same stride along both axes, no
/// padding and no groups.
fn pointwise_stride(conv: &Conv2d) -> Option<usize> {
    let unpadded = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => {
            [*top, *left, *bottom, *right] == [0, 0, 0, 0]
        }
        PaddingConfig2d::Same | PaddingConfig2d::Valid => true,
    };
    let [sy, sx] = conv.stride;
    (conv.kernel_size == [1, 1] && sy == sx && sy > 0 && conv.groups == 1 && unpadded).then_some(sy)
}

/// `conv.forward(x)`, through our kernels where they apply (flex, and a 3x3 same convolution,
/// [`conv3x3`]; a 1x1 convolution, [`super::conv1x1::conv1x1`], on every `stride`-th pixel for a
/// strided one; another square one with the same padding on every side, [`super::strided`]).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if !is_flex(&x.device()) {
        return conv.forward(x);
    }
    if let Some(stride) = pointwise_stride(conv) {
        let x = if stride == 1 {
            x
        } else {
            x.slice(s![.., .., 0..;stride, 0..;stride])
        };
        return super::conv1x1::conv1x1(x, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
    }
    if !is_same_3x3(conv) {
        return match super::strided::applies(conv) {
            Some(geometry) => super::strided::conv2d(conv, x, geometry),
            None => conv.forward(x),
        };
    }
    match &conv.bias {
        Some(bias) => Tensor::from_dispatch(<Dispatch as Conv3x3Backend>::conv3x3_bias(
            x.into_dispatch(),
            conv.weight.val().into_dispatch(),
            bias.val().into_dispatch(),
        )),
        None => conv3x3(x, conv.weight.val()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Output, input gradient, weight gradient and bias gradient of `conv` on `x` under a random
    /// linear loss, through Burn's convolution or ours.
    fn forward_backward(conv: &Conv2d, x: &Tensor<4>, ours: bool) -> [Vec<f32>; 4] {
        let x = x.clone().require_grad();
        let y = if ours {
            conv2d(conv, x.clone())
        } else {
            conv.forward(x.clone())
        };
        let probe = super::super::uniform(y.dims(), [0.0, 1.0], 11, &y.device());
        let grads = (y.clone() * probe).sum().backward();
        let bias = conv.bias.as_ref().map_or(Vec::new(), |b| {
            b.grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        });
        [
            values(y),
            values(x.grad(&grads).unwrap()),
            values(conv.weight.grad(&grads).unwrap()),
            bias,
        ]
    }

    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        // (batch, in, out, height, width): single pixels and rows, one image, batches that the
        // chunking splits unevenly, and channel counts of the students and the decoder.
        for (n, cin, cout, h, w) in [
            (1, 1, 1, 1, 1),
            (2, 3, 5, 1, 7),
            (3, 2, 4, 6, 1),
            (1, 8, 3, 20, 20),
            (5, 4, 6, 5, 7),
            (8, 16, 8, 12, 12),
            (3, 32, 32, 7, 7),
            (2, 4, 8, 56, 57),
            // Enough input channels for the strided gradients' patch matrices.
            (2, 128, 8, 6, 6),
            // Enough channels and pixels for Winograd's products (all three passes).
            (2, 64, 72, 15, 14),
            // Channels enough for im2col on small planes (forward and input gradient).
            (2, 512, 520, 5, 4),
        ] {
            // 3x3 same and 1x1 convolutions, with and without a bias.
            for (k, stride, padding, bias) in [
                (3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1), true),
                (3, 1, PaddingConfig2d::Same, false),
                (1, 1, PaddingConfig2d::Valid, true),
                (1, 1, PaddingConfig2d::Valid, false),
                (1, 2, PaddingConfig2d::Valid, false),
                (3, 2, PaddingConfig2d::Explicit(1, 1, 1, 1), true),
                (7, 2, PaddingConfig2d::Explicit(3, 3, 3, 3), false),
                (2, 2, PaddingConfig2d::Valid, false),
            ] {
                let pad = match padding {
                    PaddingConfig2d::Explicit(p, ..) => p,
                    PaddingConfig2d::Same => k / 2,
                    PaddingConfig2d::Valid => 0,
                };
                if h.min(w) + 2 * pad < k {
                    continue; // Burn's convolution panics where the kernel does not fit.
                }
                device.seed(n as u64 * 1000 + cin as u64);
                let conv = Conv2dConfig::new([cin, cout], [k, k])
                    .with_stride([stride, stride])
                    .with_padding(padding)
                    .with_bias(bias)
                    .init(&device);
                let x = Tensor::random([n, cin, h, w], Distribution::Default, &device);
                let want = forward_backward(&conv, &x, false);
                let got = forward_backward(&conv, &x, true);
                assert_eq!(got[3].len(), if bias { cout } else { 0 });
                for (what, (a, b)) in ["output", "input grad", "weight grad", "bias grad"]
                    .iter()
                    .zip(want.iter().zip(&got))
                {
                    let err = relative_error(a, b, 1e-6);
                    assert!(
                        err < 1e-5,
                        "{k}x{k} {n}x{cin}->{cout} {h}x{w} {what}: {err}"
                    );
                }
            }
        }
    }

    /// Every path's output and gradients have the same bits on 1, 2, 3 and 5 threads, run
    /// after run: the weight gradients' sums over the batch are added in a fixed order
    /// (`reduce`), and no path is chosen by the thread count.
    #[test]
    fn the_same_bits_on_any_thread_count() {
        let device = Device::flex().autodiff();
        // im2col chunks, Winograd, direct (few channels), 1x1, the strided stem, 3x3 stride 2.
        for (n, cin, cout, h, k, stride) in [
            (16, 24, 24, 16, 3, 1),
            (8, 32, 32, 8, 3, 1),
            (8, 8, 3, 16, 3, 1),
            (16, 32, 64, 8, 1, 1),
            (8, 3, 16, 32, 7, 2),
            (8, 16, 32, 16, 3, 2),
        ] {
            device.seed(7);
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_bias(false)
                .init(&device);
            let x = Tensor::random([n, cin, h, h], Distribution::Default, &device);
            let bits = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| forward_backward(&conv, &x, true))
                    .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            };
            let one = bits(1);
            for threads in [2, 3, 5, 2, 3] {
                assert!(
                    one == bits(threads),
                    "{k}x{k}/{stride} {n}x{cin}->{cout} {h}x{h}: other bits on {threads} threads"
                );
            }
        }
    }

    #[test]
    fn takes_non_contiguous_inputs_and_runs_without_autodiff() {
        let device = Device::flex();
        device.seed(3);
        let conv = Conv2dConfig::new([4, 6], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(&device);
        // [N, C, W, H] swapped into [N, C, H, W]: a strided view.
        let x: Tensor<4> = Tensor::random([2, 4, 9, 5], Distribution::Default, &device);
        let x = x.swap_dims(2, 3);
        let err = relative_error(
            &values(conv.forward(x.clone())),
            &values(conv2d(&conv, x)),
            1e-6,
        );
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn each_kind_of_convolution_takes_its_path() {
        let device = Device::flex();
        let with = |kernel: usize, stride: usize, padding: PaddingConfig2d| {
            Conv2dConfig::new([2, 2], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(padding)
                .init(&device)
        };
        let explicit = PaddingConfig2d::Explicit(1, 1, 1, 1);
        assert!(is_same_3x3(&with(3, 1, explicit.clone())));
        assert!(is_same_3x3(&with(3, 1, PaddingConfig2d::Same)));
        assert!(!is_same_3x3(&with(3, 2, explicit)));
        assert!(!is_same_3x3(&with(3, 1, PaddingConfig2d::Valid)));
        assert!(!is_same_3x3(&with(1, 1, PaddingConfig2d::Valid)));
        assert!(!is_same_3x3(&with(
            3,
            1,
            PaddingConfig2d::Explicit(1, 1, 1, 0)
        )));
        assert_eq!(
            pointwise_stride(&with(1, 1, PaddingConfig2d::Valid)),
            Some(1)
        );
        let unpadded = PaddingConfig2d::Explicit(0, 0, 0, 0);
        assert_eq!(pointwise_stride(&with(1, 1, unpadded.clone())), Some(1));
        assert_eq!(pointwise_stride(&with(1, 2, unpadded)), Some(2));
        let padded = PaddingConfig2d::Explicit(1, 1, 1, 1);
        assert_eq!(pointwise_stride(&with(1, 1, padded)), None);
        assert_eq!(pointwise_stride(&with(3, 1, PaddingConfig2d::Valid)), None);
        // Square kernels with any stride and even padding take the strided kernels.
        use super::super::strided::applies;
        assert_eq!(
            applies(&with(3, 2, PaddingConfig2d::Explicit(1, 1, 1, 1))),
            Some((2, 1))
        );
        assert_eq!(
            applies(&with(7, 2, PaddingConfig2d::Explicit(3, 3, 3, 3))),
            Some((2, 3))
        );
        assert_eq!(applies(&with(2, 2, PaddingConfig2d::Valid)), Some((2, 0)));
        assert_eq!(
            applies(&with(3, 2, PaddingConfig2d::Explicit(1, 0, 1, 0))),
            None
        );
        assert_eq!(applies(&with(3, 2, PaddingConfig2d::Same)), None);
        let dilated = Conv2dConfig::new([2, 2], [3, 3])
            .with_stride([2, 2])
            .with_dilation([2, 2])
            .init(&device);
        assert_eq!(applies(&dilated), None);
        let grouped = Conv2dConfig::new([2, 2], [3, 3])
            .with_stride([2, 2])
            .with_groups(2)
            .init(&device);
        assert_eq!(applies(&grouped), None);
        assert!(is_flex(&device) && is_flex(&device.clone().autodiff()));
        // 512 channels on 7x7 take im2col; fewer channels or larger planes keep the padded kernel
        // with AVX-512; with AVX2, many channels on planes over 14x14 take im2col too.
        let gemm = gemm_rather_than_padded;
        assert!(gemm(512, 512, 7 * 7) && gemm(1024, 512, 4));
        assert!(!gemm(256, 512, 7 * 7) && !gemm(512, 512, 14 * 14) && !gemm(16, 16, 112 * 112));
        assert!(!gemm(128, 32, 14 * 14));
        let avx512 = capability() >= Capability::Avx512;
        assert_eq!(gemm(128, 32, 56 * 56), !avx512);
        assert_eq!(gemm(32, 32, 28 * 28), !avx512);
    }

    #[test]
    fn the_batch_is_chunked_into_contiguous_ranges_covering_it() {
        for (batch, hw) in [
            (1, 1),
            (8, 49),
            (8, 196),
            (8, 3136),
            (5, 300),
            (32, 1),
            (3, 5000),
        ] {
            let chunks = chunks(batch, hw);
            assert_eq!(chunks.first().unwrap().start, 0);
            assert_eq!(chunks.last().unwrap().end, batch);
            assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
            assert!(chunks.iter().all(|c| !c.is_empty()));
            if hw >= MIN_COLUMNS {
                assert_eq!(chunks.len(), batch, "{batch}x{hw}");
            }
        }
    }
}

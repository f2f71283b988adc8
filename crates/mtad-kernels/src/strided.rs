//! Square convolutions with any stride and symmetric zero padding on the CPU backend, forward
//! and backward, through the direct kernels of [`super::padded`]: the 3x3 stride-2 convolutions
//! of the resnets and the 7x7 stride-2 stems of the resnets and densenets. The weight gradient
//! of convolutions with many input channels is instead one matrix product over a patch matrix
//! ([`PATCH_ROWS`]), and so is their input gradient on small outputs ([`PATCH_PLANE`]).
//!
//! Burn's CPU backend (flex) runs these as im2col + matrix products, with the gradients as a
//! transposed convolution and a convolution whose kernel is the output gradient: the stride-2
//! layers of a resnet18 step took 2-2.2x PyTorch's time (`cargo bench --bench burn_gap --
//! --layers`). [`super::conv3x3::conv2d`] routes them here on flex, on every CPU (the
//! kernels' SIMD code is compiled for each instruction set, [`crate::simd`]); shapes the kernels do not take (output channels not a multiple of 8, an input gradient into
//! fewer than 8 channels, other dtypes) fall back to Burn's operations.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::autodiff::{self, ConvGradients};
use super::matmul::matmul;
use super::padded::{self, Conv};
use super::{channel_rows, contiguous_f32, dims4, flex_f32, unwritten, written};
use rayon::prelude::*;

/// The input gradient through the patch matrix: `P = W^T dY` [Cin k k, N Ho Wo] (one matrix
/// product over the batch), then each patch value added back at its input pixel (the adjoint of
/// [`patches_weight_grad`]'s patches).
fn patches_input_grad(
    grad: &[f32],
    weight: &[f32],
    conv: Conv,
    [n, cin, cout]: [usize; 3],
) -> Vec<f32> {
    let Conv { k, s, p, h, w } = conv;
    let [ho, wo] = conv.output();
    let (plane, taps) = (ho * wo, k * k);
    let (rows, columns) = (cin * taps, n * plane);
    let mut dx = vec![0.0f32; n * cin * h * w];
    if rows == 0 || columns == 0 || cout == 0 {
        return dx;
    }
    let dy = channel_rows(grad, cout, plane);
    let mut patches = vec![0.0f32; rows * columns];
    matmul(
        [rows, columns, cout],
        &mut patches,
        false,
        weight,
        [1, rows],
        &dy,
        [columns, 1],
        true,
    );
    dx.par_chunks_mut(h * w).enumerate().for_each(|(i, dx)| {
        let (b, c) = (i / cin, i % cin);
        for t in 0..taps {
            let (ky, kx) = (t / k, t % k);
            let row = &patches[(c * taps + t) * columns + b * plane..][..plane];
            for (oy, line) in row.chunks(wo).enumerate() {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                for (ox, v) in line.iter().enumerate() {
                    if let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&ix| ix < w) {
                        dx[iy * w + ix] += v;
                    }
                }
            }
        }
    });
    dx
}

/// From this many rows of the patch matrix (`Cin k k`) on, the weight gradient is one matrix
/// product ([`patches_weight_grad`]) rather than the padded kernel's sum over the pixels. On the
/// development machine (batch 8, two runs each): 256->512 channels at 14x14 12.5-14.4 ms against
/// 32-36, 128->256 at 28x28 17-30 against 35-55, 64->128 at 56x56 (576 rows) 25-38 against 28-32,
/// and the 7x7 stems (147 rows) 181-212 against 46.
const PATCH_ROWS: usize = 1024;

/// Below this many output pixels (and from [`PATCH_ROWS`] on), the input gradient goes through
/// the patch matrix ([`patches_input_grad`]) rather than the padded kernel once per phase, whose
/// passes are short there. On the development machine (batch 8, two runs each): 256->512 at
/// 14x14 (7x7 out) 16-19 ms against 32; 128->256 at 28x28 (14x14 out) 18-19 against 18-19,
/// 64->128 at 56x56 26-27 against 14-16.
const PATCH_PLANE: usize = 14 * 14;

/// The weight gradient as one matrix product over the batch, `dW [Cout, Cin k k] = dY [Cout, N
/// Ho Wo] x P^T`, with `P` [Cin k k, N Ho Wo] the patches of every output pixel (zero outside
/// the image).
fn patches_weight_grad(
    x: &[f32],
    grad: &[f32],
    conv: Conv,
    [n, cin, cout]: [usize; 3],
) -> Vec<f32> {
    let Conv { k, s, p, h, w } = conv;
    let [ho, wo] = conv.output();
    let (plane, taps) = (ho * wo, k * k);
    let (rows, columns) = (cin * taps, n * plane);
    let mut dw = vec![0.0f32; cout * rows];
    if rows == 0 || columns == 0 || cout == 0 {
        return dw;
    }
    // P, per input channel (its k k rows) on rayon's threads.
    let mut patches = unwritten(rows * columns);
    patches
        .par_chunks_mut(taps * columns)
        .enumerate()
        .for_each(|(c, block)| {
            for (t, row) in block.chunks_mut(columns).enumerate() {
                let (ky, kx) = (t / k, t % k);
                for (b, image) in row.chunks_mut(plane).enumerate() {
                    let x = &x[(b * cin + c) * h * w..][..h * w];
                    for (oy, line) in image.chunks_mut(wo).enumerate() {
                        let iy = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h);
                        for (ox, v) in line.iter_mut().enumerate() {
                            let ix = (ox * s + kx).checked_sub(p).filter(|&ix| ix < w);
                            v.write(match (iy, ix) {
                                (Some(iy), Some(ix)) => x[iy * w + ix],
                                _ => 0.0,
                            });
                        }
                    }
                }
            }
        });
    // SAFETY: every (channel, tap) row has `columns` values, each written above.
    let patches = unsafe { written(patches) };
    let dy = channel_rows(grad, cout, plane);
    matmul(
        [cout, rows, columns],
        &mut dw,
        false,
        &dy,
        [columns, 1],
        &patches,
        [1, columns],
        true,
    );
    dw
}

/// The kernels, on the backends that have them: flex, and autodiff over flex. `stride` and
/// `padding` apply to both axes; the kernel is the weight's, [Cout, Cin, k, k].
#[backend_extension(Autodiff, Flex)]
pub trait StridedConvBackend: Backend {
    /// `x` [N, Cin, H, W] -> [N, Cout, Ho, Wo].
    fn conv_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
    /// [`StridedConvBackend::conv_strided`] plus `bias` [Cout], in the same pass.
    fn conv_strided_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
    /// d loss / d weight from `x`, the output gradient `grad` and the weight (for its shape).
    fn conv_strided_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
    /// d loss / d x from `x` (for its shape), the output gradient `grad` and the weight.
    fn conv_strided_input_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

fn options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
}

/// The convolution of `x` by `weight` (square kernel).
fn geometry(x: &FlexTensor, weight: &FlexTensor, stride: usize, padding: usize) -> Conv {
    let [_, _, h, w] = dims4(x);
    Conv {
        k: dims4(weight)[2],
        s: stride,
        p: padding,
        h,
        w,
    }
}

fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

fn flex_forward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let [n, cin, _, _] = dims4(&x);
    let cout = dims4(&weight)[0];
    let f32_bias = bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if !all_f32(&[&x, &weight]) || !f32_bias || !padded::forward_applies(cout) {
        return Flex::conv2d(x, weight, bias, options(stride, padding));
    }
    let conv = geometry(&x, &weight, stride, padding);
    let (x, weight) = (contiguous_f32(&x), contiguous_f32(&weight));
    let bias = bias.map(|b| contiguous_f32(&b));
    let out = padded::forward(
        x.as_slice::<f32>().unwrap(),
        weight.as_slice::<f32>().unwrap(),
        bias.as_ref().map(|b| b.as_slice::<f32>().unwrap()),
        conv,
        [n, cin, cout],
    );
    let [ho, wo] = conv.output();
    flex_f32(out, [n, cout, ho, wo])
}

impl StridedConvBackend for Flex {
    fn conv_strided(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_forward(x, weight, None, stride, padding)
    }

    fn conv_strided_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_forward(x, weight, Some(bias), stride, padding)
    }

    fn conv_strided_weight_grad(
        x: FlexTensor,
        grad: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let [n, cin, _, _] = dims4(&x);
        let [cout, _, k, _] = dims4(&weight);
        if !all_f32(&[&x, &grad]) || !padded::weight_grad_applies(cout) {
            return Flex::conv2d_weight_backward(x, weight, grad, options(stride, padding));
        }
        let conv = geometry(&x, &weight, stride, padding);
        let (x, grad) = (contiguous_f32(&x), contiguous_f32(&grad));
        let (xs, gs) = (
            x.as_slice::<f32>().unwrap(),
            grad.as_slice::<f32>().unwrap(),
        );
        let dw = if cin * k * k >= PATCH_ROWS {
            patches_weight_grad(xs, gs, conv, [n, cin, cout])
        } else {
            padded::weight_grad(xs, gs, conv, [n, cin, cout])
        };
        flex_f32(dw, [cout, cin, k, k])
    }

    fn conv_strided_input_grad(
        x: FlexTensor,
        grad: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let [n, cin, h, w] = dims4(&x);
        let cout = dims4(&weight)[0];
        if !all_f32(&[&grad, &weight]) || !padded::forward_applies(cin) {
            return Flex::conv2d_x_backward(x, weight, grad, options(stride, padding));
        }
        let conv = geometry(&x, &weight, stride, padding);
        let (grad, weight) = (contiguous_f32(&grad), contiguous_f32(&weight));
        let [ho, wo] = conv.output();
        if cin * conv.k * conv.k >= PATCH_ROWS && ho * wo < PATCH_PLANE {
            let dx = patches_input_grad(
                grad.as_slice::<f32>().unwrap(),
                weight.as_slice::<f32>().unwrap(),
                conv,
                [n, cin, cout],
            );
            return flex_f32(dx, [n, cin, h, w]);
        }
        let dx = padded::input_grad(
            grad.as_slice::<f32>().unwrap(),
            weight.as_slice::<f32>().unwrap(),
            conv,
            [n, cin, cout],
        );
        flex_f32(dx, [n, cin, h, w])
    }
}

/// The stride and padding of a [`StridedConvBackend`] convolution, for [`autodiff::conv`].
#[derive(Clone, Copy, Debug)]
struct Strided {
    stride: usize,
    padding: usize,
}

impl<B: StridedConvBackend> ConvGradients<B> for Strided {
    fn weight_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv_strided_weight_grad(x, grad, weight, self.stride, self.padding)
    }

    fn input_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        B::conv_strided_input_grad(x, grad, weight, self.stride, self.padding)
    }
}

impl<B: StridedConvBackend, C: CheckpointStrategy> StridedConvBackend for Autodiff<B, C> {
    fn conv_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let kind = Strided { stride, padding };
        autodiff::conv::<B, C, Strided>(kind, x, weight, None, |x, w, _| {
            B::conv_strided(x, w, stride, padding)
        })
    }

    fn conv_strided_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let kind = Strided { stride, padding };
        autodiff::conv::<B, C, Strided>(kind, x, weight, Some(bias), |x, w, b| {
            B::conv_strided_bias(x, w, b.expect("a bias"), stride, padding)
        })
    }

    /// Not differentiable itself; the result is a constant.
    fn conv_strided_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::conv_strided_weight_grad(
            x.into_primitive(),
            grad.into_primitive(),
            weight.into_primitive(),
            stride,
            padding,
        ))
    }

    /// Not differentiable itself; the result is a constant.
    fn conv_strided_input_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::conv_strided_input_grad(
            x.into_primitive(),
            grad.into_primitive(),
            weight.into_primitive(),
            stride,
            padding,
        ))
    }
}

/// `(stride, padding)` if `conv` is a square convolution of 2x2 or more with the same stride
/// along both axes, the same padding on every side (less than the kernel), no dilation and no
/// groups.
pub(super) fn applies(conv: &Conv2d) -> Option<(usize, usize)> {
    let padding = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if [left, bottom, right].iter().all(|p| *p == top) =>
        {
            *top
        }
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let [k, kx] = conv.kernel_size;
    let [s, sx] = conv.stride;
    let square = k == kx && k >= 2 && s == sx && s >= 1 && padding < k;
    (square && conv.dilation == [1, 1] && conv.groups == 1).then_some((s, padding))
}

/// `conv.forward(x)` through [`StridedConvBackend`], for a convolution that [`applies`] and
/// flex tensors.
pub(super) fn conv2d(conv: &Conv2d, x: Tensor<4>, (stride, padding): (usize, usize)) -> Tensor<4> {
    let weight = conv.weight.val().into_dispatch();
    let out = match &conv.bias {
        Some(bias) => <Dispatch as StridedConvBackend>::conv_strided_bias(
            x.into_dispatch(),
            weight,
            bias.val().into_dispatch(),
            stride,
            padding,
        ),
        None => <Dispatch as StridedConvBackend>::conv_strided(
            x.into_dispatch(),
            weight,
            stride,
            padding,
        ),
    };
    Tensor::from_dispatch(out)
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 + seed * 31) % 1999) as f32 / 1999.0 - 0.5)
            .collect()
    }

    /// The patch-matrix gradients against Burn's (`conv2d_weight_backward`,
    /// `conv2d_x_backward`): kernels, strides and paddings of the models and odd ones, on single
    /// pixels and odd shapes.
    #[test]
    fn patch_gradients_match_burns() {
        for (k, s, p) in [
            (3, 2, 1),
            (3, 1, 1),
            (7, 2, 3),
            (1, 2, 0),
            (2, 2, 0),
            (3, 3, 2),
        ] {
            for [n, cin, cout, h, w] in [
                [1, 1, 1, 1, 1],
                [2, 3, 5, 9, 7],
                [3, 16, 8, 13, 17],
                [1, 4, 2, 6, 6],
            ] {
                let conv = Conv { k, s, p, h, w };
                let [ho, wo] = conv.output();
                if ho * wo == 0 {
                    continue; // Burn's convolution panics where the kernel does not fit.
                }
                let x = values(n * cin * h * w, 1);
                let grad = values(n * cout * ho * wo, 2);
                let weight = values(cout * cin * k * k, 3);
                let got = patches_weight_grad(&x, &grad, conv, [n, cin, cout]);
                let want = Flex::conv2d_weight_backward(
                    flex_f32(x.clone(), [n, cin, h, w]),
                    FlexTensor::zeros(Shape::from(vec![cout, cin, k, k]), DType::F32),
                    flex_f32(grad.clone(), [n, cout, ho, wo]),
                    options(s, p),
                );
                let want = contiguous_f32(&want).as_slice::<f32>().unwrap().to_vec();
                let err = relative_error(&want, &got, 1e-6);
                assert!(
                    err < 1e-5,
                    "dw {k}x{k}/{s} pad {p}, {n}x{cin}->{cout} {h}x{w}: {err}"
                );
                let got = patches_input_grad(&grad, &weight, conv, [n, cin, cout]);
                let want = Flex::conv2d_x_backward(
                    flex_f32(x, [n, cin, h, w]),
                    flex_f32(weight, [cout, cin, k, k]),
                    flex_f32(grad, [n, cout, ho, wo]),
                    options(s, p),
                );
                let want = contiguous_f32(&want).as_slice::<f32>().unwrap().to_vec();
                let err = relative_error(&want, &got, 1e-6);
                assert!(
                    err < 1e-5,
                    "dx {k}x{k}/{s} pad {p}, {n}x{cin}->{cout} {h}x{w}: {err}"
                );
            }
        }
    }
}

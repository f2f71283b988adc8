//! Inference-mode chains of cheap layers fused into one parallel pass on the CPU backend: batch
//! norm with its running statistics (over the channel concatenation of its inputs) and the
//! activation after it, a residual sum and its ReLU, and ReLU alone, in place where the input's
//! buffer is not shared.
//!
//! Burn's CPU backend runs each of these as separate operations on the calling thread: the
//! inference batch norm is four broadcast passes, the concatenation and the ReLU one pass more
//! each. In a densenet201 forward pass at batch 8 they were a sixth of the CPU time and kept
//! the second core idle for a quarter of the wall time (`perf record`, per thread). PyTorch runs
//! a concatenation, a batch norm and a ReLU as three passes.
//!
//! Every function here takes tensors without autodiff on flex (float32) and leaves everything
//! else (other backends and dtypes, autodiff tensors) to Burn's own operations, with the same
//! results.

use std::mem::MaybeUninit;

use burn::backend::{
    BackendTensor, DType, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind,
};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{dims4, unwritten, written};

/// Values per rayon job of an element-wise pass.
const CHUNK: usize = 1 << 15;

/// The float32 flex tensor under `tensor` where it is one without autodiff, else `tensor` back.
#[allow(clippy::result_large_err)] // the tensor handed back, moved once per call
fn plain_flex<const D: usize>(tensor: Tensor<D>) -> Result<FlexTensor, Tensor<D>> {
    if tensor.is_autodiff() || tensor.dtype() != DType::F32 {
        return Err(tensor);
    }
    let DispatchTensor { kind, autodiff } = tensor.into_dispatch();
    match kind {
        DispatchTensorKind::Flex(BackendTensor::Float(flex)) => Ok(flex),
        kind => Err(Tensor::from_dispatch(DispatchTensor { kind, autodiff })),
    }
}

fn from_flex<const D: usize>(flex: FlexTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(flex)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// The values of `flex` for writing in place: its buffer, where it holds exactly the tensor's
/// values and nothing else holds it.
fn in_place(flex: &mut FlexTensor) -> Option<&mut [f32]> {
    let len = flex.layout().num_elements();
    let whole = flex.layout().contiguous_offsets() == Some((0, len));
    let values = flex.try_storage_mut::<f32>()?;
    (whole && values.len() == len).then_some(values)
}

/// `v` where `v > 0`, `slope v` elsewhere; NaN stays NaN.
#[inline(always)]
fn act(v: f32, slope: f32) -> f32 {
    if v > 0.0 { v } else { v * slope }
}

/// ReLU that keeps NaN (as Burn's and torch's do); -0.0 becomes 0.0.
#[inline(always)]
fn relu_value(v: f32) -> f32 {
    if v <= 0.0 { 0.0 } else { v }
}

/// The element-wise kernels, each over one slice, kept out of line: inlined into the rayon
/// closures that call them, the same loops ran 15-20 times slower (a batch norm of [8, 1600, 7,
/// 7] took 5.3 ms on a worker thread inside the closure, 0.36 ms through this function).
mod lanes {
    use std::mem::MaybeUninit;

    use super::{act, relu_value};

    #[inline(never)]
    pub fn affine_act(out: &mut [MaybeUninit<f32>], x: &[f32], [scale, shift, slope]: [f32; 3]) {
        for (o, v) in out.iter_mut().zip(x) {
            o.write(act(v * scale + shift, slope));
        }
    }

    #[inline(never)]
    pub fn affine_act_in_place(values: &mut [f32], [scale, shift, slope]: [f32; 3]) {
        for v in values {
            *v = act(*v * scale + shift, slope);
        }
    }

    #[inline(never)]
    pub fn relu(out: &mut [MaybeUninit<f32>], x: &[f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            o.write(relu_value(*v));
        }
    }

    #[inline(never)]
    pub fn relu_in_place(values: &mut [f32]) {
        for v in values {
            *v = relu_value(*v);
        }
    }

    #[inline(never)]
    pub fn add_relu(out: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
        for (o, (u, v)) in out.iter_mut().zip(a.iter().zip(b)) {
            o.write(relu_value(u + v));
        }
    }

    #[inline(never)]
    pub fn add_relu_in_place(values: &mut [f32], other: &[f32]) {
        for (v, o) in values.iter_mut().zip(other) {
            *v = relu_value(*v + o);
        }
    }
}

/// A new float32 flex tensor of `layout`'s shape from `fill`, which writes every value of
/// `CHUNK`-long chunks of it (the last one shorter) given the chunk's index.
fn new_flex(
    layout: &burn_flex::Layout,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> FlexTensor {
    let mut out = unwritten(layout.num_elements());
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| fill(i, chunk));
    // SAFETY: `fill` wrote every value of every chunk.
    let values = unsafe { written(out) };
    FlexTensor::new(
        burn::backend::Bytes::from_elems(values),
        burn_flex::Layout::contiguous(layout.shape().clone()),
        DType::F32,
    )
}

/// `relu(x)`, in place where `x` holds its buffer alone.
pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let mut flex = match plain_flex(x) {
        Ok(flex) => flex,
        Err(x) => return activation::relu(x),
    };
    if let Some(values) = in_place(&mut flex) {
        values.par_chunks_mut(CHUNK).for_each(lanes::relu_in_place);
        return from_flex(flex);
    }
    let flex = flex.to_contiguous();
    let x = flex.as_slice::<f32>().expect("contiguous float32");
    from_flex(new_flex(flex.layout(), |i, out| {
        lanes::relu(out, &x[i * CHUNK..][..out.len()]);
    }))
}

/// `relu(conv(x))`, the convolution through [`super::conv3x3::conv2d`].
pub fn conv2d_relu(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    relu(super::conv3x3::conv2d(conv, x))
}

/// `relu(a + b)` for tensors of one shape, in place in whichever of the two holds its buffer
/// alone; Burn's broadcasting sum otherwise.
pub fn add_relu<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if a.dims() != b.dims() {
        return activation::relu(a.add(b));
    }
    let (mut a, mut b) = match (plain_flex(a), plain_flex(b)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let a = a.map_or_else(|a| a, from_flex);
            let b = b.map_or_else(|b| b, from_flex);
            return activation::relu(a.add(b));
        }
    };
    if in_place(&mut a).is_none() {
        std::mem::swap(&mut a, &mut b);
    }
    let b = b.to_contiguous();
    let other = b.as_slice::<f32>().expect("contiguous float32");
    if let Some(values) = in_place(&mut a) {
        values
            .par_chunks_mut(CHUNK)
            .zip(other.par_chunks(CHUNK))
            .for_each(|(values, other)| lanes::add_relu_in_place(values, other));
        return from_flex(a);
    }
    let a = a.to_contiguous();
    let x = a.as_slice::<f32>().expect("contiguous float32");
    from_flex(new_flex(a.layout(), |i, out| {
        let at = i * CHUNK;
        lanes::add_relu(out, &x[at..][..out.len()], &other[at..][..out.len()]);
    }))
}

/// The running statistics and affine parameters of `norm` as a per-channel `(scale, shift)`:
/// `norm(x) = x scale + shift`.
fn scale_shift(norm: &BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let host = |t: Tensor<1>| {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("float32")
    };
    let gamma = host(norm.gamma.val());
    let beta = host(norm.beta.val());
    let mean = host(norm.running_mean.value());
    let variance = host(norm.running_var.value());
    let epsilon = norm.epsilon;
    gamma
        .iter()
        .zip(&variance)
        .map(|(g, v)| (*g as f64 / (*v as f64 + epsilon).sqrt()) as f32)
        .zip(beta.iter().zip(&mean))
        .map(|(scale, (b, m))| (scale, b - m * scale))
        .unzip()
}

/// `act(norm(cat(inputs, 1)))` in inference mode (running statistics) with `act(v) = v` for
/// `v > 0` and `slope v` elsewhere (1: identity, 0: ReLU): one pass from the inputs to the
/// output, in place for a lone input that holds its buffer alone. Burn's concatenation, batch
/// norm and activation where [`plain_flex`] does not hold for every input.
pub fn batch_norm_act(norm: &BatchNorm, inputs: Vec<Tensor<4>>, slope: f64) -> Tensor<4> {
    let burns = |inputs: Vec<Tensor<4>>| {
        let x = norm.forward(Tensor::cat(inputs, 1));
        match slope {
            0.0 => activation::relu(x),
            1.0 => x,
            slope => activation::leaky_relu(x, slope),
        }
    };
    let inputs: Vec<Result<FlexTensor, Tensor<4>>> = inputs.into_iter().map(plain_flex).collect();
    if inputs.is_empty() || inputs.iter().any(Result::is_err) {
        // In their order: a concatenation.
        return burns(
            inputs
                .into_iter()
                .map(|i| i.map_or_else(|t| t, from_flex))
                .collect(),
        );
    }
    let mut flexes: Vec<FlexTensor> = inputs.into_iter().flatten().collect();
    let [n, _, h, w] = dims4(&flexes[0]);
    let channels: usize = flexes.iter().map(|f| dims4(f)[1]).sum();
    let fits = flexes.iter().all(|f| {
        let [ni, _, hi, wi] = dims4(f);
        (ni, hi, wi) == (n, h, w)
    }) && channels == norm.gamma.dims()[0];
    if !fits {
        return burns(flexes.into_iter().map(from_flex).collect());
    }
    let (scale, shift) = scale_shift(norm);
    let slope = slope as f32;
    let plane = h * w;
    if plane == 0 || n == 0 {
        let inputs = flexes.into_iter().map(from_flex).collect();
        return burns(inputs);
    }
    let planes_per_job = super::planes_per_job(plane, CHUNK / 4);
    let coefficients = |c: usize| [scale[c], shift[c], slope];
    if let [flex] = flexes.as_mut_slice()
        && let Some(values) = in_place(flex)
    {
        values
            .par_chunks_mut(plane * planes_per_job)
            .enumerate()
            .for_each(|(job, values)| {
                for (i, values) in values.chunks_mut(plane).enumerate() {
                    let c = (job * planes_per_job + i) % channels;
                    lanes::affine_act_in_place(values, coefficients(c));
                }
            });
        return from_flex(flexes.pop().expect("one input"));
    }
    let flexes: Vec<FlexTensor> = flexes.iter().map(FlexTensor::to_contiguous).collect();
    // Per output channel: its input, and its plane's index within that input's image.
    let mut sources = Vec::with_capacity(channels);
    for (k, flex) in flexes.iter().enumerate() {
        sources.extend((0..dims4(flex)[1]).map(|c| (k, c)));
    }
    let inputs: Vec<(&[f32], usize)> = flexes
        .iter()
        .map(|f| {
            (
                f.as_slice::<f32>().expect("contiguous float32"),
                dims4(f)[1],
            )
        })
        .collect();
    let mut out = unwritten(n * channels * plane);
    out.par_chunks_mut(plane * planes_per_job)
        .enumerate()
        .for_each(|(job, out)| {
            for (i, out) in out.chunks_mut(plane).enumerate() {
                let index = job * planes_per_job + i;
                let (image, c) = (index / channels, index % channels);
                let (k, own) = sources[c];
                let (x, own_channels) = inputs[k];
                let x = &x[(image * own_channels + own) * plane..][..plane];
                lanes::affine_act(out, x, coefficients(c));
            }
        });
    // SAFETY: every plane of every image was written from its input's plane.
    let values = unsafe { written(out) };
    from_flex(super::flex_f32(values, [n, channels, h, w]))
}

#[cfg(test)]
mod tests {
    use super::super::relative_error;
    use super::*;
    use burn::module::{Param, RunningState};
    use burn::nn::BatchNormConfig;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn random<const D: usize>(dims: [usize; D], seed: u32) -> Tensor<D> {
        super::super::uniform(dims, [-1.0, 1.0], seed, &Device::flex())
    }

    /// A batch norm with running statistics and affine parameters away from their defaults.
    fn trained_norm(channels: usize) -> BatchNorm {
        let device = Device::flex();
        let mut norm = BatchNormConfig::new(channels).init(&device);
        let values = |seed, scale: f32, offset: f32| {
            random::<1>([channels], seed)
                .mul_scalar(scale)
                .add_scalar(offset)
        };
        norm.gamma = Param::from_tensor(values(1, 0.5, 1.0));
        norm.beta = Param::from_tensor(values(2, 0.3, 0.0));
        norm.running_mean = RunningState::new(values(3, 0.2, 0.0));
        norm.running_var = RunningState::new(values(4, 0.4, 1.0));
        norm
    }

    #[test]
    fn batch_norm_act_matches_burns_cat_batch_norm_and_activation() {
        // Planes of 7x7 (several per job) and 5x6, one to three inputs, each slope.
        for (dims, splits) in [
            ([2, 12, 7, 7], vec![12]),
            ([3, 9, 5, 6], vec![4, 2, 3]),
            ([1, 5, 1, 1], vec![2, 3]),
        ] {
            let norm = trained_norm(dims[1]);
            let x = random(dims, 5);
            let pieces: Vec<Tensor<4>> = x.clone().split_with_sizes(splits, 1);
            for slope in [0.0, 1.0, 0.2] {
                let want = values(match slope {
                    0.0 => activation::relu(norm.forward(x.clone())),
                    1.0 => norm.forward(x.clone()),
                    s => activation::leaky_relu(norm.forward(x.clone()), s),
                });
                // Copies, so that the lone input is written in place.
                let inputs = pieces.iter().map(|p| p.clone().add_scalar(0.0)).collect();
                let got = values(batch_norm_act(&norm, inputs, slope));
                let error = relative_error(&want, &got, 1.0);
                assert!(error < 1e-5, "{dims:?} slope {slope}: error {error}");
                assert!(
                    want.iter().any(|v| *v < 0.0) == (slope > 0.0),
                    "the test covers the negative side"
                );
            }
        }
    }

    #[test]
    fn shared_inputs_are_left_unchanged() {
        let norm = trained_norm(4);
        let x = random([2, 4, 3, 3], 6);
        let before = values(x.clone());
        let _ = batch_norm_act(&norm, vec![x.clone()], 0.0);
        let _ = relu(x.clone());
        let _ = add_relu(x.clone(), x.clone());
        assert_eq!(values(x), before);
    }

    #[test]
    fn relu_and_add_relu_match_burns_and_keep_nan() {
        let a = random([2, 3, 4, 5], 7);
        let b = random([2, 3, 4, 5], 8);
        let nan = Tensor::<4>::full([1, 1, 1, 2], f32::NAN, &Device::flex());
        for (x, y) in [
            (a.clone(), b.clone()),
            (a.clone().add_scalar(0.0), b.clone()),
        ] {
            let want = values(activation::relu(x.clone() + y.clone()));
            assert_eq!(values(add_relu(x.clone(), y.clone())), want);
            assert_eq!(values(add_relu(y.clone(), x.clone().add_scalar(0.0))), want);
        }
        assert_eq!(
            values(relu(a.clone().add_scalar(0.0))),
            values(activation::relu(a.clone()))
        );
        assert_eq!(values(relu(a.clone())), values(activation::relu(a.clone())));
        assert!(values(relu(nan.clone())).iter().all(|v| v.is_nan()));
        assert!(
            values(add_relu(nan.clone(), nan))
                .iter()
                .all(|v| v.is_nan())
        );
    }

    #[test]
    fn conv2d_relu_matches_the_convolution_then_relu() {
        let device = Device::flex();
        device.seed(9);
        let conv = Conv2dConfig::new([3, 8], [3, 3])
            .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = random([2, 3, 6, 6], 10);
        let want = values(activation::relu(conv.forward(x.clone())));
        let got = values(conv2d_relu(&conv, x));
        assert!(relative_error(&want, &got, 1.0) < 1e-5);
        assert!(got.contains(&0.0) && got.iter().any(|v| *v > 0.0));
    }

    #[test]
    fn inputs_left_to_burn_keep_their_order() {
        // An autodiff input among plain ones: the concatenation is Burn's, in the given order.
        // `valid()`: inference mode for the autodiff input too.
        let norm = trained_norm(5).valid();
        let x = random([2, 5, 3, 3], 11);
        let pieces: Vec<Tensor<4>> = x.clone().split_with_sizes(vec![2, 1, 2], 1);
        let want = values(activation::relu(norm.forward(x)));
        let mut inputs = pieces.clone();
        inputs[1] = Tensor::from_data(pieces[1].to_data(), &Device::flex().autodiff());
        let got = values(batch_norm_act(&norm, inputs, 0.0));
        assert!(relative_error(&want, &got, 1.0) < 1e-5);
    }

    #[test]
    fn autodiff_tensors_go_to_burn() {
        let device = Device::flex().autodiff();
        let norm = BatchNormConfig::new(2).init(&device);
        let x: Tensor<4> =
            Tensor::random([1, 2, 3, 3], Distribution::Default, &device).require_grad();
        let y = batch_norm_act(&norm, vec![x.clone()], 0.0);
        assert!(y.is_autodiff());
        let grads = relu(add_relu(y, x.clone())).sum().backward();
        assert!(x.grad(&grads).is_some());
    }
}

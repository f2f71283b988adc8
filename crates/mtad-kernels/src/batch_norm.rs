//! Training-mode batch norm fused with the activation after it (identity, ReLU or leaky ReLU) on
//! the CPU backend: one pass for the statistics and one for the output forward, two passes
//! backward, per channel, in NCHW.
//!
//! Burn's `batch_norm_train` is a composition of tensor operations (means over swapped axes,
//! broadcasts), and the activation a further pass with its own mask backward: several times the
//! memory traffic of PyTorch's fused kernel (`cargo bench --bench burn_gap -- --layers`).
//!
//! With `x̂ = (x - mean) / sqrt(var + eps)` over the `M = N H W` values of a channel (biased
//! variance, as torch normalises), `y = act(gamma x̂ + beta)` and `act(v) = v` for `v > 0`, else
//! `slope v`:
//!
//! ```text
//! g     = dy * (y > 0 ? 1 : slope)        (y > 0 exactly where gamma x̂ + beta > 0)
//! dbeta = sum g,  dgamma = sum g x̂
//! dx    = gamma / sqrt(var + eps) * (g - dbeta / M - x̂ dgamma / M)
//! ```

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous_f32, dims4, flex_f32, is_flex, planes_per_job, unwritten, written};

/// The fused batch norm, on flex and autodiff over flex (float32).
#[backend_extension(Autodiff, Flex)]
pub trait BatchNormBackend: Backend {
    /// `x` [N, C, H, W], `gamma`, `beta` [C] -> (act(batch norm of x), batch mean [C], biased
    /// batch variance [C]).
    fn batch_norm_act(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients (x, gamma, beta) of [`BatchNormBackend::batch_norm_act`] from its input,
    /// its output, the output's gradient, `gamma` and the batch statistics it returned.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_act_backward(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Values summed in float32 lanes within blocks of this many, the blocks in float64.
const BLOCK: usize = 1024;

/// `(sum f(a_i, b_i, c_i), sum h(a_i, b_i, c_i))` over three equally long slices, in float32
/// lanes the compiler vectorises, with float64 between blocks.
fn sums3(
    [a, b, c]: [&[f32]; 3],
    f: impl Fn(f32, f32, f32) -> f32,
    h: impl Fn(f32, f32, f32) -> f32,
) -> (f64, f64) {
    let (mut total_f, mut total_h) = (0.0f64, 0.0f64);
    for start in (0..a.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(a.len());
        let (a, b, c) = (&a[start..end], &b[start..end], &c[start..end]);
        let (mut lanes_f, mut lanes_h) = ([0.0f32; 16], [0.0f32; 16]);
        let whole = a.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let (a, b, c) = (&a[i..i + 16], &b[i..i + 16], &c[i..i + 16]);
            for j in 0..16 {
                lanes_f[j] += f(a[j], b[j], c[j]);
                lanes_h[j] += h(a[j], b[j], c[j]);
            }
        }
        for i in whole..a.len() {
            lanes_f[0] += f(a[i], b[i], c[i]);
            lanes_h[0] += h(a[i], b[i], c[i]);
        }
        total_f += lanes_f.iter().map(|&v| v as f64).sum::<f64>();
        total_h += lanes_h.iter().map(|&v| v as f64).sum::<f64>();
    }
    (total_f, total_h)
}

/// `v` where `y > 0`, `slope v` elsewhere, without a branch.
#[inline(always)]
fn masked(v: f32, y: f32, slope: f32) -> f32 {
    v * if y > 0.0 { 1.0 } else { slope }
}

fn plane(values: &[f32], [c, l]: [usize; 2], image: usize, channel: usize) -> &[f32] {
    &values[(image * c + channel) * l..][..l]
}

fn flex_vec(tensor: &FlexTensor) -> Vec<f32> {
    contiguous_f32(tensor).as_slice::<f32>().unwrap().to_vec()
}

fn vector(values: Vec<f32>) -> FlexTensor {
    let len = values.len();
    let tensor = flex_f32(values, [len, 1, 1, 1]);
    tensor.reshape(Shape::from(vec![len]))
}

impl BatchNormBackend for Flex {
    fn batch_norm_act(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        slope: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        assert_eq!(x.dtype(), DType::F32, "the fused batch norm takes float32");
        let x = contiguous_f32(&x);
        let [n, c, h, w] = dims4(&x);
        let l = h * w;
        let m = (n * l).max(1) as f64;
        let xs = x.as_slice::<f32>().unwrap();
        let (gamma, beta) = (flex_vec(&gamma), flex_vec(&beta));
        let stats: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                // Sums of (v - pivot) and its square in one pass; the pivot, the mean of the
                // channel's first values, keeps the difference of squares well conditioned.
                let first = if n > 0 { plane(xs, [c, l], 0, ch) } else { &[] };
                let head = &first[..first.len().min(BLOCK)];
                let pivot =
                    (head.iter().map(|&v| v as f64).sum::<f64>() / head.len().max(1) as f64) as f32;
                let (mut sum, mut squares) = (0.0, 0.0);
                for b in 0..n {
                    let p = plane(xs, [c, l], b, ch);
                    let (s, q) = sums3(
                        [p, p, p],
                        |v, _, _| v - pivot,
                        |v, _, _| (v - pivot) * (v - pivot),
                    );
                    sum += s;
                    squares += q;
                }
                let shift = sum / m;
                (pivot as f64 + shift, (squares / m - shift * shift).max(0.0))
            })
            .collect();
        let affine: Vec<(f32, f32)> = stats
            .iter()
            .zip(gamma.iter().zip(&beta))
            .map(|(&(mean, var), (&g, &b))| {
                let scale = g as f64 / (var + epsilon).sqrt();
                (scale as f32, (b as f64 - mean * scale) as f32)
            })
            .collect();
        let slope = slope as f32;
        let mut out = unwritten(xs.len());
        if l > 0 {
            out.par_chunks_mut(l)
                .zip(xs.par_chunks(l))
                .enumerate()
                .with_min_len(planes_per_job(l, 4096))
                .for_each(|(i, (out, x))| {
                    let (scale, shift) = affine[i % c];
                    let x = &x[..out.len()];
                    for i in 0..out.len() {
                        let y = x[i] * scale + shift;
                        out[i].write(masked(y, y, slope));
                    }
                });
        }
        // SAFETY: the planes of `l` values cover `out` (empty when `l` is 0).
        let out = unsafe { written(out) };
        let (means, vars) = stats.iter().map(|&(m, v)| (m as f32, v as f32)).unzip();
        (flex_f32(out, [n, c, h, w]), vector(means), vector(vars))
    }

    fn batch_norm_act_backward(
        x: FlexTensor,
        output: FlexTensor,
        grad: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        slope: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, output, grad) = (
            contiguous_f32(&x),
            contiguous_f32(&output),
            contiguous_f32(&grad),
        );
        let [n, c, h, w] = dims4(&x);
        let l = h * w;
        let m = (n * l).max(1) as f64;
        let (xs, ys, gs) = (
            x.as_slice::<f32>().unwrap(),
            output.as_slice::<f32>().unwrap(),
            grad.as_slice::<f32>().unwrap(),
        );
        let (gamma, mean, variance) = (flex_vec(&gamma), flex_vec(&mean), flex_vec(&variance));
        let slope = slope as f32;
        let inv_std: Vec<f32> = variance
            .iter()
            .map(|&v| (1.0 / (v as f64 + epsilon).sqrt()) as f32)
            .collect();
        // g = dy where the output is positive, slope dy elsewhere.
        // Per channel: (sum g, sum g x̂).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mu, inv) = (mean[ch], inv_std[ch]);
                let mut sum_g = 0.0;
                let mut sum_gx = 0.0;
                for b in 0..n {
                    let (x, y, g) = (
                        plane(xs, [c, l], b, ch),
                        plane(ys, [c, l], b, ch),
                        plane(gs, [c, l], b, ch),
                    );
                    let (g, gx) = sums3(
                        [g, y, x],
                        |g, y, _| masked(g, y, slope),
                        |g, y, x| masked(g, y, slope) * (x - mu),
                    );
                    sum_g += g;
                    sum_gx += gx * inv as f64;
                }
                (sum_g, sum_gx)
            })
            .collect();
        let mut dx = unwritten(xs.len());
        if l > 0 {
            dx.par_chunks_mut(l)
                .enumerate()
                .with_min_len(planes_per_job(l, 4096))
                .for_each(|(i, dx)| {
                    let ch = i % c;
                    let (sum_g, sum_gx) = sums[ch];
                    let (mu, inv) = (mean[ch], inv_std[ch]);
                    let k = gamma[ch] * inv;
                    let mean_g = (sum_g / m) as f32;
                    let mean_gx = (sum_gx / m) as f32;
                    let range = i * l..(i + 1) * l;
                    let (x, y, g) = (&xs[range.clone()], &ys[range.clone()], &gs[range]);
                    let (x, y, g) = (&x[..dx.len()], &y[..dx.len()], &g[..dx.len()]);
                    for i in 0..dx.len() {
                        let xhat = (x[i] - mu) * inv;
                        dx[i].write(k * (masked(g[i], y[i], slope) - mean_g - xhat * mean_gx));
                    }
                });
        }
        // SAFETY: the planes of `l` values cover `dx` (empty when `l` is 0).
        let dx = unsafe { written(dx) };
        let (dbeta, dgamma) = sums.iter().map(|&(g, gx)| (g as f32, gx as f32)).unzip();
        (flex_f32(dx, [n, c, h, w]), vector(dgamma), vector(dbeta))
    }
}

#[derive(Debug)]
struct BatchNormGrad;

impl<B: BatchNormBackend> Backward<B, 3> for BatchNormGrad {
    /// Checkpointed x and gamma; the output, batch mean and variance; epsilon and slope.
    type State = (
        NodeId,
        NodeId,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma_state, output, mean, variance, epsilon, slope) = ops.state;
        let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_state);
        let gamma: FloatTensor<B> = checkpointer.retrieve_node_output(gamma_state);
        let (dx, dgamma, dbeta) =
            B::batch_norm_act_backward(x, output, grad, gamma, mean, variance, epsilon, slope);
        for (node, grad) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn batch_norm_act(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prep = BatchNormGrad
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(mut prep) => {
                let (x_state, gamma_state) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (output, mean, variance) = B::batch_norm_act(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    slope,
                );
                let state = (
                    x_state,
                    gamma_state,
                    output.clone(),
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                    slope,
                );
                (
                    prep.finish(state, output),
                    Self::from_inner(mean),
                    Self::from_inner(variance),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (output, mean, variance) = B::batch_norm_act(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    slope,
                );
                (
                    prep.finish(output),
                    Self::from_inner(mean),
                    Self::from_inner(variance),
                )
            }
        }
    }

    /// Not differentiable itself; the results are constants.
    fn batch_norm_act_backward(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma, dbeta) = B::batch_norm_act_backward(
            x.into_primitive(),
            output.into_primitive(),
            grad.into_primitive(),
            gamma.into_primitive(),
            mean.into_primitive(),
            variance.into_primitive(),
            epsilon,
            slope,
        );
        (
            Self::from_inner(dx),
            Self::from_inner(dgamma),
            Self::from_inner(dbeta),
        )
    }
}

/// The fused batch norm's output with the batch mean and biased variance, where it applies: a
/// flex float32 tensor [N, C, H, W]. `None` elsewhere (other backends and dtypes).
pub fn batch_norm_act(
    x: &Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    slope: f64,
) -> Option<(Tensor<4>, Tensor<1>, Tensor<1>)> {
    if !is_flex(&x.device()) || x.dtype() != DType::F32 {
        return None;
    }
    let (output, mean, variance) = <Dispatch as BatchNormBackend>::batch_norm_act(
        x.clone().into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
        slope,
    );
    Some((
        Tensor::from_dispatch(output),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(variance),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{relative_error, uniform};
    use super::*;

    use burn::tensor::activation::{leaky_relu, relu};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// (output, mean, variance, dx, dgamma, dbeta) under a random linear loss, fused or through
    /// Burn's `batch_norm_train` and activation.
    fn run(x: &Tensor<4>, slope: f64, fused: bool) -> [Vec<f32>; 6] {
        let device = x.device();
        let c = x.dims()[1];
        let gamma = uniform([c], [0.5, 1.5], 1, &device).require_grad();
        let beta = uniform([c], [-1.0, 1.0], 2, &device).require_grad();
        let x = x.clone().require_grad();
        let (y, mean, var) = if fused {
            batch_norm_act(&x, gamma.clone(), beta.clone(), 1e-5, slope).unwrap()
        } else {
            let r = burn::tensor::module::batch_norm_train(
                x.clone(),
                gamma.clone(),
                beta.clone(),
                1e-5,
            );
            let y = match slope {
                1.0 => r.output,
                0.0 => relu(r.output),
                s => leaky_relu(r.output, s),
            };
            (y, r.mean, r.variance)
        };
        let probe = uniform(y.dims(), [-1.0, 1.0], 3, &device);
        let grads = (y.clone() * probe).sum().backward();
        [
            values(y),
            values(mean),
            values(var),
            values(x.grad(&grads).unwrap()),
            values(gamma.grad(&grads).unwrap()),
            values(beta.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn matches_burns_batch_norm_and_activation_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (i, dims) in [
            [2, 1, 1, 1],
            [8, 3, 1, 1],
            [4, 5, 7, 7],
            [2, 16, 33, 17],
            [3, 2, 64, 64],
        ]
        .into_iter()
        .enumerate()
        {
            // Shifted and scaled away from [0, 1), as real activations are.
            let x = uniform(dims, [-1.0, 7.0], 10 + i as u32, &device);
            for slope in [1.0, 0.0, 0.2] {
                let want = run(&x, slope, false);
                let got = run(&x, slope, true);
                let names = ["output", "mean", "variance", "dx", "dgamma", "dbeta"];
                for (name, (a, b)) in names.iter().zip(want.iter().zip(&got)) {
                    let err = relative_error(a, b, 1.0);
                    assert!(err < 2e-5, "{dims:?} slope {slope} {name}: {err}");
                }
            }
        }
    }

    /// Mean and variance against float64 for values 1000 times further from 0 than they spread:
    /// the single pass sums about a pivot, where sums of squares about 0 would cancel.
    #[test]
    fn statistics_hold_far_from_zero() {
        let device = Device::flex();
        let [n, c, h, w] = [4, 3, 9, 9];
        let x = uniform([n, c, h, w], [999.0, 1001.0], 7, &device);
        let xs = values(x.clone());
        let ones = Tensor::<1>::ones([c], &device);
        let (_, mean, var) =
            batch_norm_act(&x, ones.clone(), ones.zeros_like(), 1e-5, 1.0).unwrap();
        let (mean, var) = (values(mean), values(var));
        for ch in 0..c {
            let channel: Vec<f64> = (0..n)
                .flat_map(|b| &xs[(b * c + ch) * h * w..][..h * w])
                .map(|&v| v as f64)
                .collect();
            let m = channel.iter().sum::<f64>() / channel.len() as f64;
            let v = channel.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / channel.len() as f64;
            assert!(
                (mean[ch] as f64 - m).abs() < 1e-4,
                "mean {} vs {m}",
                mean[ch]
            );
            assert!(
                (var[ch] as f64 - v).abs() < 1e-4 * v,
                "variance {} vs {v}",
                var[ch]
            );
        }
        // An empty batch: no pivot to take, an empty output.
        let empty = Tensor::<4>::zeros([0, c, h, w], &device);
        let (y, _, _) = batch_norm_act(&empty, ones.clone(), ones.zeros_like(), 1e-5, 1.0).unwrap();
        assert_eq!(y.dims(), [0, c, h, w]);
    }

    #[test]
    fn leaves_other_devices_to_burn() {
        let x: Tensor<4> = Tensor::zeros([2, 3, 4, 4], &Device::flex());
        let gamma = || Tensor::<1>::ones([3], &Device::flex());
        assert!(batch_norm_act(&x, gamma(), gamma(), 1e-5, 0.0).is_some());
        let half = x.cast(burn::tensor::FloatDType::F16);
        assert!(batch_norm_act(&half, gamma(), gamma(), 1e-5, 0.0).is_none());
    }
}

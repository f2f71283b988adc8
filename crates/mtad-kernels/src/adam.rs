//! Adam as PyTorch's `torch.optim.Adam` runs it with its defaults (METHOD.md: lr 1e-3, betas
//! 0.9/0.999, eps 1e-8, no weight decay, no AMSGrad), one parameter at a time:
//!
//! ```text
//! m = lerp(m, g, 1 - beta1)            v = beta2 v + (1 - beta2) g^2
//! p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Burn's `AdamConfig` differs in its default epsilon (1e-5), and on the CPU backend it runs
//! this as about ten tensor operations per parameter, each a pass over the parameter into a new
//! buffer: 229 ms of a 2.9 s resnet18 step at 224x224, batch 8 (`speed --phases`). On flex with
//! float32 tensors, [`Adam`] makes one pass over the parameter, its gradient and both moments,
//! in place where it owns them; on every other backend it runs the same formula as tensor
//! operations.
//!
//! The state is Burn's [`AdamState`], so optimizer checkpoints keep their format.

use burn::backend::Flex;
use burn::optim::{AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use crate::is_flex;

/// Values per task of the fused pass.
const CHUNK: usize = 1 << 14;

/// Adam with PyTorch's semantics (module docs).
#[derive(Clone, Debug)]
pub struct Adam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
}

impl Default for Adam {
    /// PyTorch's defaults: betas 0.9/0.999, eps 1e-8.
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
        }
    }
}

impl Adam {
    /// The optimizer for a whole module (the learning rate comes with each step).
    pub fn module_optimizer() -> ModuleOptimizer {
        ModuleOptimizer::from(Self::default())
    }
}

/// The scalars of step `time` (from 1), as PyTorch computes them: in double precision, then
/// used as float32.
#[derive(Clone, Copy, Debug)]
struct Factors {
    /// 1 - beta1: the weight of the gradient in the first moment.
    keep_1: f32,
    beta_2: f32,
    /// 1 - beta2.
    keep_2: f32,
    /// lr / (1 - beta1^t).
    step_size: f32,
    /// sqrt(1 - beta2^t).
    correction_2: f32,
    epsilon: f32,
}

impl Factors {
    fn new(adam: &Adam, lr: LearningRate, time: usize) -> Self {
        let t = time as i32;
        let beta_1 = f64::from(adam.beta_1);
        let beta_2 = f64::from(adam.beta_2);
        Self {
            keep_1: (1.0 - beta_1) as f32,
            beta_2: adam.beta_2,
            keep_2: (1.0 - beta_2) as f32,
            step_size: (lr / (1.0 - beta_1.powi(t))) as f32,
            correction_2: (1.0 - beta_2.powi(t)).sqrt() as f32,
            epsilon: adam.epsilon,
        }
    }

    /// One value: (parameter, first moment, second moment) after the step.
    #[inline(always)]
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        // torch.lerp with a weight under 0.5: start + weight (end - start).
        let m = m + self.keep_1 * (g - m);
        let v = v * self.beta_2 + self.keep_2 * (g * g);
        let denominator = v.sqrt() / self.correction_2 + self.epsilon;
        (p - self.step_size * (m / denominator), m, v)
    }
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let fuse = fusable(&tensor, &grad, state.as_ref());
        self.step_on(lr, tensor, grad, state, fuse)
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

impl Adam {
    /// One step, through [`fused`] or through [`tensor_ops`].
    fn step_on<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
        fuse: bool,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        let (time, m, v) = match state {
            Some(state) => {
                let momentum = state.momentum;
                (momentum.time, momentum.moment_1, momentum.moment_2)
            }
            None => (0, grad.zeros_like(), grad.zeros_like()),
        };
        let time = time + 1;
        let factors = Factors::new(self, lr, time);
        let (tensor, m, v) = if fuse {
            fused(factors, tensor, grad, m, v)
        } else {
            tensor_ops(factors, tensor, grad, m, v)
        };
        let momentum = AdaptiveMomentumState::new(time, m, v);
        (tensor, Some(AdamState::new(momentum)))
    }
}

/// Whether the parameter, its gradient and its moments (zeros without a state) are all float32
/// on flex, of one shape.
fn fusable<const D: usize>(
    tensor: &Tensor<D>,
    grad: &Tensor<D>,
    state: Option<&AdamState<D>>,
) -> bool {
    let dims = tensor.dims();
    let fits = |t: &Tensor<D>| is_flex(&t.device()) && t.dtype() == DType::F32 && t.dims() == dims;
    fits(tensor)
        && fits(grad)
        && state.is_none_or(|s| fits(&s.momentum.moment_1) && fits(&s.momentum.moment_2))
}

/// The step as tensor operations, for every backend.
fn tensor_ops<const D: usize>(
    f: Factors,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let m = m.clone() + (grad.clone() - m).mul_scalar(f.keep_1);
    let v = v.mul_scalar(f.beta_2) + grad.square().mul_scalar(f.keep_2);
    let denominator = v
        .clone()
        .sqrt()
        .div_scalar(f.correction_2)
        .add_scalar(f.epsilon);
    let tensor = tensor - (m.clone() / denominator).mul_scalar(f.step_size);
    (tensor, m, v)
}

/// `tensor` as a flex tensor whose storage is exactly its values and which nothing else holds:
/// itself where it is so already (then the step writes in place), else a copy.
fn owned<const D: usize>(tensor: Tensor<D>) -> FlexTensor {
    let flex = tensor
        .inner()
        .try_into_primitive::<Flex>()
        .expect("checked by `fusable`: a float tensor on flex");
    let len = flex.layout().num_elements();
    let whole = flex.layout().contiguous_offsets() == Some((0, len))
        && flex.bytes().len() == len * std::mem::size_of::<f32>();
    if whole && flex.is_unique() {
        return flex;
    }
    let values = flex
        .to_contiguous()
        .as_slice::<f32>()
        .expect("a contiguous float32 tensor")
        .to_vec();
    FlexTensor::new(
        burn::backend::Bytes::from_elems(values),
        Layout::contiguous(flex.layout().shape().clone()),
        DType::F32,
    )
}

/// The values of a tensor from [`owned`], to write.
fn storage(tensor: &mut FlexTensor) -> &mut [f32] {
    tensor
        .try_storage_mut::<f32>()
        .expect("`owned` returns tensors nothing else holds")
}

/// The step in one parallel pass over the four tensors (flex, float32).
fn fused<const D: usize>(
    f: Factors,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let grad = grad
        .inner()
        .try_into_primitive::<Flex>()
        .expect("checked by `fusable`: a float tensor on flex")
        .to_contiguous();
    let (mut p, mut m, mut v) = (owned(tensor), owned(m), owned(v));
    {
        let g = grad.as_slice::<f32>().expect("a contiguous float32 tensor");
        let (ps, ms, vs) = (storage(&mut p), storage(&mut m), storage(&mut v));
        ps.par_chunks_mut(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    (p[i], m[i], v[i]) = f.update(p[i], g[i], m[i], v[i]);
                }
            });
    }
    let back = |t: FlexTensor| Tensor::<D>::from_primitive::<Flex>(t);
    (back(p), back(m), back(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// PyTorch's update of one value, in double precision, for `steps` steps with the gradients
    /// `grads[t]`.
    fn reference(p: f32, grads: &[f32], lr: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (f64::from(p), 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let (t, g) = ((t + 1) as i32, f64::from(g));
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let denominator = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denominator;
        }
        p
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Both paths against the double-precision reference over five steps, with gradients of
    /// mixed scales (small ones show the epsilon: Burn's default 1e-5 moves them visibly), and
    /// with the parameter shared, so that the fused path must copy instead of writing in place.
    #[test]
    fn matches_pytorchs_update() {
        let device = Device::flex();
        device.seed(3);
        let lr = 1e-3;
        let shape = [3, 70_000];
        let p0: Tensor<2> = Tensor::random(shape, Distribution::Default, &device);
        let scale: Tensor<2> =
            Tensor::random(shape, Distribution::Uniform(-9.0, 1.0), &device).exp();
        let grads: Vec<Tensor<2>> = (0..5)
            .map(|_| Tensor::random(shape, Distribution::Default, &device) * scale.clone())
            .collect();
        let host: Vec<Vec<f32>> = grads.iter().map(|g| values(g.clone())).collect();
        let start = values(p0.clone());
        let want: Vec<f64> = (0..start.len())
            .map(|i| {
                let g: Vec<f32> = host.iter().map(|g| g[i]).collect();
                reference(start[i], &g, lr)
            })
            .collect();

        let adam = Adam::default();
        // `step` takes the fused path for these flex float32 tensors.
        assert!(fusable(&p0, &grads[0], None));
        for fused_path in [true, false] {
            let (mut p, mut state) = (p0.clone(), None);
            for g in &grads {
                (p, state) = adam.step_on(lr, p, g.clone(), state, fused_path);
            }
            assert_eq!(state.as_ref().unwrap().momentum.time, 5);
            let got = values(p);
            // The error beyond two float32 steps of the result, relative to the change from the
            // start. (torch.optim.Adam itself, checked once against this reference: 4.8e-6.)
            let worst = got
                .iter()
                .zip(&want)
                .zip(&start)
                .map(|((g, w), s)| {
                    let beyond =
                        (f64::from(*g) - w).abs() - 2.0 * f64::from(f32::EPSILON) * w.abs();
                    beyond.max(0.0) / (w - f64::from(*s)).abs().max(1e-5)
                })
                .fold(0.0f64, f64::max);
            assert!(
                worst < 1e-4,
                "fused {fused_path}: worst relative error {worst}"
            );
        }
        // The start is still intact (the fused path copied the shared parameter).
        assert_eq!(values(p0), start);
    }
}

//! Concatenation along the channels on the CPU backend, forward and backward, on rayon's threads.
//!
//! densenet121's dense layers each concatenate all previous features with their 32 new channels:
//! a copy of the whole block's features per layer, forward, and a split of their gradient,
//! backward. Burn's CPU backend (flex) copies them on the calling thread while rayon's threads
//! wait, and its backward pass hands out strided views of the gradient, which the convolutions'
//! gradients then copy on the calling thread too. A per-thread `perf` profile of the densenet121
//! training step put those copies at about a seventh of the calling thread's samples. Here both
//! directions copy image by image on rayon's threads, and the gradient's parts come out
//! contiguous. [`cat_channels`] routes float32 flex tensors here and leaves the rest to Burn.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous_f32, dims4, flex_f32, is_flex, unwritten, written};

/// The kernels, on flex and autodiff over flex.
#[backend_extension(Autodiff, Flex)]
pub trait CatBackend: Backend {
    /// `a` [N, Ca, H, W] and `b` [N, Cb, H, W] -> [N, Ca + Cb, H, W].
    fn cat_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Channels `start..start + len` of `x` [N, C, H, W], as a contiguous [N, len, H, W].
    fn channel_range(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self>;
}

/// Each image of `out` [N, sum of the parts' channels, plane] from the parts' images in turn,
/// each part given as its values and its values per image.
fn join(parts: &[(&[f32], usize)], images: usize) -> Vec<f32> {
    let per_image: usize = parts.iter().map(|(_, len)| len).sum();
    let mut out = unwritten(images * per_image);
    if per_image > 0 {
        out.par_chunks_mut(per_image)
            .enumerate()
            .for_each(|(image, mut dst)| {
                for &(values, len) in parts {
                    let (head, tail) = dst.split_at_mut(len);
                    head.write_copy_of_slice(&values[image * len..][..len]);
                    dst = tail;
                }
            });
    }
    // SAFETY: each image's chunk is the parts' images, which fill it.
    unsafe { written(out) }
}

impl CatBackend for Flex {
    fn cat_channels(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        assert!(
            a.dtype() == DType::F32 && b.dtype() == DType::F32,
            "cat_channels routes float32 only"
        );
        let (a, b) = (contiguous_f32(&a), contiguous_f32(&b));
        let ([n, ca, h, w], [nb, cb, hb, wb]) = (dims4(&a), dims4(&b));
        assert_eq!([n, h, w], [nb, hb, wb], "cat_channels: mismatched shapes");
        let plane = h * w;
        let parts = [
            (a.as_slice::<f32>().unwrap(), ca * plane),
            (b.as_slice::<f32>().unwrap(), cb * plane),
        ];
        flex_f32(join(&parts, n), [n, ca + cb, h, w])
    }

    fn channel_range(x: FlexTensor, start: usize, len: usize) -> FlexTensor {
        let x = contiguous_f32(&x);
        let [n, c, h, w] = dims4(&x);
        assert!(start + len <= c, "channel_range: channels out of range");
        let plane = h * w;
        let xs = x.as_slice::<f32>().unwrap();
        let mut out = unwritten(n * len * plane);
        if len * plane > 0 {
            out.par_chunks_mut(len * plane)
                .enumerate()
                .for_each(|(image, dst)| {
                    dst.write_copy_of_slice(&xs[(image * c + start) * plane..][..len * plane]);
                });
        }
        // SAFETY: each image's chunk is written in full.
        flex_f32(unsafe { written(out) }, [n, len, h, w])
    }
}

#[derive(Debug)]
struct CatGrad;

impl<B: CatBackend> Backward<B, 2> for CatGrad {
    /// The channels of the two inputs.
    type State = [usize; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [ca, cb] = ops.state;
        let [a, b] = ops.parents;
        if let Some(a) = a {
            grads.register::<B>(a.id, B::channel_range(grad.clone(), 0, ca));
        }
        if let Some(b) = b {
            grads.register::<B>(b.id, B::channel_range(grad, ca, cb));
        }
    }
}

impl<B: CatBackend, C: CheckpointStrategy> CatBackend for Autodiff<B, C> {
    fn cat_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let channels = |t: &FloatTensor<Self>| burn::backend::TensorMetadata::shape(t)[1];
        let state = [channels(&a), channels(&b)];
        let nodes = [a.node(), b.node()];
        let out = B::cat_channels(a.into_primitive(), b.into_primitive());
        match CatGrad.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiable itself (only the backward pass uses it).
    fn channel_range(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        Self::from_inner(B::channel_range(x.into_primitive(), start, len))
    }
}

/// `Tensor::cat(vec![a, b], 1)` of two [N, C, H, W] tensors, through [`CatBackend`] for float32
/// tensors on flex (with or without autodiff); Burn's own concatenation otherwise.
pub fn cat_channels(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    let ours = is_flex(&a.device())
        && a.device() == b.device()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32;
    if !ours {
        return Tensor::cat(vec![a, b], 1);
    }
    Tensor::from_dispatch(<Dispatch as CatBackend>::cat_channels(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::uniform;
    use super::*;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// The output and both inputs' gradients under a random linear loss, ours or Burn's.
    fn run(a: &Tensor<4>, b: &Tensor<4>, ours: bool) -> (Vec<f32>, [Option<Vec<f32>>; 2]) {
        let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
        let y = if ours {
            cat_channels(a.clone(), b.clone())
        } else {
            Tensor::cat(vec![a.clone(), b.clone()], 1)
        };
        let probe = uniform(y.dims(), [-1.0, 1.0], 3, &y.device());
        let grads = (y.clone() * probe).sum().backward();
        let grad = |t: &Tensor<4>| t.grad(&grads).map(values);
        (values(y), [grad(&a), grad(&b)])
    }

    #[test]
    fn matches_burns_concatenation_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (i, ([n, ca, cb], [h, w])) in [
            ([2, 3, 5], [4, 3]),
            ([1, 1, 1], [1, 1]),
            ([3, 64, 32], [7, 7]),
            ([2, 0, 2], [2, 2]),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 * i as u32;
            let a = uniform([n, ca, h, w], [-1.0, 1.0], seed, &device);
            let b = uniform([n, cb, h, w], [-1.0, 1.0], seed + 1, &device);
            let (want, got) = (run(&a, &b, false), run(&a, &b, true));
            assert_eq!(want.0, got.0, "{n}x({ca}+{cb})x{h}x{w}");
            // Burn gives an empty input no gradient; ours gives it an empty one.
            for (want, got) in want.1.iter().zip(&got.1) {
                let got = got.as_ref().filter(|g| !g.is_empty() || want.is_some());
                assert_eq!(want.as_ref(), got, "{n}x({ca}+{cb})x{h}x{w}");
            }
        }
    }

    /// The input gradient flows through a concatenation whose output feeds a later one and
    /// whose first input is also used elsewhere: a dense block's pattern, where the gradients of
    /// both uses of the features add up.
    #[test]
    fn gradients_add_up_through_a_dense_block_pattern() {
        let device = Device::flex().autodiff();
        let x = uniform([2, 4, 3, 3], [-1.0, 1.0], 1, &device);
        let block = |x: &Tensor<4>, ours: bool| {
            let x = x.clone().require_grad();
            let cat = |a, b| {
                if ours {
                    cat_channels(a, b)
                } else {
                    Tensor::cat(vec![a, b], 1)
                }
            };
            let mut features = x.clone();
            for _ in 0..3 {
                let new = (features.clone() * 2.0).slice([0..2, 0..2]).exp();
                features = cat(features, new);
            }
            let probe = uniform(features.dims(), [-1.0, 1.0], 2, &device);
            let grads = (features.clone() * probe).sum().backward();
            (values(features), values(x.grad(&grads).unwrap()))
        };
        let (want, got) = (block(&x, false), block(&x, true));
        assert_eq!(want.0, got.0);
        let err = super::super::relative_error(&want.1, &got.1, 1.0);
        assert!(err < 1e-6, "input gradient: {err}");
    }

    #[test]
    fn runs_without_autodiff_and_on_strided_inputs() {
        let device = Device::flex();
        let a = uniform([2, 3, 4, 5], [-1.0, 1.0], 1, &device);
        let b = uniform([2, 5, 4, 2], [-1.0, 1.0], 2, &device).swap_dims(1, 3);
        let want = values(Tensor::cat(vec![a.clone(), b.clone()], 1));
        assert_eq!(values(cat_channels(a, b)), want);
    }
}

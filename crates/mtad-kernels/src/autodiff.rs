//! The autodiff side shared by our convolution kernels: an operation on `x` and `weight` (and
//! optionally `bias` [C]) whose backward pass asks the kernel for the input and weight
//! gradients and sums the output gradient over batch and space for the bias.

use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::prelude::Shape;

/// The gradients of one kind of convolution (a value: its stride and padding, if any) on the
/// inner backend `B`, from the input `x`, the output gradient `grad` and the weight.
pub(super) trait ConvGradients<B: Backend>: Debug + Send + Sync + 'static {
    /// d loss / d weight.
    fn weight_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B>;
    /// d loss / d x.
    fn input_grad(
        &self,
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B>;
}

#[derive(Debug)]
struct ConvGrad<K>(K);

/// The checkpointed input and weight, and the number of output channels.
type State = (NodeId, NodeId, usize);

/// Registers the gradients of the parents that need them.
fn register<B: Backend, K: ConvGradients<B>>(
    kind: &K,
    [node_x, node_weight, node_bias]: [Option<NodeId>; 3],
    grad: FloatTensor<B>,
    (x_state, weight_state, channels): State,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_state);
    let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight_state);
    if let Some(node) = node_bias {
        let summed = [0, 2, 3]
            .into_iter()
            .fold(grad.clone(), |g, dim| B::float_sum_dim(g, dim));
        grads.register::<B>(node, B::float_reshape(summed, Shape::new([channels])));
    }
    if let Some(node) = node_weight {
        let dw = kind.weight_grad(x.clone(), grad.clone(), weight.clone());
        grads.register::<B>(node, dw);
    }
    if let Some(node) = node_x {
        grads.register::<B>(node, kind.input_grad(x, grad, weight));
    }
}

impl<B: Backend, K: ConvGradients<B>> Backward<B, 2> for ConvGrad<K> {
    type State = State;

    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight] = ops.parents.map(|node| node.map(|node| node.id));
        register::<B, K>(
            &self.0,
            [x, weight, None],
            grad,
            ops.state,
            grads,
            checkpointer,
        );
    }
}

#[derive(Debug)]
struct ConvBiasGrad<K>(K);

impl<B: Backend, K: ConvGradients<B>> Backward<B, 3> for ConvBiasGrad<K> {
    type State = State;

    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let parents = ops.parents.map(|node| node.map(|node| node.id));
        register::<B, K>(&self.0, parents, grad, ops.state, grads, checkpointer);
    }
}

/// `forward(x, weight, bias)` on the inner backend, recorded for the backward pass of `kind`.
pub(super) fn conv<B: Backend, C: CheckpointStrategy, K: ConvGradients<B>>(
    kind: K,
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let channels = weight.shape()[0];
    let Some(bias) = bias else {
        return match ConvGrad(kind)
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), channels);
                prep.finish(
                    state,
                    forward(x.into_primitive(), weight.into_primitive(), None),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(x.into_primitive(), weight.into_primitive(), None))
            }
        };
    };
    match ConvBiasGrad(kind)
        .prepare::<C>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&weight), channels);
            let output = forward(
                x.into_primitive(),
                weight.into_primitive(),
                Some(bias.into_primitive()),
            );
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(
            x.into_primitive(),
            weight.into_primitive(),
            Some(bias.into_primitive()),
        )),
    }
}

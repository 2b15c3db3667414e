//! The fused ops under burn's Autodiff: each is one graph node whose backward calls the inner
//! backend's kernels, instead of the chain of nodes the composed form records.

use super::{attention_probs, attention_scale, oriented, FusedOps};
use crate::model::WeightSlot;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, TensorMetadata};
use burn::tensor::Shape;

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluTanh;

        impl<B: Backend + FusedOps> Backward<B, 1> for GeluTanh {
            /// The input: the backward recomputes σ from it in the same pass.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let x = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::gelu_tanh_backward(x, grad)
                });
            }
        }

        match GeluTanh.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let input = x.into_primitive();
                let output = B::gelu_tanh(input.clone());
                prep.finish(input, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.into_primitive())),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CausalAttention;

        /// Q, K, V and the probabilities P: the backward needs no recompute.
        #[derive(Debug, Clone)]
        struct Saved<B: Backend> {
            q: FloatTensor<B>,
            k: FloatTensor<B>,
            v: FloatTensor<B>,
            p: FloatTensor<B>,
        }

        impl<B: Backend + FusedOps> Backward<B, 3> for CausalAttention {
            type State = Saved<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let Saved { q, k, v, p } = ops.state;
                let grad_out = grads.consume::<B>(&ops.node);
                let [q_node, k_node, v_node] = ops.parents;
                let scale = attention_scale(*q.shape().dims::<4>().last().expect("4-D query"));
                if let Some(node) = v_node {
                    let grad_v = B::float_matmul(B::float_transpose(p.clone()), grad_out.clone());
                    grads.register::<B>(node.id, grad_v);
                }
                if q_node.is_none() && k_node.is_none() {
                    return;
                }
                let grad_p = B::float_matmul(grad_out, B::float_transpose(v));
                let grad_scores = B::causal_softmax_backward(p, grad_p, scale);
                if let Some(node) = k_node {
                    let grad_k = B::float_matmul(B::float_transpose(grad_scores.clone()), q);
                    grads.register::<B>(node.id, grad_k);
                }
                if let Some(node) = q_node {
                    grads.register::<B>(node.id, B::float_matmul(grad_scores, k));
                }
            }
        }

        let prepared = CausalAttention
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match prepared {
            OpsKind::Tracked(prep) => {
                let p = attention_probs::<B>(q.clone(), k.clone());
                let output = B::float_matmul(p.clone(), v.clone());
                prep.finish(Saved { q, k, v, p }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(q, k, v)),
        }
    }

    fn weight_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        sink: FloatTensor<Self>,
        slot: WeightSlot,
        transposed: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct WeightMatmul;

        /// `x` (for W's gradient) and where W will be: never W itself.
        #[derive(Debug, Clone)]
        struct Saved<B: Backend> {
            x: Option<FloatTensor<B>>,
            slot: WeightSlot,
            shape: Shape,
            transposed: bool,
        }

        impl<B: Backend + FusedOps> Backward<B, 2> for WeightMatmul {
            type State = Saved<B>;

            /// burn's matmul backward, call for call (`dx = dy · W_effᵀ`, `dW_eff = xᵀ · dy`,
            /// W_eff = W or Wᵀ), so every bit equals the graph path's.
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let Saved {
                    x,
                    slot,
                    shape,
                    transposed,
                } = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let [x_node, sink_node] = ops.parents;
                if let (Some(node), Some(x)) = (sink_node, x) {
                    let numel = shape.num_elements();
                    let grad_w = oriented::<B>(
                        B::float_matmul(B::float_transpose(x), grad.clone()),
                        transposed,
                    );
                    grads.register::<B>(node.id, B::float_reshape(grad_w, Shape::from([numel])));
                }
                if let Some(node) = x_node {
                    let w =
                        B::float_reshape(B::float_from_data(slot.take(), &grad.device()), shape);
                    let grad_x =
                        B::float_matmul(grad, B::float_transpose(oriented::<B>(w, transposed)));
                    grads.register::<B>(node.id, grad_x);
                }
            }
        }

        let sink_tracked = sink.is_tracked();
        let prepared = WeightMatmul
            .prepare::<C>([x.node(), sink.node()])
            .compute_bound()
            .stateful();
        let x = x.into_primitive();
        let w = w.into_primitive();
        let shape = w.shape();
        let w_eff = oriented::<B>(w, transposed);
        match prepared {
            OpsKind::Tracked(prep) => {
                let output = B::float_matmul(x.clone(), w_eff);
                let saved = Saved {
                    x: sink_tracked.then_some(x),
                    slot,
                    shape,
                    transposed,
                };
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::float_matmul(x, w_eff)),
        }
    }
}

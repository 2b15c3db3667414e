//! Fused kernels for the GPT's two hot spots outside the matmuls (issue 15's profile): GPT-2's
//! tanh GELU and causal self-attention.
//!
//! Written as burn's own ops they cost about a quarter of a CPU step: the GELU is eleven
//! elementwise passes forward and more backward (burn-autodiff recomputes `exp` in its
//! backward), and burn's attention under autodiff is its decomposed fallback — mask built per
//! call, max, subtract, exp, sum, divide, each a pass over the `[b, h, t, t]` scores forward and
//! another one or two backward. Here each is one backend op with a hand-written backward:
//!
//! - `gelu_tanh`: one pass forward; backward one pass from the saved input.
//! - `causal_attention`: `S = Q Kᵀ`, one in-place pass for scale + causal mask + softmax, `O = P V`;
//!   backward from the saved `P` (no recompute): `dV = Pᵀ dO`, `dP = dO Vᵀ`, one in-place pass
//!   for `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = dS K`, `dK = dSᵀ Q`.
//!
//! One more op is not a fusion but a graph node of its own: `weight_matmul`, burn's matmul with
//! a weight the graph does not keep (ZeRO-3's regather, [`crate::model::Param`]).
//!
//! The seam is burn's backend extension: [`FusedOps`] is implemented by the Flex backend with
//! single-pass f32 kernels ([`flex`]), by burn's Autodiff wrapper with the backward passes above
//! ([`autodiff`]), and — with the `cuda` feature — by the cubecl backend through the trait's
//! default bodies, which compose the same arithmetic from burn's ops.

mod autodiff;
mod flex;

use crate::model::WeightSlot;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Scalar, TensorMetadata};
use burn::tensor::Tensor;

/// √(2/π), doubled: GPT-2's GELU is `x σ(2u)` with `u = √(2/π) (x + 0.044715 x³)`, because
/// `0.5 (1 + tanh u) = σ(2u)`.
const GELU_K: f32 = 1.595_769_2;
/// The cubic coefficient of GPT-2's GELU.
const GELU_C: f32 = 0.044715;
/// `2u` is clamped to ±30, where σ is already 1 − 1e-13: unclamped, `e^(−2u)` overflows for
/// `2u < −88` (the composed form would then compute 0 × ∞ = NaN in its backward).
const GELU_CLAMP: f32 = 30.0;

/// Fused operations of the GPT, per backend. Default bodies compose burn ops (what a backend
/// without its own kernels runs); the Flex backend overrides all four kernels.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cuda"))]
pub trait FusedOps: Backend {
    /// GPT-2's GELU, `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`, elementwise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let z = gelu_z::<Self>(x.clone());
        Self::float_mul(x, sigmoid_of::<Self>(z))
    }

    /// The GELU's input gradient: `grad · (σ + x σ (1 − σ) dz/dx)` at `x`.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let s = sigmoid_of::<Self>(gelu_z::<Self>(x.clone()));
        let one_minus_s = Self::float_neg(Self::float_add_scalar(s.clone(), Scalar::from(-1.0)));
        let x2 = Self::float_mul(x.clone(), x.clone());
        let dz = Self::float_add_scalar(
            Self::float_mul_scalar(x2, Scalar::from(3.0 * GELU_C * GELU_K)),
            Scalar::from(GELU_K),
        );
        let slope = Self::float_mul(Self::float_mul(s.clone(), one_minus_s), dz);
        let local = Self::float_add(s, Self::float_mul(x, slope));
        Self::float_mul(grad, local)
    }

    /// Softmax over the last dimension of `scale · scores`, keys after the query masked out:
    /// `scores` is `[.., t, t]` (query row i sees keys 0..=i).
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let scaled = Self::float_mul_scalar(scores, Scalar::from(scale));
        let mask = causal_mask::<Self>(&scaled);
        let masked = Self::float_mask_fill(scaled, mask, Scalar::from(f32::NEG_INFINITY));
        let dims = masked.shape().num_dims();
        let max = Self::float_max_dim(masked.clone(), dims - 1);
        let e = Self::float_exp(Self::float_sub(masked, max));
        let sum = Self::float_sum_dim(e.clone(), dims - 1);
        Self::float_div(e, sum)
    }

    /// The gradient of `causal_softmax` with respect to `scores`, from its output `p` and the
    /// output's gradient `grad`: `scale · p ⊙ (grad − rowsum(p ⊙ grad))` (zero where masked,
    /// since `p` is).
    fn causal_softmax_backward(
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let dims = p.shape().num_dims();
        let dot = Self::float_sum_dim(Self::float_mul(p.clone(), grad.clone()), dims - 1);
        let centred = Self::float_sub(grad, dot);
        Self::float_mul_scalar(Self::float_mul(p, centred), Scalar::from(scale))
    }

    /// Causal self-attention `softmax(Q Kᵀ / √d_head, causal) V` on `[batch, heads, t, d_head]`.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let p = attention_probs::<Self>(q, k);
        Self::float_matmul(p, v)
    }

    /// `x · W` (`x · Wᵀ` when `transposed`) for a weight released after the forward
    /// ([`crate::model::Param::Released`]). Without autodiff it is the matmul; under burn's
    /// Autodiff the graph keeps `x` and `slot` instead of `W`, reads `W` from `slot` in the
    /// backward, and registers W's gradient, flat, under `sink`.
    fn weight_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        sink: FloatTensor<Self>,
        slot: WeightSlot,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let _ = (sink, slot);
        Self::float_matmul(x, oriented::<Self>(w, transposed))
    }
}

/// On the GPU the default bodies run: burn's cubecl ops, autotuned matmuls included. (A fused
/// CUDA kernel of its own is future work; this keeps every model path one seam.)
#[cfg(feature = "cuda")]
impl FusedOps for burn::backend::Cube {}

/// `P = causal_softmax(Q Kᵀ, 1/√d_head)`: the attention probabilities.
fn attention_probs<B: FusedOps>(q: FloatTensor<B>, k: FloatTensor<B>) -> FloatTensor<B> {
    let d_head = *q.shape().dims::<4>().last().expect("4-D query");
    let scores = B::float_matmul(q, B::float_transpose(k));
    B::causal_softmax(scores, attention_scale(d_head))
}

/// `w`, transposed if `transposed`: the weight as `weight_matmul` multiplies by it.
fn oriented<B: Backend>(w: FloatTensor<B>, transposed: bool) -> FloatTensor<B> {
    if transposed {
        B::float_transpose(w)
    } else {
        w
    }
}

/// The attention's score scale, `1/√d_head`.
fn attention_scale(d_head: usize) -> f32 {
    1.0 / (d_head as f32).sqrt()
}

/// `2u = 2√(2/π)(x + 0.044715 x³)`, clamped to ±30.
fn gelu_z<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let x2 = B::float_mul(x.clone(), x.clone());
    let poly = B::float_add_scalar(
        B::float_mul_scalar(x2, Scalar::from(GELU_C * GELU_K)),
        Scalar::from(GELU_K),
    );
    let z = B::float_mul(x, poly);
    B::float_clamp(z, Scalar::from(-GELU_CLAMP), Scalar::from(GELU_CLAMP))
}

/// `σ(z) = 1 / (1 + e^(−z))`.
fn sigmoid_of<B: Backend>(z: FloatTensor<B>) -> FloatTensor<B> {
    B::float_recip(B::float_add_scalar(
        B::float_exp(B::float_neg(z)),
        Scalar::from(1.0),
    ))
}

/// The `[.., t, t]` mask that is true where the key comes after the query.
fn causal_mask<B: Backend>(scores: &FloatTensor<B>) -> burn::backend::tensor::BoolTensor<B> {
    let dims = scores.shape();
    let n = dims.num_dims();
    let (rows, cols) = (dims[n - 2], dims[n - 1]);
    let device = scores.device();
    let future: Vec<bool> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| j > i))
        .collect();
    let mut mask_shape = vec![1; n];
    mask_shape[n - 2] = rows;
    mask_shape[n - 1] = cols;
    let mask = B::bool_from_data(burn::tensor::TensorData::new(future, mask_shape), &device);
    B::bool_expand(mask, dims)
}

/// GPT-2's GELU through the fused op (see [`FusedOps::gelu_tanh`]).
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::gelu_tanh(x.into_dispatch()))
}

/// Causal self-attention through the fused op (see [`FusedOps::causal_attention`]):
/// `q`, `k`, `v` are `[batch, heads, t, d_head]`.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
    ))
}

/// `x · W` for a released weight through the fused op (see [`FusedOps::weight_matmul`]).
pub fn weight_matmul(
    x: Tensor<2>,
    w: Tensor<2>,
    sink: Tensor<1>,
    slot: WeightSlot,
    transposed: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::weight_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
        sink.into_dispatch(),
        slot,
        transposed,
    ))
}

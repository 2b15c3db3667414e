//! The fused ops on burn's Flex (CPU) backend: f32 kernels of one pass each (two for the
//! softmax), with a branch-free `exp` that vectorises (flex's own `exp` calls libm per element;
//! it was 7% of a step), compiled for the CPU's widest vector unit ([`crate::simd`]). Work is
//! spread over the rank's rayon pool in whole rows; every element's result depends only on its
//! row, so neither the split nor the vector width changes a bit.

use super::{FusedOps, GELU_C, GELU_CLAMP, GELU_K};
use crate::simd::{self, widest, Kernel};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{DType, Flex, TensorMetadata};
use burn::tensor::TensorData;
use rayon::prelude::*;

impl FusedOps for Flex {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = contiguous_f32(x);
        let src = x.as_slice::<f32>().expect("contiguous");
        let mut out = vec![0.0f32; src.len()];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(out, x)| widest(GeluForward { out, x }));
        from_vec(out, &x)
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = contiguous_f32(x);
        let mut grad = owned_f32(grad);
        let src = x.as_slice::<f32>().expect("contiguous");
        let data = unique_storage(&mut grad).expect("owned");
        data.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(grad, x)| widest(GeluBackward { grad, x }));
        grad
    }

    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let mut scores = owned_f32(scores);
        let t = square_rows(&scores);
        let rows = rows_per_task(t);
        let data = unique_storage(&mut scores).expect("owned");
        data.par_chunks_mut(rows * t)
            .enumerate()
            .for_each(|(task, data)| {
                widest(SoftmaxRows {
                    data,
                    t,
                    first_row: task * rows,
                    scale,
                })
            });
        scores
    }

    fn causal_softmax_backward(
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let p = contiguous_f32(p);
        let mut grad = owned_f32(grad);
        let t = square_rows(&p);
        let rows = rows_per_task(t);
        let p = p.as_slice::<f32>().expect("contiguous");
        let data = unique_storage(&mut grad).expect("owned");
        data.par_chunks_mut(rows * t)
            .zip(p.par_chunks(rows * t))
            .enumerate()
            .for_each(|(task, (grad, p))| {
                widest(SoftmaxBackwardRows {
                    grad,
                    p,
                    t,
                    first_row: task * rows,
                    scale,
                })
            });
        grad
    }
}

/// Elements per task: enough to amortise a rayon task, small enough to share a 1M-element
/// activation between a few threads.
const CHUNK: usize = 1 << 14;

/// Whole rows of length `t` per task, about [`CHUNK`] elements.
fn rows_per_task(t: usize) -> usize {
    (CHUNK / t).max(1)
}

/// `out = gelu(x)`.
struct GeluForward<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
}

impl Kernel for GeluForward<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (o, &x) in self.out.iter_mut().zip(self.x) {
            *o = x * sigmoid(gelu_z(x));
        }
    }
}

/// `grad ← grad · gelu'(x)`, where `gelu' = σ + x σ (1 − σ) dz/dx`.
struct GeluBackward<'a> {
    grad: &'a mut [f32],
    x: &'a [f32],
}

impl Kernel for GeluBackward<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (g, &x) in self.grad.iter_mut().zip(self.x) {
            let s = sigmoid(gelu_z(x));
            let dz = GELU_K + 3.0 * GELU_C * GELU_K * x * x;
            *g *= s + x * s * (1.0 - s) * dz;
        }
    }
}

/// In place on rows of `[.., t, t]` scores starting at row `first_row`: row `r` is query
/// position `r mod t`, which sees keys `0..=r mod t`.
struct SoftmaxRows<'a> {
    data: &'a mut [f32],
    t: usize,
    first_row: usize,
    scale: f32,
}

impl Kernel for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (r, row) in self.data.chunks_mut(self.t).enumerate() {
            let (seen, masked) = row.split_at_mut((self.first_row + r) % self.t + 1);
            let max = simd::max(seen);
            for s in seen.iter_mut() {
                *s = exp((*s - max) * self.scale);
            }
            // In sequence: regrouping the sum would change the rounding of every probability
            // (and with it the trajectory the equivalence tests were calibrated on).
            let inv = 1.0 / seen.iter().sum::<f32>();
            for s in seen.iter_mut() {
                *s *= inv;
            }
            masked.fill(0.0);
        }
    }
}

/// In place on the rows of `grad` (dP), with the matching rows of `p`:
/// `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, zero on masked keys (where P is).
struct SoftmaxBackwardRows<'a> {
    grad: &'a mut [f32],
    p: &'a [f32],
    t: usize,
    first_row: usize,
    scale: f32,
}

impl Kernel for SoftmaxBackwardRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let rows = self.grad.chunks_mut(self.t).zip(self.p.chunks(self.t));
        for (r, (row, p)) in rows.enumerate() {
            let seen = (self.first_row + r) % self.t + 1;
            let (g, masked) = row.split_at_mut(seen);
            let p = &p[..seen];
            let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
            for (g, &p) in g.iter_mut().zip(p) {
                *g = self.scale * p * (*g - dot);
            }
            masked.fill(0.0);
        }
    }
}

/// `x` as a contiguous f32 tensor (a copy only if it is a strided view).
fn contiguous_f32(x: FlexTensor) -> FlexTensor {
    // kiln computes in f32 (docs/ARCHITECTURE.md); other dtypes never reach the model.
    assert_eq!(x.dtype(), DType::F32, "kiln's fused kernels take f32");
    if x.layout().contiguous_offsets().is_some() {
        x
    } else {
        x.to_contiguous()
    }
}

/// `x` as a contiguous f32 tensor that owns all of its storage, so a kernel may overwrite it.
fn owned_f32(x: FlexTensor) -> FlexTensor {
    let mut x = contiguous_f32(x);
    if unique_storage(&mut x).is_some() {
        x
    } else {
        let data = x.as_slice::<f32>().expect("contiguous").to_vec();
        from_vec(data, &x)
    }
}

/// The elements of `x` to write in place: `None` unless `x` is the only owner of a storage that
/// holds exactly its elements in order.
fn unique_storage(x: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = x.shape().num_elements();
    let whole = x.layout().contiguous_offsets() == Some((0, n)) && x.bytes().len() == 4 * n;
    if whole {
        x.try_storage_mut::<f32>()
    } else {
        None
    }
}

/// A new contiguous tensor of `like`'s shape holding `data`.
fn from_vec(data: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, like.shape()))
}

/// The row length of `[.., t, t]` scores.
fn square_rows(x: &FlexTensor) -> usize {
    let shape = x.shape();
    let n = shape.num_dims();
    assert!(
        n >= 2 && shape[n - 1] == shape[n - 2],
        "causal attention takes square [.., t, t] scores, got {shape:?}"
    );
    shape[n - 1]
}

/// `2u = 2√(2/π)(x + 0.044715 x³)`, clamped to ±30 (the composed form's arithmetic order).
#[inline(always)]
fn gelu_z(x: f32) -> f32 {
    let z = x * (x * x * (GELU_C * GELU_K) + GELU_K);
    z.clamp(-GELU_CLAMP, GELU_CLAMP)
}

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// `e^x` in f32 without a branch or a call, so loops over it vectorise: Cody–Waite reduction
/// `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-6 polynomial for `e^r` (within 2 ulp
/// of the exact value), and `2^n` built in the exponent bits. Inputs are clamped to [−87, 88]:
/// the results stay normal floats (e^−87 ≈ 1.6e−38 stands for anything smaller, which only ever
/// meets a sum of at least 1 here).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 · 2²³ rounds to an integer in the low mantissa bits, branch-free.
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let n_int = shifted.to_bits() as i32 - SHIFT.to_bits() as i32;
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

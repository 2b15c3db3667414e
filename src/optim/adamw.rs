//! AdamW with PyTorch's semantics (torch.optim.AdamW, foreach=False): decoupled weight decay
//! `p *= 1 − lr·wd`, then `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`,
//! `p −= (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + eps)`.
//!
//! One fused pass over (p, g, m, v), rayon over chunks. There is deliberately no `mul_add`: the
//! vector body and the scalar tail must do the same arithmetic per element, because shard
//! boundaries move elements between the two and ZeRO stages must stay bitwise equal to DDP.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The optimizer's hyper-parameters (`train.beta1`, `beta2`, `eps`, `weight_decay`): AdamW's,
/// and Lion's, which has no ε.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// The per-step scalars of the update (AdamW's, 8-bit AdamW's and Lion's), computed once in f64
/// and rounded to f32.
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    /// The learning rate (Lion's step).
    pub(super) lr: f32,
    pub(super) beta1: f32,
    pub(super) one_minus_beta1: f32,
    pub(super) beta2: f32,
    pub(super) one_minus_beta2: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    pub(super) decay_factor: f32,
    /// Multiplies every gradient before use (the clipping factor).
    pub(super) grad_scale: f32,
}

impl StepScalars {
    /// Scalars for optimizer step `t` (1-based) at learning rate `lr`; `grad_scale` multiplies the
    /// gradients (the clip factor, 1.0 when not clipping).
    pub fn new(cfg: &AdamWConfig, t: u64, lr: f64, grad_scale: f32) -> Self {
        let bc1 = 1.0 - cfg.beta1.powi(t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(t as i32);
        StepScalars {
            lr: lr as f32,
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            step_size: (lr / bc1) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
            decay_factor: (1.0 - lr * cfg.weight_decay) as f32,
            grad_scale,
        }
    }
}

const CHUNK: usize = 1 << 15;

/// Updates `p`, `m`, `v` in place from `g`. All four slices have the same length. `decay` says
/// whether weight decay applies to this range.
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
    decay: bool,
) {
    assert!(
        p.len() == g.len() && p.len() == m.len() && p.len() == v.len(),
        "adamw_step: slice lengths differ"
    );
    if p.len() <= CHUNK {
        dispatch(p, g, m, v, s, decay);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| dispatch(p, g, m, v, s, decay));
}

/// The kernel at the CPU's widest vector width ([`crate::simd::widest`]: bitwise the same on
/// every path).
fn dispatch(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars, decay: bool) {
    crate::simd::widest(Chunk {
        p,
        g,
        m,
        v,
        s,
        decay,
    })
}

/// One chunk's update, as a [`crate::simd::Kernel`].
struct Chunk<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    s: &'a StepScalars,
    decay: bool,
}

impl crate::simd::Kernel for Chunk<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        kernel(self.p, self.g, self.m, self.v, self.s, self.decay)
    }
}

#[inline(always)]
fn kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars, decay: bool) {
    let decay_factor = if decay { s.decay_factor } else { 1.0 };
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * s.grad_scale;
        let m_new = s.beta1 * *m + s.one_minus_beta1 * g;
        let v_new = s.beta2 * *v + s.one_minus_beta2 * (g * g);
        *m = m_new;
        *v = v_new;
        let denom = v_new.sqrt() / s.bias_correction2_sqrt + s.eps;
        *p = *p * decay_factor - s.step_size * (m_new / denom);
    }
}

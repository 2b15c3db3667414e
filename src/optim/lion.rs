//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as lion-pytorch and
//! bitsandbytes write it: decoupled weight decay `p *= 1 − lr·wd`, then
//! `p −= lr · sign(β1·m + (1−β1)·g)` and `m = β2·m + (1−β2)·g`. One state (m) instead of AdamW's
//! two, and every update has the same size per element, so Lion wants a learning rate 3–10×
//! smaller than AdamW's and a weight decay as much larger (the paper's advice).
//!
//! Like AdamW's kernel, one loop whose body the compiler vectorises; no `mul_add`, so every
//! element gets the same arithmetic wherever a shard boundary puts it.

use super::StepScalars;
use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

/// Updates `p` and `m` in place from `g`; `decay` says whether weight decay applies.
pub fn lion_step(p: &mut [f32], g: &[f32], m: &mut [f32], s: &StepScalars, decay: bool) {
    assert!(
        p.len() == g.len() && p.len() == m.len(),
        "lion_step: slice lengths differ"
    );
    if p.len() <= CHUNK {
        crate::simd::widest(Chunk { p, g, m, s, decay });
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .for_each(|((p, g), m)| crate::simd::widest(Chunk { p, g, m, s, decay }));
}

struct Chunk<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    s: &'a StepScalars,
    decay: bool,
}

impl crate::simd::Kernel for Chunk<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let s = self.s;
        let decay_factor = if self.decay { s.decay_factor } else { 1.0 };
        for ((p, &g), m) in self.p.iter_mut().zip(self.g).zip(self.m.iter_mut()) {
            let g = g * s.grad_scale;
            let c = s.beta1 * *m + s.one_minus_beta1 * g;
            *p = *p * decay_factor - s.lr * sign(c);
            *m = s.beta2 * *m + s.one_minus_beta2 * g;
        }
    }
}

/// PyTorch's `sign`: ±1, and 0 for ±0 (`f32::signum` gives ±1 there); NaN stays NaN.
#[inline(always)]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x
    }
}

//! The optimizer pieces that every strategy shares: the flat update kernels (AdamW, 8-bit AdamW,
//! Lion) behind [`OptimizerKind`], the learning-rate schedule, and the global gradient norm.

mod adamw;
mod kind;
mod lion;
mod loss_scale;
pub mod quant8;
mod schedule;

pub use adamw::{adamw_step, AdamWConfig, StepScalars};
pub use kind::OptimizerKind;
pub use lion::lion_step;
pub use loss_scale::LossScaler;
pub use schedule::{DsSchedule, LrSchedule, ScheduleKind, WarmupShape};

/// Sum of squares of a slice in f64, in index order (so the result depends only on the values).
pub fn sum_squares(g: &[f32]) -> f64 {
    // Four independent accumulators let the compiler pipeline the loop; the grouping is fixed,
    // so the result is still a pure function of the slice.
    let mut acc = [0.0f64; 4];
    let chunks = g.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += c[i] as f64 * c[i] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &x in tail {
        s += x as f64 * x as f64;
    }
    s
}

/// PyTorch's `clip_grad_norm_` factor: `min(1, max_norm / (norm + 1e-6))`; 1 when clipping is off.
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

//! Linear warmup then cosine decay to `min_lr_ratio × lr` at the last step (nanoGPT's schedule).

/// The learning-rate schedule.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub steps: u64,
}

impl LrSchedule {
    /// Learning rate of optimizer step `t` (0-based).
    pub fn at(&self, t: u64) -> f64 {
        if t < self.warmup {
            return self.lr * (t + 1) as f64 / self.warmup as f64;
        }
        let min = self.lr * self.min_lr_ratio;
        let span = self.steps.saturating_sub(self.warmup).max(1);
        let progress = ((t - self.warmup) as f64 / span as f64).min(1.0);
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

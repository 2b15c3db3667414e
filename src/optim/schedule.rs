//! Learning-rate schedules: kiln's own (nanoGPT's linear warmup then cosine decay), a constant
//! rate after a linear warmup, and DeepSpeed's three (`WarmupLR`, `WarmupDecayLR`,
//! `WarmupCosineLR`) with their exact formulas, so a `ds_config.json` gives the curve it gives
//! under DeepSpeed.

/// How the warmup of DeepSpeed's schedules rises (its `warmup_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupShape {
    /// `log`: ln(i + 1) ÷ ln(warmup) — DeepSpeed's default.
    Log,
    /// `linear`: i ÷ warmup.
    Linear,
}

impl WarmupShape {
    /// Parses `log` / `linear`.
    pub fn parse(s: &str) -> Option<WarmupShape> {
        match s {
            "log" => Some(WarmupShape::Log),
            "linear" => Some(WarmupShape::Linear),
            _ => None,
        }
    }
}

/// The shape of the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    /// Linear warmup ((t + 1) ÷ warmup), then cosine decay to `lr × min_lr_ratio` at `decay_steps`.
    Cosine {
        /// Final learning rate as a fraction of `lr`.
        min_lr_ratio: f64,
    },
    /// Linear warmup as for `Cosine`, then `lr` for good (DeepSpeed without a scheduler).
    Constant,
    /// One of DeepSpeed's schedules: a rise to `lr` over the warmup, then `schedule`.
    DeepSpeed {
        /// How the warmup rises.
        shape: WarmupShape,
        /// Which one, with its own parameters.
        schedule: DsSchedule,
    },
}

/// DeepSpeed's schedules, with their parameters under DeepSpeed's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DsSchedule {
    /// `WarmupLR`: from `warmup_min_lr` to `lr`, then `lr` for good.
    WarmupLr {
        /// Learning rate at the start of warmup.
        warmup_min_lr: f64,
    },
    /// `WarmupDecayLR`: as `WarmupLR`, then linear decay back to `warmup_min_lr` at
    /// `decay_steps`.
    WarmupDecayLr {
        /// Learning rate at the start of warmup and the end of the decay.
        warmup_min_lr: f64,
    },
    /// `WarmupCosineLR`: the ratio to `lr` rises from `warmup_min_ratio` to 1, then falls along a
    /// cosine to `cos_min_ratio` at `decay_steps`.
    WarmupCosineLr {
        /// Ratio at the start of warmup.
        warmup_min_ratio: f64,
        /// Ratio at the end of the decay.
        cos_min_ratio: f64,
    },
}

/// The learning-rate schedule.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// The step at which the decay ends (kiln: `train.decay_steps`, default `train.steps`;
    /// DeepSpeed: `total_num_steps`).
    pub decay_steps: u64,
    /// The shape.
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// Learning rate of optimizer step `t` (0-based).
    pub fn at(&self, t: u64) -> f64 {
        match self.kind {
            ScheduleKind::Cosine { min_lr_ratio } => {
                if t < self.warmup {
                    return self.lr * (t + 1) as f64 / self.warmup as f64;
                }
                let min = self.lr * min_lr_ratio;
                let span = self.decay_steps.saturating_sub(self.warmup).max(1);
                let progress = ((t - self.warmup) as f64 / span as f64).min(1.0);
                min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Constant => {
                if t < self.warmup {
                    return self.lr * (t + 1) as f64 / self.warmup as f64;
                }
                self.lr
            }
            ScheduleKind::DeepSpeed { shape, schedule } => self.deepspeed_at(t, shape, schedule),
        }
    }

    /// DeepSpeed steps its scheduler after each optimizer step, starting from iteration −1, so
    /// optimizer step t runs at the rate of iteration t − 1 (step 0 at the warmup's start).
    /// DeepSpeed also takes at least 2 warmup steps (ln 1 = 0 would divide by zero).
    fn deepspeed_at(&self, t: u64, shape: WarmupShape, schedule: DsSchedule) -> f64 {
        let warmup = self.warmup.max(2);
        let rise = |i: u64| match shape {
            // DeepSpeed multiplies by the reciprocal; so does kiln, to round as it does.
            WarmupShape::Log => (1.0 / (warmup as f64).ln()) * ((i + 1) as f64).ln(),
            WarmupShape::Linear => i as f64 / warmup as f64,
        };
        // Before its first step WarmupCosineLR answers 0 and the others their minimum.
        let i = t.checked_sub(1);
        match schedule {
            DsSchedule::WarmupLr { warmup_min_lr: min }
            | DsSchedule::WarmupDecayLr { warmup_min_lr: min } => {
                let Some(i) = i else { return min };
                let gamma = if i < warmup {
                    rise(i)
                } else if let DsSchedule::WarmupDecayLr { .. } = schedule {
                    let left = self.decay_steps as f64 - i as f64;
                    let span = (self.decay_steps as f64 - warmup as f64).max(1.0);
                    (left / span).max(0.0)
                } else {
                    1.0
                };
                min + (self.lr - min) * gamma
            }
            DsSchedule::WarmupCosineLr {
                warmup_min_ratio,
                cos_min_ratio,
            } => {
                let Some(i) = i else { return 0.0 };
                let ratio = if i < warmup {
                    warmup_min_ratio + rise(i) * (1.0 - warmup_min_ratio)
                } else {
                    let done = (i - warmup + 1) as f64;
                    let span = self.decay_steps.saturating_sub(warmup).max(1) as f64;
                    let progress = (done / span).min(1.0);
                    let cos = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
                    (cos_min_ratio + (1.0 - cos_min_ratio) * cos).max(0.0)
                };
                self.lr * ratio
            }
        }
    }
}

//! fp16's loss scale, with DeepSpeed's `DynamicLossScaler` semantics (`fp16.loss_scale = 0`):
//! start at `2^initial_scale_power`; on an overflow, spend one unit of hysteresis, or — when
//! none is left — halve the scale (not below `min_loss_scale`); after `loss_scale_window` steps
//! since the last overflow, double it. A static scale (`loss_scale > 0`) never changes. Every
//! rank sees the same overflow (the global gradient norm is agreed) and so keeps the same
//! scale; checkpoints carry it, so a resumed run scales as the uninterrupted one.

use crate::config::Fp16Config;
use crate::error::{KilnError, Result};
use serde::{Deserialize, Serialize};

/// The loss scale and its history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    /// The factor the loss is multiplied by before the backward.
    pub scale: f64,
    dynamic: bool,
    window: u64,
    hysteresis: u32,
    consecutive_hysteresis: bool,
    min_scale: f64,
    /// Overflows still tolerated before the scale halves.
    cur_hysteresis: u32,
    /// Steps seen (skipped ones included).
    cur_iter: u64,
    /// The step of the last overflow, -1 before any.
    last_overflow_iter: i64,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

impl LossScaler {
    /// The scaler `[fp16]` describes; one line naming the key for a value it cannot use.
    pub fn new(c: &Fp16Config) -> Result<LossScaler> {
        let bad = |key: &str, msg: String| KilnError::config(format!("key `fp16.{key}`: {msg}"));
        if !(c.loss_scale.is_finite() && c.loss_scale >= 0.0) {
            return Err(bad(
                "loss_scale",
                format!("{} must be ≥ 0 (0 scales dynamically)", c.loss_scale),
            ));
        }
        if c.initial_scale_power > 64 {
            return Err(bad(
                "initial_scale_power",
                format!("{} must be at most 64", c.initial_scale_power),
            ));
        }
        if c.loss_scale_window == 0 {
            return Err(bad("loss_scale_window", "must be at least 1".into()));
        }
        if c.hysteresis == 0 {
            return Err(bad("hysteresis", "must be at least 1".into()));
        }
        let initial = 2f64.powi(c.initial_scale_power as i32);
        if !(c.min_loss_scale > 0.0 && c.min_loss_scale <= initial) {
            return Err(bad(
                "min_loss_scale",
                format!(
                    "{} must be positive and at most the initial scale 2^{} = {initial}",
                    c.min_loss_scale, c.initial_scale_power
                ),
            ));
        }
        let dynamic = c.loss_scale == 0.0;
        Ok(LossScaler {
            scale: if dynamic { initial } else { c.loss_scale },
            dynamic,
            window: c.loss_scale_window,
            hysteresis: c.hysteresis,
            consecutive_hysteresis: c.consecutive_hysteresis,
            min_scale: c.min_loss_scale,
            cur_hysteresis: c.hysteresis,
            cur_iter: 0,
            last_overflow_iter: -1,
            skipped: 0,
        })
    }

    /// Records a step's outcome: `overflow` skipped it.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.skipped += 1;
        }
        if self.dynamic {
            if overflow {
                if self.hysteresis == 1 || self.cur_hysteresis == 1 {
                    self.scale = (self.scale / 2.0).max(self.min_scale);
                } else {
                    self.cur_hysteresis -= 1;
                }
                self.last_overflow_iter = self.cur_iter as i64;
            } else {
                if self.consecutive_hysteresis {
                    self.cur_hysteresis = self.hysteresis;
                }
                let since = self.cur_iter as i64 - self.last_overflow_iter;
                if since % self.window as i64 == 0 {
                    if !self.consecutive_hysteresis {
                        self.cur_hysteresis = self.hysteresis;
                    }
                    self.scale *= 2.0;
                }
            }
        }
        self.cur_iter += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(window: u64, hysteresis: u32) -> LossScaler {
        LossScaler::new(&Fp16Config {
            initial_scale_power: 4,
            loss_scale_window: window,
            hysteresis,
            ..Fp16Config::default()
        })
        .unwrap()
    }

    /// The scales DeepSpeed's DynamicLossScaler gives for the same overflow pattern
    /// (deepspeed/runtime/fp16/loss_scaler.py, traced by hand).
    #[test]
    fn follows_deepspeeds_dynamic_loss_scaler() {
        let mut s = scaler(3, 2);
        let mut scales = Vec::new();
        for overflow in [false, true, true, false, false, false, true, false] {
            s.update(overflow);
            scales.push(s.scale);
        }
        // iter 0: (0 - -1) % 3 ≠ 0; 1: overflow, hysteresis 2 → 1; 2: overflow → 8;
        // 3..5: since the overflow at 2, (5 - 2) % 3 = 0 → 16 and hysteresis refilled;
        // 6: overflow, hysteresis 2 → 1 (scale kept); 7: no change.
        assert_eq!(scales, [16.0, 16.0, 8.0, 8.0, 8.0, 16.0, 16.0, 16.0]);
        assert_eq!(s.skipped, 3);
    }

    #[test]
    fn the_scale_stops_at_its_minimum_and_a_static_scale_never_moves() {
        let mut s = scaler(1000, 1);
        for _ in 0..10 {
            s.update(true);
        }
        assert_eq!(s.scale, 1.0);
        let mut fixed = LossScaler::new(&Fp16Config {
            loss_scale: 128.0,
            ..Fp16Config::default()
        })
        .unwrap();
        fixed.update(true);
        fixed.update(false);
        assert_eq!((fixed.scale, fixed.skipped), (128.0, 1));
    }

    #[test]
    fn unusable_settings_name_the_key() {
        let bad = |c: Fp16Config| LossScaler::new(&c).unwrap_err().to_string();
        assert!(bad(Fp16Config {
            loss_scale: -1.0,
            ..Default::default()
        })
        .contains("fp16.loss_scale"));
        assert!(bad(Fp16Config {
            hysteresis: 0,
            ..Default::default()
        })
        .contains("fp16.hysteresis"));
        assert!(bad(Fp16Config {
            min_loss_scale: 1e9,
            ..Default::default()
        })
        .contains("fp16.min_loss_scale"));
    }
}

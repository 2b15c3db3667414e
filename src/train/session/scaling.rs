//! The train loop's side of fp16 loss scaling (`train.precision = "fp16"`): the scale each
//! step runs with (infinite on a rank `KILN_FAULT=overflow` names), the steps that count for the
//! schedule and AdamW (skipped ones do not), and the scale's update after each step.

use super::super::fault::Fault;
use crate::error::{KilnError, Result};
use crate::optim::LossScaler;
use crate::plan::Plan;

/// The loss scale, when the run has one.
pub(super) struct Scaling(Option<LossScaler>);

impl Scaling {
    /// fp16's scale: as the resumed checkpoint left it, else fresh from `[fp16]`.
    pub fn start(plan: &Plan, resumed: Option<LossScaler>, fault: Option<Fault>) -> Result<Self> {
        let scaler = match plan.config.train.precision.as_str() {
            "fp16" => Some(match resumed {
                Some(s) => s,
                None => LossScaler::new(&plan.config.fp16)?,
            }),
            _ => None,
        };
        if fault.is_some_and(|f| f.needs_loss_scaling()) && scaler.is_none() {
            return Err(KilnError::config(
                "KILN_FAULT=overflow: only a run with train.precision = \"fp16\" (loss scaling) can overflow",
            ));
        }
        Ok(Scaling(scaler))
    }

    /// The scaler, for checkpoints and metrics.
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.0.as_ref()
    }

    /// The scale the gradients of this step are divided by.
    pub fn grad_scale(&self) -> Option<f64> {
        self.0.as_ref().map(|s| s.scale)
    }

    /// The scale `rank` multiplies its loss by at `step`: infinite where `fault` overflows it.
    pub fn loss_scale(&self, fault: Option<Fault>, rank: usize, step: u64) -> Option<f32> {
        let injected = fault.is_some_and(|f| f.overflows(rank, step));
        self.grad_scale()
            .map(|s| if injected { f32::INFINITY } else { s as f32 })
    }

    /// Step `step` as the schedule and AdamW count it: steps skipped for overflow advance
    /// neither (DeepSpeed's engine does not step its LR scheduler on overflow either).
    pub fn applied(&self, step: u64) -> u64 {
        step - self.0.as_ref().map_or(0, |s| s.skipped)
    }

    /// Records step `step` (`skipped` on every rank alike); the warning line for an overflow,
    /// from the lead rank.
    pub fn update(&mut self, step: u64, skipped: bool, lead: bool, say: impl FnOnce(String)) {
        let Some(scaler) = self.0.as_mut() else {
            return;
        };
        let before = scaler.scale;
        scaler.update(skipped);
        if skipped && lead {
            say(format!(
                "step {}: the gradients overflowed at loss scale {before}; every rank skipped the step; loss scale now {}",
                step + 1,
                scaler.scale
            ));
        }
    }
}

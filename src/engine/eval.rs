//! Forward-only passes (validation, issue 12): the same hooks and parameter tensors as a
//! training micro-step's forward, without a graph or gradients.

use super::{Engine, ParamMode};
use crate::error::Result;
use crate::model::{Activation, Metrics};
use crate::strategy::Strategy;

impl<B: 'static, A: Activation> Engine<B, A> {
    /// The mean token loss of `batch` with the strategy's current parameters, forward only.
    ///
    /// Each unit runs between `before_forward` and `after_forward`, so ZeRO-3 gathers it (and
    /// the units it borrows tied weights from) and releases it after, as in training. The
    /// parameters are untracked tensors on the autodiff device, as recompute builds them: the
    /// loss is bitwise the one `micro_step` reports for the same batch and parameters, without
    /// keeping a graph.
    pub fn eval_loss(&mut self, strategy: &mut dyn Strategy, batch: &B) -> Result<f32> {
        let last = self.model.num_units() - 1;
        let x = self.eval_units(strategy, batch, last)?;
        let y = self.eval_unit_with(strategy, last, |e, params| {
            e.model.forward_unit(last, params, x, batch)
        })?;
        self.loss_value(y)
    }

    /// The model's evaluation metrics for `batch` (`UnitModel::eval_unit` on the last unit),
    /// forward only, each unit between the strategy's hooks as in [`Engine::eval_loss`].
    pub fn eval_metrics(&mut self, strategy: &mut dyn Strategy, batch: &B) -> Result<Metrics> {
        let last = self.model.num_units() - 1;
        let x = self.eval_units(strategy, batch, last)?;
        self.eval_unit_with(strategy, last, |e, params| {
            e.model.eval_unit(last, params, x, batch)
        })
    }

    /// Units `0..end` forward only; the output of the last of them.
    fn eval_units(&self, strategy: &mut dyn Strategy, batch: &B, end: usize) -> Result<Option<A>> {
        let mut x: Option<A> = None;
        for unit in 0..end {
            x = Some(self.eval_unit_with(strategy, unit, |e, params| {
                e.model.forward_unit(unit, params, x.take(), batch)
            })?);
        }
        Ok(x)
    }

    /// `run` on `unit`'s untracked parameters, between the strategy's hooks.
    fn eval_unit_with<T>(
        &self,
        strategy: &mut dyn Strategy,
        unit: usize,
        run: impl FnOnce(&Self, &[crate::model::Param]) -> Result<T>,
    ) -> Result<T> {
        strategy.before_forward(unit)?;
        let params = self.params(unit, strategy, ParamMode::Untracked);
        let out = run(self, &params)?;
        strategy.after_forward(unit)?;
        Ok(out)
    }
}

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
        let y = self.eval_output(strategy, batch)?;
        self.loss_value(y)
    }

    /// The last unit's output for `batch`, forward only, each unit between the strategy's hooks
    /// as in [`Engine::eval_loss`].
    pub fn eval_output(&mut self, strategy: &mut dyn Strategy, batch: &B) -> Result<A> {
        let mut x: Option<A> = None;
        for unit in 0..self.model.num_units() {
            strategy.before_forward(unit)?;
            let params = self.params(unit, strategy, ParamMode::Untracked);
            x = Some(self.model.forward_unit(unit, &params, x.take(), batch)?);
            strategy.after_forward(unit)?;
        }
        Ok(x.expect("a model has at least one unit"))
    }

    /// The model's evaluation metrics for `batch` (`UnitModel::eval_unit` on the last unit),
    /// forward only, each unit between the strategy's hooks as in [`Engine::eval_loss`].
    pub fn eval_metrics(&mut self, strategy: &mut dyn Strategy, batch: &B) -> Result<Metrics> {
        let last = self.model.num_units() - 1;
        let mut x: Option<A> = None;
        for unit in 0..last {
            strategy.before_forward(unit)?;
            let params = self.params(unit, strategy, ParamMode::Untracked);
            x = Some(self.model.forward_unit(unit, &params, x.take(), batch)?);
            strategy.after_forward(unit)?;
        }
        strategy.before_forward(last)?;
        let params = self.params(last, strategy, ParamMode::Untracked);
        let metrics = self.model.eval_unit(last, &params, x, batch)?;
        strategy.after_forward(last)?;
        Ok(metrics)
    }
}

//! Forward-only passes (validation, issue 12): the same hooks and parameter tensors as a
//! training micro-step's forward, without a graph or gradients.

use super::{Engine, ParamMode};
use crate::error::Result;
use crate::model::MicroBatch;
use crate::strategy::Strategy;
use burn::tensor::Tensor;

impl Engine {
    /// The mean token loss of `batch` with the strategy's current parameters, forward only.
    ///
    /// Each unit runs between `before_forward` and `after_forward`, so ZeRO-3 gathers it (and
    /// the units it borrows tied weights from) and releases it after, as in training. The
    /// parameters are untracked tensors on the autodiff device, as recompute builds them: the
    /// loss is bitwise the one `micro_step` reports for the same batch and parameters, without
    /// keeping a graph.
    pub fn eval_loss(&mut self, strategy: &mut dyn Strategy, batch: &MicroBatch) -> Result<f32> {
        let mut x: Option<Tensor<3>> = None;
        for unit in 0..self.model.num_units() {
            strategy.before_forward(unit)?;
            let params = self.params(unit, strategy, ParamMode::Untracked);
            x = Some(self.model.forward_unit(unit, &params, x.take(), batch));
            strategy.after_forward(unit)?;
        }
        let loss = x.expect("a model has at least one unit").into_data();
        Ok(loss.as_slice::<f32>().expect("f32 loss")[0])
    }
}

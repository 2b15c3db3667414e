//! The global gradient norm, computed the same way in every stage so that clipping factors agree
//! to the last bit: rank r sums the squares of its shard of every unit (f64, unit order), the
//! partial sums are gathered and added in rank order.

use crate::comm::Communicator;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::optim::sum_squares;

/// `sqrt(Σ_r Σ_u ‖g[u][shard r]‖²)`. `shard_grads(u)` is this rank's shard of unit u's gradient.
pub fn global_grad_norm<'a>(
    comm: &dyn Communicator,
    layout: &ModelLayout,
    shard_grads: impl Fn(usize) -> &'a [f32],
) -> Result<f64> {
    let partial: f64 = (0..layout.units.len())
        .map(|u| sum_squares(shard_grads(u)))
        .sum();
    comm.set_serves("the global gradient norm");
    let all = comm.all_gather_bytes(&partial.to_le_bytes())?;
    let mut total = 0.0f64;
    for bytes in all {
        let arr: [u8; 8] = bytes
            .try_into()
            .map_err(|_| KilnError::Comm("grad norm: malformed partial sum".into()))?;
        total += f64::from_le_bytes(arr);
    }
    Ok(total.sqrt())
}

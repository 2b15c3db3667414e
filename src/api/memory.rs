//! Memory for a user's model: kiln has no activation formula for it, but its model states
//! (parameters, gradients, optimizer state, buffers, frozen parameters) follow from the layout
//! exactly as the strategies allocate them (`memory::rank_model_states`). Rank 0 logs them, and
//! a run whose model states alone exceed what the process may use is refused before anything
//! is allocated — the lower bound of the GPT's preflight (DeepSpeed's
//! `estimate_zero3_model_states_mem_needs` in spirit).

use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::memory::estimate::{bytes, states_breakdown};
use crate::memory::{process_limit, MemoryLimit};
use crate::plan::Plan;
use crate::strategy::MemoryReport;

/// This rank's model states for `plan` and `layout`, with `frozen_bytes` of frozen parameters.
pub(crate) fn model_states(plan: &Plan, layout: &ModelLayout, frozen_bytes: usize) -> MemoryReport {
    MemoryReport {
        frozen_params: frozen_bytes,
        ..crate::memory::rank_model_states(plan, layout)
    }
}

/// Logs `states` (rank 0) and checks them against the process's limit: `ranks_here` ranks on
/// this machine share it (threads of this process, or processes of one launch).
pub(crate) fn check(
    plan: &Plan,
    states: &MemoryReport,
    ranks_here: usize,
    lead: bool,
) -> Result<()> {
    if lead {
        tracing::info!(
            "memory: model states {} per rank ({}); activations are not estimated for a user's model",
            bytes(states.total()),
            states_breakdown(states).join(", ")
        );
    }
    if !plan.config.train.preflight {
        return Ok(());
    }
    match process_limit() {
        Some(limit) => check_against(states, ranks_here, &limit),
        None => Ok(()),
    }
}

/// [`check`] against a given limit.
fn check_against(states: &MemoryReport, ranks_here: usize, limit: &MemoryLimit) -> Result<()> {
    let need = states.total().saturating_mul(ranks_here.max(1));
    if need as u64 <= limit.bytes {
        return Ok(());
    }
    Err(KilnError::config(format!(
        "preflight: the model states alone need {} per rank ({}) × {ranks_here} rank(s) on this \
         machine = {}, but it may use {} ({}); raise parallel.stage, set offload.optimizer = \
         \"cpu\" or \"nvme\", or spread the ranks over more machines — or set \
         train.preflight = false to run anyway",
        bytes(states.total()),
        states_breakdown(states).join(", "),
        bytes(need),
        bytes(limit.bytes as usize),
        limit.source
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_states_over_the_limit_are_one_line_naming_the_settings() {
        let states = MemoryReport {
            param_shards: 4 << 20,
            grads: 4 << 20,
            optimizer: 8 << 20,
            frozen_params: 2 << 20,
            ..MemoryReport::default()
        };
        let limit = |mib: u64| MemoryLimit {
            bytes: mib << 20,
            source: "test".into(),
        };
        assert!(check_against(&states, 2, &limit(36)).is_ok());
        let err = check_against(&states, 2, &limit(35))
            .unwrap_err()
            .to_string();
        assert!(err.contains("18.0 MiB per rank"), "{err}");
        assert!(err.contains("frozen params 2.0 MiB"), "{err}");
        assert!(
            err.contains("× 2 rank(s) on this machine = 36.0 MiB"),
            "{err}"
        );
        assert!(
            err.contains("offload.optimizer") && !err.contains('\n'),
            "{err}"
        );
    }
}

//! Model-state bytes of one rank (ZeRO paper §3: parameters, gradients, optimizer states), by
//! kind. The strategies' [`MemoryReport`]s are built from these functions at run time, and
//! [`rank_model_states`] builds the same report from a [`Plan`] before anything is allocated, so
//! the estimate and the report cannot disagree (tests/preflight.rs holds them equal, byte for
//! byte, for every stage and tier).

pub use crate::strategy::accounting::*;

use crate::flat::ModelLayout;
use crate::model::Gpt;
use crate::offload::StateLayout;
use crate::plan::Plan;
use crate::strategy::MemoryReport;

/// The model-state report a rank of `plan` gives once its first step has run, computed without
/// allocating: `layout` is the model's layout at `plan.world`.
pub fn rank_model_states(plan: &Plan, layout: &ModelLayout) -> MemoryReport {
    let world = layout.world;
    let buckets = expected_bucket_plan(layout, plan.bucket_bytes);
    let pooled = pooled_buckets(stage_reduction(plan.stage), plan.grad_accum);
    let shard_lens: Vec<usize> = layout.units.iter().map(|u| u.padded_len / world).collect();
    // DDP updates every shard on every rank; the ZeRO stages their own (rank 0's here: every
    // rank's shards have the same length).
    let shards = if plan.stage == 0 { 0..world } else { 0..1 };
    let state = StateLayout::new(layout, shards);
    let (optimizer, optimizer_offloaded) = optimizer_bytes(
        plan.offload,
        &plan.config.offload,
        state.len,
        plan.optimizer.format(),
    );
    let grads = grad_bytes(&buckets, pooled, &shard_lens);
    let comm_buffers = if pooled {
        pool_buffer_bytes(&buckets)
    } else {
        0
    };
    if plan.stage < 3 {
        return MemoryReport {
            params_full: unit_param_bytes(layout, |_| true),
            grads,
            optimizer,
            optimizer_offloaded,
            comm_buffers,
            ..Default::default()
        };
    }
    let persistent = persistent_units(layout, plan.config.parallel.persist_threshold);
    let (param_shards, params_offloaded) = param_shard_bytes(layout, plan.param_offload);
    let regathers = zero3_regather_units(plan, &persistent);
    let buffers =
        zero3_peak_gather_buffers_with(&persistent, &regathers, plan.config.parallel.prefetch);
    MemoryReport {
        params_full: unit_param_bytes(layout, |u| persistent[u]),
        param_shards,
        params_offloaded,
        grads,
        optimizer,
        optimizer_offloaded,
        comm_buffers,
        gathered: buffers * largest_unit_bytes(layout),
        frozen_params: 0,
    }
}

/// The layout of `plan`'s model at its world size (tables only; no parameter is allocated).
pub fn plan_layout(plan: &Plan) -> ModelLayout {
    ModelLayout::new(&Gpt::new(*plan.gpt()), plan.world)
}

//! The `Strategy` seam (docs/ARCHITECTURE.md): what happens before a unit runs, after its
//! gradients are ready, and at the optimizer step. One object per stage, chosen once; the train loop calls the
//! same hooks for every stage and never matches on the stage number.

pub mod accounting;
mod buckets;
mod grads;
mod norm;
mod replicated;
mod sharded;
mod zero3;

pub use buckets::{Bucket, BucketPlan, BucketSlot, Packer};
pub use grads::{GradBuckets, Reduction, POOL_BUFFERS};
pub use norm::global_grad_norm;
pub use replicated::{Replicated, ReplicatedStage};
pub use zero3::Zero3;

use crate::comm::Communicator;
use crate::error::Result;
use crate::flat::ModelLayout;
use crate::offload::{StateLayout, StateStore};
use crate::plan::Plan;
use serde::Serialize;
use std::sync::Arc;

/// Position of a micro-step inside its optimizer step (gradient accumulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroStep {
    /// 0-based index.
    pub index: usize,
    /// Micro-steps per optimizer step.
    pub count: usize,
}

impl MicroStep {
    /// The first micro-step overwrites gradient buffers instead of adding to them.
    pub fn is_first(&self) -> bool {
        self.index == 0
    }
    /// The last micro-step communicates (earlier ones accumulate locally, PyTorch's `no_sync`).
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Time the step waited for gradient communication still in flight, ms (exposed comm).
    pub comm_wait_ms: f64,
    /// Time of the AdamW update, ms, optimizer-state transfers included (offload tiers).
    pub optimizer_ms: f64,
    /// The gradients overflowed under fp16 loss scaling: every rank left the parameters and
    /// the optimizer state as they were.
    pub skipped: bool,
}

/// Bytes this rank holds, by kind (ZeRO paper §3 accounting).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// Full (unsharded) parameters kept permanently.
    pub params_full: usize,
    /// Parameter shards in memory (with `offload.param = "nvme"`: the one unit's shard the
    /// optimizer step and checkpoints hold at a time).
    pub param_shards: usize,
    /// Parameter shards in files (`offload.param = "nvme"`): not in memory, not part of `total`.
    pub params_offloaded: usize,
    /// Gradients (full or sharded).
    pub grads: usize,
    /// Optimizer states (AdamW's m and v, or another optimizer's) in memory.
    pub optimizer: usize,
    /// Optimizer states in files (nvme tier): not in memory, not part of `total`.
    pub optimizer_offloaded: usize,
    /// Communication buffers other than gradient buckets.
    pub comm_buffers: usize,
    /// Units gathered temporarily (stage 3), at their peak.
    pub gathered: usize,
    /// Frozen parameters (no gradient, no optimizer state): whole, or this rank's shards at
    /// stage 3. Held by the model, not the strategy; the train loop fills it in.
    pub frozen_params: usize,
}

impl MemoryReport {
    /// Model-state bytes: everything above.
    pub fn total(&self) -> usize {
        self.params_full
            + self.param_shards
            + self.grads
            + self.optimizer
            + self.comm_buffers
            + self.gathered
            + self.frozen_params
    }
}

/// A data-parallel strategy (DDP or a ZeRO stage).
pub trait Strategy {
    /// Whether `unit`'s graph must keep no copy of its parameters because the strategy frees
    /// them after the forward and gathers them again for the backward (ZeRO-3 with
    /// `parallel.reshard_after_forward`): the engine then releases the unit's matmul weights,
    /// or recomputes the unit. (A unit that `train.recompute` names keeps no graph anyway, so a
    /// strategy that regathers it for that reason answers `false`.)
    fn releases_after_forward(&self, unit: usize) -> bool {
        let _ = unit;
        false
    }
    /// Called before unit `unit` runs forward (stage 3 gathers it here).
    fn before_forward(&mut self, unit: usize) -> Result<()>;
    /// The unit's full parameters (padded); valid between `before_*` and the matching release.
    fn unit_params(&self, unit: usize) -> &[f32];
    /// Called after unit `unit` ran forward.
    fn after_forward(&mut self, unit: usize) -> Result<()>;
    /// Called before unit `unit` runs backward.
    fn before_backward(&mut self, unit: usize) -> Result<()>;
    /// The unit's gradients of one micro-batch (padded; mean over the micro-batch's tokens).
    fn on_grads_ready(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()>;
    /// Finishes communication, averages over the global batch, clips and applies AdamW.
    /// `step` is 0-based.
    /// With `grad_scale` (fp16's loss scale) the gradients are divided by it first, and a step
    /// whose global gradient norm is not finite is skipped (`StepStats::skipped`).
    fn step(&mut self, step: u64, lr: f64, grad_scale: Option<f64>) -> Result<StepStats>;
    /// The full parameters of every unit, without padding (gathers them if they are sharded).
    fn full_params(&mut self) -> Result<Vec<Vec<f32>>>;
    /// Bytes held, by kind.
    fn memory(&self) -> MemoryReport;
    /// This rank's parameters and optimizer state, for saving and loading checkpoints.
    fn state_view(&mut self) -> StateView<'_>;
    /// Called after a checkpoint was loaded through `state_view`, to refresh anything derived
    /// from the loaded values.
    fn after_load(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What a checkpoint reads and writes of a rank: parameters and optimizer state.
pub struct StateView<'a> {
    /// The flat layout at this world size.
    pub layout: &'a ModelLayout,
    /// Parameters, full units or own shards as `held` says, wherever they live.
    pub params: &'a mut dyn crate::offload::ParamAccess,
    /// What `params` holds.
    pub held: ParamsHeld,
    /// Which shards the optimizer state covers.
    pub state: &'a StateLayout,
    /// The optimizer, which names the state's lanes.
    pub optimizer: crate::optim::OptimizerKind,
    /// The optimizer state.
    pub store: &'a mut dyn StateStore,
}

/// How a strategy holds the parameters that the optimizer state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsHeld {
    /// `params[u]` is unit u's whole (padded) buffer.
    FullUnits,
    /// `params[u]` is only this rank's shard of unit u.
    OwnShards,
}

/// Builds the strategy the plan asks for, with initial parameters from the seed.
pub fn build(
    plan: &Plan,
    comm: Arc<dyn Communicator>,
    layout: &ModelLayout,
    model: &dyn crate::model::ModelUnits,
) -> Result<Box<dyn Strategy>> {
    let stage = match plan.stage {
        0 => ReplicatedStage::Ddp,
        1 => ReplicatedStage::Zero1,
        2 => ReplicatedStage::Zero2,
        _ => return Ok(Box::new(Zero3::new(plan, comm, layout, model)?)),
    };
    Ok(Box::new(Replicated::new(plan, comm, layout, model, stage)?))
}

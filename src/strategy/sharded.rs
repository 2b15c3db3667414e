//! The optimizer side every strategy shares (docs/ARCHITECTURE.md, "The seams"): gradient
//! buckets reduced as gradients arrive, the optimizer state of the shards this rank updates in a
//! state store, and the step that ends the reduction, clips and updates. One implementation for
//! every stage, so every element gets the same arithmetic at every stage — the stages are
//! bitwise equal because this is the same code.

use super::{global_grad_norm, GradBuckets, ParamsHeld, Reduction, StepStats};
use crate::comm::Communicator;
use crate::error::Result;
use crate::flat::{ModelLayout, ShardRange, UnitOffset};
use crate::offload::{self, Access, ParamAccess, StateLayout, StateStore};
use crate::optim::{AdamWConfig, OptimizerKind, StepScalars};
use crate::plan::Plan;
use std::ops::Range;
use std::sync::Arc;

/// Gradient buckets, optimizer state and the step, for the shards `shards` of every unit.
pub(crate) struct ShardedOptimizer {
    /// The gradients, reduced bucket by bucket.
    pub grads: GradBuckets,
    /// Which shards the optimizer state covers.
    pub state: StateLayout,
    /// The optimizer state, in its offload tier.
    pub store: Box<dyn StateStore>,
    /// The optimizer whose state the store holds.
    pub kind: OptimizerKind,
    adamw: AdamWConfig,
    clip_grad: f64,
    /// world × grad_accum: gradients are sums of per-micro-batch means over this many.
    grad_divisor: f32,
}

/// Which optimizer step this is: its number (for AdamW's bias correction), learning rate, and
/// fp16's loss scale to divide the gradients by.
pub struct StepAt {
    pub step: u64,
    pub lr: f64,
    pub grad_scale: Option<f64>,
}

impl ShardedOptimizer {
    /// Buckets reducing with `reduction`, and `plan.optimizer`'s state for `shards` in `plan`'s
    /// tier.
    pub fn new(
        plan: &Plan,
        comm: &Arc<dyn Communicator>,
        layout: &ModelLayout,
        reduction: Reduction,
        shards: Range<usize>,
    ) -> Result<Self> {
        let state = StateLayout::new(layout, shards);
        let store = offload::open(
            plan.offload,
            &plan.config.offload,
            comm.rank(),
            state.len,
            plan.optimizer.format(),
        )?;
        let grads = GradBuckets::new(
            comm.clone(),
            layout,
            reduction,
            plan.grad_accum,
            plan.config.parallel.static_graph,
            plan.bucket_bytes,
        );
        Ok(ShardedOptimizer {
            grads,
            state,
            store,
            kind: plan.optimizer,
            adamw: plan.adamw,
            clip_grad: plan.clip_grad,
            grad_divisor: (plan.world * plan.grad_accum) as f32,
        })
    }

    /// Ends the step's gradient reduction, takes the global norm over this rank's shards (in
    /// rank order, `strategy::norm`), derives the step's scalars with the clip factor and
    /// updates `params` (held as `held` says) from the state store.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        layout: &ModelLayout,
        params: &mut dyn ParamAccess,
        held: ParamsHeld,
        at: StepAt,
    ) -> Result<StepStats> {
        let StepAt {
            step,
            lr,
            grad_scale,
        } = at;
        // Dividing by divisor × scale: for a power-of-two scale (dynamic scaling's always are)
        // the same bits as dividing by each in turn.
        let divisor = self.grad_divisor * grad_scale.unwrap_or(1.0) as f32;
        let comm_wait_ms = self.grads.finish(divisor)?;
        let rank = comm.rank();
        let grads = &self.grads;
        let grad_norm = global_grad_norm(comm, layout, |u| grads.shard(u, rank))?;
        // Every rank has the same norm (`strategy::norm`), so every rank skips the same step.
        if grad_scale.is_some() && !grad_norm.is_finite() {
            return Ok(StepStats {
                grad_norm,
                comm_wait_ms,
                optimizer_ms: 0.0,
                skipped: true,
            });
        }
        let scalars = StepScalars::new(
            &self.adamw,
            step + 1,
            lr,
            crate::optim::clip_factor(grad_norm, self.clip_grad),
        );
        let optimizer_ms = self.update(layout, params, held, &scalars)?;
        Ok(StepStats {
            grad_norm,
            comm_wait_ms,
            optimizer_ms,
            skipped: false,
        })
    }

    /// The optimizer step over a rank's optimizer state: streams the store chunk by chunk
    /// (whatever its tier) and updates, for every element of state, the parameter element it
    /// belongs to. Chunk boundaries do not matter: the update is element-wise (8-bit AdamW's
    /// block-wise, and chunks and shards start on block boundaries), so every tier gives the
    /// same bits. Returns the time it took, ms.
    fn update(
        &mut self,
        layout: &ModelLayout,
        params: &mut dyn ParamAccess,
        held: ParamsHeld,
        s: &StepScalars,
    ) -> Result<f64> {
        let ShardedOptimizer {
            grads,
            state,
            store,
            kind,
            ..
        } = self;
        let kind = *kind;
        let started = std::time::Instant::now();
        let world = layout.world;
        store.stream(Access::ReadWrite, &mut |chunk, mut lanes| {
            for (seg, sub) in state.split(chunk.clone()) {
                let g = grads.shard(seg.unit, seg.shard);
                if g.is_empty() {
                    continue;
                }
                let unit = &layout.units[seg.unit];
                let shard = unit.shard(seg.shard, world);
                // The window: elements `sub` of the shard, as unit offsets.
                let window = shard.start.0 + sub.start..shard.start.0 + sub.end;
                let touched = ShardRange {
                    start: UnitOffset(window.start),
                    end: UnitOffset(window.end),
                };
                let pieces: Vec<_> = unit
                    .pieces_in(touched)
                    .map(|(r, decay)| (r.start - window.start..r.end - window.start, decay))
                    .collect();
                let params_base = match held {
                    ParamsHeld::FullUnits => shard.start.0,
                    ParamsHeld::OwnShards => 0,
                };
                let in_chunk =
                    seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
                let unit_params = params.unit_mut(seg.unit)?;
                kind.update(
                    &mut unit_params[params_base + sub.start..params_base + sub.end],
                    &g[sub],
                    lanes.slice(in_chunk),
                    &pieces,
                    s,
                );
            }
            Ok(())
        })?;
        params.flush()?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }
}

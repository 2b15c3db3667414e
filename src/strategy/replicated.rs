//! Strategies that keep full parameters on every rank: DDP (stage 0), ZeRO-1 and ZeRO-2
//! (Rajbhandari et al. 2020, §5.1–5.2). They differ only in two choices, fixed at construction:
//!
//! | stage | gradient collective | AdamW state and update | after the step |
//! |---|---|---|---|
//! | 0, DDP | all-reduce | every shard (the whole model) | — |
//! | 1 | all-reduce | this rank's shard of every unit | all-gather parameters |
//! | 2 | reduce-scatter | this rank's shard of every unit | all-gather parameters |
//!
//! Every element gets the same arithmetic in all three: the sum over ranks in rank order (see
//! `comm`), the same division, the same clip factor (see `norm`), the same AdamW — so the stages
//! are bitwise equal to each other at the same world size.

use super::sharded::{ShardedOptimizer, StepAt};
use super::{MemoryReport, MicroStep, ParamsHeld, Reduction, StateView, StepStats, Strategy};
use crate::comm::Communicator;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::init::InitSource;
use crate::model::ModelUnits;

use crate::plan::Plan;
use std::sync::Arc;

/// Which of the replicated-parameter stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicatedStage {
    /// Stage 0.
    Ddp,
    /// Optimizer states sharded.
    Zero1,
    /// Optimizer states and gradients sharded.
    Zero2,
}

/// Full parameters on every rank; optimizer state for `shards`.
pub struct Replicated {
    comm: Arc<dyn Communicator>,
    layout: ModelLayout,
    params: Vec<Vec<f32>>,
    /// Gradients, and AdamW moments of the shards this rank updates: every one (DDP) or its
    /// own (ZeRO).
    optim: ShardedOptimizer,
    gather_after_step: bool,
}

impl Replicated {
    /// Initialises parameters from the seed or `model.init_from` (identical on every rank;
    /// checked by hash).
    pub fn new(
        plan: &Plan,
        comm: Arc<dyn Communicator>,
        layout: &ModelLayout,
        model: &dyn ModelUnits,
        stage: ReplicatedStage,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world());
        let (reduction, shards, gather_after_step) = match stage {
            ReplicatedStage::Ddp => (Reduction::AllReduce, 0..world, false),
            ReplicatedStage::Zero1 => (Reduction::AllReduce, rank..rank + 1, true),
            ReplicatedStage::Zero2 => (Reduction::ReduceScatter, rank..rank + 1, true),
        };
        let init = InitSource::new(&plan.config.model.init_from, plan.config.train.seed);
        let params: Vec<Vec<f32>> = (0..layout.units.len())
            .map(|u| init.unit(model, u, &layout.units[u]))
            .collect::<Result<_>>()?;
        check_same_on_all_ranks(comm.as_ref(), "initial parameters", params_hash(&params))?;
        let optim = ShardedOptimizer::new(plan, &comm, layout, reduction, shards)?;
        Ok(Replicated {
            comm,
            layout: layout.clone(),
            params,
            optim,
            gather_after_step,
        })
    }

    /// Number of times bucket buffers were allocated so far.
    pub fn buffer_allocations(&self) -> usize {
        self.optim.grads.allocations()
    }

    /// The bucket plan in use, once built.
    pub fn bucket_plan(&self) -> Option<&super::BucketPlan> {
        self.optim.grads.plan()
    }

    fn gather_params(&mut self) -> Result<()> {
        let pending: Vec<_> = self
            .params
            .iter_mut()
            .enumerate()
            .map(|(unit, p)| {
                self.comm
                    .set_serves(&format!("the updated parameters of unit {unit}"));
                self.comm.all_gather(std::mem::take(p))
            })
            .collect();
        for (slot, p) in self.params.iter_mut().zip(pending) {
            *slot = p.wait()?;
        }
        Ok(())
    }
}

fn params_hash(params: &[Vec<f32>]) -> u64 {
    params
        .iter()
        .flatten()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// Errors unless every rank passes the same `hash`, naming the ranks that differ.
pub(crate) fn check_same_on_all_ranks(
    comm: &dyn Communicator,
    what: &str,
    hash: u64,
) -> Result<()> {
    comm.set_serves(&format!("the check that {what} agree"));
    let differing = crate::comm::ranks_differing_from_first(comm, &hash.to_string())?;
    if differing.is_empty() {
        Ok(())
    } else {
        Err(KilnError::Comm(format!(
            "{what} of rank(s) {} differ from rank 0's",
            crate::comm::rank_list(&differing)
        )))
    }
}

impl Strategy for Replicated {
    fn before_forward(&mut self, _unit: usize) -> Result<()> {
        Ok(())
    }

    fn unit_params(&self, unit: usize) -> &[f32] {
        &self.params[unit]
    }

    fn after_forward(&mut self, _unit: usize) -> Result<()> {
        Ok(())
    }

    fn before_backward(&mut self, _unit: usize) -> Result<()> {
        Ok(())
    }

    fn on_grads_ready(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()> {
        self.optim.grads.on_grads(unit, grads, micro)
    }

    fn step(&mut self, step: u64, lr: f64, grad_scale: Option<f64>) -> Result<StepStats> {
        let stats = self.optim.step(
            self.comm.as_ref(),
            &self.layout,
            &mut self.params,
            ParamsHeld::FullUnits,
            StepAt {
                step,
                lr,
                grad_scale,
            },
        )?;
        if self.gather_after_step {
            self.gather_params()?;
        }
        Ok(stats)
    }

    fn full_params(&mut self) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .params
            .iter()
            .zip(&self.layout.units)
            .map(|(p, u)| p[..u.numel].to_vec())
            .collect())
    }

    fn state_view(&mut self) -> StateView<'_> {
        StateView {
            layout: &self.layout,
            params: &mut self.params,
            held: ParamsHeld::FullUnits,
            state: &self.optim.state,
            optimizer: self.optim.kind,
            store: self.optim.store.as_mut(),
        }
    }

    fn memory(&self) -> MemoryReport {
        MemoryReport {
            params_full: super::accounting::unit_param_bytes(&self.layout, |_| true),
            grads: self.optim.grads.grad_bytes(),
            optimizer: self.optim.store.resident_bytes(),
            optimizer_offloaded: self.optim.store.offloaded_bytes(),
            comm_buffers: self.optim.grads.buffer_bytes(),
            ..Default::default()
        }
    }
}

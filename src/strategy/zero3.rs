//! ZeRO-3 (Rajbhandari et al. 2020, §5.3; PyTorch's FSDP): parameters exist only as shards.
//! A unit's full parameters are all-gathered just before it runs — the next `parallel.prefetch`
//! units' gathers are already in flight — and released after; backward gathers the unit again
//! (FSDP2's and DeepSpeed's regather). The engine keeps the unit's activations but no copy of
//! its matrices in the graph (released weights, `model::Param`), and refills them from the
//! regathered buffer for the backward; the embedding, which the graph would hold, is recomputed
//! instead. Gradients are reduce-scattered per bucket as in ZeRO-2. Units with fewer parameters
//! than `parallel.persist_threshold` stay whole on every rank (DeepSpeed's
//! stage3_param_persistence_threshold).
//!
//! `parallel.reshard_after_forward = false` (FSDP2's knob) trades memory for that second gather:
//! a unit's forward graph holds the unit's gathered parameters until its backward (the gather
//! buffer itself goes back to the pool: the graph has its own copy), so backward does not gather
//! it. Inside the step every parameter is then held whole at the peak, as in ZeRO-2; between
//! steps only the shards are kept. Persistent units are never gathered again (nothing was
//! released), whatever the setting. `train.recompute` recomputes the units it names in either
//! case, and they are gathered again for it.
//!
//! A unit that reads another unit's parameters (tied embeddings: the head reads `wte`) gathers
//! that unit too while it runs, and releases it with itself.
//!
//! Under `train.precision = "bf16"`/`"fp16"` the gathers carry each shard rounded to the
//! compute dtype, two values to a word (`halves`): half the bytes, and the same bits in the
//! forward and backward, which cast the unit's parameters to that dtype anyway. The final
//! parameters are gathered in f32 (the masters).
//!
//! With `offload.param = "nvme"` the rank's shards live in a file (`offload::ParamShards`): a
//! gather reads the rank's shard from it into the gather buffer, and the optimizer step and
//! checkpoints reach the shards one unit at a time (ZeRO-Infinity's parameter offload).
//!
//! Every element gets the same arithmetic as in DDP (same parameters, the same bitwise
//! recompute and released-weight matmuls, the same rank-ordered sums, norm and AdamW), so stage 3
//! is bitwise equal to the other stages at the same world size.

use super::sharded::{ShardedOptimizer, StepAt};
use super::{MemoryReport, MicroStep, ParamsHeld, Reduction, StateView, StepStats, Strategy};
use crate::comm::{Communicator, Pending};
use crate::error::Result;
use crate::flat::ModelLayout;
use crate::halves::Half;
use crate::init::InitSource;
use crate::model::ModelUnits;
use crate::offload::ParamShards;

use crate::plan::Plan;
use std::sync::Arc;

/// Where a unit's parameters are.
enum Gathered {
    /// Only this rank's shard is here.
    Released,
    /// An all-gather is in flight (of halves, when `Zero3::gather_in` says so).
    InFlight(Pending),
    /// The full (padded) parameters.
    Full(Vec<f32>),
}

/// The ZeRO-3 strategy.
pub struct Zero3 {
    comm: Arc<dyn Communicator>,
    layout: ModelLayout,
    /// This rank's shard of every unit's parameters, in their tier (`offload.param`).
    shards: ParamShards,
    /// Units kept whole on every rank.
    persistent: Vec<bool>,
    /// Per unit, the other units whose parameters it reads (tied weights).
    lenders: Vec<Vec<usize>>,
    gathered: Vec<Gathered>,
    /// Released gather buffers kept for the next gathers (at most `prefetch + 1`), so that a
    /// step does not allocate and fault in a unit-sized buffer per unit per pass.
    spare: Vec<Vec<f32>>,
    /// Gradient shards and the AdamW moments of this rank's shards.
    optim: ShardedOptimizer,
    prefetch: usize,
    /// Largest number of bytes held in gathered units at once.
    peak_gathered: usize,
    /// Per unit: backward gathers it again (released after forward, or recomputed by
    /// `train.recompute`).
    regathers: Vec<bool>,
    /// Per unit: its forward graph holds its gathered parameters until its gradients are ready
    /// (`reshard_after_forward = false`).
    in_graph: Vec<bool>,
    /// Per unit: released after its forward, its graph keeping no copy of its parameters.
    released: Vec<bool>,
    /// The compute dtype the gathers round to (`train.precision`), if not f32.
    gather_in: Option<Half>,
}

impl Zero3 {
    /// Initialises one unit at a time, keeping only this rank's shard (and whole persistent
    /// units): the whole model is never materialised, and the values equal a single process's.
    pub fn new(
        plan: &Plan,
        comm: Arc<dyn Communicator>,
        layout: &ModelLayout,
        model: &dyn ModelUnits,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world());
        let init = InitSource::new(&plan.config.model.init_from, plan.config.train.seed);
        let threshold = plan.config.parallel.persist_threshold;
        let lens: Vec<usize> = layout.units.iter().map(|u| u.padded_len / world).collect();
        let mut shards =
            ParamShards::create(plan.param_offload, &plan.config.offload, rank, &lens)?;
        let mut gathered = Vec::new();
        let mut persistent = Vec::new();
        for (u, unit) in layout.units.iter().enumerate() {
            let full = init.unit(model, u, unit)?;
            shards.set(u, &full[unit.shard(rank, world).range()])?;
            let keep = unit.numel < threshold;
            persistent.push(keep);
            gathered.push(if keep {
                Gathered::Full(full)
            } else {
                Gathered::Released
            });
        }
        let regathers = super::accounting::zero3_regather_units(plan, &persistent);
        let released = super::accounting::zero3_released_units(plan, &persistent);
        let lenders = (0..layout.units.len())
            .map(|u| model.borrowed_params(u).iter().map(|r| r.unit).collect())
            .collect();
        let optim = ShardedOptimizer::new(
            plan,
            &comm,
            layout,
            Reduction::ReduceScatter,
            rank..rank + 1,
        )?;
        Ok(Zero3 {
            comm,
            layout: layout.clone(),
            shards,
            persistent,
            lenders,
            gathered,
            spare: Vec::new(),
            optim,
            prefetch: plan.config.parallel.prefetch,
            peak_gathered: 0,
            in_graph: vec![false; regathers.len()],
            regathers,
            released,
            gather_in: Half::of_precision(&plan.config.train.precision),
        })
    }

    /// Starts gathering `unit` unless it is already here or on its way.
    fn start_gather(&mut self, unit: usize) -> Result<()> {
        if !matches!(self.gathered[unit], Gathered::Released) {
            return Ok(());
        }
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let layout = &self.layout.units[unit];
        let buf = match self.gather_in {
            Some(h) => {
                let words = h.pack(&self.shards.shard(unit)?);
                let mut buf = vec![0.0f32; world * words.len()];
                buf[rank * words.len()..(rank + 1) * words.len()].copy_from_slice(&words);
                buf
            }
            None => {
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(layout.padded_len, 0.0);
                self.shards
                    .read(unit, &mut buf[layout.shard(rank, world).range()])?;
                buf
            }
        };
        self.comm.set_serves(&format!("the gather of unit {unit}"));
        self.gathered[unit] = Gathered::InFlight(self.comm.all_gather(buf));
        Ok(())
    }

    /// The whole (padded) unit from what its gather brought: f32 as is, or each rank's halves
    /// widened into their shard's place.
    fn widen(&mut self, unit: usize, got: Vec<f32>) -> Vec<f32> {
        let Some(h) = self.gather_in else {
            return got;
        };
        let layout = &self.layout.units[unit];
        let world = self.comm.world();
        let shard_len = layout.padded_len / world;
        let words = got.len() / world;
        let mut full = self.spare.pop().unwrap_or_default();
        full.clear();
        full.resize(layout.padded_len, 0.0);
        for q in 0..world {
            h.unpack_into(
                &got[q * words..(q + 1) * words],
                &mut full[q * shard_len..(q + 1) * shard_len],
            );
        }
        full
    }

    /// Makes `unit` whole, then starts gathering the units after it in `order`.
    fn gather(&mut self, unit: usize, next: impl Iterator<Item = usize>) -> Result<()> {
        self.start_gather(unit)?;
        if let Gathered::InFlight(_) = self.gathered[unit] {
            let Gathered::InFlight(p) =
                std::mem::replace(&mut self.gathered[unit], Gathered::Released)
            else {
                unreachable!()
            };
            let got = p.wait()?;
            self.gathered[unit] = Gathered::Full(self.widen(unit, got));
        }
        for u in next.take(self.prefetch) {
            self.start_gather(u)?;
        }
        self.note_peak();
        Ok(())
    }

    /// Counts what is held now into the peak: gather buffers (full, in flight, spare) and
    /// units whose forward graph holds their parameters, each as large as the largest unit
    /// (`memory::model_states` replays the same count before a run).
    fn note_peak(&mut self) {
        let held: usize = self
            .gathered
            .iter()
            .zip(&self.persistent)
            .filter(|(g, p)| !**p && !matches!(g, Gathered::Released))
            .count()
            + self.spare.len()
            + self.in_graph.iter().filter(|&&g| g).count();
        let largest = self
            .layout
            .units
            .iter()
            .map(|u| u.padded_len)
            .max()
            .unwrap_or(0);
        self.peak_gathered = self.peak_gathered.max(held * largest * 4);
    }

    /// Persistent units are whole on every rank: regathers them from the (updated) shards.
    fn refresh_persistent(&mut self) -> Result<()> {
        for u in 0..self.layout.units.len() {
            if self.persistent[u] {
                self.gathered[u] = Gathered::Released;
                self.gather(u, std::iter::empty())?;
            }
        }
        Ok(())
    }

    /// Gathers the units `unit` borrows parameters from (no prefetch: they are needed now).
    fn gather_lenders(&mut self, unit: usize) -> Result<()> {
        for lender in self.lenders[unit].clone() {
            self.gather(lender, std::iter::empty())?;
        }
        Ok(())
    }

    /// Releases what `gather_lenders` gathered; a lender whose own gather a prefetch has
    /// already started stays (it is about to be used).
    fn release_lenders(&mut self, unit: usize) {
        for lender in self.lenders[unit].clone() {
            if matches!(self.gathered[lender], Gathered::Full(_)) {
                self.release(lender);
            }
        }
    }

    fn release(&mut self, unit: usize) {
        if !self.persistent[unit] {
            let old = std::mem::replace(&mut self.gathered[unit], Gathered::Released);
            if let Gathered::Full(buf) = old {
                if self.spare.len() <= self.prefetch {
                    self.spare.push(buf);
                }
            }
        }
    }
}

impl Strategy for Zero3 {
    fn releases_after_forward(&self, unit: usize) -> bool {
        self.released[unit]
    }

    fn before_forward(&mut self, unit: usize) -> Result<()> {
        let n = self.layout.units.len();
        self.gather(unit, unit + 1..n)?;
        self.gather_lenders(unit)
    }

    fn unit_params(&self, unit: usize) -> &[f32] {
        match &self.gathered[unit] {
            Gathered::Full(p) => p,
            _ => panic!("unit {unit} used while not gathered (a strategy hook was skipped)"),
        }
    }

    fn after_forward(&mut self, unit: usize) -> Result<()> {
        self.release(unit);
        self.release_lenders(unit);
        if !self.regathers[unit] && !self.persistent[unit] {
            self.in_graph[unit] = true;
            self.note_peak();
        }
        Ok(())
    }

    fn before_backward(&mut self, unit: usize) -> Result<()> {
        // Only units gathered again in backward are worth prefetching; with the default every
        // unit is (persistent ones are whole already), and this is the plain reverse order.
        let gathers = |u: usize| self.regathers[u] || self.persistent[u];
        if !gathers(unit) {
            return Ok(());
        }
        let next: Vec<usize> = (0..unit).rev().filter(|&u| gathers(u)).collect();
        self.gather(unit, next.into_iter())?;
        if self.regathers[unit] {
            self.gather_lenders(unit)?;
        }
        Ok(())
    }

    fn on_grads_ready(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()> {
        self.in_graph[unit] = false;
        self.release(unit);
        self.release_lenders(unit);
        self.optim.grads.on_grads(unit, grads, micro)
    }

    fn step(&mut self, step: u64, lr: f64, grad_scale: Option<f64>) -> Result<StepStats> {
        let stats = self.optim.step(
            self.comm.as_ref(),
            &self.layout,
            &mut self.shards,
            ParamsHeld::OwnShards,
            StepAt {
                step,
                lr,
                grad_scale,
            },
        )?;
        self.refresh_persistent()?;
        Ok(stats)
    }

    fn full_params(&mut self) -> Result<Vec<Vec<f32>>> {
        // Gathers still in flight finish as they started (every rank has the same ones).
        for u in 0..self.layout.units.len() {
            if matches!(self.gathered[u], Gathered::InFlight(_)) {
                self.gather(u, std::iter::empty())?;
            }
        }
        // The f32 masters, whatever the gathers round to.
        let gather_in = self.gather_in.take();
        let mut out = Vec::with_capacity(self.layout.units.len());
        for u in 0..self.layout.units.len() {
            let kept = std::mem::replace(&mut self.gathered[u], Gathered::Released);
            self.gather(u, std::iter::empty())?;
            out.push(self.unit_params(u)[..self.layout.units[u].numel].to_vec());
            self.gathered[u] = Gathered::Released;
            if self.persistent[u] {
                self.gathered[u] = kept;
            }
        }
        self.gather_in = gather_in;
        Ok(out)
    }

    fn state_view(&mut self) -> StateView<'_> {
        StateView {
            layout: &self.layout,
            params: &mut self.shards,
            held: ParamsHeld::OwnShards,
            state: &self.optim.state,
            optimizer: self.optim.kind,
            store: self.optim.store.as_mut(),
        }
    }

    fn after_load(&mut self) -> Result<()> {
        self.refresh_persistent()
    }

    fn memory(&self) -> MemoryReport {
        use super::accounting::unit_param_bytes;
        MemoryReport {
            params_full: unit_param_bytes(&self.layout, |u| self.persistent[u]),
            param_shards: self.shards.resident_bytes(),
            params_offloaded: self.shards.offloaded_bytes(),
            grads: self.optim.grads.grad_bytes(),
            optimizer: self.optim.store.resident_bytes(),
            optimizer_offloaded: self.optim.store.offloaded_bytes(),
            comm_buffers: self.optim.grads.buffer_bytes(),
            gathered: self.peak_gathered,
            frozen_params: 0,
        }
    }
}

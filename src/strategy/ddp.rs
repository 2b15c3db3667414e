//! Stage 0, DDP: every rank keeps full parameters, gradients and optimizer states; gradients are
//! all-reduced in buckets while backward continues.
//!
//! Static graph (PyTorch's `static_graph=True`): the first step records the order and sizes in
//! which unit gradients arrive, builds the bucket plan, checks with a hash exchange that every
//! rank built the same one, and allocates the bucket buffers once; later steps reuse plan and
//! buffers and reject a unit that arrives out of order or not at all. Without it, the plan is
//! recorded and rebuilt on every step (and that step's communication is not overlapped).
//!
//! Accumulation: micro-steps before the last add into the buckets without communicating
//! (PyTorch's `no_sync`); the last one launches each bucket as it fills. Because accumulation
//! writes into the same buffers the plan owns, it composes with the static graph — the case
//! PyTorch gets wrong in pytorch#143580.

use super::{global_grad_norm, BucketPlan, MemoryReport, MicroStep, StepStats, Strategy};
use crate::comm::{Communicator, Pending, ReduceOp};
use crate::error::{KilnError, Result};
use crate::flat::{init_unit, ModelLayout};
use crate::model::UnitModel;
use crate::optim::{adamw_step, clip_factor, AdamWConfig, StepScalars};
use crate::plan::Plan;
use std::sync::Arc;
use std::time::Instant;

/// The DDP strategy.
pub struct Ddp {
    comm: Arc<dyn Communicator>,
    layout: ModelLayout,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    adamw: AdamWConfig,
    clip_grad: f64,
    /// world × grad_accum: gradients are sums of per-micro-batch means over this many.
    grad_divisor: f32,
    static_graph: bool,
    bucket_bytes: usize,
    plan: Option<BucketPlan>,
    /// Bucket buffers; `None` while a collective owns one.
    buffers: Vec<Option<Vec<f32>>>,
    in_flight: Vec<Option<Pending>>,
    /// Units of each bucket that have delivered their last micro-step.
    arrived: Vec<usize>,
    /// Position in `plan.order` within the current micro-step.
    cursor: usize,
    /// While recording: (unit, length) in arrival order, and the accumulated gradients.
    arrivals: Vec<(usize, usize)>,
    staged: Vec<Vec<f32>>,
    /// How many times bucket buffers were allocated (once with a static graph).
    buffer_allocations: usize,
}

impl Ddp {
    /// Initialises parameters from the seed (identical on every rank; checked by hash).
    pub fn new(plan: &Plan, comm: Arc<dyn Communicator>, layout: &ModelLayout, model: &dyn UnitModel) -> Result<Self> {
        let seed = plan.config.train.seed;
        let params: Vec<Vec<f32>> = (0..layout.units.len()).map(|u| init_unit(&model.unit_params(u), &layout.units[u], seed)).collect();
        check_same_on_all_ranks(comm.as_ref(), "initial parameters", params_hash(&params))?;
        let zeros: Vec<Vec<f32>> = layout.units.iter().map(|u| vec![0.0; u.padded_len]).collect();
        Ok(Ddp {
            comm,
            layout: layout.clone(),
            params,
            m: zeros.clone(),
            v: zeros,
            adamw: plan.adamw,
            clip_grad: plan.clip_grad,
            grad_divisor: (plan.world * plan.grad_accum) as f32,
            static_graph: plan.config.parallel.static_graph,
            bucket_bytes: plan.bucket_bytes,
            plan: None,
            buffers: Vec::new(),
            in_flight: Vec::new(),
            arrived: Vec::new(),
            cursor: 0,
            arrivals: Vec::new(),
            staged: vec![Vec::new(); layout.units.len()],
            buffer_allocations: 0,
        })
    }

    /// Number of times bucket buffers were allocated so far.
    pub fn buffer_allocations(&self) -> usize {
        self.buffer_allocations
    }

    /// The bucket plan in use, once built.
    pub fn bucket_plan(&self) -> Option<&BucketPlan> {
        self.plan.as_ref()
    }

    fn unit_name(&self, unit: usize) -> &str {
        &self.layout.units[unit].name
    }

    fn launch(&mut self, bucket: usize) {
        let buf = self.buffers[bucket].take().expect("a bucket is launched once per step");
        self.in_flight[bucket] = Some(self.comm.all_reduce(buf, ReduceOp::Sum));
    }

    /// Builds the plan from this step's arrivals, checks it across ranks, moves the staged
    /// gradients into fresh bucket buffers and launches every bucket.
    fn finish_recording(&mut self) -> Result<()> {
        let plan = BucketPlan::build(&self.arrivals, self.layout.units.len(), self.bucket_bytes);
        let hashes = self.comm.all_gather_bytes(&plan.hash().to_le_bytes())?;
        if hashes.iter().any(|h| *h != hashes[0]) {
            let ranks: Vec<String> = hashes.iter().enumerate().filter(|(_, h)| **h != hashes[0]).map(|(r, _)| r.to_string()).collect();
            return Err(KilnError::Comm(format!(
                "the gradient bucket plan of rank(s) {} differs from rank 0's (different arrival order or sizes)",
                ranks.join(", ")
            )));
        }
        self.buffers = plan.buckets.iter().map(|b| Some(vec![0.0f32; b.len])).collect();
        self.buffer_allocations += 1;
        for (b, bucket) in plan.buckets.iter().enumerate() {
            let buf = self.buffers[b].as_mut().expect("fresh buffer");
            for (unit, range) in &bucket.slots {
                buf[range.clone()].copy_from_slice(&self.staged[*unit]);
            }
        }
        self.in_flight = plan.buckets.iter().map(|_| None).collect();
        self.arrived = vec![0; plan.buckets.len()];
        self.plan = Some(plan);
        for b in 0..self.buffers.len() {
            self.launch(b);
        }
        self.arrivals.clear();
        Ok(())
    }

    fn record(&mut self, unit: usize, grads: &[f32], micro: MicroStep) {
        if micro.is_first() {
            self.arrivals.push((unit, grads.len()));
            self.staged[unit].clear();
            self.staged[unit].extend_from_slice(grads);
        } else {
            self.staged[unit].iter_mut().zip(grads).for_each(|(a, g)| *a += g);
        }
    }

    fn accumulate(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()> {
        let plan = self.plan.as_ref().expect("accumulate runs with a plan");
        let expected = plan.order.get(self.cursor).copied();
        if expected != Some(unit) {
            let wanted = expected.map_or("no unit".to_string(), |e| format!("`{}`", self.unit_name(e)));
            return Err(KilnError::Comm(format!(
                "unit `{}` delivered gradients where the static bucket plan expects {wanted} (parallel.static_graph = true requires the same units in the same order every step)",
                self.unit_name(unit)
            )));
        }
        self.cursor = (self.cursor + 1) % plan.order.len();
        let (b, range) = plan.slot_of_unit[unit].clone().expect("units in the order have slots");
        let buf = &mut self.buffers[b].as_mut().expect("buckets are home between steps")[range];
        if micro.is_first() {
            buf.copy_from_slice(grads);
        } else {
            buf.iter_mut().zip(grads).for_each(|(a, g)| *a += g);
        }
        if micro.is_last() {
            self.arrived[b] += 1;
            if self.arrived[b] == plan.buckets[b].slots.len() {
                self.launch(b);
            }
        }
        Ok(())
    }
}

fn params_hash(params: &[Vec<f32>]) -> u64 {
    params.iter().flatten().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3))
}

/// Errors unless every rank passes the same `hash`, naming the ranks that differ.
pub(crate) fn check_same_on_all_ranks(comm: &dyn Communicator, what: &str, hash: u64) -> Result<()> {
    let all = comm.all_gather_bytes(&hash.to_le_bytes())?;
    let differing: Vec<String> = all.iter().enumerate().filter(|(_, h)| **h != all[0]).map(|(r, _)| r.to_string()).collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(KilnError::Comm(format!("{what} of rank(s) {} differ from rank 0's", differing.join(", "))))
    }
}

impl Strategy for Ddp {
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
        if self.plan.is_some() && self.static_graph {
            self.accumulate(unit, grads, micro)
        } else {
            self.record(unit, grads, micro);
            Ok(())
        }
    }

    fn step(&mut self, step: u64, lr: f64) -> Result<StepStats> {
        let started = Instant::now();
        if self.plan.is_none() || !self.static_graph {
            self.finish_recording()?;
        } else if self.cursor != 0 {
            let missing = self.plan.as_ref().expect("plan").order[self.cursor];
            return Err(KilnError::Comm(format!("unit `{}` delivered no gradients this step (parallel.static_graph = true)", self.unit_name(missing))));
        }
        for b in 0..self.in_flight.len() {
            let pending = self.in_flight[b].take().expect("every bucket was launched");
            self.buffers[b] = Some(pending.wait()?);
            self.arrived[b] = 0;
        }
        let comm_wait_ms = started.elapsed().as_secs_f64() * 1e3;

        let divisor = self.grad_divisor;
        for buf in self.buffers.iter_mut().flatten() {
            buf.iter_mut().for_each(|g| *g /= divisor);
        }
        let plan = self.plan.as_ref().expect("plan");
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let grad_of = |u: usize| -> &[f32] {
            match &plan.slot_of_unit[u] {
                Some((b, range)) => &self.buffers[*b].as_ref().expect("home")[range.clone()],
                None => &[],
            }
        };
        let norm = global_grad_norm(self.comm.as_ref(), &self.layout, |u| {
            let g = grad_of(u);
            if g.is_empty() {
                g
            } else {
                &g[self.layout.units[u].shard(rank, world).range()]
            }
        })?;
        let scalars = StepScalars::new(&self.adamw, step + 1, lr, clip_factor(norm, self.clip_grad));
        for (u, unit) in self.layout.units.iter().enumerate() {
            let Some((b, range)) = &plan.slot_of_unit[u] else { continue };
            let g = &self.buffers[*b].as_ref().expect("home")[range.clone()];
            let full = unit.shard(0, 1);
            for (r, decay) in unit.pieces_in(full) {
                adamw_step(&mut self.params[u][r.clone()], &g[r.clone()], &mut self.m[u][r.clone()], &mut self.v[u][r], &scalars, decay);
            }
        }
        Ok(StepStats { grad_norm: norm, comm_wait_ms })
    }

    fn full_params(&mut self) -> Result<Vec<Vec<f32>>> {
        Ok(self.params.iter().zip(&self.layout.units).map(|(p, u)| p[..u.numel].to_vec()).collect())
    }

    fn memory(&self) -> MemoryReport {
        let f = std::mem::size_of::<f32>();
        let padded: usize = self.layout.units.iter().map(|u| u.padded_len).sum();
        let buckets: usize = self.plan.as_ref().map_or(0, |p| p.buckets.iter().map(|b| b.len).sum());
        MemoryReport { params_full: padded * f, grads: buckets * f, optimizer: 2 * padded * f, ..Default::default() }
    }
}

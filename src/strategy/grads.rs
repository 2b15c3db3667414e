//! Gradient bucketing shared by DDP and the ZeRO stages: accumulation across micro-steps,
//! the static bucket plan (recorded on the first step, checked across ranks, reused), and one
//! non-blocking collective per bucket launched the moment the bucket is full.
//!
//! Static graph (PyTorch's `static_graph=True`): the first step records the order and sizes in
//! which unit gradients arrive, builds the plan, checks with a hash exchange that every rank
//! built the same one, and allocates the bucket buffers once; later steps reuse plan and buffers
//! and reject a unit that arrives out of order or not at all. Without it, the plan is recorded
//! and rebuilt on every step (and that step's communication is not overlapped).
//!
//! Accumulation: micro-steps before the last add into the buckets without communicating
//! (PyTorch's `no_sync`); the last one launches each bucket as it fills. Because accumulation
//! writes into the same buffers the plan owns, it composes with the static graph — the case
//! PyTorch gets wrong in pytorch#143580.

use super::{BucketPlan, MicroStep};
use crate::comm::{Communicator, Pending, ReduceOp};
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use std::sync::Arc;
use std::time::Instant;

/// What each bucket's collective is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Every rank ends with the whole reduced bucket (DDP, ZeRO-1).
    AllReduce,
    /// Each rank ends with its own shard of the bucket (ZeRO-2).
    ReduceScatter,
}

/// Bucketed gradient reduction.
pub struct GradBuckets {
    comm: Arc<dyn Communicator>,
    reduction: Reduction,
    unit_names: Vec<String>,
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
    /// While recording: (unit, padded length) in arrival order, and the accumulated gradients.
    arrivals: Vec<(usize, usize)>,
    staged: Vec<Vec<f32>>,
    /// How many times bucket buffers were allocated (once with a static graph).
    allocations: usize,
}

impl GradBuckets {
    /// Bucketing for `layout` with the given collective.
    pub fn new(comm: Arc<dyn Communicator>, layout: &ModelLayout, reduction: Reduction, static_graph: bool, bucket_bytes: usize) -> Self {
        GradBuckets {
            comm,
            reduction,
            unit_names: layout.units.iter().map(|u| u.name.clone()).collect(),
            static_graph,
            bucket_bytes,
            plan: None,
            buffers: Vec::new(),
            in_flight: Vec::new(),
            arrived: Vec::new(),
            cursor: 0,
            arrivals: Vec::new(),
            staged: vec![Vec::new(); layout.units.len()],
            allocations: 0,
        }
    }

    /// The plan in use, once built.
    pub fn plan(&self) -> Option<&BucketPlan> {
        self.plan.as_ref()
    }

    /// Number of times bucket buffers were allocated.
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    /// Bytes of the bucket buffers.
    pub fn bytes(&self) -> usize {
        self.plan.as_ref().map_or(0, |p| p.buckets.iter().map(|b| b.len(p.world)).sum::<usize>() * 4)
    }

    fn launch(&mut self, bucket: usize) {
        let buf = self.buffers[bucket].take().expect("a bucket is launched once per step");
        self.in_flight[bucket] = Some(match self.reduction {
            Reduction::AllReduce => self.comm.all_reduce(buf, ReduceOp::Sum),
            Reduction::ReduceScatter => self.comm.reduce_scatter(buf, ReduceOp::Sum),
        });
    }

    /// Hands over one unit's gradients of one micro-step.
    pub fn on_grads(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()> {
        if self.plan.is_none() || !self.static_graph {
            if micro.is_first() {
                self.arrivals.push((unit, grads.len()));
                self.staged[unit].clear();
                self.staged[unit].extend_from_slice(grads);
            } else {
                self.staged[unit].iter_mut().zip(grads).for_each(|(a, g)| *a += g);
            }
            return Ok(());
        }
        let plan = self.plan.as_ref().expect("checked above");
        let expected = plan.order.get(self.cursor).copied();
        if expected != Some(unit) {
            let wanted = expected.map_or("no unit".to_string(), |e| format!("`{}`", self.unit_names[e]));
            return Err(KilnError::Comm(format!(
                "unit `{}` delivered gradients where the static bucket plan expects {wanted} (parallel.static_graph = true requires the same units in the same order every step)",
                self.unit_names[unit]
            )));
        }
        self.cursor = (self.cursor + 1) % plan.order.len();
        let (b, s) = plan.slot_of_unit[unit].expect("units in the order have slots");
        let bucket = &plan.buckets[b];
        let buf = self.buffers[b].as_mut().expect("buckets are home between steps");
        bucket.write(buf, &bucket.slots[s], grads, plan.world, !micro.is_first());
        if micro.is_last() {
            self.arrived[b] += 1;
            if self.arrived[b] == bucket.slots.len() {
                self.launch(b);
            }
        }
        Ok(())
    }

    /// Builds the plan from this step's arrivals, checks it across ranks, moves the staged
    /// gradients into fresh bucket buffers and launches every bucket.
    fn finish_recording(&mut self) -> Result<()> {
        let world = self.comm.world();
        let plan = BucketPlan::build(&self.arrivals, self.unit_names.len(), self.bucket_bytes, world);
        let hashes = self.comm.all_gather_bytes(&plan.hash().to_le_bytes())?;
        if hashes.iter().any(|h| *h != hashes[0]) {
            let ranks: Vec<String> = hashes.iter().enumerate().filter(|(_, h)| **h != hashes[0]).map(|(r, _)| r.to_string()).collect();
            return Err(KilnError::Comm(format!(
                "the gradient bucket plan of rank(s) {} differs from rank 0's (different arrival order or sizes)",
                ranks.join(", ")
            )));
        }
        self.buffers = plan.buckets.iter().map(|b| Some(vec![0.0f32; b.len(world)])).collect();
        self.allocations += 1;
        for (b, bucket) in plan.buckets.iter().enumerate() {
            let buf = self.buffers[b].as_mut().expect("fresh buffer");
            for slot in &bucket.slots {
                bucket.write(buf, slot, &self.staged[slot.unit], world, false);
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

    /// Waits for every bucket and divides the reduced gradients by `divisor` (world × grad_accum:
    /// the gradients are sums of per-micro-batch means). Returns the milliseconds spent waiting.
    pub fn finish(&mut self, divisor: f32) -> Result<f64> {
        let started = Instant::now();
        if self.plan.is_none() || !self.static_graph {
            self.finish_recording()?;
        } else if self.cursor != 0 {
            let missing = self.plan.as_ref().expect("plan").order[self.cursor];
            return Err(KilnError::Comm(format!(
                "unit `{}` delivered no gradients this step (parallel.static_graph = true)",
                self.unit_names[missing]
            )));
        }
        for b in 0..self.in_flight.len() {
            let pending = self.in_flight[b].take().expect("every bucket was launched");
            self.buffers[b] = Some(pending.wait()?);
            self.arrived[b] = 0;
        }
        let waited = started.elapsed().as_secs_f64() * 1e3;
        let plan = self.plan.as_ref().expect("plan");
        let rank = self.comm.rank();
        for (buf, bucket) in self.buffers.iter_mut().zip(&plan.buckets) {
            let buf = buf.as_mut().expect("home");
            // After a reduce-scatter only this rank's shard of the bucket holds sums.
            let valid = match self.reduction {
                Reduction::AllReduce => &mut buf[..],
                Reduction::ReduceScatter => &mut buf[rank * bucket.shard_len..(rank + 1) * bucket.shard_len],
            };
            valid.iter_mut().for_each(|g| *g /= divisor);
        }
        Ok(waited)
    }

    /// Shard `q` of `unit`'s reduced gradient (after [`finish`](Self::finish)); empty if the unit
    /// has no gradients. With `ReduceScatter` only `q == rank` is meaningful.
    pub fn shard(&self, unit: usize, q: usize) -> &[f32] {
        match self.plan.as_ref().and_then(|p| p.shard_of(unit, q)) {
            Some((b, range)) => &self.buffers[b].as_ref().expect("buckets are home after finish")[range],
            None => &[],
        }
    }
}

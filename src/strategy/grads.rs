//! Gradient bucketing shared by DDP and the ZeRO stages: accumulation across micro-steps,
//! the static bucket plan (recorded on the first step, checked across ranks, reused), and one
//! non-blocking collective per bucket launched the moment the bucket is full.
//!
//! Static graph (PyTorch's `static_graph=True`): the first step records the order and sizes in
//! which unit gradients arrive and builds the plan as they come — each bucket is checked across
//! ranks with a hash exchange when it closes, gets its buffer, and is launched at once, so the
//! recording step overlaps communication and never holds more than one open bucket of staged
//! gradients. Later steps reuse plan and buffers and reject a unit that arrives out of order or
//! not at all. Without a static graph the plan is recorded this way on every step. (With
//! accumulation the first micro-step's arrivals are staged and the plan is built at the step:
//! the buckets could not be launched before the last micro-step anyway.)
//!
//! Accumulation: micro-steps before the last add into the buckets without communicating
//! (PyTorch's `no_sync`); the last one launches each bucket as it fills. Because accumulation
//! writes into the same buffers the plan owns, it composes with the static graph — the case
//! PyTorch gets wrong in pytorch#143580.
//!
//! Storage: with an all-reduce, or with accumulation, every bucket has its own buffer for the
//! whole step. A reduce-scatter without accumulation (ZeRO-2's common case) instead recycles a
//! pool of [`POOL_BUFFERS`] buffers: when a bucket needs one and none is free, the oldest
//! reduce-scatter in flight is waited for and this rank's shard of each of its units is copied
//! to a compact per-unit store, so only the shards (4Ψ/N bytes) outlive backward.

use super::{Bucket, BucketPlan, MicroStep, Packer};
use crate::comm::{Communicator, Pending, ReduceOp};
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use std::collections::VecDeque;
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

/// Bucket buffers recycled by a reduce-scatter without accumulation.
pub const POOL_BUFFERS: usize = 2;

/// Where reduced gradients live.
enum Storage {
    /// One buffer per bucket for the whole step; `None` while a collective owns it.
    PerBucket {
        buffers: Vec<Option<Vec<f32>>>,
        in_flight: Vec<Option<Pending>>,
    },
    /// A recycled pool; this rank's shard of every unit kept in `shards`.
    Pooled {
        free: Vec<Vec<f32>>,
        assigned: Vec<Option<Vec<f32>>>,
        in_flight: VecDeque<(usize, Pending)>,
        shards: Vec<Vec<f32>>,
    },
}

/// Bucketed gradient reduction.
pub struct GradBuckets {
    comm: Arc<dyn Communicator>,
    reduction: Reduction,
    pooled: bool,
    unit_names: Vec<String>,
    shard_lens: Vec<usize>,
    static_graph: bool,
    bucket_bytes: usize,
    plan: Option<BucketPlan>,
    storage: Storage,
    /// Units of each bucket that have delivered their last micro-step.
    arrived: Vec<usize>,
    /// Position in `plan.order` within the current micro-step.
    cursor: usize,
    /// Whether this step records the plan (the first step, or every step without a static graph).
    recording: bool,
    /// While recording online (no accumulation): the packer of the open bucket.
    packer: Option<Packer>,
    /// While recording: (unit, padded length) in arrival order, and gradients not yet in a
    /// bucket (with accumulation: all of them; online: the open bucket's).
    arrivals: Vec<(usize, usize)>,
    staged: Vec<Vec<f32>>,
    /// How many times bucket buffers were allocated (once with a static graph).
    allocations: usize,
    /// Time spent inside backward waiting for a pool buffer, this step, ms.
    waited_in_backward_ms: f64,
}

impl GradBuckets {
    /// Bucketing for `layout` with the given collective; `grad_accum` micro-steps per step.
    pub fn new(
        comm: Arc<dyn Communicator>,
        layout: &ModelLayout,
        reduction: Reduction,
        grad_accum: usize,
        static_graph: bool,
        bucket_bytes: usize,
    ) -> Self {
        let world = comm.world();
        GradBuckets {
            comm,
            reduction,
            pooled: super::accounting::pooled_buckets(reduction, grad_accum),
            unit_names: layout.units.iter().map(|u| u.name.clone()).collect(),
            shard_lens: layout.units.iter().map(|u| u.padded_len / world).collect(),
            static_graph,
            bucket_bytes,
            plan: None,
            storage: Storage::PerBucket {
                buffers: Vec::new(),
                in_flight: Vec::new(),
            },
            arrived: Vec::new(),
            cursor: 0,
            recording: true,
            packer: None,
            arrivals: Vec::new(),
            staged: vec![Vec::new(); layout.units.len()],
            allocations: 0,
            waited_in_backward_ms: 0.0,
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

    /// Bytes of gradients kept between backward and the step: every bucket, or this rank's
    /// shards when pooled.
    pub fn grad_bytes(&self) -> usize {
        self.plan.as_ref().map_or(0, |plan| {
            super::accounting::grad_bytes(plan, self.pooled, &self.shard_lens)
        })
    }

    /// Bytes of the recycled bucket buffers (pooled storage only).
    pub fn buffer_bytes(&self) -> usize {
        self.plan
            .as_ref()
            .filter(|_| self.pooled)
            .map_or(0, super::accounting::pool_buffer_bytes)
    }

    fn launch(&mut self, bucket: usize) {
        let (comm, reduction) = (&self.comm, self.reduction);
        comm.set_serves(&format!("gradient bucket {bucket}"));
        let start = |buf: Vec<f32>| match reduction {
            Reduction::AllReduce => comm.all_reduce(buf, ReduceOp::Sum),
            Reduction::ReduceScatter => comm.reduce_scatter(buf, ReduceOp::Sum),
        };
        const ONCE: &str = "a bucket is launched once per step";
        match &mut self.storage {
            Storage::PerBucket { buffers, in_flight } => {
                in_flight[bucket] = Some(start(buffers[bucket].take().expect(ONCE)));
            }
            Storage::Pooled {
                assigned,
                in_flight,
                ..
            } => {
                in_flight.push_back((bucket, start(assigned[bucket].take().expect(ONCE))));
            }
        }
    }

    /// Waits for the oldest reduce-scatter in flight and keeps this rank's shard of its units.
    fn retire_oldest(&mut self) -> Result<bool> {
        let plan = self.plan.as_ref().expect("pooled storage has a plan");
        let rank = self.comm.rank();
        let Storage::Pooled {
            free,
            in_flight,
            shards,
            ..
        } = &mut self.storage
        else {
            unreachable!("pooled only")
        };
        let Some((b, pending)) = in_flight.pop_front() else {
            return Ok(false);
        };
        let buf = pending.wait()?;
        let bucket = &plan.buckets[b];
        for slot in &bucket.slots {
            let start = rank * bucket.shard_len + slot.offset;
            shards[slot.unit].copy_from_slice(&buf[start..start + slot.shard_len]);
        }
        free.push(buf);
        Ok(true)
    }

    /// Makes sure bucket `b` has a buffer this step, taking one from the pool if needed.
    fn ensure_buffer(&mut self, b: usize) -> Result<()> {
        let needs =
            matches!(&self.storage, Storage::Pooled { assigned, .. } if assigned[b].is_none());
        if needs {
            let len = {
                let plan = self.plan.as_ref().expect("plan");
                plan.buckets[b].len(plan.world)
            };
            loop {
                let Storage::Pooled { free, assigned, .. } = &mut self.storage else {
                    unreachable!()
                };
                if let Some(mut buf) = free.pop() {
                    // Pool buffers have the largest bucket's capacity: no reallocation here.
                    buf.resize(len, 0.0);
                    assigned[b] = Some(buf);
                    break;
                }
                let started = Instant::now();
                self.retire_oldest()?;
                self.waited_in_backward_ms += started.elapsed().as_secs_f64() * 1e3;
            }
        }
        Ok(())
    }

    /// Hands over one unit's gradients of one micro-step.
    pub fn on_grads(&mut self, unit: usize, grads: &[f32], micro: MicroStep) -> Result<()> {
        if self.recording && micro.count == 1 {
            return self.record_online(unit, grads);
        }
        if self.recording {
            if micro.is_first() {
                self.arrivals.push((unit, grads.len()));
                self.staged[unit].clear();
                self.staged[unit].extend_from_slice(grads);
            } else {
                self.staged[unit]
                    .iter_mut()
                    .zip(grads)
                    .for_each(|(a, g)| *a += g);
            }
            return Ok(());
        }
        let plan = self.plan.as_ref().expect("checked above");
        let expected = plan.order.get(self.cursor).copied();
        if expected != Some(unit) {
            let wanted = expected.map_or("no unit".to_string(), |e| {
                format!("`{}`", self.unit_names[e])
            });
            return Err(KilnError::Comm(format!(
                "unit `{}` delivered gradients where the static bucket plan expects {wanted} (parallel.static_graph = true requires the same units in the same order every step)",
                self.unit_names[unit]
            )));
        }
        self.cursor = (self.cursor + 1) % plan.order.len();
        let (b, s) = plan.slot_of_unit[unit].expect("units in the order have slots");
        self.write_slot(b, s, grads, !micro.is_first())?;
        if micro.is_last() {
            self.arrived[b] += 1;
            if self.arrived[b] == self.plan.as_ref().expect("plan").buckets[b].slots.len() {
                self.launch(b);
            }
        }
        Ok(())
    }

    fn write_slot(&mut self, b: usize, s: usize, grads: &[f32], accumulate: bool) -> Result<()> {
        self.ensure_buffer(b)?;
        let plan = self.plan.as_ref().expect("plan");
        let buf = match &mut self.storage {
            Storage::PerBucket { buffers, .. } => {
                buffers[b].as_mut().expect("buckets are home between steps")
            }
            Storage::Pooled { assigned, .. } => {
                assigned[b].as_mut().expect("assigned by ensure_buffer")
            }
        };
        let bucket = &plan.buckets[b];
        bucket.write(buf, &bucket.slots[s], grads, plan.world, accumulate);
        Ok(())
    }

    /// Fresh storage for a plan being recorded.
    fn new_storage(&self, bucket_lens: &[usize]) -> Storage {
        if self.pooled {
            let largest = bucket_lens.iter().copied().max().unwrap_or(0);
            Storage::Pooled {
                free: (0..POOL_BUFFERS)
                    .map(|_| Vec::with_capacity(largest))
                    .collect(),
                assigned: bucket_lens.iter().map(|_| None).collect(),
                in_flight: VecDeque::new(),
                shards: self.shard_lens.iter().map(|&len| vec![0.0; len]).collect(),
            }
        } else {
            Storage::PerBucket {
                buffers: bucket_lens
                    .iter()
                    .map(|&len| Some(vec![0.0f32; len]))
                    .collect(),
                in_flight: bucket_lens.iter().map(|_| None).collect(),
            }
        }
    }

    /// Records one arrival of the recording step (no accumulation): the unit joins the open
    /// bucket; a bucket it closes is checked, filled and launched.
    fn record_online(&mut self, unit: usize, grads: &[f32]) -> Result<()> {
        let world = self.comm.world();
        if self.packer.is_none() {
            self.packer = Some(Packer::new(self.bucket_bytes, world));
            self.plan = Some(BucketPlan::empty(self.unit_names.len(), world));
            // Buffers come as buckets close; pool buffers grow to the largest bucket.
            self.storage = self.new_storage(&[]);
            self.allocations += 1;
        }
        self.arrivals.push((unit, grads.len()));
        self.plan.as_mut().expect("plan").order.push(unit);
        self.staged[unit].clear();
        self.staged[unit].extend_from_slice(grads);
        let closed = self
            .packer
            .as_mut()
            .expect("packer")
            .push(unit, grads.len());
        match closed {
            Some(bucket) => self.close_bucket(bucket),
            None => Ok(()),
        }
    }

    /// Checks a just-closed bucket across ranks, gives it a buffer, moves its units' staged
    /// gradients in and launches it.
    fn close_bucket(&mut self, bucket: Bucket) -> Result<()> {
        let world = self.comm.world();
        let plan = self.plan.as_mut().expect("recording has a plan");
        let hash = crate::rng::hash_str(&format!("{} {:?}", plan.buckets.len(), bucket));
        check_same_plan(self.comm.as_ref(), hash)?;
        let len = bucket.len(world);
        let units: Vec<usize> = bucket.slots.iter().map(|s| s.unit).collect();
        let b = plan.push_bucket(bucket);
        match &mut self.storage {
            Storage::PerBucket { buffers, in_flight } => {
                buffers.push(Some(vec![0.0f32; len]));
                in_flight.push(None);
            }
            Storage::Pooled { assigned, .. } => assigned.push(None),
        }
        for (s, unit) in units.into_iter().enumerate() {
            let staged = std::mem::take(&mut self.staged[unit]);
            self.write_slot(b, s, &staged, false)?;
        }
        self.launch(b);
        Ok(())
    }

    /// Ends an online recording: closes the last bucket and checks the whole plan.
    fn finish_online_recording(&mut self) -> Result<()> {
        let last = self.packer.take().expect("recording online").finish();
        if let Some(bucket) = last {
            self.close_bucket(bucket)?;
        }
        let plan = self.plan.as_ref().expect("plan");
        check_same_plan(self.comm.as_ref(), plan.hash())?;
        self.arrived = vec![0; plan.buckets.len()];
        self.arrivals.clear();
        Ok(())
    }

    /// Builds the plan from this step's arrivals, checks it across ranks, sets up storage, moves
    /// the staged gradients into the buckets and launches every bucket.
    fn finish_recording(&mut self) -> Result<()> {
        let world = self.comm.world();
        let plan = BucketPlan::build(
            &self.arrivals,
            self.unit_names.len(),
            self.bucket_bytes,
            world,
        );
        check_same_plan(self.comm.as_ref(), plan.hash())?;
        let num_buckets = plan.buckets.len();
        let lens: Vec<usize> = plan.buckets.iter().map(|b| b.len(world)).collect();
        self.storage = self.new_storage(&lens);
        self.allocations += 1;
        self.arrived = vec![0; num_buckets];
        self.plan = Some(plan);
        let staged = std::mem::take(&mut self.staged);
        for b in 0..num_buckets {
            let units: Vec<usize> = self.plan.as_ref().expect("plan").buckets[b]
                .slots
                .iter()
                .map(|s| s.unit)
                .collect();
            for (s, unit) in units.into_iter().enumerate() {
                self.write_slot(b, s, &staged[unit], false)?;
            }
            self.launch(b);
        }
        // Release the staged full-size gradients; recording happens again only without a
        // static graph.
        self.staged = vec![Vec::new(); self.unit_names.len()];
        self.arrivals.clear();
        Ok(())
    }

    /// Waits for every bucket and divides the reduced gradients by `divisor` (world × grad_accum:
    /// the gradients are sums of per-micro-batch means). Returns the milliseconds this step
    /// waited for communication (in backward for a pool buffer, and here).
    pub fn finish(&mut self, divisor: f32) -> Result<f64> {
        let started = Instant::now();
        if self.recording {
            if self.packer.is_some() {
                self.finish_online_recording()?;
            } else {
                self.finish_recording()?;
            }
            self.recording = !self.static_graph;
        } else if self.cursor != 0 {
            let missing = self.plan.as_ref().expect("plan").order[self.cursor];
            return Err(KilnError::Comm(format!(
                "unit `{}` delivered no gradients this step (parallel.static_graph = true)",
                self.unit_names[missing]
            )));
        }
        let rank = self.comm.rank();
        match &mut self.storage {
            Storage::PerBucket { buffers, in_flight } => {
                for (buf, pending) in buffers.iter_mut().zip(in_flight.iter_mut()) {
                    *buf = Some(pending.take().expect("every bucket was launched").wait()?);
                }
            }
            Storage::Pooled { .. } => while self.retire_oldest()? {},
        }
        self.arrived.iter_mut().for_each(|a| *a = 0);
        let waited =
            started.elapsed().as_secs_f64() * 1e3 + std::mem::take(&mut self.waited_in_backward_ms);
        let plan = self.plan.as_ref().expect("plan");
        match &mut self.storage {
            Storage::PerBucket { buffers, .. } => {
                for (buf, bucket) in buffers.iter_mut().zip(&plan.buckets) {
                    let buf = buf.as_mut().expect("home");
                    // After a reduce-scatter only this rank's shard of the bucket holds sums.
                    let valid = match self.reduction {
                        Reduction::AllReduce => &mut buf[..],
                        Reduction::ReduceScatter => {
                            &mut buf[rank * bucket.shard_len..(rank + 1) * bucket.shard_len]
                        }
                    };
                    valid.iter_mut().for_each(|g| *g /= divisor);
                }
            }
            Storage::Pooled { shards, .. } => {
                shards.iter_mut().flatten().for_each(|g| *g /= divisor)
            }
        }
        Ok(waited)
    }

    /// Shard `q` of `unit`'s reduced gradient (after [`finish`](Self::finish)); empty if the unit
    /// has no gradients. With `ReduceScatter` only `q == rank` is available.
    pub fn shard(&self, unit: usize, q: usize) -> &[f32] {
        let Some(plan) = self.plan.as_ref() else {
            return &[];
        };
        match &self.storage {
            Storage::PerBucket { buffers, .. } => match plan.shard_of(unit, q) {
                Some((b, range)) => {
                    &buffers[b].as_ref().expect("buckets are home after finish")[range]
                }
                None => &[],
            },
            Storage::Pooled { shards, .. } => {
                assert_eq!(
                    q,
                    self.comm.rank(),
                    "a reduce-scatter keeps only this rank's shard"
                );
                if plan.slot_of_unit[unit].is_some() {
                    &shards[unit]
                } else {
                    &[]
                }
            }
        }
    }
}

/// Errors unless every rank passes the same plan `hash`, naming the ranks that differ.
fn check_same_plan(comm: &dyn Communicator, hash: u64) -> Result<()> {
    comm.set_serves("the bucket plan check");
    let hashes = comm.all_gather_bytes(&hash.to_le_bytes())?;
    let ranks: Vec<String> = hashes
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != hashes[0])
        .map(|(r, _)| r.to_string())
        .collect();
    if ranks.is_empty() {
        return Ok(());
    }
    Err(KilnError::Comm(format!(
        "the gradient bucket plan of rank(s) {} differs from rank 0's (different arrival order or sizes)",
        ranks.join(", ")
    )))
}

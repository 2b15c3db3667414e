//! Gradient buckets (DDP paper, Li et al. 2020, §3.2.3): unit gradients are packed into buckets
//! in the order they arrive during backward; a full bucket is reduced while backward continues.
//! The first bucket is capped at 1 MiB (or `parallel.bucket_mb` if smaller) so that
//! communication starts early, later ones at `parallel.bucket_mb`. A unit is never split across buckets.
//!
//! A bucket is laid out rank-major: its shard q is shard q of every unit in the bucket, one after
//! another. An all-reduce does not care, and a reduce-scatter of the bucket then leaves each rank
//! exactly its own shard of every unit (ZeRO-2) — with the same per-element sums as DDP.

use crate::rng::hash_str;
use std::ops::Range;

/// One unit's place in a bucket: at `offset` inside each of the bucket's shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSlot {
    /// The unit.
    pub unit: usize,
    /// Offset of the unit's shard inside each bucket shard.
    pub offset: usize,
    /// The unit's shard length (its padded length ÷ world).
    pub shard_len: usize,
}

/// One bucket: the units it holds, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Units in arrival order.
    pub slots: Vec<BucketSlot>,
    /// Length of one of the bucket's `world` shards.
    pub shard_len: usize,
}

impl Bucket {
    /// Buffer length in elements.
    pub fn len(&self, world: usize) -> usize {
        self.shard_len * world
    }

    /// Copies (or adds, when `accumulate`) a unit's padded gradients into the rank-major layout.
    pub fn write(
        &self,
        buf: &mut [f32],
        slot: &BucketSlot,
        grads: &[f32],
        world: usize,
        accumulate: bool,
    ) {
        for q in 0..world {
            let dst = &mut buf[q * self.shard_len + slot.offset..][..slot.shard_len];
            let src = &grads[q * slot.shard_len..(q + 1) * slot.shard_len];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(a, g)| *a += g);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// The bucket plan: built from one step's arrival order, identical on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Buckets in the order they fill.
    pub buckets: Vec<Bucket>,
    /// Units in arrival order.
    pub order: Vec<usize>,
    /// For each unit: its bucket and slot, if it produced gradients.
    pub slot_of_unit: Vec<Option<(usize, usize)>>,
    /// World size the shards were cut for.
    pub world: usize,
}

/// Size of the first bucket (PyTorch DDP's first-bucket cap).
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// Greedy packing one arrival at a time, so that a plan can be built while backward runs: the
/// buckets are the same as packing all arrivals at once.
#[derive(Debug)]
pub struct Packer {
    bucket_bytes: usize,
    world: usize,
    closed: usize,
    current: Bucket,
}

impl Packer {
    /// An empty packer for `world` ranks.
    pub fn new(bucket_bytes: usize, world: usize) -> Self {
        Packer {
            bucket_bytes,
            world,
            closed: 0,
            current: Bucket {
                slots: Vec::new(),
                shard_len: 0,
            },
        }
    }

    /// Adds a unit with `len` padded gradient elements; returns the bucket this closed, if the
    /// unit did not fit in the open one.
    pub fn push(&mut self, unit: usize, len: usize) -> Option<Bucket> {
        let cap = if self.closed == 0 {
            FIRST_BUCKET_BYTES.min(self.bucket_bytes)
        } else {
            self.bucket_bytes
        } / 4;
        let mut full = None;
        if !self.current.slots.is_empty() && (self.current.shard_len * self.world + len) > cap {
            full = self.finish();
        }
        let shard_len = len / self.world;
        self.current.slots.push(BucketSlot {
            unit,
            offset: self.current.shard_len,
            shard_len,
        });
        self.current.shard_len += shard_len;
        full
    }

    /// Closes the open bucket, if it holds anything.
    pub fn finish(&mut self) -> Option<Bucket> {
        if self.current.slots.is_empty() {
            return None;
        }
        self.closed += 1;
        Some(std::mem::replace(
            &mut self.current,
            Bucket {
                slots: Vec::new(),
                shard_len: 0,
            },
        ))
    }
}

impl BucketPlan {
    /// A plan with no buckets yet, to be extended with [`push_bucket`](Self::push_bucket).
    pub fn empty(num_units: usize, world: usize) -> Self {
        BucketPlan {
            buckets: Vec::new(),
            order: Vec::new(),
            slot_of_unit: vec![None; num_units],
            world,
        }
    }

    /// Packs `arrivals` (unit, padded gradient length) in order for `world` ranks.
    pub fn build(
        arrivals: &[(usize, usize)],
        num_units: usize,
        bucket_bytes: usize,
        world: usize,
    ) -> Self {
        let mut plan = BucketPlan::empty(num_units, world);
        let mut packer = Packer::new(bucket_bytes, world);
        for &(unit, len) in arrivals {
            plan.order.push(unit);
            if let Some(b) = packer.push(unit, len) {
                plan.push_bucket(b);
            }
        }
        if let Some(b) = packer.finish() {
            plan.push_bucket(b);
        }
        plan
    }

    /// Appends a closed bucket; returns its index.
    pub fn push_bucket(&mut self, bucket: Bucket) -> usize {
        let b = self.buckets.len();
        for (s, slot) in bucket.slots.iter().enumerate() {
            self.slot_of_unit[slot.unit] = Some((b, s));
        }
        self.buckets.push(bucket);
        b
    }

    /// Where shard `q` of `unit`'s gradient lives: bucket index and range in its buffer.
    pub fn shard_of(&self, unit: usize, q: usize) -> Option<(usize, Range<usize>)> {
        let (b, s) = self.slot_of_unit[unit]?;
        let bucket = &self.buckets[b];
        let slot = &bucket.slots[s];
        let start = q * bucket.shard_len + slot.offset;
        Some((b, start..start + slot.shard_len))
    }

    /// A hash of the plan, compared across ranks.
    pub fn hash(&self) -> u64 {
        hash_str(&format!("{:?}", self.buckets))
    }
}

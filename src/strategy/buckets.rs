//! Gradient buckets (DDP paper, Li et al. 2020, §3.2.3): unit gradients are packed into buckets
//! in the order they arrive during backward; a full bucket is reduced while backward continues.
//! The first bucket is capped at 1 MiB so that communication starts early, later ones at
//! `parallel.bucket_mb`. A unit is never split across buckets.

use crate::rng::hash_str;
use std::ops::Range;

/// One bucket: the units it holds, in arrival order, and where each one sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// `(unit, range in the bucket buffer)` in arrival order.
    pub slots: Vec<(usize, Range<usize>)>,
    /// Buffer length in elements.
    pub len: usize,
}

/// The bucket plan: built from one step's arrival order, identical on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Buckets in the order they fill.
    pub buckets: Vec<Bucket>,
    /// Units in arrival order.
    pub order: Vec<usize>,
    /// For each unit: its bucket and range, if it produced gradients.
    pub slot_of_unit: Vec<Option<(usize, Range<usize>)>>,
}

/// Size of the first bucket (PyTorch DDP's `bucket_cap_mb` for the first bucket).
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;

impl BucketPlan {
    /// Packs `arrivals` (unit, gradient length) in order.
    pub fn build(arrivals: &[(usize, usize)], num_units: usize, bucket_bytes: usize) -> Self {
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut current = Bucket { slots: Vec::new(), len: 0 };
        for &(unit, len) in arrivals {
            let cap = if buckets.is_empty() { FIRST_BUCKET_BYTES } else { bucket_bytes } / 4;
            if !current.slots.is_empty() && current.len + len > cap {
                buckets.push(std::mem::replace(&mut current, Bucket { slots: Vec::new(), len: 0 }));
            }
            current.slots.push((unit, current.len..current.len + len));
            current.len += len;
        }
        if !current.slots.is_empty() {
            buckets.push(current);
        }
        let mut slot_of_unit = vec![None; num_units];
        for (b, bucket) in buckets.iter().enumerate() {
            for (unit, range) in &bucket.slots {
                slot_of_unit[*unit] = Some((b, range.clone()));
            }
        }
        BucketPlan { buckets, order: arrivals.iter().map(|a| a.0).collect(), slot_of_unit }
    }

    /// A hash of the plan, compared across ranks.
    pub fn hash(&self) -> u64 {
        hash_str(&format!("{:?}", self.buckets))
    }
}

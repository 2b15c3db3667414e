//! Tiers `none` and `cpu`: m and v as two vectors in this process's memory.

use super::{Access, ChunkFn, StateStore, Tier};
use crate::error::Result;

/// Optimizer state in host memory.
pub struct HostStore {
    tier: Tier,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl HostStore {
    /// Zeroed state of `len` elements.
    pub fn new(tier: Tier, len: usize) -> Self {
        HostStore {
            tier,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

impl StateStore for HostStore {
    fn tier(&self) -> Tier {
        self.tier
    }

    fn len(&self) -> usize {
        self.m.len()
    }

    fn stream(&mut self, _access: Access, f: &mut ChunkFn<'_>) -> Result<()> {
        // One chunk: the update's own rayon split is the parallelism.
        f(0..self.m.len(), &mut self.m, &mut self.v)
    }

    fn resident_bytes(&self) -> usize {
        (self.m.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

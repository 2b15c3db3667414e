//! Tiers `none` and `cpu`: the optimizer state's lanes as vectors in this process's memory.

use super::{Access, ChunkFn, StateFormat, StateStore, Tier};
use crate::error::Result;

/// Optimizer state in host memory.
pub struct HostStore {
    tier: Tier,
    len: usize,
    format: StateFormat,
    /// One vector of 4-byte words per lane (`StateFormat::lane_words`).
    lanes: Vec<Vec<f32>>,
}

impl HostStore {
    /// Zeroed state of `len` elements in `format`.
    pub fn new(tier: Tier, len: usize, format: StateFormat) -> Self {
        HostStore {
            tier,
            len,
            format,
            lanes: format.lane_words(len).map(|w| vec![0.0; w]).collect(),
        }
    }
}

impl StateStore for HostStore {
    fn tier(&self) -> Tier {
        self.tier
    }

    fn len(&self) -> usize {
        self.len
    }

    fn stream(&mut self, _access: Access, f: &mut ChunkFn<'_>) -> Result<()> {
        // One chunk: the update's own rayon split is the parallelism.
        let lanes = self.lanes.iter_mut().map(|l| l.as_mut_slice()).collect();
        f(0..self.len, self.format.chunk(lanes, self.len))
    }

    fn resident_bytes(&self) -> usize {
        self.format.bytes(self.len)
    }
}

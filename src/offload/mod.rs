//! The `StateStore` seam: where a rank's AdamW moments (m and v) live between steps, one tier per
//! run (`offload.optimizer`, DeepSpeed's names):
//!
//! | tier | where m and v are | resident in this process |
//! |---|---|---|
//! | `none` | host memory, owned by the strategy | all of it |
//! | `cpu` | host memory | all of it |
//! | `nvme` | one preallocated file per rank under `offload.nvme_path` | `buffer_count` chunks |
//!
//! kiln computes on the CPU, so `none` and `cpu` hold the same bytes in the same memory: on a
//! GPU backend `cpu` is the tier that moves the states off the device; here it only names the
//! placement. `nvme` is the one that frees host memory.
//!
//! Strategies see the state as one flat array per rank, laid out segment after segment by a
//! `StateLayout`, and reach it only through `StateStore::stream`, which hands it over in order,
//! one chunk at a time. The strategy's update therefore never knows the tier, and every tier
//! applies the same element-wise arithmetic to the same elements: results are bitwise equal.

pub(crate) mod aligned;
mod host;
mod nvme;

pub use host::HostStore;
pub use nvme::NvmeStore;

use crate::config::OffloadConfig;
use crate::error::Result;
use crate::flat::ModelLayout;
use std::ops::Range;

/// The offload tier of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Optimizer states next to the parameters.
    None,
    /// Optimizer states in host memory.
    Cpu,
    /// Optimizer states in files, streamed at each step.
    Nvme,
}

impl Tier {
    /// Parses `offload.optimizer`.
    pub fn parse(name: &str) -> Option<Tier> {
        match name {
            "none" => Some(Tier::None),
            "cpu" => Some(Tier::Cpu),
            "nvme" => Some(Tier::Nvme),
            _ => None,
        }
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::None => "none",
            Tier::Cpu => "cpu",
            Tier::Nvme => "nvme",
        }
    }
}

/// What `StateStore::stream` does with a chunk after the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The callback only reads m and v (saving a checkpoint).
    Read,
    /// The callback changes m and v (the optimizer step, loading a checkpoint).
    ReadWrite,
}

/// The callback of `StateStore::stream`: a range of the flat state and its m and v.
pub type ChunkFn<'a> = dyn FnMut(Range<usize>, &mut [f32], &mut [f32]) -> Result<()> + 'a;

/// A rank's AdamW moments, wherever they live.
pub trait StateStore: Send {
    /// The tier.
    fn tier(&self) -> Tier;
    /// Number of elements in m (and in v).
    fn len(&self) -> usize;
    /// Whether there is no state at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Hands the whole state to `f` in order, in consecutive ranges that cover `0..len()`.
    fn stream(&mut self, access: Access, f: &mut ChunkFn<'_>) -> Result<()>;
    /// Bytes of optimizer state held in this process's memory.
    fn resident_bytes(&self) -> usize;
    /// Bytes of optimizer state held outside memory (files).
    fn offloaded_bytes(&self) -> usize {
        0
    }
}

/// Opens the store of `tier` for `len` elements of m and v on `rank`, all zero.
pub fn open(
    tier: Tier,
    config: &OffloadConfig,
    rank: usize,
    len: usize,
) -> Result<Box<dyn StateStore>> {
    Ok(match tier {
        Tier::None | Tier::Cpu => Box::new(HostStore::new(tier, len)),
        Tier::Nvme => Box::new(NvmeStore::create(config, rank, len)?),
    })
}

/// One run of the flat state: shard `shard` of unit `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSegment {
    /// Unit index.
    pub unit: usize,
    /// Shard index (the rank that owns it at this world size).
    pub shard: usize,
    /// First element in the flat state.
    pub start: usize,
    /// Elements (the shard's length, padding included).
    pub len: usize,
}

/// How a rank's flat state is laid out: for every unit in order, the shards the rank updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    /// Segments in flat order.
    pub segments: Vec<StateSegment>,
    /// Total elements.
    pub len: usize,
}

impl StateLayout {
    /// The state of shards `shards` of every unit of `layout`.
    pub fn new(layout: &ModelLayout, shards: Range<usize>) -> Self {
        let mut segments = Vec::new();
        let mut start = 0;
        for (unit, u) in layout.units.iter().enumerate() {
            let len = u.padded_len / layout.world;
            for shard in shards.clone() {
                segments.push(StateSegment {
                    unit,
                    shard,
                    start,
                    len,
                });
                start += len;
            }
        }
        StateLayout {
            segments,
            len: start,
        }
    }

    /// The parts of flat range `r`: each segment it touches, with the touched elements as a
    /// range inside that segment (shard-local offsets).
    pub fn split(&self, r: Range<usize>) -> impl Iterator<Item = (&StateSegment, Range<usize>)> {
        let first = self
            .segments
            .partition_point(|s| s.start + s.len <= r.start);
        self.segments[first..]
            .iter()
            .take_while(move |s| s.start < r.end)
            .filter_map(move |s| {
                let lo = r.start.max(s.start) - s.start;
                let hi = r.end.min(s.start + s.len) - s.start;
                (lo < hi).then_some((s, lo..hi))
            })
    }
}

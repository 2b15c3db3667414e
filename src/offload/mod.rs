//! The `StateStore` seam: where a rank's optimizer state (AdamW's m and v, Lion's m, 8-bit
//! AdamW's quantized blocks) lives between steps, one tier per run (`offload.optimizer`,
//! DeepSpeed's names):
//!
//! | tier | where the state is | resident in this process |
//! |---|---|---|
//! | `none` | host memory, owned by the strategy | all of it |
//! | `cpu` | host memory | all of it |
//! | `nvme` | one preallocated file per rank under `offload.nvme_path` | `buffer_count` chunks |
//!
//! kiln computes on the CPU, so `none` and `cpu` hold the same bytes in the same memory: on a
//! GPU backend `cpu` is the tier that moves the states off the device; here it only names the
//! placement. `nvme` is the one that frees host memory.
//!
//! Strategies see the state as flat arrays per rank ([`StateFormat`]'s lanes), laid out segment
//! after segment by a `StateLayout`, and reach it only through `StateStore::stream`, which hands
//! it over in order, one chunk at a time. The strategy's update therefore never knows the tier,
//! and every tier applies the same element-wise arithmetic to the same elements: results are
//! bitwise equal. Which lanes exist is the optimizer's business (`optim::OptimizerKind::format`);
//! the stores only size and move them.

pub(crate) mod aligned;
mod host;
mod nvme;
mod params;

pub use host::HostStore;
pub use nvme::NvmeStore;
pub use params::{ParamAccess, ParamShards};

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

/// The arrays an optimizer keeps per element of the flat state: `floats` f32 lanes (one value
/// per element: AdamW's m and v), and `quantized` lanes of one byte per element, each with one
/// f32 scale per [`StateFormat::BLOCK`] elements (8-bit AdamW's codes and block absmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFormat {
    /// f32 lanes.
    pub floats: usize,
    /// Byte lanes, each with its lane of block scales.
    pub quantized: usize,
}

impl StateFormat {
    /// Elements per scale of a quantized lane: the flat layout's shard grain, so that blocks
    /// never straddle a shard boundary (`flat::SHARD_GRAIN`).
    pub const BLOCK: usize = crate::flat::SHARD_GRAIN;

    /// The 4-byte words each lane takes for `len` elements, in lane order: the f32 lanes, the
    /// byte lanes (four codes per word), then their scale lanes. `len` is a multiple of
    /// [`StateFormat::BLOCK`] when there are byte lanes (every `StateLayout`'s is).
    pub fn lane_words(&self, len: usize) -> impl Iterator<Item = usize> {
        self.lanes().map(move |lane| match lane {
            Lane::Floats => len,
            Lane::Codes => len.div_ceil(4),
            Lane::Scales => len.div_ceil(Self::BLOCK),
        })
    }

    /// What each lane holds, in lane order: the f32 lanes, the byte lanes, their scale lanes.
    pub fn lanes(&self) -> impl Iterator<Item = Lane> {
        let floats = std::iter::repeat_n(Lane::Floats, self.floats);
        let codes = std::iter::repeat_n(Lane::Codes, self.quantized);
        let scales = std::iter::repeat_n(Lane::Scales, self.quantized);
        floats.chain(codes).chain(scales)
    }

    /// Bytes of state for `len` elements.
    pub fn bytes(&self, len: usize) -> usize {
        self.lane_words(len).sum::<usize>() * 4
    }

    /// Elements per chunk of the nvme tier: about `chunk_mb` MiB of state, at most `len`
    /// rounded up, and a multiple of the grain that keeps every lane's bytes — so every
    /// transfer's offset and length — a multiple of `aligned::ALIGN` (O_DIRECT's rule).
    pub fn chunk_len(&self, chunk_mb: f64, len: usize) -> usize {
        let grain = if self.quantized > 0 {
            // A scale lane has 4 bytes per BLOCK elements.
            aligned::ALIGN / 4 * Self::BLOCK
        } else if self.floats > 0 {
            aligned::ALIGN / 4
        } else {
            return 0;
        };
        let per_grain = self.bytes(grain);
        let wanted = (chunk_mb * (1 << 20) as f64 / per_grain as f64) as usize;
        wanted.max(1).min(len.div_ceil(grain).max(1)) * grain
    }

    /// Splits lane storage (`lane_words(len)` words each, in order) into a chunk's typed views
    /// of its first `n` elements.
    pub fn chunk<'a>(&self, lanes: Vec<&'a mut [f32]>, n: usize) -> StateChunk<'a> {
        let mut lanes = lanes.into_iter();
        let floats = lanes
            .by_ref()
            .take(self.floats)
            .map(|l| &mut l[..n])
            .collect();
        let codes = lanes
            .by_ref()
            .take(self.quantized)
            .map(|l| &mut f32s_as_bytes_mut(l)[..n])
            .collect();
        let scales = lanes.map(|l| &mut l[..n.div_ceil(Self::BLOCK)]).collect();
        StateChunk {
            floats,
            codes,
            scales,
        }
    }
}

/// What one lane of a [`StateFormat`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// One f32 per element.
    Floats,
    /// One byte (a code) per element.
    Codes,
    /// One f32 per [`StateFormat::BLOCK`] elements.
    Scales,
}

/// One chunk of the flat state, lane by lane (a [`StateFormat`]'s): element `i` of the chunk is
/// `floats[k][i]` and `codes[k][i]`, with scale `scales[k][i / BLOCK]`.
pub struct StateChunk<'a> {
    /// The f32 lanes.
    pub floats: Vec<&'a mut [f32]>,
    /// The byte lanes.
    pub codes: Vec<&'a mut [u8]>,
    /// One scale per block of each byte lane.
    pub scales: Vec<&'a mut [f32]>,
}

impl StateChunk<'_> {
    /// The elements `r` of every lane (`r` starts on a block boundary when there are byte
    /// lanes).
    pub fn slice(&mut self, r: Range<usize>) -> StateChunk<'_> {
        let block = StateFormat::BLOCK;
        debug_assert!(self.codes.is_empty() || r.start % block == 0);
        let blocks = r.start / block..r.end.div_ceil(block);
        StateChunk {
            floats: self.floats.iter_mut().map(|l| &mut l[r.clone()]).collect(),
            codes: self.codes.iter_mut().map(|l| &mut l[r.clone()]).collect(),
            scales: self
                .scales
                .iter_mut()
                .map(|l| &mut l[blocks.clone()])
                .collect(),
        }
    }
}

/// A lane of words viewed as its bytes (a byte lane's codes).
fn f32s_as_bytes_mut(words: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no padding and alignment ≥ u8's; any byte pattern is a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, std::mem::size_of_val(words))
    }
}

/// The callback of `StateStore::stream`: a range of the flat state and its lanes.
pub type ChunkFn<'a> = dyn FnMut(Range<usize>, StateChunk<'_>) -> Result<()> + 'a;

/// A rank's optimizer state, wherever it lives.
pub trait StateStore: Send {
    /// The tier.
    fn tier(&self) -> Tier;
    /// Number of elements of the flat state (of each lane).
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

/// Opens the store of `tier` for `len` elements of state in `format` on `rank`, all zero.
pub fn open(
    tier: Tier,
    config: &OffloadConfig,
    rank: usize,
    len: usize,
    format: StateFormat,
) -> Result<Box<dyn StateStore>> {
    Ok(match tier {
        Tier::None | Tier::Cpu => Box::new(HostStore::new(tier, len, format)),
        Tier::Nvme => Box::new(NvmeStore::create(config, rank, len, format)?),
    })
}

/// Reserves `bytes` of the file at `path` now, so that a full disk fails at start with one line
/// naming the file and `what` it holds, not in the middle of a step. `file` must be a buffered
/// descriptor: without fallocate (ext2, NFSv3…) glibc reserves the blocks by writing a byte into
/// each, which O_DIRECT refuses. Where nothing can reserve blocks the file is only sized: a
/// sparse file reads as zeros all the same, and a full disk shows at a write instead, as an
/// error naming the file.
pub(crate) fn reserve(
    file: &std::fs::File,
    path: &std::path::Path,
    bytes: u64,
    what: &str,
) -> Result<()> {
    use crate::error::KilnError;
    use std::os::unix::io::AsRawFd;
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: a valid open descriptor and in-range lengths.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC => Err(KilnError::file(
            path,
            format!(
                "no space left for {:.1} MiB of {what} (offload.nvme_path)",
                bytes as f64 / (1 << 20) as f64
            ),
        )),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(bytes).map_err(|e| KilnError::io(path, e)),
        other => Err(KilnError::io(
            path,
            std::io::Error::from_raw_os_error(other),
        )),
    }
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

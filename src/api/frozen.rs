//! Frozen parameters (burn's `no_grad`): no gradient buffer, no bucket slot and no optimizer
//! state at any stage, so they live outside the strategy's flat buffers. At stages 0–2 every
//! rank holds them whole; at stage 3 each rank holds shard r of every unit's frozen buffer and
//! gathers a unit's just before its forward (and again for a recompute), as ZeRO-3 does for
//! the trainable ones.
//!
//! A frozen value is only ever read in the compute dtype, so under bf16/fp16 it is stored in
//! it (half the bytes, the same bits after the cast), and QLoRA's linear weights in NF4
//! (`api::nf4`). Either way it sits in f32 words — two halves, or NF4's absmax and codes, to a
//! word — so the stage-3 shards and gathers carry it unchanged (a gather copies bits).

use crate::comm::{padded_len, Communicator};
use crate::error::Result;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// How a frozen parameter is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    F32,
    /// The compute dtype, two values to a word.
    Half(crate::halves::Half),
    /// QLoRA: NF4 blocks of a weight of burn's `[d_in, d_out]`.
    Nf4([usize; 2]),
}

impl Storage {
    /// `values` as stored, in f32 words.
    fn encode(self, values: &[f32]) -> Vec<f32> {
        match self {
            Storage::F32 => values.to_vec(),
            Storage::Half(h) => h.pack(values),
            Storage::Nf4(dims) => super::nf4::encode(values, dims),
        }
    }

    /// The `numel` values `stored` holds, widened to f32 (exactly: a half or an NF4 level times
    /// its absmax is what the compute dtype would have read).
    fn decode(self, stored: &[f32], numel: usize) -> Vec<f32> {
        match self {
            Storage::F32 => stored.to_vec(),
            Storage::Half(h) => {
                let mut out = vec![0.0; numel];
                h.unpack_into(stored, &mut out);
                out
            }
            Storage::Nf4(dims) => super::nf4::decode(stored, dims),
        }
    }
}

/// One frozen parameter: where it lies in its unit's buffer, and how it is stored there.
pub(crate) struct FrozenEntry {
    pub path: String,
    /// Its range of the unit's (unpadded) buffer, in f32 words.
    pub range: Range<usize>,
    pub storage: Storage,
    /// Its number of elements.
    pub numel: usize,
}

impl FrozenEntry {
    /// Its values, widened to f32, from the unit's whole buffer `buf`.
    pub fn values(&self, buf: &[f32]) -> Vec<f32> {
        self.storage.decode(&buf[self.range.clone()], self.numel)
    }
}

/// One unit's frozen parameters, laid out in path order.
pub(crate) struct FrozenUnit {
    /// Each parameter: path, range, storage.
    pub entries: Vec<FrozenEntry>,
    /// The buffer length, padded to a multiple of the world size.
    padded: usize,
    /// The whole padded buffer, or this rank's shard of it (stage 3).
    held: Vec<f32>,
}

/// Every unit's frozen parameters on this rank.
pub(crate) struct Frozen {
    comm: Arc<dyn Communicator>,
    sharded: bool,
    pub units: Vec<FrozenUnit>,
}

impl Frozen {
    /// Lays out `per_unit` (each unit's (path, values) in order), each stored as `storage`
    /// says, and keeps what this rank holds: all of it, or with `sharded` its own shard.
    pub fn new(
        comm: Arc<dyn Communicator>,
        sharded: bool,
        per_unit: Vec<Vec<(String, Vec<f32>)>>,
        storage: impl Fn(&str) -> Storage,
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world());
        let units = per_unit
            .into_iter()
            .map(|params| {
                let mut entries = Vec::new();
                let mut buf = Vec::new();
                for (path, values) in params {
                    let storage = storage(&path);
                    let stored = storage.encode(&values);
                    let range = buf.len()..buf.len() + stored.len();
                    entries.push(FrozenEntry {
                        path,
                        range,
                        storage,
                        numel: values.len(),
                    });
                    buf.extend_from_slice(&stored);
                }
                let padded = padded_len(buf.len(), world);
                buf.resize(padded, 0.0);
                let held = if sharded {
                    let len = padded / world;
                    buf[rank * len..(rank + 1) * len].to_vec()
                } else {
                    buf
                };
                FrozenUnit {
                    entries,
                    padded,
                    held,
                }
            })
            .collect();
        Frozen {
            comm,
            sharded,
            units,
        }
    }

    /// Unit `unit`'s whole frozen buffer: what this rank holds, or gathered from
    /// every rank's shard (a collective: every rank asks for the same units in the same order).
    pub fn values(&self, unit: usize) -> Result<Cow<'_, [f32]>> {
        let u = &self.units[unit];
        if !self.sharded || u.padded == 0 {
            return Ok(Cow::Borrowed(&u.held));
        }
        let len = u.held.len();
        let rank = self.comm.rank();
        let mut buf = vec![0.0f32; u.padded];
        buf[rank * len..(rank + 1) * len].copy_from_slice(&u.held);
        self.comm
            .set_serves(&format!("the frozen parameters of unit {unit}"));
        self.comm.all_gather(buf).wait().map(Cow::Owned)
    }

    /// Bytes held on this rank.
    pub fn bytes(&self) -> usize {
        self.units.iter().map(|u| u.held.len() * 4).sum()
    }

    /// CRC-32 of every frozen value, in unit and path order (identical at every world size):
    /// a checkpoint holds no frozen values, so resuming checks they are the same.
    pub fn checksum(all: &[Vec<(String, Vec<f32>)>]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for (path, values) in all.iter().flatten() {
            h.update(path.as_bytes());
            for v in values {
                h.update(&v.to_le_bytes());
            }
        }
        h.finalize()
    }
}

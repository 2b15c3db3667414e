//! Frozen parameters (burn's `no_grad`): no gradient buffer, no bucket slot and no optimizer
//! state at any stage, so they live outside the strategy's flat buffers. At stages 0–2 every
//! rank holds them whole; at stage 3 each rank holds shard r of every unit's frozen buffer and
//! gathers a unit's just before its forward (and again for a recompute), as ZeRO-3 does for
//! the trainable ones.

use crate::comm::{padded_len, Communicator};
use crate::error::Result;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// One unit's frozen parameters, laid out in path order.
pub(crate) struct FrozenUnit {
    /// Each parameter's path and its range of the unit's (unpadded) buffer.
    pub entries: Vec<(String, Range<usize>)>,
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
    /// Lays out `per_unit` (each unit's (path, values) in order) and keeps what this rank
    /// holds: all of it, or with `sharded` its own shard.
    pub fn new(
        comm: Arc<dyn Communicator>,
        sharded: bool,
        per_unit: Vec<Vec<(String, Vec<f32>)>>,
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world());
        let units = per_unit
            .into_iter()
            .map(|params| {
                let mut entries = Vec::new();
                let mut buf = Vec::new();
                for (path, values) in params {
                    entries.push((path, buf.len()..buf.len() + values.len()));
                    buf.extend_from_slice(&values);
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

//! A rank's checkpoint file and loading at any world size. At world N, rank r's file holds
//! shard r (as `UnitLayout::shard` cuts it) of every unit: parameters, `exp_avg` (m) and
//! `exp_avg_sq` (v), padding included. Every stage writes the same thing — DDP ranks hold every
//! shard but write only their own, so each byte is written once. Loading works in unit
//! coordinates: whatever range a rank needs at its new world size and stage is read from the
//! old shards that overlap it, so resharding is a read pattern, not a conversion.

use super::manifest::Manifest;
use crate::error::{KilnError, Result};
use crate::offload::Access;
use crate::strategy::{ParamsHeld, StateView};
use crate::tensor_file::{TensorFileReader, TensorFileWriter};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// Tensor kinds in a rank file.
pub const PARAM: &str = "param";
/// AdamW first moment (PyTorch's name).
pub const EXP_AVG: &str = "exp_avg";
/// AdamW second moment (PyTorch's name).
pub const EXP_AVG_SQ: &str = "exp_avg_sq";

fn tensor_name(kind: &str, unit: &str) -> String {
    format!("{kind}.{unit}")
}

/// Writes rank `rank`'s shard of parameters and optimizer state to `path`, streaming the state
/// from its store (no copy of it is made in memory).
pub fn write_rank_file(path: &Path, view: StateView<'_>, rank: usize, step: u64) -> Result<()> {
    let StateView {
        layout,
        params,
        held,
        state,
        store,
    } = view;
    let world = layout.world;
    let mut tensors = Vec::new();
    for kind in [PARAM, EXP_AVG, EXP_AVG_SQ] {
        for u in &layout.units {
            tensors.push((tensor_name(kind, &u.name), vec![u.padded_len / world]));
        }
    }
    let metadata = BTreeMap::from([
        ("rank".to_string(), rank.to_string()),
        ("world".to_string(), world.to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    let writer = TensorFileWriter::create(path, &tensors, &metadata)?;
    for (u, unit) in layout.units.iter().enumerate() {
        let own = match held {
            ParamsHeld::FullUnits => &params[u][unit.shard(rank, world).range()],
            ParamsHeld::OwnShards => &params[u][..],
        };
        writer.write(&tensor_name(PARAM, &unit.name), 0, own)?;
    }
    store.stream(Access::Read, &mut |chunk, m, v| {
        for (seg, sub) in state.split(chunk.clone()) {
            if seg.shard != rank {
                continue;
            }
            let name = &layout.units[seg.unit].name;
            let at = seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
            writer.write(&tensor_name(EXP_AVG, name), sub.start, &m[at.clone()])?;
            writer.write(&tensor_name(EXP_AVG_SQ, name), sub.start, &v[at])?;
        }
        Ok(())
    })?;
    writer.finish()
}

/// The rank files of one checkpoint, read in unit coordinates.
pub struct CheckpointReader<'a> {
    manifest: &'a Manifest,
    files: Vec<TensorFileReader>,
}

impl<'a> CheckpointReader<'a> {
    /// Opens every rank file of the checkpoint in `dir`.
    pub fn open(dir: &Path, manifest: &'a Manifest) -> Result<Self> {
        let files = manifest
            .files
            .iter()
            .map(|f| TensorFileReader::open(&dir.join(&f.name)))
            .collect::<Result<_>>()?;
        Ok(CheckpointReader { manifest, files })
    }

    /// Elements `range` of unit `unit`'s flat buffer of `kind`, whoever wrote them. Elements past
    /// the unit's parameters (padding at the new world size) read as zero.
    pub fn read(
        &self,
        kind: &str,
        unit: usize,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let layout = &self.manifest.layout.units[unit];
        let shard_len = layout.padded_len / self.manifest.world;
        let name = tensor_name(kind, &layout.name);
        let mut x = range.start;
        while x < range.end {
            let dst = x - range.start;
            if x >= layout.numel {
                out[dst..].fill(0.0);
                break;
            }
            let q = x / shard_len;
            let end = range.end.min((q + 1) * shard_len).min(layout.numel);
            self.files[q].read(&name, x - q * shard_len, &mut out[dst..dst + end - x])?;
            x = end;
        }
        Ok(())
    }
}

/// Loads parameters and optimizer state into `view` (this rank at its own world size and stage).
pub fn load(reader: &CheckpointReader<'_>, view: StateView<'_>, rank: usize) -> Result<()> {
    let StateView {
        layout,
        params,
        held,
        state,
        store,
    } = view;
    let world = layout.world;
    for (u, unit) in layout.units.iter().enumerate() {
        if reader.manifest.layout.units.get(u).map(|o| &o.name) != Some(&unit.name) {
            return Err(KilnError::config(format!(
                "checkpoint unit {u} is not `{}`: written for another model",
                unit.name
            )));
        }
        let range = match held {
            ParamsHeld::FullUnits => 0..unit.padded_len,
            ParamsHeld::OwnShards => unit.shard(rank, world).range(),
        };
        reader.read(PARAM, u, range, &mut params[u])?;
    }
    store.stream(Access::ReadWrite, &mut |chunk, m, v| {
        for (seg, sub) in state.split(chunk.clone()) {
            let start = layout.units[seg.unit].shard(seg.shard, world).start.0;
            let in_unit = start + sub.start..start + sub.end;
            let at = seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
            reader.read(EXP_AVG, seg.unit, in_unit.clone(), &mut m[at.clone()])?;
            reader.read(EXP_AVG_SQ, seg.unit, in_unit, &mut v[at])?;
        }
        Ok(())
    })
}

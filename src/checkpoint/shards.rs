//! A rank's checkpoint file and loading at any world size. At world N, rank r's file holds
//! shard r (as `UnitLayout::shard` cuts it) of every unit: parameters and each lane of the
//! optimizer state under its `OptimizerKind::lane_names` name (AdamW's `exp_avg` (m) and
//! `exp_avg_sq` (v); 8-bit AdamW's codes as U8 and block scales), padding included. Every stage writes the same thing — DDP ranks hold every
//! shard but write only their own, so each byte is written once. Loading works in unit
//! coordinates: whatever range a rank needs at its new world size and stage is read from the
//! old shards that overlap it, so resharding is a read pattern, not a conversion.

use super::manifest::Manifest;
use crate::error::{KilnError, Result};
use crate::offload::{Access, Lane, StateFormat};
use crate::strategy::{ParamsHeld, StateView};
use crate::tensor_file::{StoredDtype, TensorFileReader, TensorFileWriter};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// The parameters' tensor kind in a rank file (the optimizer's lanes are the others).
pub const PARAM: &str = "param";

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
        optimizer,
        store,
    } = view;
    let world = layout.world;
    let format = optimizer.format();
    let lanes = optimizer.lane_names();
    let mut tensors = Vec::new();
    for u in &layout.units {
        tensors.push((
            tensor_name(PARAM, &u.name),
            vec![u.padded_len / world],
            StoredDtype::F32,
        ));
    }
    for (lane, kind) in format.lanes().zip(lanes) {
        let (dtype, grain) = match lane {
            Lane::Floats => (StoredDtype::F32, 1),
            Lane::Codes => (StoredDtype::U8, 1),
            Lane::Scales => (StoredDtype::F32, StateFormat::BLOCK),
        };
        for u in &layout.units {
            let len = u.padded_len / world / grain;
            tensors.push((tensor_name(kind, &u.name), vec![len], dtype));
        }
    }
    let metadata = BTreeMap::from([
        ("rank".to_string(), rank.to_string()),
        ("world".to_string(), world.to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    let writer = TensorFileWriter::create_typed(path, &tensors, &metadata)?;
    for (u, unit) in layout.units.iter().enumerate() {
        let values = params.unit_mut(u)?;
        let own = match held {
            ParamsHeld::FullUnits => &values[unit.shard(rank, world).range()],
            ParamsHeld::OwnShards => &values[..],
        };
        writer.write(&tensor_name(PARAM, &unit.name), 0, own)?;
    }
    params.flush()?;
    store.stream(Access::Read, &mut |chunk, mut chunk_lanes| {
        for (seg, sub) in state.split(chunk.clone()) {
            if seg.shard != rank {
                continue;
            }
            let unit = &layout.units[seg.unit].name;
            let at = seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
            let part = chunk_lanes.slice(at);
            // The chunk's lanes in lane order, as `lane_names` names them.
            let mut names = lanes.iter().map(|kind| tensor_name(kind, unit));
            let mut name = || names.next().expect("a name per lane");
            for l in &part.floats {
                writer.write(&name(), sub.start, l)?;
            }
            for l in &part.codes {
                writer.write_bytes(&name(), sub.start, l)?;
            }
            for l in &part.scales {
                writer.write(&name(), sub.start / StateFormat::BLOCK, l)?;
            }
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
        self.read_lane(kind, unit, 1, range, out)
    }

    /// [`read`](Self::read) for a lane with one value per `grain` elements of the flat buffer
    /// (`range` counts those values), of f32s or bytes.
    fn read_lane<T: LaneValue>(
        &self,
        kind: &str,
        unit: usize,
        grain: usize,
        range: Range<usize>,
        out: &mut [T],
    ) -> Result<()> {
        let layout = &self.manifest.layout.units[unit];
        let shard_len = layout.padded_len / self.manifest.world / grain;
        let numel = layout.numel.div_ceil(grain);
        let name = tensor_name(kind, &layout.name);
        let mut x = range.start;
        while x < range.end {
            let dst = x - range.start;
            if x >= numel {
                out[dst..].fill(T::default());
                break;
            }
            let q = x / shard_len;
            let end = range.end.min((q + 1) * shard_len).min(numel);
            T::read(
                &self.files[q],
                &name,
                x - q * shard_len,
                &mut out[dst..dst + end - x],
            )?;
            x = end;
        }
        Ok(())
    }
}

/// What a lane holds: f32s or (8-bit codes) bytes.
trait LaneValue: Copy + Default {
    fn read(file: &TensorFileReader, name: &str, at: usize, out: &mut [Self]) -> Result<()>;
}

impl LaneValue for f32 {
    fn read(file: &TensorFileReader, name: &str, at: usize, out: &mut [f32]) -> Result<()> {
        file.read(name, at, out)
    }
}

impl LaneValue for u8 {
    fn read(file: &TensorFileReader, name: &str, at: usize, out: &mut [u8]) -> Result<()> {
        file.read_bytes(name, at, out)
    }
}

/// Loads parameters and optimizer state into `view` (this rank at its own world size and stage).
pub fn load(reader: &CheckpointReader<'_>, view: StateView<'_>, rank: usize) -> Result<()> {
    let StateView {
        layout,
        params,
        held,
        state,
        optimizer,
        store,
    } = view;
    let world = layout.world;
    let lanes = optimizer.lane_names();
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
        reader.read(PARAM, u, range, params.unit_mut(u)?)?;
    }
    params.flush()?;
    store.stream(Access::ReadWrite, &mut |chunk, mut chunk_lanes| {
        for (seg, sub) in state.split(chunk.clone()) {
            let start = layout.units[seg.unit].shard(seg.shard, world).start.0;
            let in_unit = start + sub.start..start + sub.end;
            let at = seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
            let mut part = chunk_lanes.slice(at);
            let mut names = lanes.iter();
            for l in part.floats.iter_mut() {
                let kind = names.next().expect("a name per lane");
                reader.read_lane(kind, seg.unit, 1, in_unit.clone(), l)?;
            }
            for l in part.codes.iter_mut() {
                let kind = names.next().expect("a name per lane");
                reader.read_lane(kind, seg.unit, 1, in_unit.clone(), l)?;
            }
            let block = StateFormat::BLOCK;
            let blocks = in_unit.start / block..in_unit.end.div_ceil(block);
            for l in part.scales.iter_mut() {
                let kind = names.next().expect("a name per lane");
                reader.read_lane(kind, seg.unit, block, blocks.clone(), l)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::{DataPosition, FileEntry, FORMAT};
    use crate::flat::{ModelLayout, UnitLayout};
    use crate::model::{Init, ParamSpec};
    use crate::offload::{HostStore, StateLayout, StateStore, Tier};
    use crate::optim::OptimizerKind;

    fn layout(world: usize) -> ModelLayout {
        // Neither unit's length is a multiple of the block or of 2 or 3.
        let unit = |name: &str, lens: &[usize]| {
            let specs: Vec<ParamSpec> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| ParamSpec {
                    path: format!("{name}.p{i}"),
                    shape: vec![n],
                    init: Init::Zeros,
                    decay: true,
                })
                .collect();
            UnitLayout::new(name.into(), &specs, world)
        };
        ModelLayout {
            units: vec![unit("a", &[1001, 333]), unit("b", &[2917])],
            world,
        }
    }

    /// A value of each lane as a function of (lane, unit, offset in the unit or block index),
    /// zero past the unit's parameters, as real state is.
    fn code(lane: usize, unit: usize, at: usize) -> u8 {
        (at * 7 + unit * 31 + lane * 3) as u8 | 1
    }
    fn scale(lane: usize, unit: usize, block: usize) -> f32 {
        1.0 + block as f32 * 0.5 + unit as f32 * 100.0 + lane as f32 * 1000.0
    }

    /// Runs `f` over every element of rank `rank`'s state at `layout`'s world size, with the
    /// element's unit, unit offset and the lanes of its chunk.
    fn fill_or_check(layout: &ModelLayout, rank: usize, store: &mut dyn StateStore, check: bool) {
        let world = layout.world;
        let state = StateLayout::new(layout, rank..rank + 1);
        let block = StateFormat::BLOCK;
        store
            .stream(Access::ReadWrite, &mut |chunk, mut lanes| {
                for (seg, sub) in state.split(chunk.clone()) {
                    let unit = &layout.units[seg.unit];
                    let start = unit.shard(seg.shard, world).start.0 + sub.start;
                    let at = seg.start + sub.start - chunk.start..seg.start + sub.end - chunk.start;
                    let part = lanes.slice(at);
                    for (lane, codes) in part.codes.into_iter().enumerate() {
                        for (i, c) in codes.iter_mut().enumerate() {
                            let x = start + i;
                            let want = if x < unit.numel {
                                code(lane, seg.unit, x)
                            } else {
                                0
                            };
                            if check {
                                assert_eq!(*c, want, "codes {lane} of unit {} at {x}", seg.unit);
                            }
                            *c = want;
                        }
                    }
                    for (lane, scales) in part.scales.into_iter().enumerate() {
                        for (i, s) in scales.iter_mut().enumerate() {
                            let b = start / block + i;
                            let live = b < unit.numel.div_ceil(block);
                            let want = if live { scale(lane, seg.unit, b) } else { 0.0 };
                            if check {
                                assert_eq!(
                                    *s, want,
                                    "scales {lane} of unit {} block {b}",
                                    seg.unit
                                );
                            }
                            *s = want;
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// 8-bit state written by 2 ranks loads at 3 ranks (and at 1) as exactly the same blocks:
    /// shards are cut on block boundaries at every world size, so nothing is requantized.
    #[test]
    fn quantized_state_reshards_without_requantizing() {
        let kind = OptimizerKind::AdamW8bit;
        let dir = std::env::temp_dir().join(format!("kiln-q8-reshard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = layout(2);
        let mut files = Vec::new();
        for rank in 0..2 {
            let state = StateLayout::new(&old, rank..rank + 1);
            let mut store = HostStore::new(Tier::None, state.len, kind.format());
            fill_or_check(&old, rank, &mut store, false);
            let mut params: Vec<Vec<f32>> = old
                .units
                .iter()
                .map(|u| vec![0.0; u.padded_len / 2])
                .collect();
            let name = format!("rank{rank}.safetensors");
            let view = StateView {
                layout: &old,
                params: &mut params,
                held: ParamsHeld::OwnShards,
                state: &state,
                optimizer: kind,
                store: &mut store,
            };
            write_rank_file(&dir.join(&name), view, rank, 20).unwrap();
            files.push(FileEntry {
                name,
                bytes: 0,
                crc32: 0,
            });
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            step: 20,
            world: 2,
            stage: 2,
            offload: "none".into(),
            model: serde_json::Value::Null,
            layout: old,
            config: Default::default(),
            config_hash: String::new(),
            data: DataPosition {
                next_step: 20,
                global_batch: 4,
                source: String::new(),
            },
            files,
            loss_scale: None,
        };
        let reader = CheckpointReader::open(&dir, &manifest).unwrap();
        for world in [3, 1] {
            let new = layout(world);
            for rank in 0..world {
                let state = StateLayout::new(&new, rank..rank + 1);
                let mut store = HostStore::new(Tier::None, state.len, kind.format());
                let mut params: Vec<Vec<f32>> = new
                    .units
                    .iter()
                    .map(|u| vec![0.0; u.padded_len / world])
                    .collect();
                let view = StateView {
                    layout: &new,
                    params: &mut params,
                    held: ParamsHeld::OwnShards,
                    state: &state,
                    optimizer: kind,
                    store: &mut store,
                };
                load(&reader, view, rank).unwrap();
                fill_or_check(&new, rank, &mut store, true);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

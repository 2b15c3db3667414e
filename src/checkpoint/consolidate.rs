//! `kiln consolidate CKPT OUT.safetensors`: the full f32 parameters of a checkpoint, named by
//! module path with the model's shapes — what `output.export` writes at the end of a run, from
//! any checkpoint, with no training process. One unit is in memory at a time.

use super::shards::{CheckpointReader, PARAM};
use super::write_params;
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Unit `unit`'s parameters (unpadded, `buf.len()` = the unit's numel) from a checkpoint's
/// rank files, whatever world size wrote them.
pub fn read_unit_params(reader: &CheckpointReader<'_>, unit: usize, buf: &mut [f32]) -> Result<()> {
    reader.read(PARAM, unit, 0..buf.len(), buf)
}

/// Writes the consolidated parameters of the checkpoint in `dir` to `out`.
pub fn consolidate(dir: &Path, out: &Path) -> Result<()> {
    let manifest = super::verify(dir)?;
    let reader = CheckpointReader::open(dir, &manifest)?;
    let metadata = BTreeMap::from([("step".to_string(), manifest.step.to_string())]);
    write_params(out, &manifest.layout, &metadata, |u, buf| {
        reader.read(PARAM, u, 0..buf.len(), buf)
    })
}

//! Tier `offload.param` (ZeRO-Infinity's parameter offload, DeepSpeed's `offload_param`): where
//! ZeRO-3 keeps this rank's shard of every unit's f32 master parameters between their uses.
//!
//! | tier | where the shards are | resident in this process |
//! |---|---|---|
//! | `none`, `cpu` | one vector per unit | all of them |
//! | `nvme` | one file per rank under `offload.nvme_path`, unit after unit | one unit's shard, inside the optimizer step and a checkpoint |
//!
//! As for the optimizer tiers, `cpu` is the same memory as `none` on this CPU backend (on a GPU
//! it is the tier that keeps parameters off the device). With `nvme` a gather reads the rank's
//! shard straight from the file into the gather buffer, and the optimizer step and checkpoints
//! reach the shards through [`ParamAccess`], one unit at a time: the unit's shard is read when
//! first touched and written back when the next unit is touched or at [`ParamAccess::flush`].
//! The values and the arithmetic are the same in every tier, so results are bitwise equal.

use super::Tier;
use crate::config::OffloadConfig;
use crate::error::{KilnError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Mutable access to a rank's parameters unit by unit, wherever they live: the optimizer step
/// and checkpoints go through it.
pub trait ParamAccess {
    /// Unit `unit`'s parameters as the strategy holds them (a whole unit or this rank's shard).
    fn unit_mut(&mut self, unit: usize) -> Result<&mut [f32]>;
    /// Writes back whatever [`unit_mut`](Self::unit_mut) handed out and frees it.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

impl ParamAccess for Vec<Vec<f32>> {
    fn unit_mut(&mut self, unit: usize) -> Result<&mut [f32]> {
        Ok(&mut self[unit])
    }
}

/// A rank's parameter shards in their tier.
pub enum ParamShards {
    /// In memory (`none` and `cpu`).
    Resident(Vec<Vec<f32>>),
    /// In a file (`nvme`).
    File(ShardFile),
}

impl ParamShards {
    /// Empty shards of `lens` elements per unit, in `tier` (a file is created for `nvme`).
    pub fn create(tier: Tier, config: &OffloadConfig, rank: usize, lens: &[usize]) -> Result<Self> {
        Ok(match tier {
            Tier::None | Tier::Cpu => {
                ParamShards::Resident(lens.iter().map(|&n| vec![0.0; n]).collect())
            }
            Tier::Nvme => ParamShards::File(ShardFile::create(config, rank, lens)?),
        })
    }

    /// Sets unit `unit`'s shard.
    pub fn set(&mut self, unit: usize, values: &[f32]) -> Result<()> {
        match self {
            ParamShards::Resident(s) => {
                s[unit].copy_from_slice(values);
                Ok(())
            }
            ParamShards::File(f) => f.write(unit, values),
        }
    }

    /// Copies unit `unit`'s shard into `out`.
    pub fn read(&self, unit: usize, out: &mut [f32]) -> Result<()> {
        match self {
            ParamShards::Resident(s) => {
                out.copy_from_slice(&s[unit]);
                Ok(())
            }
            ParamShards::File(f) => f.read(unit, out),
        }
    }

    /// Unit `unit`'s shard: borrowed where it is in memory, read where it is in a file.
    pub fn shard(&self, unit: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
        match self {
            ParamShards::Resident(s) => Ok(std::borrow::Cow::Borrowed(&s[unit])),
            ParamShards::File(f) => {
                let mut own = vec![0.0; f.lens[unit]];
                f.read(unit, &mut own)?;
                Ok(std::borrow::Cow::Owned(own))
            }
        }
    }

    /// Bytes of shards held in memory at most (a file tier holds one unit's, at times).
    pub fn resident_bytes(&self) -> usize {
        match self {
            ParamShards::Resident(s) => s.iter().map(|v| v.len() * 4).sum(),
            ParamShards::File(f) => f.lens.iter().max().copied().unwrap_or(0) * 4,
        }
    }

    /// Bytes of shards in files.
    pub fn offloaded_bytes(&self) -> usize {
        match self {
            ParamShards::Resident(_) => 0,
            ParamShards::File(f) => f.lens.iter().sum::<usize>() * 4,
        }
    }
}

impl ParamAccess for ParamShards {
    fn unit_mut(&mut self, unit: usize) -> Result<&mut [f32]> {
        match self {
            ParamShards::Resident(s) => Ok(&mut s[unit]),
            ParamShards::File(f) => f.unit_mut(unit),
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self {
            ParamShards::Resident(_) => Ok(()),
            ParamShards::File(f) => f.flush(),
        }
    }
}

/// A rank's shards in one file, unit after unit, with at most one unit's shard in memory.
pub struct ShardFile {
    path: PathBuf,
    file: File,
    lens: Vec<usize>,
    /// Byte offset of each unit's shard.
    offsets: Vec<u64>,
    /// The unit [`ParamAccess::unit_mut`] handed out last, and its values.
    cached: Option<(usize, Vec<f32>)>,
}

impl ShardFile {
    fn create(config: &OffloadConfig, rank: usize, lens: &[usize]) -> Result<Self> {
        let dir = Path::new(&config.nvme_path);
        if !dir.is_dir() {
            return Err(KilnError::file(
                dir,
                "offload.nvme_path must be an existing directory",
            ));
        }
        let path = dir.join(format!("kiln-{}-rank{rank}.params", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                KilnError::file(
                    &path,
                    format!("cannot create the parameter file (offload.nvme_path): {e}"),
                )
            })?;
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0u64;
        for &n in lens {
            offsets.push(at);
            at += n as u64 * 4;
        }
        let shards = ShardFile {
            path,
            file,
            lens: lens.to_vec(),
            offsets,
            cached: None,
        };
        super::reserve(&shards.file, &shards.path, at, "parameters")?;
        Ok(shards)
    }

    fn read(&self, unit: usize, out: &mut [f32]) -> Result<()> {
        if let Some((u, values)) = &self.cached {
            if *u == unit {
                out.copy_from_slice(values);
                return Ok(());
            }
        }
        assert_eq!(out.len(), self.lens[unit], "a whole shard");
        self.file
            .read_exact_at(as_bytes_mut(out), self.offsets[unit])
            .map_err(|e| self.failed("read", unit, e))
    }

    fn write(&mut self, unit: usize, values: &[f32]) -> Result<()> {
        assert_eq!(values.len(), self.lens[unit], "a whole shard");
        if let Some((u, cached)) = &mut self.cached {
            if *u == unit {
                cached.copy_from_slice(values);
            }
        }
        self.file
            .write_all_at(as_bytes(values), self.offsets[unit])
            .map_err(|e| self.failed("write", unit, e))
    }

    fn unit_mut(&mut self, unit: usize) -> Result<&mut [f32]> {
        if self.cached.as_ref().is_some_and(|(u, _)| *u != unit) {
            self.flush()?;
        }
        if self.cached.is_none() {
            let mut values = vec![0.0; self.lens[unit]];
            self.read(unit, &mut values)?;
            self.cached = Some((unit, values));
        }
        Ok(&mut self.cached.as_mut().expect("just filled").1)
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((unit, values)) = self.cached.take() {
            self.file
                .write_all_at(as_bytes(&values), self.offsets[unit])
                .map_err(|e| self.failed("write", unit, e))?;
        }
        Ok(())
    }

    fn failed(&self, what: &str, unit: usize, e: std::io::Error) -> KilnError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            KilnError::file(
                &self.path,
                format!("parameter file is shorter than expected at unit {unit} (truncated?)"),
            )
        } else {
            KilnError::file(
                &self.path,
                format!("{what} of unit {unit}'s parameters failed: {e}"),
            )
        }
    }
}

impl Drop for ShardFile {
    fn drop(&mut self) {
        // Scratch space: checkpoints copy the shards into their own files.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn as_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any bytes are valid u8 (the file is this process's scratch,
    // read back on the same machine).
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

fn as_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; any byte pattern is a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, std::mem::size_of_val(data))
    }
}

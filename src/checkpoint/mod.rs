//! Sharded checkpoints (DESIGN.md "Checkpoint"): `checkpoint.dir/step_NNNNNN/` holds one
//! safetensors file per rank and a `manifest.json`; `checkpoint.dir/latest` names the newest.
//!
//! Saving is atomic: every rank writes and syncs its file inside a hidden temporary directory;
//! rank 0 then writes the manifest (with every file's length and CRC-32), renames the directory
//! to its final name, and only then replaces `latest` — so a run killed at any moment leaves
//! the previous checkpoint and pointer intact. Loading reads whatever shards a rank needs at its
//! own world size and stage (see `shards`), so any checkpoint resumes at any world size.

mod consolidate;
mod manifest;
mod shards;
mod tensor_file;

pub use consolidate::consolidate;
pub use manifest::{DataPosition, FileEntry, Manifest, FORMAT};
pub use shards::CheckpointReader;
pub use tensor_file::{file_crc32, TensorFileReader, TensorFileWriter};

use crate::comm::Communicator;
use crate::config::CheckpointConfig;
use crate::error::{KilnError, Result};
use crate::plan::Plan;
use crate::strategy::Strategy;
use std::path::{Path, PathBuf};

/// Name of the pointer file inside `checkpoint.dir`.
pub const LATEST: &str = "latest";

/// `step_000020`: DESIGN.md's contract (the name ends in the step number).
fn step_dir_name(step: u64) -> String {
    format!("step_{step:06}")
}

/// The step number of a step directory's name.
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step_")?.parse().ok()
}

fn rank_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KilnError + '_ {
    move |e| KilnError::io(path, e)
}

/// fsync of a directory, so that renames inside it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Saves the state after `step` optimizer steps (collective: every rank calls it).
pub fn save(
    plan: &Plan,
    comm: &dyn Communicator,
    strategy: &mut dyn Strategy,
    step: u64,
    source: &str,
) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let (rank, world) = (comm.rank(), comm.world());
    let root = PathBuf::from(&plan.config.checkpoint.dir);
    let name = step_dir_name(step);
    let tmp = root.join(format!(".{name}.tmp"));
    let done = root.join(&name);
    if rank == 0 {
        std::fs::create_dir_all(&root)
            .map_err(|e| KilnError::file(&root, format!("cannot create checkpoint.dir: {e}")))?;
        if tmp.exists() {
            // Left by a run killed while saving this step: never a valid checkpoint.
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    }
    comm.barrier()?;
    let file = tmp.join(rank_file_name(rank));
    shards::write_rank_file(&file, strategy.state_view(), rank, step)?;
    let bytes = std::fs::metadata(&file).map_err(io(&file))?.len();
    let crc = file_crc32(&file)?;
    let mut entry = bytes.to_le_bytes().to_vec();
    entry.extend(crc.to_le_bytes());
    let entries = comm.all_gather_bytes(&entry)?;
    if rank == 0 {
        let files = entries
            .iter()
            .enumerate()
            .map(|(r, e)| FileEntry {
                name: rank_file_name(r),
                bytes: u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                crc32: u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")),
            })
            .collect();
        let layout = strategy.state_view().layout.clone();
        let manifest = Manifest {
            format: FORMAT.into(),
            step,
            world,
            stage: plan.stage,
            offload: plan.offload.name().into(),
            model: plan.model,
            layout,
            config: plan.config.clone(),
            config_hash: manifest::config_hash(&plan.config),
            data: DataPosition {
                next_step: step,
                global_batch: plan.global_batch,
                source: source.into(),
            },
            files,
        };
        publish(&root, &tmp, &done, &manifest, plan.config.checkpoint.keep)?;
        let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
        tracing::info!(
            "checkpoint saved: {} ({:.1} MiB in {:.2} s)",
            done.display(),
            bytes as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64()
        );
    }
    comm.barrier()?;
    Ok(done)
}

/// Rank 0's half of a save: manifest, rename, pointer, pruning.
fn publish(root: &Path, tmp: &Path, done: &Path, manifest: &Manifest, keep: usize) -> Result<()> {
    let path = tmp.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest).expect("manifest serialises");
    write_synced(&path, text.as_bytes())?;
    if done.exists() {
        tracing::warn!("replacing the existing checkpoint {}", done.display());
        std::fs::remove_dir_all(done).map_err(io(done))?;
    }
    std::fs::rename(tmp, done).map_err(io(done))?;
    sync_dir(root)?;
    let pointer = root.join(LATEST);
    let pointer_tmp = root.join(format!(".{LATEST}.tmp"));
    let name = done.file_name().expect("step dir name").to_string_lossy();
    write_synced(&pointer_tmp, format!("{name}\n").as_bytes())?;
    std::fs::rename(&pointer_tmp, &pointer).map_err(io(&pointer))?;
    sync_dir(root)?;
    prune(root, keep, &name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(path))
}

/// Removes all but the newest `keep` step directories (0 keeps all); never the latest.
fn prune(root: &Path, keep: usize, latest: &str) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut steps: Vec<(u64, String)> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| Some((step_of(&n)?, n)))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, old) in steps
        .iter()
        .take(excess)
        .filter(|(_, n)| n.as_str() != latest)
    {
        let path = root.join(old);
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The checkpoint directory that `--resume ARG` names: `latest` follows `checkpoint.dir/latest`;
/// a path is a step directory, or a checkpoint.dir whose `latest` is followed.
pub fn locate(arg: &str, config: &CheckpointConfig) -> Result<PathBuf> {
    let root = if arg == LATEST {
        if config.dir.is_empty() {
            return Err(KilnError::config(
                "--resume latest needs `checkpoint.dir` (or give the checkpoint's path)",
            ));
        }
        PathBuf::from(&config.dir)
    } else {
        let path = PathBuf::from(arg);
        if path.join("manifest.json").exists() {
            return Ok(path);
        }
        path
    };
    let pointer = root.join(LATEST);
    let name = std::fs::read_to_string(&pointer).map_err(|_| {
        KilnError::file(
            &root,
            "no checkpoint here (neither manifest.json nor a `latest` pointer)",
        )
    })?;
    Ok(root.join(name.trim()))
}

/// Reads the manifest in `dir` and checks every file it lists: present, of the listed length,
/// with the listed CRC-32.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = Manifest::read(dir)?;
    check_lengths(dir, &manifest)?;
    check_crcs(dir, &manifest, 0, 1)?;
    Ok(manifest)
}

/// Every listed file is present with the listed length (cheap: metadata only).
fn check_lengths(dir: &Path, manifest: &Manifest) -> Result<()> {
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let len = std::fs::metadata(&path).map(|m| m.len()).map_err(|_| {
            KilnError::file(
                &path,
                format!(
                    "missing: the checkpoint was written by {} ranks and lists this file",
                    manifest.world
                ),
            )
        })?;
        if len != f.bytes {
            return Err(KilnError::file(
                &path,
                format!("truncated: {len} bytes, the manifest lists {}", f.bytes),
            ));
        }
    }
    Ok(())
}

/// Files `first`, `first + stride`, … have their listed CRC-32 (each rank reads its share).
fn check_crcs(dir: &Path, manifest: &Manifest, first: usize, stride: usize) -> Result<()> {
    for f in manifest.files.iter().skip(first).step_by(stride) {
        let path = dir.join(&f.name);
        let crc = file_crc32(&path)?;
        if crc != f.crc32 {
            return Err(KilnError::file(
                &path,
                format!(
                    "corrupted: CRC-32 {crc:08x}, the manifest lists {:08x}",
                    f.crc32
                ),
            ));
        }
    }
    Ok(())
}

/// Loads the checkpoint in `dir` into `strategy` (collective). Nothing is loaded until the whole
/// checkpoint is verified: rank 0 checks the manifest, the file lengths and the compatibility
/// with this run, every rank checks the CRC-32 of its share of the files, and the verdicts are
/// exchanged, so a bad checkpoint is reported once, by the rank that found it. Returns the step
/// to continue from.
pub fn resume(
    dir: &Path,
    plan: &Plan,
    comm: &dyn Communicator,
    strategy: &mut dyn Strategy,
) -> Result<u64> {
    let rank = comm.rank();
    let checked = if rank == 0 {
        Manifest::read(dir).and_then(|m| {
            check_lengths(dir, &m)?;
            m.check_compatible(dir, plan)?;
            if m.step >= plan.steps {
                return Err(KilnError::config(format!(
                    "key `train.steps`: {} but the checkpoint {} is at step {}; raise it to continue",
                    plan.steps,
                    dir.display(),
                    m.step
                )));
            }
            Ok(m)
        })
    } else {
        Manifest::read(dir)
    }
    .and_then(|m| {
        check_crcs(dir, &m, rank, comm.world())?;
        Ok(m)
    });
    let verdict = match comm.all_gather_bytes(&[checked.is_ok() as u8]) {
        Ok(v) => v,
        // Another rank gave up first; this rank's own finding is the better message.
        Err(e) => return Err(checked.err().unwrap_or(e)),
    };
    let ok: Vec<bool> = verdict.iter().map(|v| v.as_slice() == [1]).collect();
    if !ok.iter().all(|&x| x) {
        // Rank 0's finding first (every rank may have hit it); otherwise each rank that found
        // something reports it, and the others stay silent.
        return Err(match checked {
            Err(e) if rank == 0 || ok[0] => e,
            Err(e) => KilnError::ReportedByAnotherRank(e.exit_code()),
            Ok(_) => KilnError::ReportedByAnotherRank(2),
        });
    }
    let manifest = checked?;
    let reader = CheckpointReader::open(dir, &manifest)?;
    shards::load(&reader, strategy.state_view(), rank)?;
    strategy.after_load()?;
    if rank == 0 {
        tracing::info!(
            "resumed from {} (step {}, written by {} ranks at stage {}, tier {})",
            dir.display(),
            manifest.step,
            manifest.world,
            manifest.stage,
            manifest.offload
        );
    }
    Ok(manifest.step)
}

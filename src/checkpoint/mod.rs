//! Sharded checkpoints (docs/ARCHITECTURE.md): `checkpoint.dir/step_NNNNNN/` holds one
//! safetensors file per rank and a `manifest.json`; `checkpoint.dir/latest` names the newest.
//!
//! Saving is atomic: every rank writes and syncs its file inside a hidden temporary directory;
//! rank 0 then writes the manifest (with every file's length and CRC-32), renames the directory
//! to its final name, and only then replaces `latest` — so a run killed at any moment leaves
//! the previous checkpoint and pointer intact. Loading reads whatever shards a rank needs at its
//! own world size and stage (see `shards`), so any checkpoint resumes at any world size.

mod consolidate;
mod export;
mod manifest;
mod shards;
mod values;

pub use crate::tensor_file::{file_crc32, TensorFileReader, TensorFileWriter};
pub use consolidate::{consolidate, read_unit_params};
pub use export::{create_parent_dir, export_command, export_safetensors, write_params};
pub use manifest::{DataPosition, FileEntry, Manifest, FORMAT};
pub use shards::CheckpointReader;
pub use values::ModelValues;

use crate::comm::{agree, agree_on, Communicator};
use crate::config::CheckpointConfig;
use crate::error::{KilnError, Result};
use crate::plan::Plan;
use crate::strategy::Strategy;
use std::path::{Path, PathBuf};

/// Name of the pointer file inside `checkpoint.dir`.
pub const LATEST: &str = "latest";

/// `step_000020`: the checkpoint contract (the name ends in the step number).
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
///
/// Rank 0 prepares a temporary directory, every rank writes its file into it, rank 0 publishes
/// it; each phase ends with the ranks agreeing on its outcome. So a failure on any rank (a full
/// disk, say) is reported once, by the rank that hit it, every rank returns the same way, the
/// temporary directory is removed, and `latest` and the previous checkpoint stay as they were.
pub fn save(
    plan: &Plan,
    comm: &dyn Communicator,
    strategy: &mut dyn Strategy,
    step: u64,
    source: &str,
    loss_scale: Option<&crate::optim::LossScaler>,
) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let (rank, world) = (comm.rank(), comm.world());
    let root = PathBuf::from(&plan.config.checkpoint.dir);
    let name = step_dir_name(step);
    let tmp = root.join(format!(".{name}.tmp"));
    let done = root.join(&name);
    let not_saved = |cause: KilnError| {
        if rank == 0 {
            discard(&root, &tmp);
        }
        match cause {
            KilnError::ReportedByAnotherRank(_) | KilnError::Comm(_) => cause,
            cause => KilnError::CheckpointNotSaved {
                step,
                cause: Box::new(cause),
                kept: match std::fs::read_to_string(root.join(LATEST)) {
                    Ok(name) => format!("`latest` still names {}", name.trim()),
                    Err(_) => "no earlier checkpoint".into(),
                },
            },
        }
    };
    comm.set_serves(&format!("the checkpoint of step {step}"));
    let prepared = if rank == 0 {
        prepare_dir(&root).and_then(|()| {
            if tmp.exists() {
                // Left by a run killed while saving this step: never a valid checkpoint.
                std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
            }
            std::fs::create_dir(&tmp).map_err(io(&tmp))
        })
    } else {
        Ok(())
    };
    agree_on(comm, prepared).map_err(not_saved)?;
    let file = tmp.join(rank_file_name(rank));
    let written =
        shards::write_rank_file(&file, strategy.state_view(), rank, step).and_then(|()| {
            let bytes = std::fs::metadata(&file).map_err(io(&file))?.len();
            let crc = file_crc32(&file)?;
            Ok([&bytes.to_le_bytes()[..], &crc.to_le_bytes()].concat())
        });
    let entries = agree(comm, written).map_err(not_saved)?;
    let published = if rank == 0 {
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
            model: plan.model_desc.clone(),
            layout,
            config: plan.config.clone(),
            config_hash: manifest::config_hash(&plan.config),
            data: DataPosition {
                next_step: step,
                global_batch: plan.global_batch,
                source: source.into(),
            },
            files,
            loss_scale: loss_scale.cloned(),
        };
        publish(&root, &tmp, &done, &manifest, plan.config.checkpoint.keep).map(|()| {
            let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
            tracing::info!(
                "checkpoint saved: {} ({:.1} MiB in {:.2} s)",
                done.display(),
                bytes as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
        })
    } else {
        Ok(())
    };
    agree_on(comm, published).map_err(not_saved)?;
    Ok(done)
}

/// Creates `checkpoint.dir` (rank 0, at start-up too: a bad path fails before any training).
pub fn prepare_dir(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)
        .map_err(|e| KilnError::file(root, format!("cannot create checkpoint.dir: {e}")))
}

/// Removes what a failed save left: its temporary directory and pointer (best effort; the error
/// being reported matters more).
fn discard(root: &Path, tmp: &Path) {
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_file(root.join(format!(".{LATEST}.tmp")));
}

/// Rank 0's half of a save: manifest and pointer written (everything that needs space), then
/// the renames that commit it, then pruning.
fn publish(root: &Path, tmp: &Path, done: &Path, manifest: &Manifest, keep: usize) -> Result<()> {
    let path = tmp.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest).expect("manifest serialises");
    write_synced(&path, text.as_bytes())?;
    let pointer = root.join(LATEST);
    let pointer_tmp = root.join(format!(".{LATEST}.tmp"));
    let name = done.file_name().expect("step dir name").to_string_lossy();
    write_synced(&pointer_tmp, format!("{name}\n").as_bytes())?;
    if done.exists() {
        tracing::warn!("replacing the existing checkpoint {}", done.display());
        std::fs::remove_dir_all(done).map_err(io(done))?;
    }
    std::fs::rename(tmp, done).map_err(io(done))?;
    let committed =
        sync_dir(root).and_then(|()| std::fs::rename(&pointer_tmp, &pointer).map_err(io(&pointer)));
    if let Err(e) = committed {
        let _ = std::fs::remove_dir_all(done);
        return Err(e);
    }
    sync_dir(root)?;
    // Saved: a step directory that cannot be removed costs space, not the checkpoint.
    if let Err(e) = prune(root, keep, &name) {
        tracing::warn!("{e}");
    }
    Ok(())
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
/// to continue from, and fp16's loss scale as it was then.
pub fn resume(
    dir: &Path,
    plan: &Plan,
    comm: &dyn Communicator,
    strategy: &mut dyn Strategy,
) -> Result<(u64, Option<crate::optim::LossScaler>)> {
    let rank = comm.rank();
    let mut changed = Vec::new();
    let checked = if rank == 0 {
        Manifest::read(dir).and_then(|m| {
            check_lengths(dir, &m)?;
            changed = m.check_compatible(dir, plan)?;
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
    comm.set_serves("the checks of the checkpoint to resume from");
    // The lowest rank that found something reports it (rank 0's finding first: every rank may
    // have hit it); the others stay silent.
    let manifest = agree_on(comm, checked)?;
    let reader = CheckpointReader::open(dir, &manifest)?;
    shards::load(&reader, strategy.state_view(), rank)?;
    strategy.after_load()?;
    if rank == 0 && !changed.is_empty() {
        tracing::info!(
            "resuming with settings that differ from the checkpoint's: {}",
            changed.join(", ")
        );
    }
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
    Ok((manifest.step, manifest.loss_scale))
}

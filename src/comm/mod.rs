//! The `Communicator` seam (DESIGN.md): collectives on flat f32 buffers and on bytes.
//!
//! Contract: every rank issues the same collectives, with the same lengths, in the same order.
//! With `comm.verify = true` each call first exchanges a small descriptor (operation, length)
//! and a disagreement becomes an error naming the operation, the ranks and the lengths instead
//! of a hang.
//!
//! Every backend runs one communication thread per rank that executes collectives in the order
//! they were issued. A non-blocking call hands its buffer to that thread and returns a
//! [`Pending`] handle; the buffer comes back from [`Pending::wait`]. Because the thread sits in
//! the transport's blocking calls while the caller computes, communication progresses during
//! backward even on OpenMPI, which only progresses non-blocking collectives inside MPI calls.
//!
//! Determinism: a reduction is an all-to-all of shards followed by a local sum over ranks in rank
//! order (0, 1, …, N−1), and `all_reduce` is exactly `reduce_scatter` + `all_gather`. Every
//! element is therefore added in the same order whatever the buffer or shard boundaries, so
//! DDP buckets and ZeRO shards give bitwise equal sums, and the local and MPI backends agree
//! bitwise with each other (both use [`sum_shard_in_rank_order`]).

pub mod conformance;
mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod worker;

pub use local::{simulate_group, LocalGroup};
#[cfg(feature = "mpi")]
pub use mpi::mpi_communicator;
pub use worker::{Collective, Pending, ReferenceKind, Transport, WorkerComm};

use crate::error::{KilnError, Result};
use std::sync::Arc;

/// How the contributions of the ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the world size.
    Average,
}

/// Collectives on flat buffers. Buffers move into a call and come back from `wait()`, so a
/// buffer can never be touched while a collective owns it. Keep the capacity of buffers passed
/// to `all_reduce` at least `padded_len(len, world)` to avoid a reallocation per call.
pub trait Communicator: Send + Sync {
    /// This rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Backend name (`local`, `mpi`).
    fn backend(&self) -> &'static str;
    /// Starts a collective; see [`Collective`] for the buffer conventions.
    fn start(&self, op: Collective) -> Pending;
    /// Gathers a byte string from every rank (control data; blocking).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has reached the barrier.
    fn barrier(&self) -> Result<()>;
    /// Tells the other ranks that this one is failing, so that they stop waiting for it.
    fn abort(&self, why: &str);

    /// Non-blocking all-reduce of the whole buffer (any length).
    fn all_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Pending {
        self.start(Collective::AllReduce { buf, op })
    }
    /// Non-blocking reduce-scatter: `buf.len()` must be a multiple of the world size; afterwards
    /// shard `rank` of the buffer holds the reduction and the other shards are unspecified.
    fn reduce_scatter(&self, buf: Vec<f32>, op: ReduceOp) -> Pending {
        self.start(Collective::ReduceScatter { buf, op })
    }
    /// Non-blocking all-gather in place: `buf.len()` must be a multiple of the world size; shard
    /// `rank` is this rank's contribution and afterwards every shard is filled.
    fn all_gather(&self, buf: Vec<f32>) -> Pending {
        self.start(Collective::AllGather { buf })
    }
    /// Non-blocking broadcast of `root`'s buffer into every rank's buffer of the same length.
    fn broadcast(&self, buf: Vec<f32>, root: usize) -> Pending {
        self.start(Collective::Broadcast { buf, root })
    }
}

/// Length of a buffer padded to a multiple of the world size.
pub fn padded_len(len: usize, world: usize) -> usize {
    len.div_ceil(world) * world
}

/// Sums shard `rank` of every rank's buffer in rank order into `out`: `out[i] = b0[i] + b1[i] +
/// … + b(N-1)[i]`, starting from rank 0's value. The one summation every backend uses.
pub fn sum_shard_in_rank_order<'a>(
    world: usize,
    block: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
    op: ReduceOp,
) {
    const CHUNK: usize = 2048;
    let mut acc = [0.0f32; CHUNK];
    let len = out.len();
    let mut start = 0;
    while start < len {
        let end = (start + CHUNK).min(len);
        let acc = &mut acc[..end - start];
        acc.copy_from_slice(&block(0)[start..end]);
        for q in 1..world {
            for (a, b) in acc.iter_mut().zip(&block(q)[start..end]) {
                *a += *b;
            }
        }
        if op == ReduceOp::Average {
            let n = world as f32;
            acc.iter_mut().for_each(|a| *a /= n);
        }
        out[start..end].copy_from_slice(acc);
        start = end;
    }
}

/// Whether this process was started by mpirun/srun (a launcher's rank variables are set).
pub fn running_under_launcher() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "SLURM_STEP_ID",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Rank within this node and ranks on this node, from the launcher's environment.
pub fn local_rank_and_size(rank: usize, world: usize) -> (usize, usize) {
    let read = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok()?.parse::<usize>().ok())
    };
    let local_rank = read(&[
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
        "PMI_LOCAL_RANK",
    ])
    .unwrap_or(rank);
    let local_size = read(&[
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "SLURM_NTASKS_PER_NODE",
        "MPI_LOCALNRANKS",
        "PMI_LOCAL_SIZE",
    ])
    .unwrap_or(world);
    (local_rank, local_size.max(1))
}

/// Opens the communicator `comm.backend` names for a process launched on its own (`local`, world
/// 1) or under mpirun/srun (`mpi`).
pub fn open(backend: &str, verify: bool) -> Result<Arc<dyn Communicator>> {
    let use_mpi = match backend {
        "auto" => running_under_launcher() && cfg!(feature = "mpi"),
        "local" => false,
        "mpi" => true,
        "nccl" => {
            return Err(KilnError::config(
                "key `comm.backend`: `nccl` needs a GPU build of kiln; this build has the local and mpi backends",
            ))
        }
        other => return Err(KilnError::config(format!("key `comm.backend`: `{other}` is not one of auto, local, mpi, nccl"))),
    };
    if use_mpi {
        #[cfg(feature = "mpi")]
        return mpi_communicator(verify);
        #[cfg(not(feature = "mpi"))]
        return Err(KilnError::config(
            "key `comm.backend`: `mpi` was asked for but kiln was built without the `mpi` feature",
        ));
    }
    if running_under_launcher() && backend == "local" {
        tracing::warn!(
            "comm.backend = local under a launcher: every process trains alone as world 1"
        );
    }
    Ok(simulate_group(1, verify).pop().expect("one rank"))
}

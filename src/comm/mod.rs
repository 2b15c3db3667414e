//! The `Communicator` seam (docs/ARCHITECTURE.md): collectives on flat f32 buffers and on bytes.
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
//! A small collective (up to 256 KiB) issued while nothing is queued runs on the caller's thread
//! instead, and is finished when `start` returns: handing it over would cost more than it
//! overlaps.
//!
//! Determinism: a reduction is an all-to-all of shards followed by a local sum over ranks in rank
//! order (0, 1, …, N−1), and `all_reduce` is exactly `reduce_scatter` + `all_gather`. Every
//! element is therefore added in the same order whatever the buffer or shard boundaries, so
//! DDP buckets and ZeRO shards give bitwise equal sums, and the local and MPI backends agree
//! bitwise with each other (both use [`sum_shard_in_rank_order`]).

mod agree;
pub mod conformance;
pub mod flight;
mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
mod status_net;
pub mod watchdog;
mod worker;

pub use agree::{agree, agree_on, rank_list, ranks_differing_from_first};
pub use local::{simulate_group, LocalGroup};
#[cfg(feature = "mpi")]
pub use mpi::mpi_communicator;
pub(crate) use worker::INLINE_BYTES;
pub use worker::{thread_cpu_seconds, Collective, Pending, ReferenceKind, Transport, WorkerComm};

use crate::error::{KilnError, Result};
use std::sync::Arc;

/// How a communicator checks and times its collectives (`[comm]`).
#[derive(Debug, Clone)]
pub struct CommOptions {
    /// `comm.verify`: check every collective's operation and length across ranks first.
    pub verify: bool,
    /// `comm.timeout_s`: how long one collective may take before the watchdog ends the job.
    pub timeout: std::time::Duration,
}

impl CommOptions {
    /// NCCL's default collective timeout.
    pub const DEFAULT_TIMEOUT_S: f64 = 600.0;

    /// Options with the default timeout.
    pub fn new(verify: bool) -> Self {
        CommOptions {
            verify,
            timeout: std::time::Duration::from_secs_f64(Self::DEFAULT_TIMEOUT_S),
        }
    }

    /// The options `[comm]` sets, checked (this runs before the plan is resolved, since the
    /// communicator is opened first).
    pub fn from_config(c: &crate::config::CommConfig) -> Result<Self> {
        if !(c.timeout_s.is_finite() && c.timeout_s > 0.0 && c.timeout_s < 1e9) {
            return Err(KilnError::config(format!(
                "key `comm.timeout_s`: {} must be a positive number of seconds",
                c.timeout_s
            )));
        }
        Ok(CommOptions {
            verify: c.verify,
            timeout: std::time::Duration::from_secs_f64(c.timeout_s),
        })
    }
}

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
    /// The training loop entered optimizer step `step` (for the watchdog and flight record).
    fn set_step(&self, step: u64);
    /// Names what the collectives issued from now on serve (a bucket, a unit's gather, the
    /// loss), so that a timeout or the flight record can say it.
    fn set_serves(&self, what: &str);
    /// Where the flight record goes: `dir/flight/rank-R.json`.
    fn set_flight_dir(&self, dir: &std::path::Path);
    /// Writes the flight record now (after an error); its path, if one was written.
    fn dump_flight(&self) -> Option<std::path::PathBuf>;

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

/// Where a rank sits in its launch: its index among the ranks on its node, how many ranks share
/// the node, and how many nodes the launch spans (`None` when the launcher does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Rank within this node, 0-based.
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_ranks: usize,
    /// Nodes in the launch.
    pub num_nodes: Option<usize>,
}

/// This process's [`Placement`], from the launcher's environment.
pub fn placement(rank: usize, world: usize) -> Placement {
    placement_from(|name| std::env::var(name).ok(), rank, world)
}

/// [`placement`] with the environment read through `var`, so that it can be checked with any
/// launcher's variables set.
///
/// The variables of the launcher that started this very process come first: OpenMPI's mpirun
/// (`OMPI_COMM_WORLD_LOCAL_*`), MPICH/Intel MPI's Hydra (`MPI_LOCAL*`), PMI (`PMI_LOCAL_*`).
/// Slurm's come last because they are inherited: under `mpirun` or Hydra inside an allocation,
/// the ranks are children of daemons that srun started one per node, so they carry the
/// daemons' `SLURM_LOCALID` (0) and a step layout of one task per node. Rank and size are taken
/// from one launcher, never mixed. Without any, all `world` ranks share this node (world 1 for a
/// process started on its own).
pub fn placement_from(
    var: impl Fn(&str) -> Option<String>,
    rank: usize,
    world: usize,
) -> Placement {
    let num = |name: &str| var(name)?.trim().parse::<usize>().ok();
    let pair = |r: &str, s: &str| Some((num(r)?, num(s)?));
    if let Some((local_rank, local_ranks)) =
        pair("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    {
        // OpenMPI 4's mpirun also tells its ranks how many nodes run daemons.
        return Placement::new(local_rank, local_ranks, num("OMPI_MCA_orte_num_nodes"));
    }
    for (r, s) in [
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
    ] {
        if let Some((local_rank, local_ranks)) = pair(r, s) {
            return Placement::new(local_rank, local_ranks, None);
        }
    }
    if let Some(local_rank) = num("SLURM_LOCALID") {
        if let Some((local_ranks, num_nodes)) = slurm_tasks_here(&var) {
            return Placement::new(local_rank, local_ranks, Some(num_nodes));
        }
    }
    Placement::new(rank, world, None)
}

impl Placement {
    fn new(local_rank: usize, local_ranks: usize, num_nodes: Option<usize>) -> Self {
        Placement {
            local_rank,
            local_ranks: local_ranks.max(1),
            num_nodes: num_nodes.filter(|&n| n > 0),
        }
    }
}

/// Tasks of this srun step on this node, and the step's nodes. `SLURM_NTASKS_PER_NODE` is set
/// only with `--ntasks-per-node` (and then holds the job's request, not this step's layout);
/// the tasks-per-node list (`2(x3),1`: three nodes with 2 tasks, one with 1) is always set, and
/// `SLURM_NODEID` indexes it. `SLURM_STEP_TASKS_PER_NODE` first: srun overwrites
/// `SLURM_TASKS_PER_NODE` with the step's layout too, except under `--preserve-env`.
fn slurm_tasks_here(var: &impl Fn(&str) -> Option<String>) -> Option<(usize, usize)> {
    let num = |name: &str| var(name)?.trim().parse::<usize>().ok();
    let node = num("SLURM_NODEID");
    for list in ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        let counts = var(list).and_then(|v| parse_tasks_per_node(&v));
        if let (Some(counts), Some(node)) = (counts, node) {
            if let Some(&here) = counts.get(node) {
                return Some((here, counts.len()));
            }
        }
    }
    let nodes = num("SLURM_STEP_NUM_NODES").or_else(|| num("SLURM_NNODES"))?;
    Some((num("SLURM_NTASKS_PER_NODE")?, nodes))
}

/// Expands Slurm's tasks-per-node list, `2(x3),1` → `[2, 2, 2, 1]`; `None` if malformed.
pub fn parse_tasks_per_node(list: &str) -> Option<Vec<usize>> {
    let mut counts = Vec::new();
    for part in list.trim().split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => (count, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.parse::<usize>().ok()?;
        // A repeat count beyond any cluster's size is a malformed value, not a layout.
        if repeat > 1 << 20 {
            return None;
        }
        counts.extend(std::iter::repeat_n(count, repeat));
    }
    Some(counts)
}

/// Processes the launcher started, from its own variables: mpirun's and Hydra/PMI's first, and
/// srun's step size only when no MPI launcher stands between srun and this process (mpirun
/// inside an allocation starts its daemons with srun, whose step sizes its ranks inherit).
pub fn launched_world(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|name| var(name))
        .and_then(|v| v.trim().parse().ok())
}

/// An error when MPI joined fewer processes than the launcher started. The usual cause is srun
/// starting an MPI that does not speak its `--mpi` plugin: every process then initialises MPI
/// alone as world 1 and would train alone, all writing the same outputs.
pub fn check_launched_world(launched: Option<usize>, mpi_world: usize) -> Result<()> {
    match launched {
        Some(n) if n != mpi_world => Err(KilnError::Comm(format!(
            "the launcher started {n} processes but MPI sees a world of {mpi_world}: with srun use the --mpi plugin this MPI was built for (srun --mpi=list), or start kiln with mpirun (launcher/README.md)"
        ))),
        _ => Ok(()),
    }
}

/// Opens the communicator `comm.backend` names for a process launched on its own (`local`, world
/// 1) or under mpirun/srun (`mpi`).
pub fn open(backend: &str, options: &CommOptions) -> Result<Arc<dyn Communicator>> {
    let use_mpi = match backend {
        "auto" => running_under_launcher() && cfg!(feature = "mpi"),
        "local" => false,
        "mpi" => true,
        "nccl" => {
            return Err(KilnError::config(
                "key `comm.backend`: `nccl` needs a GPU build of kiln; this build has the local and mpi backends",
            ))
        }
        other => {
            crate::config::check_choice("comm.backend", other, crate::config::COMM_BACKENDS)?;
            unreachable!("comm.backend `{other}` is listed but not opened here")
        }
    };
    if use_mpi {
        #[cfg(feature = "mpi")]
        return mpi_communicator(options).and_then(|comm| {
            check_launched_world(launched_world(|n| std::env::var(n).ok()), comm.world())?;
            Ok(comm)
        });
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
    Ok(simulate_group(1, options).pop().expect("one rank"))
}

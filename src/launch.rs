//! Starting ranks: N threads of one process (`--simulate N`, local backend) or this process as
//! one rank of an mpirun/srun launch. Each rank computes with its own rayon pool of
//! cores ÷ ranks-on-this-node threads, so ranks do not fight over cores.

use crate::comm::{self, Communicator};
use crate::config::Config;
use crate::error::{KilnError, Result};
use crate::memory::{self, Residency};
use crate::plan::Plan;
use crate::train::{self, RunOptions, RunOutcome};
use std::sync::Arc;

/// Compute threads for one of `local_ranks` ranks on this node: `train.threads` if set, else
/// `KILN_THREADS` (set by launcher/kiln-mpirun, which also binds ranks to that many cores),
/// else the cores this process may use divided by the ranks on this node.
pub fn threads_per_rank(config: &Config, local_ranks: usize) -> usize {
    if config.train.threads > 0 {
        return config.train.threads;
    }
    if let Some(n) = std::env::var("KILN_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_ranks.max(1)).max(1)
}

/// This process's rank as its launcher numbers it (mpirun, srun, a PMI launcher), before any
/// communicator exists; 0 when not launched by one. Lets messages about the config, which every
/// rank reads, be printed once.
pub fn launcher_rank() -> usize {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|n| std::env::var(n).ok()?.parse().ok())
    .unwrap_or(0)
}

/// Runs `f` inside a rayon pool of `threads` threads (burn's flex backend and the fused AdamW
/// use the current pool).
///
/// The compute threads run at a slightly lower priority (nice +[`COMPUTE_NICE`]) than the
/// communication thread. A rank's communication thread shares its core with the compute
/// threads; at equal priority the scheduler may let it wait a whole time slice when its data
/// arrives, and since a collective needs every rank's thread, that delay stalls all ranks
/// (measured here: bimodal DDP step times, up to 24 ms of exposed communication per step). A
/// lower nice value for the communication thread would need privileges; a higher one for the
/// compute threads does not.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-compute-{i}"))
        .start_handler(|_| lower_this_thread_priority())
        .build()
        .expect("building a rayon pool");
    pool.install(f)
}

/// Nice value of compute threads, relative to the communication thread's.
pub const COMPUTE_NICE: i32 = 5;

fn lower_this_thread_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes this
    // thread's nice value (Linux applies PRIO_PROCESS with a thread id to that thread).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + COMPUTE_NICE);
    }
}

/// Trains with `world` ranks as threads of this process; returns every rank's outcome.
pub fn simulate(config: &Config, world: usize, opts: &RunOptions) -> Result<Vec<RunOutcome>> {
    check_simulated(config, world)?;
    let mut plan = Plan::resolve(config, world)?;
    // All `world` ranks share this process's memory.
    let residency = Residency {
        process: memory::Process::Threads(world),
        processes_here: 1,
    };
    if let Some(choice) = memory::choose_micro_batch(&mut plan, residency)? {
        tracing::info!("{}", choice.describe());
    }
    memory::preflight(&plan, residency)?;
    simulate_ranks(config, world, &|comm| train::run(&plan, comm, opts))
}

/// Runs `rank` on `world` ranks as threads of this process, each with its own communicator of
/// one local group and `config`'s compute threads; returns every rank's result.
pub fn simulate_ranks<T: Send>(
    config: &Config,
    world: usize,
    rank: &(dyn Fn(Arc<dyn Communicator>) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    check_simulated(config, world)?;
    crate::plan::check_threads(&config.train)?;
    let comms = comm::simulate_group(world, &comm::CommOptions::from_config(&config.comm)?);
    let threads = threads_per_rank(config, world);
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                std::thread::Builder::new()
                    .name(format!("kiln-rank-{r}"))
                    .spawn_scoped(s, move || {
                        with_threads(threads, || {
                            // Spans are per thread: enter it on the pool thread that trains.
                            let _span = tracing::info_span!("rank", r = r).entered();
                            rank(c)
                        })
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(KilnError::Comm("a rank thread panicked".into())))
            })
            .collect()
    });
    collect(results)
}

/// `--simulate N` needs N ≥ 1 and the local backend.
fn check_simulated(config: &Config, world: usize) -> Result<()> {
    if world == 0 {
        return Err(KilnError::config(
            "--simulate: the number of ranks must be at least 1",
        ));
    }
    if !matches!(config.comm.backend.as_str(), "auto" | "local") {
        return Err(KilnError::config(format!("key `comm.backend`: --simulate runs ranks as threads and needs `local` or `auto`, not `{}`", config.comm.backend)));
    }
    Ok(())
}

/// Every rank's value, or the error that caused a failure rather than the "another rank failed"
/// errors it triggered on the other ranks.
pub fn collect<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut errors: Vec<KilnError> = Vec::new();
    let mut outcomes = Vec::new();
    for r in results {
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(outcomes);
    }
    // A rank's own error first; then anything but "another rank reports it" (prints nothing).
    let own = |e: &KilnError| !e.to_string().contains("another rank failed");
    let root = errors
        .iter()
        .position(|e| own(e) && !matches!(e, KilnError::ReportedByAnotherRank(_)))
        .or_else(|| errors.iter().position(own))
        .unwrap_or(0);
    Err(errors.swap_remove(root))
}

/// Preflight of one rank per process, `local_ranks` processes on this machine, after choosing
/// `train.micro_batch = "auto"`. Machines may differ, so every rank checks its own and they
/// agree on the outcome: the lowest rank that does not fit reports it, the others exit with its
/// code and print nothing; an automatic micro-batch is the smallest any rank chose.
fn preflight_process(plan: &mut Plan, comm: &dyn Communicator, local_ranks: usize) -> Result<()> {
    let residency = Residency {
        process: memory::Process::running(comm),
        processes_here: local_ranks,
    };
    let share = plan.micro_batch * plan.grad_accum;
    let chosen = memory::choose_micro_batch(plan, residency);
    if plan.micro_batch_auto && comm.world() > 1 {
        // Every rank takes part, whatever it found: a rank without a choice (no readable limit,
        // or an error reported below) constrains nothing.
        let mine = match &chosen {
            Ok(Some(choice)) => choice.micro as u64,
            _ => u64::MAX,
        };
        let all = comm.all_gather_bytes(&mine.to_le_bytes())?;
        let least = all
            .iter()
            .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
            .min()
            .unwrap_or(u64::MAX);
        if least != u64::MAX {
            plan.micro_batch = least as usize;
            plan.grad_accum = share / plan.micro_batch;
        }
    }
    if let (Ok(Some(choice)), 0) = (&chosen, comm.rank()) {
        tracing::info!(
            "{}{}",
            choice.describe(),
            if plan.micro_batch < choice.micro {
                format!(
                    "; {} on every rank, the smallest any rank chose",
                    plan.micro_batch
                )
            } else {
                String::new()
            }
        );
    }
    let mine = chosen.and_then(|_| memory::preflight(plan, residency));
    if comm.world() == 1 {
        return mine;
    }
    let all = comm.all_gather_bytes(&[u8::from(mine.is_err())])?;
    match all.iter().position(|flag| flag.first() == Some(&1)) {
        None => Ok(()),
        Some(r) if r == comm.rank() => mine,
        Some(_) => Err(KilnError::ReportedByAnotherRank(2)),
    }
}

/// Trains as one rank of this process's launch (world 1 when not under a launcher).
pub fn run_process(config: &Config, opts: &RunOptions) -> Result<RunOutcome> {
    process_rank(config, &|comm| {
        let (rank, world) = (comm.rank(), comm.world());
        let place = comm::placement(rank, world);
        // Every rank validates the same config; rank 0 alone reports the error.
        let mut plan = match Plan::resolve(config, world) {
            Err(e) if rank == 0 => return Err(e),
            Err(e) => return Err(KilnError::ReportedByAnotherRank(e.exit_code())),
            Ok(plan) => plan,
        };
        preflight_process(&mut plan, comm.as_ref(), place.local_ranks)?;
        train::run(&plan, comm, opts)
    })
}

/// Runs `rank` as this process's rank of its launch (world 1 when not under a launcher), with
/// `config`'s compute threads.
pub fn process_rank<T: Send>(
    config: &Config,
    rank_fn: &(dyn Fn(Arc<dyn Communicator>) -> Result<T> + Sync),
) -> Result<T> {
    let options = comm::CommOptions::from_config(&config.comm)?;
    let comm: Arc<dyn Communicator> = comm::open(&config.comm.backend, &options)?;
    let (rank, world) = (comm.rank(), comm.world());
    let place = comm::placement(rank, world);
    let outcome = match crate::plan::check_threads(&config.train) {
        // Every rank checks the same config; rank 0 alone reports the error.
        Err(e) if rank == 0 => Err(e),
        Err(e) => Err(KilnError::ReportedByAnotherRank(e.exit_code())),
        Ok(()) => {
            let threads = threads_per_rank(config, place.local_ranks);
            // Every rank says where it landed: a wrong local size from the launcher shows up
            // as oversubscribed or idle cores, and this line is how to tell. (A lone process
            // has nothing to tell, and a bad input then stays one line.)
            let nodes = place
                .num_nodes
                .map_or(String::new(), |n| format!(" on {n} nodes"));
            if world > 1 {
                tracing::info!(
                    "rank {rank} of {world}{nodes}: local rank {} of {} on this node, {threads} compute threads",
                    place.local_rank,
                    place.local_ranks,
                );
            }
            with_threads(threads, || {
                let _span = tracing::info_span!("rank", r = rank).entered();
                rank_fn(comm.clone())
            })
        }
    };
    drop(comm);
    if let (Err(KilnError::ReportedByAnotherRank(_)), true) = (&outcome, world > 1) {
        // mpirun stops the whole job when one process exits with an error; give rank 0 time
        // to print the line it owns first.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    outcome
}

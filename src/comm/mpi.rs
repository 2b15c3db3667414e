//! The `mpi` backend: rsmpi over the system MPI (Debian OpenMPI here). MPI is initialised on the
//! communication thread with `MPI_THREAD_SERIALIZED` and finalised there when the communicator is
//! dropped. In between a caller may make a small or blocking call itself (never two threads at
//! once: the transport sits behind a lock); a library that only offers `MPI_THREAD_FUNNELED`
//! keeps every call on the communication thread.
//!
//! Reduce-scatter is `MPI_Alltoall` followed by the rank-ordered local sum that the local backend
//! uses too, rather than `MPI_Reduce_scatter_block`: OpenMPI picks its reduction algorithm (and
//! so the order of additions) by message size, which would make a bucket-sized and a unit-sized
//! reduction differ in the last bit once N ≥ 3. All-to-all moves the same bytes per rank as a
//! ring reduce-scatter, (N−1)/N of the buffer.
//!
//! The exception is an all-reduce of two ranks up to 16 MiB, which is one `MPI_Allreduce`: with
//! two operands per element there is only one possible sum, so it is bitwise kiln's (NaN
//! payloads aside), at one latency instead of two.

use super::worker::{ReferenceKind, Transport, WorkerComm};
use super::{status_net, sum_shard_in_rank_order, CommOptions};
use super::{Communicator as KilnCommunicator, ReduceOp};
use crate::error::{KilnError, Result};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::Arc;

/// Opens the MPI communicator of this process (MPI_COMM_WORLD), with the watchdog's side channel:
/// each rank serves its status over TCP and the ranks swap addresses once, now, while MPI works.
pub fn mpi_communicator(options: &CommOptions) -> Result<Arc<dyn KilnCommunicator>> {
    // A failing rank exits the process; mpirun then stops the others, so no abort hook is needed.
    let hook: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|_: &str| {});
    let comm = WorkerComm::spawn("mpi", options, MpiTransport::init, hook)?;
    let rank = comm.rank();
    let advert = status_net::serve(rank, comm.recorder())
        .map_err(|e| KilnError::Comm(format!("cannot serve the watchdog's status port: {e}")))?;
    comm.set_serves("start-up: watchdog addresses");
    let all = comm.all_gather_bytes(&serde_json::to_vec(&advert).expect("advert serialises"))?;
    let adverts = all
        .iter()
        .map(|b| serde_json::from_slice(b))
        .collect::<std::result::Result<Vec<status_net::Advert>, _>>()
        .map_err(|e| KilnError::Comm(format!("a rank sent a malformed status address: {e}")))?;
    comm.set_peers(Arc::new(status_net::NetPeers::new(
        rank,
        comm.recorder(),
        adverts,
    )));
    Ok(Arc::new(comm))
}

/// Two-rank all-reduces up to this size use `MPI_Allreduce` itself (one call and one latency
/// instead of kiln's two). Measured with `kiln bench comm` at N = 2 (medians of 5 alternating
/// runs, ratio to the library's own call): at 64 KiB 0.88 vs 0.86 with kiln's two phases, at
/// 4 MiB 1.54 vs 0.96, at 16 MiB 1.84 vs 1.00; at 64 MiB kiln's two phases win, 2.43 vs 1.20.
const LIBRARY_ALL_REDUCE_BYTES: usize = 16 << 20;

struct MpiTransport {
    // Dropped last: finalises MPI.
    world_comm: SimpleCommunicator,
    rank: usize,
    world: usize,
    /// Receive side of the all-to-all, and the send side of all-gather; grown once, reused.
    scratch: Vec<f32>,
    /// The library's `MPI_IN_PLACE` sentinel, when the library is one whose value is known
    /// (rsmpi's safe API has no in-place collectives); without it all-gather copies its shard.
    in_place: Option<*mut std::ffi::c_void>,
    /// The library allows calls from any thread, one at a time.
    serialized: bool,
    _universe: Universe,
}

// SAFETY: the handles are MPI's, which may be used from any thread at the level MPI provided
// (`callable_from_any_thread` says which); the worker keeps the transport behind a lock, so no
// two threads call MPI at once, and drops it on the thread that initialised MPI. `in_place` is a
// constant sentinel, never dereferenced.
unsafe impl Send for MpiTransport {}

impl MpiTransport {
    fn init() -> Result<Self> {
        // OpenMPI's blocking calls poll for progress. The communication thread shares its core
        // with the rank's compute thread (one rank per core), so let it yield the core while it
        // waits instead of spinning through backward. A user's own setting wins. The variable is
        // set before MPI_Init reads it; the main thread is blocked waiting for this thread then.
        if std::env::var_os("OMPI_MCA_mpi_yield_when_idle").is_none() {
            std::env::set_var("OMPI_MCA_mpi_yield_when_idle", "1");
        }
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| KilnError::Comm("MPI was already initialised in this process".into()))?;
        if provided < Threading::Funneled {
            return Err(KilnError::Comm(format!(
                "MPI provides thread level {provided:?}; kiln needs Funneled"
            )));
        }
        let world_comm = universe.world();
        let rank = world_comm.rank() as usize;
        let world = world_comm.size() as usize;
        // MPI_IN_PLACE is a macro, not a symbol: ((void *) 1) in Open MPI's mpi.h, ((void *) -1)
        // in MPICH's.
        let version = mpi::environment::library_version().unwrap_or_default();
        let in_place = if version.contains("Open MPI") {
            Some(1usize as *mut std::ffi::c_void)
        } else if version.contains("MPICH") {
            Some(usize::MAX as *mut std::ffi::c_void)
        } else {
            None
        };
        Ok(MpiTransport {
            world_comm,
            rank,
            world,
            scratch: Vec::new(),
            in_place,
            serialized: provided >= Threading::Serialized,
            _universe: universe,
        })
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn callable_from_any_thread(&self) -> bool {
        self.serialized
    }

    fn world(&self) -> usize {
        self.world
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let shard = buf.len() / self.world;
        self.scratch.resize(buf.len(), 0.0);
        self.world_comm
            .all_to_all_into(&buf[..], &mut self.scratch[..]);
        // After the all-to-all, block q of `scratch` is rank q's contribution to our shard.
        let received = &self.scratch;
        let start = self.rank * shard;
        sum_shard_in_rank_order(
            self.world,
            |q| &received[q * shard..(q + 1) * shard],
            &mut buf[start..start + shard],
            op,
        );
        Ok(())
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let shard = buf.len() / self.world;
        let start = self.rank * shard;
        if let Some(in_place) = self.in_place {
            let datatype = f32::equivalent_datatype().as_raw();
            // SAFETY: MPI_Allgather with MPI_IN_PLACE reads this rank's block from `buf` and
            // writes every block of `buf`, which holds world × shard f32 and is exclusively
            // borrowed for the call; the send count and type are ignored in place.
            let code = unsafe {
                mpi::ffi::MPI_Allgather(
                    in_place,
                    0,
                    datatype,
                    buf.as_mut_ptr().cast(),
                    shard as i32,
                    datatype,
                    self.world_comm.as_raw(),
                )
            };
            if code != 0 {
                return Err(KilnError::Comm(format!(
                    "MPI_Allgather failed with code {code}"
                )));
            }
            return Ok(());
        }
        // No MPI_IN_PLACE in the safe API: send a copy of our shard.
        self.scratch.clear();
        self.scratch.extend_from_slice(&buf[start..start + shard]);
        self.world_comm.all_gather_into(&self.scratch[..], buf);
        Ok(())
    }

    fn all_reduce_exact(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<bool> {
        // With two ranks each element's sum has one possible value whatever algorithm the
        // library picks: b0 + b1, and IEEE addition is commutative. Averaging then divides by
        // 2 as the rank-ordered sum does. Above LIBRARY_ALL_REDUCE_BYTES kiln's own two-phase
        // all-reduce is the faster (README, "Collectives"); from three ranks up the library's
        // grouping of the additions is its own, so kiln's is used.
        let bytes = std::mem::size_of_val(buf);
        let (true, Some(in_place)) = (
            self.world == 2 && bytes <= LIBRARY_ALL_REDUCE_BYTES,
            self.in_place,
        ) else {
            return Ok(false);
        };
        let datatype = f32::equivalent_datatype().as_raw();
        // SAFETY: MPI_Allreduce with MPI_IN_PLACE reads and writes `buf`, buf.len() f32,
        // exclusively borrowed for the call; count fits i32 below the byte limit.
        let code = unsafe {
            mpi::ffi::MPI_Allreduce(
                in_place,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                datatype,
                mpi::collective::SystemOperation::sum().as_raw(),
                self.world_comm.as_raw(),
            )
        };
        if code != 0 {
            return Err(KilnError::Comm(format!(
                "MPI_Allreduce failed with code {code}"
            )));
        }
        if op == ReduceOp::Average {
            buf.iter_mut().for_each(|x| *x /= 2.0);
        }
        Ok(true)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.world_comm
            .process_at_rank(root as i32)
            .broadcast_into(buf);
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut lens = vec![0u64; self.world];
        self.world_comm
            .all_gather_into(&(mine.len() as u64), &mut lens[..]);
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = mine.to_vec();
        padded.resize(max, 0);
        let mut all = vec![0u8; max * self.world];
        if max > 0 {
            self.world_comm.all_gather_into(&padded[..], &mut all[..]);
        }
        Ok(lens
            .iter()
            .enumerate()
            .map(|(q, &l)| all[q * max..q * max + l as usize].to_vec())
            .collect())
    }

    fn barrier(&mut self) -> Result<()> {
        self.world_comm.barrier();
        Ok(())
    }

    fn reference(&mut self, kind: ReferenceKind, buf: &mut [f32]) -> Result<(f64, f64)> {
        use mpi::collective::SystemOperation;
        let shard = buf.len() / self.world;
        let mut out = vec![0.0f32; buf.len()];
        self.world_comm.barrier();
        let (start, start_cpu) = (mpi::time(), super::thread_cpu_seconds());
        match kind {
            ReferenceKind::AllReduce => {
                self.world_comm
                    .all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum())
            }
            ReferenceKind::ReduceScatter => self.world_comm.reduce_scatter_block_into(
                &buf[..],
                &mut out[..shard],
                SystemOperation::sum(),
            ),
            ReferenceKind::AllGather => {
                self.world_comm.all_gather_into(&buf[..shard], &mut out[..])
            }
        }
        Ok((mpi::time() - start, super::thread_cpu_seconds() - start_cpu))
    }
}

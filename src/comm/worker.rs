//! The per-rank communication thread shared by every backend. A backend only provides a
//! [`Transport`] (blocking primitives, created on the thread itself so that e.g. MPI is
//! initialised and finalised on one thread); the worker queues collectives in issue order,
//! checks them across ranks when `comm.verify` is on, records each in the rank's
//! [`FlightRecorder`] (which the [`Watchdog`] watches), and hands buffers back through
//! [`Pending`].
//!
//! A job the caller would only wait for — a blocking call, or a collective of at most
//! [`INLINE_BYTES`] — runs on the caller's own thread when nothing is queued ahead of it, so
//! that it costs no hand-off; the order of collectives is the issue order either way.

use super::flight::{Entry, FlightRecorder};
#[cfg(doc)]
use super::sum_shard_in_rank_order;
use super::watchdog::{Peers, Watchdog, WatchdogSetup};
use super::{padded_len, CommOptions, Communicator, ReduceOp};
use crate::error::{KilnError, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// A collective with the buffer it owns while in flight.
#[derive(Debug)]
pub enum Collective {
    /// All-reduce of the whole buffer.
    AllReduce {
        /// Data in, result out.
        buf: Vec<f32>,
        /// Sum or average.
        op: ReduceOp,
    },
    /// Reduce-scatter; length a multiple of the world size.
    ReduceScatter {
        /// Data in; this rank's shard of the result out.
        buf: Vec<f32>,
        /// Sum or average.
        op: ReduceOp,
    },
    /// All-gather in place; length a multiple of the world size.
    AllGather {
        /// This rank's shard in, every shard out.
        buf: Vec<f32>,
    },
    /// Broadcast from `root`.
    Broadcast {
        /// Root's data in (root), root's data out (everyone).
        buf: Vec<f32>,
        /// Sending rank.
        root: usize,
    },
    /// One call of the backend library's own collective (e.g. `MPI_Allreduce`), timed after a
    /// barrier, for `kiln bench comm`; the buffer comes back with the seconds it took in element
    /// 0 and the seconds its thread spent on a core meanwhile in element 1. Errors on backends
    /// that have no library of their own.
    Reference {
        /// Which collective.
        kind: ReferenceKind,
        /// Data (contents irrelevant); length a multiple of the world size.
        buf: Vec<f32>,
    },
}

/// A library collective to compare kiln's with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceKind {
    /// `MPI_Allreduce` (sum).
    AllReduce,
    /// `MPI_Reduce_scatter_block` (sum).
    ReduceScatter,
    /// `MPI_Allgather`.
    AllGather,
}

impl Collective {
    /// Operation name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Collective::AllReduce { .. } => "all_reduce",
            Collective::ReduceScatter { .. } => "reduce_scatter",
            Collective::AllGather { .. } => "all_gather",
            Collective::Broadcast { .. } => "broadcast",
            Collective::Reference { .. } => "reference",
        }
    }

    /// Bytes this rank passes in.
    fn bytes(&self) -> usize {
        self.len() * std::mem::size_of::<f32>()
    }

    fn len(&self) -> usize {
        match self {
            Collective::AllReduce { buf, .. }
            | Collective::ReduceScatter { buf, .. }
            | Collective::AllGather { buf }
            | Collective::Broadcast { buf, .. }
            | Collective::Reference { buf, .. } => buf.len(),
        }
    }

    /// What `comm.verify` compares across ranks: operation, reduction, root and length.
    fn descriptor(&self) -> String {
        match self {
            Collective::AllReduce { op, .. } | Collective::ReduceScatter { op, .. } => {
                format!("{}({:?}, len {})", self.name(), op, self.len())
            }
            Collective::AllGather { .. } => format!("all_gather(len {})", self.len()),
            Collective::Broadcast { root, .. } => {
                format!("broadcast(root {root}, len {})", self.len())
            }
            Collective::Reference { kind, .. } => format!("reference {kind:?}(len {})", self.len()),
        }
    }
}

/// Blocking collective primitives of one backend, created on the communication thread and
/// finalised there; callers never use it concurrently (it sits behind a lock).
pub trait Transport: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Reduce-scatter in place; `buf.len()` is a multiple of the world size.
    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// All-gather in place; `buf.len()` is a multiple of the world size.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()>;
    /// All-reduce with the library's own single call where that gives bitwise what
    /// reduce-scatter + all-gather give (the rank-ordered sum of [`sum_shard_in_rank_order`]);
    /// returns `false`, leaving `buf` alone, where it does not. The default never does.
    fn all_reduce_exact(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<bool> {
        let _ = (buf, op);
        Ok(false)
    }
    /// Broadcast in place from `root`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's byte string, in rank order.
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Barrier.
    fn barrier(&mut self) -> Result<()>;
    /// Called on the communication thread before each operation with its record, e.g. to
    /// check that every rank is at the same one.
    fn begin(&mut self, entry: &Entry) {
        let _ = entry;
    }
    /// Whether a thread other than the one that created the transport may call it (one thread at
    /// a time). Where it may not, every job goes through the communication thread.
    fn callable_from_any_thread(&self) -> bool {
        true
    }
    /// Times one call of the library's own collective: (seconds, seconds the calling thread spent
    /// on a core meanwhile, [`thread_cpu_seconds`]).
    fn reference(&mut self, kind: ReferenceKind, buf: &mut [f32]) -> Result<(f64, f64)> {
        let _ = (kind, buf);
        Err(KilnError::Comm(
            "this backend has no library collective to compare with".into(),
        ))
    }
}

enum Job {
    Collective(Collective, Sender<Result<Vec<f32>>>),
    Bytes(Vec<u8>, Sender<Result<Vec<Vec<u8>>>>),
    Barrier(Sender<Result<()>>),
}

impl Job {
    fn describe(&self) -> (String, usize) {
        match self {
            Job::Collective(c, _) => (c.descriptor(), c.bytes()),
            Job::Bytes(b, _) => (format!("all_gather_bytes(len {})", b.len()), b.len()),
            Job::Barrier(_) => ("barrier".to_string(), 0),
        }
    }

    /// Whether the caller may run this job itself (see [`INLINE_BYTES`]).
    fn inline(&self) -> bool {
        match self {
            Job::Collective(c, _) => c.bytes() <= INLINE_BYTES,
            Job::Bytes(..) | Job::Barrier(_) => true,
        }
    }
}

/// Collectives up to this size run on the caller's thread when nothing is queued ahead of them
/// (blocking calls always do). Handing a job to the communication thread and its result back
/// costs two thread switches — a rank's two threads share one core — about 2.8 µs of the 29 µs
/// of a 64 KiB all-reduce of two ranks here, so small collectives lost 5–12% to the library's
/// own call. Blocking the caller costs little at this size, where the transfer is a few tens of
/// microseconds; larger collectives keep overlapping with compute.
pub(crate) const INLINE_BYTES: usize = 256 << 10;

/// CPU time of the calling thread so far, seconds (`CLOCK_THREAD_CPUTIME_ID`); 0 if unknown.
/// A call's wall time minus this clock's advance is the time its thread spent off a core.
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: clock_gettime writes one plain struct that lives on this frame.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) == 0 {
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        } else {
            0.0
        }
    }
}

/// A finished job's result with where it goes.
enum Reply {
    Collective(Result<Vec<f32>>, Sender<Result<Vec<f32>>>),
    Bytes(Result<Vec<Vec<u8>>>, Sender<Result<Vec<Vec<u8>>>>),
    Barrier(Result<()>, Sender<Result<()>>),
}

impl Reply {
    fn ok(&self) -> bool {
        match self {
            Reply::Collective(r, _) => r.is_ok(),
            Reply::Bytes(r, _) => r.is_ok(),
            Reply::Barrier(r, _) => r.is_ok(),
        }
    }

    /// A caller that has gone away no longer wants the result.
    fn send(self) {
        match self {
            Reply::Collective(r, tx) => drop(tx.send(r)),
            Reply::Bytes(r, tx) => drop(tx.send(r)),
            Reply::Barrier(r, tx) => drop(tx.send(r)),
        }
    }
}

/// Runs jobs on the transport, from the communication thread or from a caller.
trait RunJob: Send + Sync {
    /// Runs `job`, records it, calls `before_reply` (transport released), then replies.
    fn run(&self, entry: &Entry, job: Job, before_reply: &dyn Fn());
}

/// The transport behind its lock, with what running a job needs.
struct Runner<T> {
    transport: Mutex<T>,
    verify: bool,
    recorder: Arc<FlightRecorder>,
}

impl<T: Transport> RunJob for Runner<T> {
    fn run(&self, entry: &Entry, job: Job, before_reply: &dyn Fn()) {
        self.recorder.start(entry.seq);
        let mut t = self.transport.lock().expect("transport lock");
        t.begin(entry);
        let in_transport = std::time::Instant::now();
        let reply = match job {
            Job::Collective(c, tx) => {
                Reply::Collective(run_collective(&mut *t, c, self.verify), tx)
            }
            Job::Bytes(b, tx) => Reply::Bytes(t.all_gather_bytes(&b), tx),
            Job::Barrier(tx) => Reply::Barrier(t.barrier(), tx),
        };
        let transport_s = in_transport.elapsed().as_secs_f64();
        drop(t);
        self.recorder.finish(entry.seq, reply.ok(), transport_s);
        before_reply();
        reply.send();
    }
}

/// Where jobs go: the communication thread's queue, and the runner a caller may use itself
/// (`None` where the transport must stay on its thread).
struct Queue {
    tx: Sender<(Entry, Job)>,
    runner: Option<Arc<dyn RunJob>>,
}

/// The handle of a collective in flight. Its buffer comes back only from [`Pending::wait`].
#[must_use = "a collective's buffer comes back only from wait()"]
pub struct Pending {
    rx: Receiver<Result<Vec<f32>>>,
}

impl Pending {
    /// Blocks until the collective has finished and returns its buffer.
    pub fn wait(self) -> Result<Vec<f32>> {
        recv_soon(&self.rx)
            .unwrap_or_else(|| Err(KilnError::Comm("the communication thread stopped".into())))
    }
}

/// A [`Communicator`] made of a communication thread running a [`Transport`].
pub struct WorkerComm {
    rank: usize,
    world: usize,
    backend: &'static str,
    /// Locked while a job is issued (and while the caller runs it), so jobs keep issue order.
    queue: Mutex<Option<Queue>>,
    /// Jobs queued for the communication thread and not yet finished.
    queued: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
    abort_hook: Arc<dyn Fn(&str) + Send + Sync>,
    recorder: Arc<FlightRecorder>,
    peers: Arc<OnceLock<Arc<dyn Peers>>>,
    flight_dir: Arc<OnceLock<PathBuf>>,
    // Fields drop after `Drop::drop` has joined the communication thread, so the watchdog
    // still watches the collectives that drain at shutdown.
    _watchdog: Watchdog,
}

impl WorkerComm {
    /// Starts the communication thread; `make` builds the transport on that thread.
    pub fn spawn<F, T>(
        backend: &'static str,
        options: &CommOptions,
        make: F,
        abort_hook: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Self>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Transport + 'static,
    {
        let verify = options.verify;
        let (job_tx, job_rx) = channel::<(Entry, Job)>();
        let (ready_tx, ready_rx) = channel::<Result<(usize, usize)>>();
        let (recorder_tx, recorder_rx) = channel::<Arc<FlightRecorder>>();
        let (runner_tx, runner_rx) = channel::<Option<Arc<dyn RunJob>>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let thread_queued = queued.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-comm-{backend}"))
            .spawn(move || {
                let transport = match make() {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((transport.rank(), transport.world())));
                let Ok(recorder) = recorder_rx.recv() else {
                    return;
                };
                let shared = transport.callable_from_any_thread();
                let runner = Arc::new(Runner {
                    transport: Mutex::new(transport),
                    verify,
                    recorder,
                });
                let _ = runner_tx.send(shared.then(|| runner.clone() as Arc<dyn RunJob>));
                while let Some((entry, job)) = recv_soon(&job_rx) {
                    runner.run(&entry, job, &|| {
                        thread_queued.fetch_sub(1, Ordering::Release);
                    });
                }
                // The callers' references are gone (dropped before the queue closed), so the
                // transport is finalised here, on the thread that created it.
                drop(runner);
            })
            .map_err(|e| KilnError::Comm(format!("cannot start the communication thread: {e}")))?;
        let (rank, world) = ready_rx
            .recv()
            .map_err(|_| KilnError::Comm(format!("the {backend} backend failed to start")))??;
        let recorder = Arc::new(FlightRecorder::new(rank, options.timeout));
        let _ = recorder_tx.send(recorder.clone());
        let runner = runner_rx
            .recv()
            .map_err(|_| KilnError::Comm(format!("the {backend} backend failed to start")))?;
        let peers = Arc::new(OnceLock::new());
        let flight_dir = Arc::new(OnceLock::new());
        let watchdog = Watchdog::spawn(WatchdogSetup {
            rank,
            recorder: recorder.clone(),
            peers: peers.clone(),
            flight_dir: flight_dir.clone(),
            timeout: options.timeout,
        })
        .map_err(|e| KilnError::Comm(format!("cannot start the watchdog thread: {e}")))?;
        Ok(WorkerComm {
            rank,
            world,
            backend,
            queue: Mutex::new(Some(Queue { tx: job_tx, runner })),
            queued,
            thread: Mutex::new(Some(thread)),
            abort_hook,
            recorder,
            peers,
            flight_dir,
            _watchdog: watchdog,
        })
    }

    /// This rank's flight recorder.
    pub fn recorder(&self) -> Arc<FlightRecorder> {
        self.recorder.clone()
    }

    /// Tells the watchdog how to reach the other ranks (once; later calls are ignored).
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    /// Issues `job`: runs it here when it may run inline and nothing is queued ahead of it,
    /// otherwise queues it for the communication thread.
    fn send(&self, job: Job) {
        let (op, bytes) = job.describe();
        let entry = self.recorder.issue(op, bytes);
        let queue = self.queue.lock().expect("queue lock");
        let Some(queue) = queue.as_ref() else {
            return; // shutting down: the dropped reply channel reports it
        };
        // `queued` only falls to 0 once the thread has released the transport, and only this
        // lock's holder raises it, so no queued job can start while this one runs.
        if let Some(runner) = queue.runner.as_ref() {
            if job.inline() && self.queued.load(Ordering::Acquire) == 0 {
                runner.run(&entry, job, &|| {});
                return;
            }
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        // A closed channel means the thread is gone; the reply channel then reports it.
        let _ = queue.tx.send((entry, job));
    }
}

/// How long a thread that waits for the other side of the hand-off (the communication thread
/// for its next job, a caller for its result) polls before it sleeps. Waking a sleeping thread
/// costs a futex call on each side and a trip through the scheduler, several microseconds on
/// this machine: `kiln bench comm` at N = 2, 64 KiB all-gather (one library call, so the rest
/// is the hand-off) went from 0.48 to 0.86 of `MPI_Allgather` with polling (medians of 5
/// alternating runs). Polling yields the core at each turn, so a compute thread sharing it
/// loses little, and it stops after this long, so an idle rank does not spin.
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(50);

/// Receives from `rx`, polling for [`SPIN_LIMIT`] before sleeping; `None` once every sender is
/// gone.
fn recv_soon<T>(rx: &Receiver<T>) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if start.elapsed() < SPIN_LIMIT => std::thread::yield_now(),
            Err(TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

fn check_agreement<T: Transport>(t: &mut T, c: &Collective) -> Result<()> {
    let mine = c.descriptor();
    let all = t.all_gather_bytes(mine.as_bytes())?;
    let all: Vec<String> = all
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    if all.iter().all(|d| *d == all[0]) {
        return Ok(());
    }
    let detail: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(r, d)| format!("rank {r}: {d}"))
        .collect();
    Err(KilnError::Comm(format!(
        "ranks called different collectives ({})",
        detail.join("; ")
    )))
}

fn run_collective<T: Transport>(t: &mut T, c: Collective, verify: bool) -> Result<Vec<f32>> {
    if verify {
        check_agreement(t, &c)?;
    }
    let world = t.world();
    let check_multiple = |len: usize, name: &str| {
        if len % world != 0 {
            return Err(KilnError::Comm(format!(
                "{name}: length {len} is not a multiple of the world size {world}"
            )));
        }
        Ok(())
    };
    match c {
        Collective::AllReduce { mut buf, op } => {
            let len = buf.len();
            // One call instead of two where the library's is exact (two ranks, small buffers).
            if world > 1 && !t.all_reduce_exact(&mut buf, op)? {
                buf.resize(padded_len(len, world), 0.0);
                t.reduce_scatter(&mut buf, op)?;
                t.all_gather(&mut buf)?;
                buf.truncate(len);
            }
            Ok(buf)
        }
        Collective::ReduceScatter { mut buf, op } => {
            check_multiple(buf.len(), "reduce_scatter")?;
            if world > 1 {
                t.reduce_scatter(&mut buf, op)?;
            }
            Ok(buf)
        }
        Collective::AllGather { mut buf } => {
            check_multiple(buf.len(), "all_gather")?;
            if world > 1 {
                t.all_gather(&mut buf)?;
            }
            Ok(buf)
        }
        Collective::Reference { kind, mut buf } => {
            check_multiple(buf.len(), "reference")?;
            if buf.len() < 2 {
                return Err(KilnError::Comm(format!(
                    "reference: {} elements cannot hold the two timings it returns",
                    buf.len()
                )));
            }
            let (seconds, on_cpu) = t.reference(kind, &mut buf)?;
            buf[0] = seconds as f32;
            buf[1] = on_cpu as f32;
            Ok(buf)
        }
        Collective::Broadcast { mut buf, root } => {
            if root >= world {
                return Err(KilnError::Comm(format!(
                    "broadcast: root {root} is not a rank of a world of {world}"
                )));
            }
            if world > 1 {
                t.broadcast(&mut buf, root)?;
            }
            Ok(buf)
        }
    }
}

impl Communicator for WorkerComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        self.backend
    }

    fn start(&self, op: Collective) -> Pending {
        let (tx, rx) = channel();
        self.send(Job::Collective(op, tx));
        Pending { rx }
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (tx, rx) = channel();
        self.send(Job::Bytes(bytes.to_vec(), tx));
        rx.recv()
            .unwrap_or_else(|_| Err(KilnError::Comm("the communication thread stopped".into())))
    }

    fn barrier(&self) -> Result<()> {
        let (tx, rx) = channel();
        self.send(Job::Barrier(tx));
        rx.recv()
            .unwrap_or_else(|_| Err(KilnError::Comm("the communication thread stopped".into())))
    }

    fn abort(&self, why: &str) {
        (self.abort_hook)(why)
    }

    fn set_step(&self, step: u64) {
        self.recorder.set_step(step);
    }

    fn set_serves(&self, what: &str) {
        self.recorder.set_serves(what);
    }

    fn set_flight_dir(&self, dir: &Path) {
        let _ = self.flight_dir.set(dir.to_path_buf());
    }

    fn dump_flight(&self) -> Option<PathBuf> {
        let dir = self.flight_dir.get()?;
        self.recorder.dump(dir).ok()
    }
}

impl Drop for WorkerComm {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the collectives already issued; joining it
        // lets a backend finalise (MPI_Finalize) before the process exits. This side's runner
        // goes first, so that the thread holds the last reference and the transport is
        // finalised there, on the thread that initialised it.
        if let Some(Queue { tx, runner }) = self.queue.lock().expect("queue lock").take() {
            drop(runner);
            drop(tx);
        }
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

//! The watchdog: every collective has a deadline (`comm.timeout_s`, NCCL's default of 600 s;
//! twice that during start-up and the first step). When the one a rank's communication thread is
//! in runs past it, the watchdog asks every rank where it is — over [`Peers`], a path that does
//! not go through the stuck collective — prints one line naming the collective, its sequence
//! number and size, the step and what it serves, and the ranks that never arrived or sit in a
//! different collective (a desync), writes the flight record, and ends the process. Under mpirun
//! that ends the job; with `--simulate` the ranks are this process.

use super::flight::{FlightRecorder, Running, Status};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Exit code of a process ended by the watchdog (the code `timeout(1)` uses).
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 124;

/// How long the other ranks get to say where they are.
const ASK_PEERS: Duration = Duration::from_secs(5);

/// How long a rank that leaves the report to another waits for that rank to end the job.
const LEAVE_TO_REPORTER: Duration = Duration::from_secs(10);

/// Every rank's whereabouts, reached without the collectives.
pub trait Peers: Send + Sync {
    /// Each rank's status in rank order; `None` where a rank did not answer within `wait`.
    fn statuses(&self, wait: Duration) -> Vec<Option<Status>>;
}

/// Ranks that are threads of this process: their recorders, read directly.
pub struct LocalPeers(pub Vec<Arc<FlightRecorder>>);

impl Peers for LocalPeers {
    fn statuses(&self, _wait: Duration) -> Vec<Option<Status>> {
        self.0.iter().map(|r| Some(r.status())).collect()
    }
}

/// What the watchdog of one rank needs.
pub struct WatchdogSetup {
    /// This rank.
    pub rank: usize,
    /// This rank's recorder.
    pub recorder: Arc<FlightRecorder>,
    /// How to reach the other ranks; set once they are known.
    pub peers: Arc<OnceLock<Arc<dyn Peers>>>,
    /// Where the flight record goes (`output.dir`); none: not written.
    pub flight_dir: Arc<OnceLock<PathBuf>>,
    /// `comm.timeout_s`.
    pub timeout: Duration,
}

/// A running watchdog; dropping it stops the thread.
pub struct Watchdog {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub fn spawn(setup: WatchdogSetup) -> std::io::Result<Watchdog> {
        let (stop, stopped) = channel::<()>();
        // Often enough that the job ends well within timeout + 30 s; rarely enough to cost nothing.
        let poll = (setup.timeout / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let thread = std::thread::Builder::new()
            .name(format!("kiln-watchdog-{}", setup.rank))
            .spawn(move || loop {
                match stopped.recv_timeout(poll) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if let Some(mine) = setup.recorder.overdue() {
                    fire(&setup, mine);
                }
            })?;
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reports (or leaves the report to a lower rank that is stuck too), writes the flight record and
/// ends the process. Exiting is the only way out: the communication thread cannot be interrupted
/// inside a blocking MPI call, and under mpirun one process's exit ends the job.
fn fire(setup: &WatchdogSetup, mine: Running) -> ! {
    let statuses = match setup.peers.get() {
        Some(p) => p.statuses(ASK_PEERS),
        None => Vec::new(),
    };
    let flight = setup
        .flight_dir
        .get()
        .map(|dir| setup.recorder.dump(dir).map(|_| dir.join("flight")));
    if reporter(setup.rank, &statuses) {
        let record = match flight {
            Some(Ok(dir)) => format!("; flight records in {}", dir.display()),
            Some(Err(e)) => format!("; the flight record could not be written: {e}"),
            None => String::new(),
        };
        let line = describe(setup.rank, &mine, &statuses, setup.timeout);
        eprintln!("kiln: error: comm: {line}{record}");
        let _ = std::io::stderr().flush();
    } else {
        std::thread::sleep(LEAVE_TO_REPORTER);
    }
    // SAFETY: _exit ends the process at once without running atexit handlers or destructors,
    // which could block on the stuck communication thread (e.g. MPI_Finalize).
    unsafe { libc::_exit(EXIT_COLLECTIVE_TIMEOUT) }
}

/// The lowest rank that answered and is itself past (most of) its deadline reports, so that a
/// job whose ranks all wait on one stalled rank prints one line, not one per rank.
fn reporter(me: usize, statuses: &[Option<Status>]) -> bool {
    let stuck = |s: &Status| {
        s.running
            .as_ref()
            .is_some_and(|r| r.elapsed_s >= 0.8 * r.deadline_s)
    };
    statuses
        .iter()
        .flatten()
        .find(|s| stuck(s))
        .is_none_or(|s| s.rank >= me)
}

fn describe_entry(e: &super::flight::Entry) -> String {
    let step = e
        .step
        .map_or("during start-up".to_string(), |s| format!("at step {s}"));
    let serves = if e.serves.is_empty() {
        String::new()
    } else {
        format!(" serving {}", e.serves)
    };
    format!("{} #{} ({} bytes) {step}{serves}", e.op, e.seq, e.bytes)
}

/// The one line: the collective, and where every other rank is.
pub fn describe(
    me: usize,
    mine: &Running,
    statuses: &[Option<Status>],
    timeout: Duration,
) -> String {
    let mut line = format!(
        "collective timed out after {:.0} s (comm.timeout_s = {}): rank {me} in {}",
        mine.elapsed_s,
        timeout.as_secs_f64(),
        describe_entry(&mine.entry)
    );
    if statuses.is_empty() {
        line.push_str("; the other ranks could not be asked where they are");
        return line;
    }
    let (mut waiting, mut absent, mut elsewhere) = (Vec::new(), Vec::new(), Vec::new());
    for (q, status) in statuses.iter().enumerate().filter(|(q, _)| *q != me) {
        match status {
            None => absent.push(format!("rank {q} (did not answer: stopped, hung or dead)")),
            Some(s) => match &s.running {
                Some(r) if r.entry.seq == mine.entry.seq && r.entry.op == mine.entry.op => {
                    waiting.push(q.to_string())
                }
                Some(r) => elsewhere.push(format!("rank {q} is in {}", describe_entry(&r.entry))),
                None if s.issued < mine.entry.seq => absent.push(format!(
                    "rank {q} (last issued #{}{}, now computing or stuck outside communication)",
                    s.issued,
                    s.step.map_or(String::new(), |t| format!(", step {t}"))
                )),
                None => elsewhere.push(format!(
                    "rank {q} has issued #{} and its communication thread is idle",
                    s.issued
                )),
            },
        }
    }
    if !absent.is_empty() {
        line.push_str(&format!("; never arrived: {}", absent.join(", ")));
    }
    if !elsewhere.is_empty() {
        line.push_str(&format!(
            "; in a different collective (desync): {}",
            elsewhere.join("; ")
        ));
    }
    if !waiting.is_empty() {
        line.push_str(&format!(
            "; also waiting in it: rank {}",
            waiting.join(", ")
        ));
    }
    line
}

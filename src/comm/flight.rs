//! The flight recorder: each rank's last [`CAPACITY`] collectives — operation, sequence number,
//! size, what it serves, state and times — kept in memory and written to
//! `output.dir/flight/rank-R.json` when a collective times out or fails (PyTorch's NCCL flight
//! recorder, `TORCH_NCCL_TRACE_BUFFER_SIZE`). It is also where the watchdog and the other ranks
//! read where this rank is.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Collectives kept per rank.
pub const CAPACITY: usize = 64;

/// Where a recorded collective is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Queued behind another collective on the communication thread.
    Issued,
    /// The communication thread is inside it.
    Running,
    /// Finished.
    Completed,
    /// Returned an error.
    Failed,
}

/// One collective as the recorder saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// 1 for the first collective of the run, then one more per collective, on every rank alike.
    pub seq: u64,
    /// Operation, reduction and length, as `comm.verify` compares them.
    pub op: String,
    /// Bytes this rank passes in.
    pub bytes: usize,
    /// What it serves: the loss, a gradient bucket and its units, a unit's gather, …
    pub serves: String,
    /// The optimizer step (0-based) it belongs to; none during start-up.
    pub step: Option<u64>,
    /// Where it is.
    pub state: State,
    /// Seconds after the recorder started: issued, started, ended.
    pub issued_s: f64,
    /// When the communication thread entered it.
    pub started_s: Option<f64>,
    /// When it finished or failed.
    pub ended_s: Option<f64>,
    /// How long the transport's own calls took (the library call or calls and, for a reduction,
    /// the rank-ordered sum), without the issue, the hand-off and the bookkeeping around them.
    #[serde(default)]
    pub transport_s: Option<f64>,
}

/// What a rank says about itself when asked (by its watchdog, or another rank's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The rank.
    pub rank: usize,
    /// Sequence number of the last collective it issued (0: none yet).
    pub issued: u64,
    /// The step its training loop is in.
    pub step: Option<u64>,
    /// The collective its communication thread is inside, if any, and for how long.
    pub running: Option<Running>,
    /// The last collective it issued, if any.
    pub last: Option<Entry>,
}

/// A collective in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    /// Its record.
    pub entry: Entry,
    /// Seconds since the communication thread entered it.
    pub elapsed_s: f64,
    /// Seconds it may take before the watchdog fires.
    pub deadline_s: f64,
}

/// The recorder of one rank. Cheap: a lock and a ring buffer touched three times per collective.
pub struct FlightRecorder {
    rank: usize,
    timeout: Duration,
    started: Instant,
    started_unix_s: f64,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: VecDeque<Entry>,
    issued: u64,
    step: Option<u64>,
    serves: String,
}

impl FlightRecorder {
    /// A recorder for `rank` whose collectives may take `timeout` each (twice that during
    /// start-up and the first step, which include building and checking the bucket plan).
    pub fn new(rank: usize, timeout: Duration) -> Self {
        FlightRecorder {
            rank,
            timeout,
            started: Instant::now(),
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            inner: Mutex::new(Inner {
                entries: VecDeque::with_capacity(CAPACITY),
                issued: 0,
                step: None,
                serves: String::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the ring half-written in a way that matters here.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The deadline of a collective of `step`.
    fn deadline(&self, step: Option<u64>) -> Duration {
        match step {
            None | Some(0) => self.timeout * 2,
            Some(_) => self.timeout,
        }
    }

    /// The training loop entered optimizer step `step`.
    pub fn set_step(&self, step: u64) {
        self.lock().step = Some(step);
    }

    /// Names what the collectives issued from now on serve.
    pub fn set_serves(&self, what: &str) {
        let mut inner = self.lock();
        inner.serves.clear();
        inner.serves.push_str(what);
    }

    /// Records a collective being issued; returns its record.
    pub fn issue(&self, op: String, bytes: usize) -> Entry {
        let now = self.now_s();
        let mut inner = self.lock();
        inner.issued += 1;
        let entry = Entry {
            seq: inner.issued,
            op,
            bytes,
            serves: inner.serves.clone(),
            step: inner.step,
            state: State::Issued,
            issued_s: now,
            started_s: None,
            ended_s: None,
            transport_s: None,
        };
        if inner.entries.len() == CAPACITY {
            inner.entries.pop_front();
        }
        inner.entries.push_back(entry.clone());
        entry
    }

    fn update(&self, seq: u64, f: impl FnOnce(&mut Entry, f64)) {
        let now = self.now_s();
        let mut inner = self.lock();
        // Entries are in seq order and the one wanted is among the newest.
        if let Some(e) = inner.entries.iter_mut().rev().find(|e| e.seq == seq) {
            f(e, now);
        }
    }

    /// The communication thread entered collective `seq`.
    pub fn start(&self, seq: u64) {
        self.update(seq, |e, now| {
            e.state = State::Running;
            e.started_s = Some(now);
        });
    }

    /// Collective `seq` finished (`ok`) or failed, after `transport_s` seconds in the transport.
    pub fn finish(&self, seq: u64, ok: bool, transport_s: f64) {
        self.update(seq, |e, now| {
            e.state = if ok { State::Completed } else { State::Failed };
            e.ended_s = Some(now);
            e.transport_s = Some(transport_s);
        });
    }

    /// Where this rank is now.
    pub fn status(&self) -> Status {
        let now = self.now_s();
        let inner = self.lock();
        let running = inner
            .entries
            .iter()
            .find(|e| e.state == State::Running)
            .map(|e| Running {
                entry: e.clone(),
                elapsed_s: now - e.started_s.unwrap_or(now),
                deadline_s: self.deadline(e.step).as_secs_f64(),
            });
        Status {
            rank: self.rank,
            issued: inner.issued,
            step: inner.step,
            running,
            last: inner.entries.back().cloned(),
        }
    }

    /// The collective in progress, if it has run past its deadline.
    pub fn overdue(&self) -> Option<Running> {
        self.status()
            .running
            .filter(|r| r.elapsed_s >= r.deadline_s)
    }

    /// Writes `dir/flight/rank-R.json` (creating the folder) and returns its path.
    pub fn dump(&self, dir: &Path) -> std::io::Result<PathBuf> {
        #[derive(Serialize)]
        struct Record<'a> {
            rank: usize,
            /// Unix time of `*_s` = 0.
            clock_zero_unix_s: f64,
            timeout_s: f64,
            now_s: f64,
            status: &'a Status,
            collectives: &'a [Entry],
        }
        let status = self.status();
        let entries: Vec<Entry> = self.lock().entries.iter().cloned().collect();
        let record = Record {
            rank: self.rank,
            clock_zero_unix_s: self.started_unix_s,
            timeout_s: self.timeout.as_secs_f64(),
            now_s: self.now_s(),
            status: &status,
            collectives: &entries,
        };
        let folder = dir.join("flight");
        std::fs::create_dir_all(&folder)?;
        let path = folder.join(format!("rank-{}.json", self.rank));
        let text = serde_json::to_string_pretty(&record).expect("flight record serialises");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

//! Stop requests: SIGTERM, SIGINT and SIGUSR1 ask a training run to stop at the end of the step
//! in progress (issue 13, "Preemption"). The train loop folds the request into the loss
//! all-reduce it already does every step, so every rank stops after the same step; it then
//! writes a checkpoint (when `checkpoint.dir` is set) and the process exits with
//! [`EXIT_STOPPED`]. A second signal ends the process at once, by that signal.
//!
//! The flag is the one process-wide static in kiln: a signal handler can reach nothing else.
//! Everything else holds a [`StopRequest`] handle, which [`install`] hands out.
//!
//! SIGUSR1 is there for mpirun: OpenMPI 4.1's mpirun forwards SIGUSR1 to every rank at once,
//! but answers SIGTERM and SIGINT by killing the job (SIGTERM to the ranks after
//! `odls_base_sigkill_timeout`, 1 s, then SIGKILL 1 s later — checked here). srun forwards
//! both. Slurm's `--signal=B:USR1@120` therefore reaches every rank whichever starts them
//! (PyTorch Lightning's Slurm requeue uses SIGUSR1 for the same reason).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

/// Exit code of a run that a stop signal ended at a step boundary, after its checkpoint:
/// sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"). It differs
/// from 0 so that a scheduler never takes the run as finished, and from 128 + N, the status of
/// a process killed by signal N (e.g. by a second signal), so that a wrapper can tell "stopped
/// cleanly, `--resume` continues" from "died": requeue on 75 (LSF: `bsub -Q 75`).
pub const EXIT_STOPPED: i32 = 75;

/// Signals that request a stop.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// Stop signals received so far (process-wide: the handler can reach only statics).
static RECEIVED: AtomicU32 = AtomicU32::new(0);
/// The first stop signal's number, for messages.
static FIRST: AtomicI32 = AtomicI32::new(0);
/// Whether the handler says at once that it heard the signal: only for a person at a terminal.
/// Under mpirun stderr is a pipe, and mpirun sends SIGTERM to the ranks of every job that fails,
/// so the notice would follow every error line; rank 0 logs a real stop anyway.
static NOTICE: AtomicBool = AtomicBool::new(false);

/// Whether the run has been asked to stop. Copy it into every rank; [`StopRequest::NEVER`]
/// (the default) never asks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopRequest {
    flag: Option<&'static AtomicU32>,
}

impl StopRequest {
    /// A request that never comes (library use, tests, benchmarks).
    pub const NEVER: StopRequest = StopRequest { flag: None };

    /// Has a stop signal arrived?
    pub fn requested(&self) -> bool {
        self.flag.is_some_and(|f| f.load(Ordering::Relaxed) > 0)
    }

    /// The name of the first stop signal received (`SIGTERM`, …), if any.
    pub fn signal_name(&self) -> Option<&'static str> {
        self.requested()
            .then(|| signal_name(FIRST.load(Ordering::Relaxed)))
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// Installs the handlers for [`STOP_SIGNALS`] and returns the handle the train loop polls.
/// Call it once, before the ranks start (before MPI_Init, so that MPI's own handlers, if any,
/// come after).
pub fn install() -> StopRequest {
    use std::io::IsTerminal;
    NOTICE.store(std::io::stderr().is_terminal(), Ordering::SeqCst);
    for sig in STOP_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags); the handler is an
        // `extern "C" fn(c_int)` that does only async-signal-safe work (atomics, write(2),
        // signal(2), raise(3)). SA_RESTART keeps blocking calls (file I/O, MPI's sockets) from
        // failing with EINTR when the first signal arrives.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        assert_eq!(rc, 0, "sigaction({sig}) failed");
    }
    StopRequest {
        flag: Some(&RECEIVED),
    }
}

extern "C" fn on_stop_signal(sig: libc::c_int) {
    if RECEIVED.fetch_add(1, Ordering::SeqCst) == 0 {
        FIRST.store(sig, Ordering::SeqCst);
        let msg: &[u8] = match sig {
            libc::SIGTERM => b"kiln: SIGTERM: stopping after the step in progress (a second signal stops at once)\n",
            libc::SIGINT => b"kiln: SIGINT: stopping after the step in progress (a second signal stops at once)\n",
            _ => b"kiln: SIGUSR1: stopping after the step in progress (a second signal stops at once)\n",
        };
        // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string. A short or
        // failed write only loses the message.
        if NOTICE.load(Ordering::SeqCst) {
            unsafe {
                libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len());
            }
        }
    } else {
        // A second signal: die of it now, with the status a shell reports as 128 + N. The
        // signal is blocked while this handler runs, so the raised one is delivered, with the
        // default action restored, as soon as the handler returns.
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

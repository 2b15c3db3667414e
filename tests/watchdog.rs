//! Hangs that explain themselves: a rank that stops (SIGSTOP under mpirun, `KILN_FAULT=stall`
//! with `--simulate`) makes the job end within `comm.timeout_s` + 30 s with one line naming the
//! collective and the rank that never arrived, and flight records on disk; a rank that calls a
//! different collective is named with the one the others are in.

mod common;

use common::{mpirun_available, output_text, Scratch, TEST_MODEL};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT_S: u64 = 3;

/// `kiln train` arguments: the test model, many steps (the run is stopped long before), outputs
/// in `dir`, a short collective timeout.
fn train_args(dir: &Path, ranks_as_threads: Option<usize>) -> Vec<String> {
    let mut args = vec!["train".to_string(), "--quiet".into()];
    if let Some(n) = ranks_as_threads {
        args.extend(["--simulate".into(), n.to_string()]);
    }
    let sets = TEST_MODEL.iter().map(|s| s.to_string()).chain([
        "train.steps=100000".to_string(),
        "train.threads=1".into(),
        "train.micro_batch=2".into(),
        "train.global_batch=4".into(),
        "parallel.bucket_mb=0.01".into(),
        format!("comm.timeout_s={TIMEOUT_S}"),
        format!("output.dir={}", dir.display()),
    ]);
    for s in sets {
        args.extend(["--set".to_string(), s]);
    }
    args
}

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_LOG", "error");
    c
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-x", "KILN_LOG", "-x", "KILN_FAULT"])
    .arg(env!("CARGO_BIN_EXE_kiln"))
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("KILN_LOG", "error");
    c
}

/// Waits for `child` to end; fails the test if it takes longer than the watchdog may.
fn wait_bounded(mut child: Child, started: Instant) -> (Output, Duration) {
    let limit = Duration::from_secs(TIMEOUT_S + 30);
    loop {
        if child.try_wait().expect("poll child").is_some() {
            let out = child.wait_with_output().expect("collect output");
            return (out, started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "the job did not end within timeout_s + 30 s:\n{}",
                output_text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Steps rank 0 has written to metrics.jsonl.
fn steps_done(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// kiln's error line in a run's stderr (mpirun adds lines of its own around it).
fn error_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with("kiln: error:"))
        .unwrap_or_else(|| panic!("no error line: {}", output_text(out)))
        .to_string()
}

fn assert_flight_record(dir: &Path, rank: usize) {
    let path = dir.join(format!("flight/rank-{rank}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let record: serde_json::Value = serde_json::from_str(&text).expect("flight record is JSON");
    let collectives = record["collectives"].as_array().expect("collectives");
    assert!(!collectives.is_empty() && collectives.len() <= 64, "{text}");
    assert!(
        collectives.iter().any(|c| c["state"] == "running"),
        "the stuck collective is recorded as running: {text}"
    );
}

#[test]
fn a_stalled_simulated_rank_is_named_and_the_job_ends() {
    let dir = Scratch::new("watchdog-stall-local");
    let started = Instant::now();
    let child = kiln()
        .args(train_args(&dir.0, Some(2)))
        .env("KILN_FAULT", "stall:1:3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let (out, took) = wait_bounded(child, started);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(124), "{text}");
    let line = error_line(&out);
    assert!(line.contains("collective timed out after"), "{line}");
    assert!(line.contains("rank 0 in "), "{line}");
    assert!(line.contains("at step 3"), "{line}");
    assert!(line.contains("never arrived: rank 1"), "{line}");
    assert!(line.contains("flight records in"), "{line}");
    assert_eq!(
        steps_done(&dir.0),
        3,
        "steps 0-2 completed before the stall"
    );
    assert_flight_record(&dir.0, 0);
    eprintln!("stalled simulated rank: job ended after {took:?}");
}

#[test]
fn a_simulated_desync_names_both_collectives() {
    let dir = Scratch::new("watchdog-desync-local");
    let out = kiln()
        .args(train_args(&dir.0, Some(2)))
        .env("KILN_FAULT", "desync:1:2")
        .output()
        .expect("run kiln");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kiln: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{text}");
    let line = errors[0];
    assert!(
        line.contains("ranks called different collectives (desync)"),
        "{line}"
    );
    assert!(line.contains("rank 1: barrier #"), "{line}");
    assert!(line.contains("serving the injected desync"), "{line}");
    assert!(line.contains("rank 0: all_reduce(Sum, len"), "{line}");
    assert!(line.contains("at step 2 serving gradient bucket"), "{line}");
    assert_flight_record_written(&dir.0);
}

fn assert_flight_record_written(dir: &Path) {
    for rank in 0..2 {
        let path = dir.join(format!("flight/rank-{rank}.json"));
        assert!(path.exists(), "{} missing", path.display());
    }
}

/// The pids of the ranks mpirun started, by rank (from their environment).
fn rank_pids(mpirun_pid: u32, np: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut found = vec![0u32; np];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the 4th field, after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(mpirun_pid) {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in env.split(|&b| b == 0) {
                if let Some(r) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                    if let Some(r) = std::str::from_utf8(r)
                        .ok()
                        .and_then(|r| r.parse::<usize>().ok())
                    {
                        if r < np {
                            found[r] = pid;
                        }
                    }
                }
            }
        }
        if found.iter().all(|&p| p != 0) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "ranks of mpirun {mpirun_pid} not found"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stopped_mpi_rank_is_named_and_the_job_ends() {
    if !mpirun_available() {
        return;
    }
    let dir = Scratch::new("watchdog-stall-mpi");
    let child = mpirun(2)
        .args(train_args(&dir.0, None))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    let pids = rank_pids(child.id(), 2);
    let ready = Instant::now() + Duration::from_secs(60);
    while steps_done(&dir.0) < 3 {
        assert!(Instant::now() < ready, "the run did not reach step 3");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill only sends a signal to a process this test started (through mpirun).
    unsafe { libc::kill(pids[1] as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let (out, took) = wait_bounded(child, started);
    // mpirun should have killed the stopped rank; make sure nothing is left behind.
    // SAFETY: as above; a pid that has already exited is harmless to signal (ESRCH).
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    let text = output_text(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    let line = error_line(&out);
    assert!(line.contains("collective timed out after"), "{line}");
    assert!(
        line.contains("never arrived: rank 1 (did not answer"),
        "{line}"
    );
    assert_flight_record(&dir.0, 0);
    eprintln!("stopped MPI rank: job ended {took:?} after the stop");
}

#[test]
fn an_mpi_desync_names_both_collectives() {
    if !mpirun_available() {
        return;
    }
    let dir = Scratch::new("watchdog-desync-mpi");
    let started = Instant::now();
    let child = mpirun(2)
        .args(train_args(&dir.0, None))
        .env("KILN_FAULT", "desync:1:2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    let (out, _) = wait_bounded(child, started);
    let text = output_text(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    let line = error_line(&out);
    assert!(line.contains("rank 0 in all_reduce(Sum, len"), "{line}");
    assert!(
        line.contains("in a different collective (desync): rank 1 is in barrier #"),
        "{line}"
    );
    assert!(line.contains("serving the injected desync"), "{line}");
    assert_flight_record(&dir.0, 0);
}

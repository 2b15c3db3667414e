//! Helpers shared by the integration tests.
#![allow(dead_code)]

use kiln::config::{self, Config};
use kiln::launch;
use kiln::train::{RunOptions, RunOutcome};
use std::path::PathBuf;

/// In-process runs: no progress bar, no files.
pub const QUIET: RunOptions = RunOptions {
    quiet: true,
    no_outputs: true,
    no_final_params: false,
    resume: None,
    stop: kiln::signals::StopRequest::NEVER,
};

/// The model of the test matrices: vocab 61, d 21, 3 heads, 2 layers, 37 positions, trained on
/// 16 Markov symbols at seq 16. Its embedding unit has 2058 parameters and its head 1323,
/// neither a multiple of 2, 3 or 4, so shards carry padding.
pub const TEST_MODEL: &[&str] = &[
    "model.vocab=61",
    "model.d_model=21",
    "model.n_heads=3",
    "model.n_layers=2",
    "model.max_seq_len=37",
    "model.seq_len=16",
    "data.markov_symbols=16",
];

/// Text of a finished command, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `world` local ranks train a model small enough for test matrices, 30 steps, micro-batch 2:
/// vocab 61, d 21, 3 heads, 37 positions — the embedding unit has 2058 parameters and the head
/// 1323, neither a multiple of 2, 3 or 4, so shards carry padding. `extra` are more `--set`s.
pub fn small_run(stage: u8, world: usize, accum: usize, extra: &[&str]) -> RunOutcome {
    small_run_resumed(stage, world, accum, extra, None).expect("run")
}

/// `small_run`, continuing from checkpoint `resume` when given.
pub fn small_run_resumed(
    stage: u8,
    world: usize,
    accum: usize,
    extra: &[&str],
    resume: Option<&str>,
) -> kiln::error::Result<RunOutcome> {
    let micro = 2;
    let mut sets: Vec<String> = TEST_MODEL.iter().map(|s| s.to_string()).collect();
    sets.extend([
        "train.steps=30".to_string(),
        "train.lr=1e-2".into(),
        "train.warmup_steps=3".into(),
        "train.threads=1".into(),
        "parallel.bucket_mb=0.01".into(),
        format!("parallel.stage={stage}"),
        format!("train.micro_batch={micro}"),
        format!("train.global_batch={}", micro * accum * world),
    ]);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let opts = RunOptions {
        resume: resume.map(str::to_string),
        ..QUIET
    };
    Ok(launch::simulate(&config(&sets), world, &opts)?.swap_remove(0))
}

/// Runs the kiln binary with `args` (warnings only in its log) and returns what it did.
pub fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_LOG", "warn")
        .output()
        .expect("run kiln")
}

/// Runs `kiln train --quiet` as a process with these `--set` overrides and asserts that it
/// succeeded (warnings only in its log).
pub fn train_process(sets: impl IntoIterator<Item = String>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["train", "--quiet"]).env("KILN_LOG", "warn");
    for s in sets {
        cmd.args(["--set", &s]);
    }
    let out = cmd.output().expect("kiln runs");
    assert!(out.status.success(), "{}", output_text(&out));
    out
}

/// A fresh, empty scratch directory for one test (removed when dropped).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    pub fn str(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config from `--set` style overrides on top of the defaults.
pub fn config(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    config::load(None, &sets).expect("valid test config")
}

/// Largest |a − b| over a tensor divided by the largest |b| of that tensor (a scale-aware
/// relative difference: elementwise ratios are meaningless for values that pass through zero).
pub fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b
        .iter()
        .map(|x| x.abs() as f64)
        .fold(0.0, f64::max)
        .max(1e-30);
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

/// ‖a − b‖₂ ÷ ‖b‖₂ over a tensor.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-300)).sqrt()
}

/// Same bits?
pub fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Whether `mpirun` can be run here. Tests that need it skip without it, saying so, except under
/// `CI=true`, where a missing mpirun is a failure.
pub fn mpirun_available() -> bool {
    let found = std::process::Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var("CI").as_deref() == Ok("true") {
        panic!("mpirun is required when CI=true (apt-get install openmpi-bin libopenmpi-dev)");
    }
    if !found {
        eprintln!("skipping: mpirun not found");
    }
    found
}

/// Every file and directory under `dir` with its bytes (directories: empty), sorted: two
/// snapshots are equal when nothing under `dir` was created, removed or changed.
pub fn snapshot(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.push((p.clone(), Vec::new()));
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// Asserts that the safetensors files `mine` and `theirs` hold the same tensors (names,
/// shapes, bits); `what` prefixes the messages. Returns `mine`'s reader.
pub fn assert_same_tensors(
    mine: &std::path::Path,
    theirs: &std::path::Path,
    what: &str,
) -> kiln::checkpoint::TensorFileReader {
    let mine = kiln::checkpoint::TensorFileReader::open(mine).unwrap();
    let theirs = kiln::checkpoint::TensorFileReader::open(theirs).unwrap();
    let mut names: Vec<&str> = mine.names().collect();
    names.sort();
    let mut want: Vec<&str> = theirs.names().collect();
    want.sort();
    assert_eq!(names, want, "{what}: tensor names");
    for name in names {
        let shape = theirs.shape(name).unwrap();
        assert_eq!(mine.shape(name).unwrap(), shape, "{what}: {name}");
        let n = shape.iter().product();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        mine.read(name, 0, &mut a).unwrap();
        theirs.read(name, 0, &mut b).unwrap();
        assert!(bitwise_equal(&a, &b), "{what}: {name} differs");
    }
    mine
}

/// `tests/fixtures/hf-{arch}-tiny`: the Llama-family fixtures `scripts/make_hf_fixture.py` made.
pub fn hf_fixture(arch: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/hf-{arch}-tiny"))
}

/// The fixture's `reference.json`.
pub fn hf_reference(arch: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(hf_fixture(arch).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `--set` overrides that train the fixture on its token file with the settings `train` (an
/// object of kiln keys from reference.json), one thread, then `extra`.
pub fn hf_sets(arch: &str, train: &serde_json::Value, extra: &[&str]) -> Vec<String> {
    let f = hf_fixture(arch).display().to_string();
    let mut sets = vec![
        format!("model.init_from={f}"),
        format!("data.path={f}/tokens.bin"),
        "train.threads=1".into(),
    ];
    for (key, value) in train.as_object().expect("reference.json train settings") {
        sets.push(format!("{key}={value}"));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

/// A Llama-family run in this process, `world` ranks as threads.
pub fn decoder_run(sets: &[String], world: usize) -> RunOutcome {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    kiln::llama::train(&config(&sets), Some(world), QUIET).expect("run")
}

/// Asserts the bad-input contract: exit code 2 and one line on stderr containing `needle`
/// (`what` names the case in a failure).
pub fn assert_refused(out: &std::process::Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {}", output_text(out));
    assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
    assert!(err.contains(needle), "{what}: {err}");
}

/// The records of `dir/metrics.jsonl`, one per step.
pub fn metrics_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

//! Whole-run benchmarks that launch kiln (and references) as separate processes, alternating the
//! contenders run by run so that drift on a shared machine hits them alike, and quote medians.
//!
//! - `kiln bench step`: one process, one thread, the configured preset (tiny by default) at
//!   micro-batch 8 — kiln next to the same model in PyTorch (scripts/torch_gpt.py, when a Python
//!   with torch is given).
//! - `kiln bench ddp`: weak scaling, one process vs N ranks under mpirun (micro-batch 8 per rank,
//!   one thread per rank): efficiency = single ÷ N-rank step time, the absolute overhead, and the
//!   exposed communication time (the step's wait for gradient buckets); with a Python with torch,
//!   PyTorch's counterpart of the configured stage on as many ranks (scripts/torch_gpt.py `dist`).

use crate::error::{KilnError, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Medians of one contender over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct Contender {
    /// What ran.
    pub name: String,
    /// Median step time of each run, ms.
    pub step_ms: Vec<f64>,
    /// Median exposed communication of each run, ms (kiln runs only).
    pub comm_wait_ms: Vec<f64>,
    /// Median AdamW time (state transfers included) of each run, ms (kiln runs only).
    pub optimizer_ms: Vec<f64>,
}

/// Median of a list (NaN when empty).
pub fn median_of(v: &[f64]) -> f64 {
    median(v)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

impl Contender {
    pub(super) fn new(name: impl Into<String>) -> Self {
        Contender {
            name: name.into(),
            step_ms: Vec::new(),
            comm_wait_ms: Vec::new(),
            optimizer_ms: Vec::new(),
        }
    }

    /// Median over runs of the per-run median step time.
    pub fn median_ms(&self) -> f64 {
        median(&self.step_ms)
    }

    /// `reference`'s step time ÷ this one's, run by run (the two alternate, so run i of each
    /// saw the same hour of a shared machine), then the median: robust to the machine slowing
    /// down for a while, which moves both medians but not the pairs.
    pub fn paired_speed_ratio(&self, reference: &Contender) -> f64 {
        let ratios: Vec<f64> = self
            .step_ms
            .iter()
            .zip(&reference.step_ms)
            .map(|(own, other)| other / own)
            .collect();
        median(&ratios)
    }
}

pub(super) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| KilnError::config(format!("bench: cannot start {what}: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The whole output goes to a file: torchrun ends it with a banner of `=` signs, and the
        // error that matters may be any of the lines above.
        let name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path =
            std::env::temp_dir().join(format!("kiln-bench-{}-{name}.stderr", std::process::id()));
        let kept = match std::fs::write(&path, stderr.as_bytes()) {
            Ok(()) => format!(" (whole output: {})", path.display()),
            Err(_) => String::new(),
        };
        return Err(KilnError::Comm(format!(
            "bench: {what} failed ({}): {}{kept}",
            out.status,
            telling_line(&stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line of a failed command's output that says what went wrong: the last one naming an
/// error, an exception or a crash, else the last one that is not blank or a banner. torchrun's
/// own report of a failed child (its `torch.distributed.elastic` lines, `ChildFailedError`)
/// comes after the child's last words and names no cause, so it is passed over.
fn telling_line(stderr: &str) -> &str {
    const CAUSES: [&str; 6] = [
        "Error",
        "error:",
        "Exception",
        "terminate called",
        "Segmentation fault",
        "Killed",
    ];
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.chars().any(|c| c.is_alphanumeric()))
        .collect();
    let launcher = |l: &str| {
        [
            "distributed/elastic",
            "distributed.elastic",
            "ChildFailedError",
        ]
        .iter()
        .any(|m| l.contains(m))
    };
    lines
        .iter()
        .rev()
        .find(|l| !launcher(l) && CAUSES.iter().any(|c| l.contains(c)))
        .or(lines.last())
        .copied()
        .unwrap_or("no output")
}

/// Medians over the steps of one finished kiln run, ms.
pub(super) struct RunTimes {
    pub step: f64,
    pub comm_wait: f64,
    pub optimizer: f64,
}

/// The medians of a finished kiln run, skipping the first `skip` steps (the first step builds
/// the bucket plan).
pub(super) fn read_run(dir: &Path, skip: usize) -> Result<RunTimes> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| KilnError::io(&path, e))?;
    let mut columns: [Vec<f64>; 3] = Default::default();
    for line in text.lines().skip(skip) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| KilnError::file(&path, e.to_string()))?;
        for (col, key) in columns
            .iter_mut()
            .zip(["step_ms", "comm_wait_ms", "optimizer_ms"])
        {
            col.push(v[key].as_f64().unwrap_or(f64::NAN));
        }
    }
    let [step, comm_wait, optimizer] = columns.map(|c| median(&c));
    Ok(RunTimes {
        step,
        comm_wait,
        optimizer,
    })
}

/// Common settings: the recipe plus the benchmark shape.
pub struct BenchShape {
    /// Recipe.
    pub config: PathBuf,
    /// Extra `--set` overrides.
    pub sets: Vec<String>,
    /// Steps per run.
    pub steps: u64,
    /// Runs per contender.
    pub repeats: usize,
    /// Micro-batch per rank.
    pub micro_batch: usize,
}

pub(super) fn kiln_train(shape: &BenchShape, world: usize, out: &Path) -> Result<Command> {
    let exe = std::env::current_exe()
        .map_err(|e| KilnError::Comm(format!("bench: cannot find the kiln binary: {e}")))?;
    let mut cmd = if world == 1 {
        Command::new(&exe)
    } else {
        let mut c = Command::new("mpirun");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        c.args(["-np", &world.to_string()]);
        if world > cores {
            c.args(["--oversubscribe", "--bind-to", "none"]);
        } else {
            c.args(["--bind-to", "core"]);
        }
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c.arg(&exe);
        c
    };
    cmd.args(["train", "--quiet", "--config"])
        .arg(&shape.config);
    let mut sets = vec![
        format!("train.steps={}", shape.steps),
        format!("train.micro_batch={}", shape.micro_batch),
        format!("train.global_batch={}", shape.micro_batch * world),
        "train.threads=1".to_string(),
        format!("output.dir={}", out.display()),
        format!("comm.backend={}", if world == 1 { "local" } else { "mpi" }),
    ];
    sets.extend(shape.sets.iter().cloned());
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env("KILN_LOG", "warn");
    Ok(cmd)
}

pub(super) fn scratch_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| KilnError::io(&dir, e))?;
    Ok(dir)
}

/// Single process vs `world` ranks, alternating; plus `world` independent single processes run
/// side by side, which shows what sharing the machine's memory system costs without any
/// communication (the floor under the N-rank step time).
///
/// With `torch` = (python, model arguments, mode), PyTorch's `world`-rank counterpart (scripts/torch_gpt.py
/// `dist --mode`) runs in the same alternation and comes fourth.
pub fn ddp(
    shape: &BenchShape,
    world: usize,
    torch: Option<(&str, &[String], &str)>,
) -> Result<Vec<Contender>> {
    let dir = scratch_dir()?;
    let mut reference = torch.map(|(_, _, mode)| Contender::new(format!("PyTorch {mode}")));
    let mut single = Contender::new("kiln, 1 process");
    let mut multi = Contender::new(format!("kiln, {world} ranks (mpirun)"));
    let mut side_by_side = Contender::new(format!("{world} independent processes"));
    for r in 0..shape.repeats {
        for (w, c) in [(1, &mut single), (world, &mut multi)] {
            let out = dir.join(format!("w{w}-r{r}"));
            run(&mut kiln_train(shape, w, &out)?, &c.name)?;
            let t = read_run(&out, 2)?;
            let (ms, wait) = (t.step, t.comm_wait);
            c.step_ms.push(ms);
            c.comm_wait_ms.push(wait);
            eprintln!(
                "  run {}: {:<28} {ms:8.1} ms/step  (comm wait {wait:.2} ms)",
                r + 1,
                c.name
            );
        }
        if let (Some((py, model, mode)), Some(c)) = (torch, reference.as_mut()) {
            let ms = torch_step_ms(py, shape, world, model, mode)?;
            c.step_ms.push(ms);
            eprintln!("  run {}: {:<28} {ms:8.1} ms/step", r + 1, c.name);
        }
        let outs: Vec<PathBuf> = (0..world)
            .map(|i| dir.join(format!("side{i}-r{r}")))
            .collect();
        let mut children = Vec::new();
        for out in &outs {
            let child = kiln_train(shape, 1, out)?
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            children.push(
                child.map_err(|e| KilnError::config(format!("bench: cannot start kiln: {e}")))?,
            );
        }
        for mut child in children {
            let _ = child.wait();
        }
        let times: Result<Vec<f64>> = outs
            .iter()
            .map(|o| read_run(o, 2).map(|t| t.step))
            .collect();
        let ms = median(&times?);
        side_by_side.step_ms.push(ms);
        eprintln!(
            "  run {}: {:<28} {ms:8.1} ms/step",
            r + 1,
            side_by_side.name
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok([single, multi, side_by_side]
        .into_iter()
        .chain(reference)
        .collect())
}

/// PyTorch's median step time for the same shape (scripts/torch_gpt.py run by `python`): one
/// process (`bench`), or `world` ranks over gloo (`dist --mode MODE` under
/// torch.distributed.run), one thread per rank.
fn torch_step_ms(
    python: &str,
    shape: &BenchShape,
    world: usize,
    model: &[String],
    mode: &str,
) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_gpt.py");
    let mut cmd = Command::new(python);
    if world == 1 {
        cmd.arg(&script).arg("bench");
    } else {
        cmd.args([
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
        ])
        .arg(world.to_string())
        .arg(&script)
        .args(["dist", "--mode", mode]);
    }
    cmd.args(model)
        .args(["--threads", "1", "--micro-batch"])
        .arg(shape.micro_batch.to_string())
        .arg("--steps")
        .arg(shape.steps.to_string());
    let text = run(&mut cmd, "scripts/torch_gpt.py")?;
    text.split("median ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            KilnError::Comm(format!(
                "bench: unexpected output from torch_gpt.py: {text}"
            ))
        })
}

/// kiln vs PyTorch (scripts/torch_gpt.py run by `python` with the same `model` arguments: a
/// preset, or a Hugging Face checkpoint), one process, one thread, alternating.
pub fn step(shape: &BenchShape, torch: Option<(&str, &[String])>) -> Result<Vec<Contender>> {
    let dir = scratch_dir()?;
    let mut kiln = Contender::new("kiln (burn flex)");
    let mut reference = Contender::new("PyTorch");
    for r in 0..shape.repeats {
        let out = dir.join(format!("k-r{r}"));
        run(&mut kiln_train(shape, 1, &out)?, "kiln")?;
        let ms = read_run(&out, 2)?.step;
        kiln.step_ms.push(ms);
        eprintln!("  run {}: kiln    {ms:8.1} ms/step", r + 1);
        if let Some((py, model)) = torch {
            let ms = torch_step_ms(py, shape, 1, model, "")?;
            reference.step_ms.push(ms);
            eprintln!("  run {}: PyTorch {ms:8.1} ms/step", r + 1);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if torch.is_some() {
        vec![kiln, reference]
    } else {
        vec![kiln]
    })
}

#[cfg(test)]
mod tests {
    use super::telling_line;

    #[test]
    fn the_error_line_is_picked_over_torchruns_banner() {
        let torchrun = "W1123 step 3\nTraceback (most recent call last):\n  File \"x.py\"\nRuntimeError: Connection reset by peer\n\n======================================================\nscripts/torch_gpt.py FAILED\n------------------------------------------------------\nFailures:\n  <NO_OTHER_FAILURES>\n======================================================\n";
        assert_eq!(
            telling_line(torchrun),
            "RuntimeError: Connection reset by peer"
        );
        // A child that aborted (seen in an FSDP2 run): torchrun's traceback and ChildFailedError
        // follow its last words.
        let aborted = "terminate called without an active exception\nE1124 02:23:25 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -6) local_rank: 1\nTraceback (most recent call last):\n    raise ChildFailedError(\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n======\n  exitcode  : -6 (pid: 26187)  (SIGABRT)\n";
        assert_eq!(
            telling_line(aborted),
            "terminate called without an active exception"
        );
        assert_eq!(telling_line("first\nlast words\n=====\n"), "last words");
        assert_eq!(telling_line("\n"), "no output");
    }
}

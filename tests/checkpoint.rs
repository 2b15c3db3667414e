//! Checkpoints: resume is bit-exact for every stage and tier; any checkpoint loads at any world
//! size and stage; consolidate equals the export; bad checkpoints are one-line errors and
//! change nothing.

mod common;

use common::{small_run, small_run_resumed, snapshot, Scratch};
use kiln::train::RunOutcome;
use std::path::Path;

fn same_params(a: &RunOutcome, b: &RunOutcome) -> bool {
    a.params
        .iter()
        .zip(&b.params)
        .all(|(x, y)| common::bitwise_equal(x, y))
}

fn ckpt_sets(dir: &Path, every: u64) -> [String; 3] {
    [
        format!("checkpoint.dir={}", dir.display()),
        format!("checkpoint.every={every}"),
        "checkpoint.keep=0".into(),
    ]
}

#[test]
fn forty_steps_equal_twenty_plus_resume_plus_twenty_for_every_stage_and_tier() {
    let scratch = Scratch::new("resume");
    let nvme = format!("offload.nvme_path={}", scratch.str());
    for stage in 0..=3 {
        for tier in ["none", "nvme"] {
            let dir = scratch.path(&format!("s{stage}-{tier}"));
            let ck = ckpt_sets(&dir, 20);
            let tier_set = format!("offload.optimizer={tier}");
            let sets = [
                "train.steps=40",
                &tier_set,
                &nvme,
                "offload.chunk_mb=0.001",
                &ck[0],
                &ck[1],
                &ck[2],
            ];
            let straight = small_run(stage, 2, 1, &sets);
            let at_20 = dir.join("step_000020");
            let resumed =
                small_run_resumed(stage, 2, 1, &sets, Some(at_20.to_str().unwrap())).unwrap();
            assert_eq!(
                resumed.losses,
                straight.losses[20..],
                "stage {stage} {tier}: losses after resume"
            );
            assert!(
                same_params(&resumed, &straight),
                "stage {stage} {tier}: parameters after resume differ"
            );
        }
    }
}

/// Trains `from` for 20 of 40 steps (world, stage, accum), resumes at `to`, and returns the
/// resumed run and an uninterrupted run at `to`.
fn reshard(
    from: (usize, u8, usize),
    to: (usize, u8, usize),
    name: &str,
) -> (RunOutcome, RunOutcome) {
    reshard_with(from, to, name, &[])
}

fn reshard_with(
    from: (usize, u8, usize),
    to: (usize, u8, usize),
    name: &str,
    extra: &[&str],
) -> (RunOutcome, RunOutcome) {
    let scratch = Scratch::new(name);
    let ck = ckpt_sets(&scratch.0, 20);
    let (w, s, a) = from;
    let mut sets = vec!["train.steps=40", &ck[0], &ck[1], &ck[2]];
    sets.extend(extra);
    small_run(s, w, a, &sets);
    let (w, s, a) = to;
    let at_20 = scratch.path("step_000020");
    let mut sets = vec!["train.steps=40"];
    sets.extend(extra);
    let resumed = small_run_resumed(s, w, a, &sets, Some(at_20.to_str().unwrap())).unwrap();
    let reference = small_run(s, w, a, &sets);
    assert_eq!(resumed.losses.len(), 20);
    (resumed, reference)
}

#[test]
fn a_checkpoint_loads_at_another_world_size_and_stage() {
    // Same world size, another stage: the arithmetic is the same, so the bits are too.
    let (resumed, reference) = reshard((2, 0, 1), (2, 3, 1), "reshard-same-world");
    assert_eq!(resumed.losses, reference.losses[20..]);
    assert!(same_params(&resumed, &reference));

    // Another world size: the first 20 steps summed gradients over other groupings (see
    // tests/ddp_equivalence.rs), so the continuation is close, not bitwise.
    for (from, to, name) in [
        ((4, 3, 1), (2, 1, 2), "reshard-4z3-2z1"),
        ((2, 0, 3), (3, 3, 2), "reshard-2ddp-3z3"),
    ] {
        let (resumed, reference) = reshard(from, to, name);
        let diff = common::rel_l2(&resumed.params.concat(), &reference.params.concat());
        assert!(diff <= 1e-5, "{name}: {diff:e} from an uninterrupted run");
        for (a, b) in resumed.losses.iter().zip(&reference.losses[20..]) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{name}: loss {a} vs {b}");
        }
    }
}

/// A tied embedding is one tensor in the checkpoint (the embedding unit's `wte`), and loads
/// as one at another stage and world size.
#[test]
fn tied_embeddings_reshard_like_any_parameter() {
    let tied = ["model.tie_embeddings=true"];
    let (resumed, reference) = reshard_with((2, 3, 1), (2, 1, 1), "reshard-tied-same", &tied);
    assert_eq!(resumed.losses, reference.losses[20..]);
    assert!(same_params(&resumed, &reference));
    assert!(resumed
        .layout
        .units
        .iter()
        .flat_map(|u| &u.params)
        .all(|p| p.path != "lm_head.weight"));
    let (resumed, reference) = reshard_with((2, 2, 3), (3, 3, 2), "reshard-tied-2z2-3z3", &tied);
    let diff = common::rel_l2(&resumed.params.concat(), &reference.params.concat());
    assert!(
        diff <= 1e-5,
        "tied 2z2 → 3z3: {diff:e} from an uninterrupted run"
    );
}

#[test]
fn bad_checkpoints_are_one_line_errors_that_change_nothing() {
    let scratch = Scratch::new("bad");
    let ck = ckpt_sets(&scratch.0, 5);
    let sets = ["train.steps=10", &ck[0], &ck[1], &ck[2]];
    small_run(1, 2, 1, &sets);
    let good = scratch.path("step_000005");
    let rank1 = good.join("rank-00001.safetensors");
    let original = std::fs::read(&rank1).unwrap();

    let attempt = |extra: &[&str], expect: &[&str]| {
        let before = snapshot(&scratch.0);
        let mut all: Vec<&str> = sets.to_vec();
        all.extend_from_slice(extra);
        let err = small_run_resumed(1, 2, 1, &all, Some(good.to_str().unwrap())).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2, "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        for e in expect {
            assert!(msg.contains(e), "`{e}` not in: {msg}");
        }
        assert!(
            before == snapshot(&scratch.0),
            "the checkpoint directory changed: {msg}"
        );
    };
    let rank1_name = rank1.display().to_string();

    std::fs::write(&rank1, &original[..original.len() - 100]).unwrap();
    attempt(&[], &[&rank1_name, "truncated"]);

    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(&rank1, &flipped).unwrap();
    attempt(&[], &[&rank1_name, "corrupted"]);

    std::fs::remove_file(&rank1).unwrap();
    attempt(&[], &[&rank1_name, "missing", "2 ranks"]);
    std::fs::write(&rank1, &original).unwrap();

    attempt(
        &["model.d_model=24"],
        &[
            "manifest.json",
            "another model",
            "model.d_model",
            "24",
            "21",
        ],
    );
    attempt(
        &["data.seed=99"],
        &["manifest.json", "incompatible config", "data.seed"],
    );
    attempt(&["train.steps=5"], &["train.steps", "step 5"]);

    // Intact again: it resumes.
    small_run_resumed(1, 2, 1, &sets, Some(good.to_str().unwrap())).unwrap();

    let err = small_run_resumed(
        1,
        2,
        1,
        &sets,
        Some(scratch.path("nowhere").to_str().unwrap()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no checkpoint here"), "{err}");
}

//! The optimizers beside AdamW (issue 28), each held to an independent reference and to the
//! equivalence contract: 8-bit AdamW reproduces bitsandbytes' codes and trajectory, Lion a
//! float64 PyTorch Lion (tests/fixtures/optimizers.json, made by
//! scripts/make_optimizer_fixture.py); every stage and tier is bitwise DDP; resume is exact;
//! 8-bit state is about a quarter of AdamW's; wrong choices are one-line errors.

mod common;

use common::{small_run, small_run_resumed, Scratch};
use kiln::offload::{StateChunk, StateFormat};
use kiln::optim::quant8::{adamw8bit_step, dynamic_map};
use kiln::optim::{AdamWConfig, StepScalars};

fn fixture() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optimizers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value::<Vec<f64>>(v.clone())
        .unwrap()
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

/// The fixture script's generator: a 32-bit LCG, `(x >> 8) / 2^24 · 2 − 1`, exact in f32.
fn lcg(seed: u32, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn the_dynamic_codes_are_bitsandbytes_bit_for_bit() {
    let f = &fixture()["adamw8bit"];
    for (signed, key) in [(true, "signed_map"), (false, "unsigned_map")] {
        let theirs = floats(&f[key]);
        let mine = dynamic_map(signed);
        for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{key}[{i}]: kiln {a:e}, bitsandbytes {b:e}"
            );
        }
    }
}

/// Ten steps on four blocks whose scales differ by 2^-2 each, against bitsandbytes' CPU kernel
/// with its nearest-code quantizer: the same codes, and block maxima and parameters equal to
/// f32 rounding.
#[test]
fn eight_bit_adamw_follows_bitsandbytes() {
    let f = &fixture()["adamw8bit"];
    let n = f["n"].as_u64().unwrap() as usize;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: f["weight_decay"].as_f64().unwrap(),
    };
    let lr = f["lr"].as_f64().unwrap();
    let block = StateFormat::BLOCK;
    let mut p = lcg(1, n);
    let (mut qm, mut qv) = (vec![0u8; n], vec![0u8; n]);
    let (mut sm, mut sv) = (vec![0f32; n / block], vec![0f32; n / block]);
    for t in 0..f["steps"].as_u64().unwrap() {
        let g: Vec<f32> = lcg(100 + t as u32, n)
            .iter()
            .enumerate()
            .map(|(i, g)| g * 2f32.powi(-2 * (i / block) as i32))
            .collect();
        let state = StateChunk {
            floats: Vec::new(),
            codes: vec![&mut qm[..], &mut qv[..]],
            scales: vec![&mut sm[..], &mut sv[..]],
        };
        let s = StepScalars::new(&cfg, t + 1, lr, 1.0);
        adamw8bit_step(&mut p, &g, state, &[(0..n, true)], &s);
    }
    let want_p = floats(&f["param"]);
    let gap = common::rel_l2(&p, &want_p);
    assert!(gap <= 1e-7, "parameters: {gap:e} from bitsandbytes");
    for (name, mine, scales) in [("exp_avg", &qm, &sm), ("exp_avg_sq", &qv, &sv)] {
        let theirs: Vec<u8> = serde_json::from_value(f[format!("{name}_codes")].clone()).unwrap();
        let off: Vec<usize> = (0..n).filter(|&i| mine[i] != theirs[i]).collect();
        assert!(off.is_empty(), "{name}: codes differ at {off:?}");
        let absmax = floats(&f[format!("{name}_absmax")]);
        assert!(
            common::rel_diff(scales, &absmax) <= 1e-6,
            "{name} block maxima"
        );
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Twenty steps of Lion on the Llama fixture follow float64 PyTorch Lion within 1e-6 (f32
/// rounding), and stages 1–3 equal DDP bit for bit.
#[test]
fn lion_follows_float64_lion_and_every_stage_equals_ddp() {
    let lion = &fixture()["lion"];
    let want: Vec<f64> = serde_json::from_value(lion["losses"].clone()).unwrap();
    let run = |world, extra: &[&str]| {
        common::decoder_run(&common::hf_sets("llama", &lion["train"], extra), world)
    };
    let ddp = run(2, &["parallel.stage=0"]);
    assert_eq!(ddp.losses.len(), want.len());
    for (step, (&mine, &theirs)) in ddp.losses.iter().zip(&want).enumerate() {
        assert!(
            rel(mine as f64, theirs) <= 1e-6,
            "step {}: kiln {mine} vs float64 Lion {theirs}",
            step + 1
        );
    }
    for stage in ["parallel.stage=1", "parallel.stage=3"] {
        let zero = run(2, &[stage, "parallel.bucket_mb=0.01"]);
        assert_eq!(zero.losses, ddp.losses, "{stage}: losses");
        for (u, (a, b)) in zero.params.iter().zip(&ddp.params).enumerate() {
            assert!(
                common::bitwise_equal(a, b),
                "{stage}: unit {u} differs from DDP"
            );
        }
    }
}

/// Every stage and tier gives DDP's bits for each optimizer, at N = 2 and, with accumulation,
/// N = 3 (the nvme tier with the smallest chunks, so chunk boundaries cut units and shards).
#[test]
fn every_stage_and_tier_equals_ddp_for_lion_and_8bit_adamw() {
    let scratch = Scratch::new("optimizers-tiers");
    let nvme = format!("offload.nvme_path={}", scratch.str());
    for optimizer in ["train.optimizer=lion", "train.optimizer=adamw8bit"] {
        for (world, accum) in [(2, 1), (3, 2)] {
            let ddp = small_run(0, world, accum, &[optimizer]);
            assert!(ddp.losses.iter().all(|l| l.is_finite()));
            assert!(
                ddp.losses[29] < ddp.losses[0] * 0.9,
                "{optimizer}: the loss does not fall: {:?}",
                ddp.losses
            );
            for stage in 1..=3 {
                for tier in ["none", "nvme"] {
                    let tier_set = format!("offload.optimizer={tier}");
                    let run = small_run(
                        stage,
                        world,
                        accum,
                        &[optimizer, &tier_set, &nvme, "offload.chunk_mb=0.001"],
                    );
                    let what = format!("{optimizer} stage {stage} {tier} N={world}");
                    assert_eq!(run.losses, ddp.losses, "{what}: losses");
                    for (u, (a, b)) in run.params.iter().zip(&ddp.params).enumerate() {
                        assert!(common::bitwise_equal(a, b), "{what}: unit {u} differs");
                    }
                }
            }
        }
    }
}

/// Forty steps equal twenty, a checkpoint, and twenty more, for 8-bit AdamW (the checkpoint
/// keeps the quantized blocks as they are) and Lion.
#[test]
fn resume_is_exact_for_lion_and_8bit_adamw() {
    let scratch = Scratch::new("optimizers-resume");
    let nvme = format!("offload.nvme_path={}", scratch.str());
    for (optimizer, stage, tier) in [
        ("train.optimizer=adamw8bit", 2, "nvme"),
        ("train.optimizer=adamw8bit", 3, "none"),
        ("train.optimizer=lion", 1, "none"),
    ] {
        let dir = scratch.path(&format!("{stage}-{tier}-{}", &optimizer[16..]));
        let ck = format!("checkpoint.dir={}", dir.display());
        let tier_set = format!("offload.optimizer={tier}");
        let sets = [
            optimizer,
            "train.steps=40",
            &tier_set,
            &nvme,
            &ck,
            "checkpoint.every=20",
            "checkpoint.keep=0",
        ];
        let straight = small_run(stage, 2, 1, &sets);
        let at_20 = dir.join("step_000020");
        let resumed = small_run_resumed(stage, 2, 1, &sets, Some(at_20.to_str().unwrap())).unwrap();
        assert_eq!(
            resumed.losses,
            straight.losses[20..],
            "{optimizer} {stage} {tier}"
        );
        for (a, b) in resumed.params.iter().zip(&straight.params) {
            assert!(
                common::bitwise_equal(a, b),
                "{optimizer} {stage} {tier}: parameters"
            );
        }
        // A checkpoint of one optimizer does not resume another.
        let err = small_run_resumed(
            stage,
            2,
            1,
            &["train.steps=40", "train.optimizer=adamw"],
            Some(at_20.to_str().unwrap()),
        )
        .err()
        .expect("another optimizer is refused")
        .to_string();
        assert!(
            err.contains("train.optimizer") && err.lines().count() == 1,
            "{err}"
        );
    }
}

/// The memory report's optimizer bytes: 8-bit AdamW's are at most 0.27 × AdamW's, Lion's half.
#[test]
fn the_memory_report_counts_each_optimizers_state() {
    let adamw = small_run(2, 2, 1, &["train.steps=1"])
        .summary
        .memory
        .optimizer;
    let lion = small_run(2, 2, 1, &["train.steps=1", "train.optimizer=lion"]);
    let q8 = small_run(2, 2, 1, &["train.steps=1", "train.optimizer=adamw8bit"]);
    assert_eq!(lion.summary.memory.optimizer * 2, adamw);
    let ratio = q8.summary.memory.optimizer as f64 / adamw as f64;
    assert!(
        ratio <= 0.27,
        "8-bit AdamW keeps {ratio:.3} × AdamW's state"
    );
}

#[test]
fn an_unknown_optimizer_is_a_one_line_error_naming_the_key() {
    let out = common::kiln(&[
        "train",
        "--set",
        "train.optimizer=sgd",
        "--set",
        "train.steps=1",
    ]);
    common::assert_refused(&out, "train.optimizer", "unknown optimizer");
}

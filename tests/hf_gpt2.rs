//! Hugging Face GPT-2 checkpoints in and out (issue 12), against the fixture that
//! scripts/make_hf_fixture.py made with transformers: a small random `GPT2LMHeadModel` (tied
//! embeddings, key bias, non-zero biases), the rows kiln trains on at step 1, and transformers'
//! loss on them.

mod common;

use common::{bitwise_equal, kiln, output_text, rel_l2, Scratch};
use kiln::checkpoint::TensorFileReader;
use kiln::launch;
use kiln::train::RunOutcome;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The settings under which kiln's step-1 rows are the fixture's rows (as in the script).
fn fixture_sets() -> Vec<String> {
    let r = reference();
    let f = fixture().display().to_string();
    vec![
        format!("model.init_from={f}"),
        "model.qkv_bias=qkv".into(),
        "model.tie_embeddings=true".into(),
        format!("model.seq_len={}", r["seq_len"]),
        "data.source=tokens".into(),
        format!("data.path={f}/tokens.bin"),
        format!("data.seed={}", r["data_seed"]),
        format!("train.global_batch={}", r["global_batch"]),
        "train.threads=1".into(),
    ]
}

fn run(world: usize, extra: &[String]) -> RunOutcome {
    let mut sets = fixture_sets();
    sets.extend(extra.iter().cloned());
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    launch::simulate(&common::config(&sets), world, &common::QUIET)
        .expect("run")
        .swap_remove(0)
}

#[test]
fn step_one_rows_are_the_fixtures() {
    let r = reference();
    let mut sets = fixture_sets();
    sets.push(format!("train.micro_batch={}", r["micro_batch"]));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let cfg = common::config(&sets);
    let plan = kiln::plan::Plan::resolve(&cfg, 1).unwrap();
    let source = kiln::data::open(&cfg.data, plan.gpt().vocab, plan.gpt().seq_len).unwrap();
    for (i, want) in r["rows"].as_array().unwrap().iter().enumerate() {
        let mut row = vec![0u32; plan.gpt().seq_len + 1];
        source.fill_row(0, i as u64, &mut row);
        let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(row, want, "row {i} of step 1");
    }
}

#[test]
fn initial_loss_equals_transformers_at_world_one_and_two_ranks_stages_zero_and_three() {
    let r = reference();
    let theirs = r["loss"]["transformers_labels_f32"].as_f64().unwrap();
    let exact = r["loss"]["nll_f64"].as_f64().unwrap();
    // transformers' own f32 loss and the f64 one agree far inside the tolerance.
    assert!((theirs - exact).abs() / exact < 1e-6);
    let micro = r["micro_batch"].as_u64().unwrap();
    for (world, stage) in [(1, 0), (2, 0), (2, 3)] {
        let out = run(
            world,
            &[
                "train.steps=1".into(),
                format!("train.micro_batch={micro}"),
                format!("parallel.stage={stage}"),
            ],
        );
        let mine = out.losses[0] as f64;
        let rel = (mine - theirs).abs() / theirs;
        assert!(
            rel <= 1e-5,
            "world {world} stage {stage}: kiln {mine} vs transformers {theirs} (rel {rel:e})"
        );
    }
}

/// Train from the fixture (tied embeddings, key bias): stages 1–3 bitwise equal to DDP at 2
/// and 3 ranks, and every run within 1e-5 of one process (tests/ddp_equivalence.rs explains
/// the tolerance).
#[test]
fn training_from_the_fixture_is_equivalent_across_stages_and_world_sizes() {
    let steps = |world: usize, accum: usize, stage: u8| {
        run(
            world,
            &[
                "train.steps=8".into(),
                "train.lr=1e-2".into(),
                "train.warmup_steps=2".into(),
                "parallel.bucket_mb=0.01".into(),
                "train.micro_batch=2".into(),
                format!("train.global_batch={}", 2 * accum * world),
                format!("parallel.stage={stage}"),
            ],
        )
    };
    for world in [2, 3] {
        let single = steps(1, world, 0);
        let ddp = steps(world, 1, 0);
        let whole = rel_l2(&ddp.params.concat(), &single.params.concat());
        assert!(
            whole <= 1e-5,
            "N={world}: DDP differs from one process by {whole:e}"
        );
        assert!(
            single.losses.last() < single.losses.first(),
            "training lowers the loss: {:?}",
            single.losses
        );
        for stage in [1, 2, 3] {
            let zero = steps(world, 1, stage);
            assert_eq!(zero.losses, ddp.losses, "stage {stage} N={world}: losses");
            for (u, (a, b)) in zero.params.iter().zip(&ddp.params).enumerate() {
                assert!(
                    bitwise_equal(a, b),
                    "stage {stage} N={world}: unit {u} differs from DDP"
                );
            }
        }
    }
}

/// `kiln train` from the fixture for one step at a learning rate too small to move any weight
/// (every fixture value is far above 1e-30 × its ulp), then `kiln export --format hf`: the
/// export's tensors are the fixture's, bit for bit, under the same names and shapes, and its
/// config.json describes the same model.
#[test]
fn hf_export_of_the_fixture_is_the_fixture() {
    let scratch = Scratch::new("hf-export");
    let ck = scratch.path("ck").display().to_string();
    let out = scratch.path("hf");
    common::train_process(fixture_sets().into_iter().chain([
        "train.steps=1".into(),
        "train.micro_batch=2".into(),
        "train.lr=1e-30".into(),
        format!("checkpoint.dir={ck}"),
        format!("output.dir={}", scratch.path("run").display()),
    ]));
    let exported = kiln(&["export", "--format", "hf", &ck, out.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", output_text(&exported));

    let mine = common::assert_same_tensors(
        &out.join("model.safetensors"),
        &fixture().join("model.safetensors"),
        "export vs fixture",
    );
    assert_eq!(mine.metadata("format"), Some("pt"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let fixture_config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    for key in [
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "activation_function",
        "layer_norm_epsilon",
        "tie_word_embeddings",
        "model_type",
    ] {
        assert_eq!(config[key], fixture_config[key], "config.json {key}");
    }
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
}

/// An untied model with kiln's query/value-only bias goes out as GPT-2 (transposed head, zero
/// key bias) and comes back in through `model.init_from` as the same parameters.
#[test]
fn untied_qv_model_round_trips_through_hf() {
    let scratch = Scratch::new("hf-roundtrip");
    let ck = scratch.path("ck").display().to_string();
    common::train_process(common::TEST_MODEL.iter().map(|s| s.to_string()).chain([
        "train.steps=2".into(),
        "train.global_batch=2".into(),
        "train.micro_batch=2".into(),
        "train.threads=1".into(),
        format!("checkpoint.dir={ck}"),
        format!("output.dir={}", scratch.path("run").display()),
    ]));
    let hf = scratch.path("hf");
    let exported = kiln(&["export", &ck, hf.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", output_text(&exported));
    let kiln_file = scratch.path("kiln.safetensors");
    let consolidated = kiln(&[
        "export",
        "--format",
        "kiln",
        &ck,
        kiln_file.to_str().unwrap(),
    ]);
    assert!(
        consolidated.status.success(),
        "{}",
        output_text(&consolidated)
    );

    let reader = TensorFileReader::open(&hf.join("model.safetensors")).unwrap();
    let mut bias = vec![0f32; 3 * 21];
    reader
        .read("transformer.h.0.attn.c_attn.bias", 0, &mut bias)
        .unwrap();
    assert!(bias[21..42].iter().all(|&x| x == 0.0), "key bias is zero");
    assert_eq!(reader.shape("lm_head.weight"), Some(&[61, 21][..]));

    let mut sets: Vec<String> = common::TEST_MODEL.iter().map(|s| s.to_string()).collect();
    sets.retain(|s| !s.starts_with("model.") || s.starts_with("model.seq_len"));
    sets.push(format!("model.init_from={}", hf.display()));
    sets.push("model.tie_embeddings=false".into());
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let cfg = common::config(&sets);
    let plan = kiln::plan::Plan::resolve(&cfg, 1).unwrap();
    let model = kiln::model::Gpt::new(*plan.gpt());
    let layout = kiln::flat::ModelLayout::new(&model, 1);
    let init = kiln::init::InitSource::new(&plan.config.model.init_from, plan.config.train.seed);
    let want = TensorFileReader::open(&kiln_file).unwrap();
    for (u, unit) in layout.units.iter().enumerate() {
        let got = init.unit(&model, u, unit).unwrap();
        for p in &unit.params {
            let mut w = vec![0f32; p.len];
            want.read(&p.path, 0, &mut w).unwrap();
            assert!(bitwise_equal(&got[p.range()], &w), "{}", p.path);
        }
    }
}

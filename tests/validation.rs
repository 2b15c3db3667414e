//! Validation loss (`data.val_path`, `train.eval_every`, `train.eval_batches`): the same value at
//! every world size, stage and backend, and equal to the loss training reports for the same rows.
//!
//! Data: the bytes of the Shakespeare excerpts in tests/fixtures, through `kiln prepare-data
//! --tokenizer bytes` (vocab 256), on the test matrices' model with vocab 256.

mod common;

use common::{mpirun_available, output_text, small_run, Scratch, TEST_MODEL};
use kiln::data::prepare::{prepare, PrepareOptions};
use kiln::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHAKESPEARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/shakespeare");
const SEQ_LEN: usize = 16;
/// Rows per evaluation: eval_batches 2 × global batch 4.
const ROWS: usize = 8;

/// train.bin / val.bin of the excerpts as bytes, 30% validation.
fn bytes_data(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let out = scratch.path("data");
    prepare(&PrepareOptions {
        tokenizer: Tokenizer::Bytes,
        inputs: vec![
            Path::new(SHAKESPEARE).join("hamlet.txt"),
            Path::new(SHAKESPEARE).join("macbeth.txt"),
        ],
        out: out.clone(),
        val_fraction: 0.3,
        force: false,
        progress: false,
        format: kiln::data::prepare::DataFormat::Text,
    })
    .unwrap();
    (out.join("train.bin"), out.join("val.bin"))
}

fn sets(train: &Path, val: &Path) -> Vec<String> {
    vec![
        "model.vocab=256".into(),
        "data.source=tokens".into(),
        format!("data.path={}", train.display()),
        format!("data.val_path={}", val.display()),
        "train.eval_every=10".into(),
        "train.eval_batches=2".into(),
    ]
}

fn rel(a: f32, b: f32) -> f64 {
    ((a as f64 - b as f64) / b as f64).abs()
}

#[test]
fn val_loss_is_the_same_at_every_world_size_and_stage() {
    let scratch = Scratch::new("val-worlds");
    let (train, val) = bytes_data(&scratch);
    let extra = sets(&train, &val);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // Global batch 4 of micro-batches of 2 rows: world 1 accumulates 2, world 2 one each.
    let single = small_run(0, 1, 2, &extra);
    let steps: Vec<u64> = single.val_losses.iter().map(|&(s, _)| s).collect();
    assert_eq!(steps, [0, 10, 20, 30]);
    let (_, first) = single.val_losses[0];
    // Byte-level loss of a fresh model: close to ln(256) = 5.545.
    assert!((first - 256f32.ln()).abs() < 0.1, "{first}");
    assert!(
        single.val_losses[3].1 < first - 0.5,
        "{:?}",
        single.val_losses
    );
    let ddp = small_run(0, 2, 1, &extra);
    let zero3 = small_run(3, 2, 1, &extra);
    // Stages at one world size train to the same bits, and validation adds exactly (one
    // non-zero addend per slot): bitwise equal at every evaluation.
    assert_eq!(
        ddp.val_losses, zero3.val_losses,
        "stage 0 vs stage 3, world 2"
    );
    // Before training, the parameters are the same at every world size: bitwise equal.
    assert_eq!(ddp.val_losses[0], single.val_losses[0]);
    // After training the parameters of world 1 and 2 differ in the last bits (the gradient
    // sum over ranks is added in another order), so the losses agree to f32 rounding.
    for (a, b) in ddp.val_losses.iter().zip(&single.val_losses) {
        assert_eq!(a.0, b.0);
        assert!(rel(a.1, b.1) < 1e-6, "step {}: {} vs {}", a.0, a.1, b.1);
    }
    // The summary carries the last, the best and the initial value.
    let s = &ddp.summary;
    assert_eq!(s.val_loss, Some(ddp.val_losses[3].1 as f64));
    assert_eq!(s.initial_val_loss, Some(ddp.val_losses[0].1 as f64));
    let best = ddp
        .val_losses
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(
        (s.best_val_step, s.best_val_loss),
        (Some(best.0), Some(best.1 as f64))
    );
}

#[test]
fn tied_embeddings_are_evaluated_at_every_stage() {
    // The head borrows wte from the embedding unit: ZeRO-3 must gather that unit while the
    // head runs forward-only too, and the borrowed tensor must be the embedding's values.
    let scratch = Scratch::new("val-tied");
    let (train, val) = bytes_data(&scratch);
    let mut extra = sets(&train, &val);
    extra.push("model.tie_embeddings=true".into());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let single = small_run(0, 1, 2, &extra);
    let ddp = small_run(0, 2, 1, &extra);
    let zero3 = small_run(3, 2, 1, &extra);
    assert_eq!(
        ddp.val_losses, zero3.val_losses,
        "stage 0 vs stage 3, world 2"
    );
    assert_eq!(zero3.val_losses[0], single.val_losses[0]);
    for (a, b) in zero3.val_losses.iter().zip(&single.val_losses) {
        assert!(rel(a.1, b.1) < 1e-6, "step {}: {} vs {}", a.0, a.1, b.1);
    }
    // Tying changes the model: not the untied run's numbers.
    let untied = small_run(0, 1, 2, &extra[..extra.len() - 1]);
    assert_ne!(untied.val_losses[3], single.val_losses[3]);
}

#[test]
fn val_loss_before_training_equals_the_training_loss_of_its_rows() {
    let scratch = Scratch::new("val-reference");
    let (train, val) = bytes_data(&scratch);
    let extra = sets(&train, &val);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let evaluated = small_run(0, 2, 1, &extra).val_losses[0].1;

    // The reference: row i of the validation set is tokens [16 i, 16 i + 17) of val.bin. A
    // training file holding exactly that window makes every training row that window, so the
    // first step's loss (before any update, initial parameters from the same seed) is the
    // row's mean token loss, from the training forward with its graph.
    let bytes = std::fs::read(&val).unwrap();
    let mut row_losses = Vec::new();
    for i in 0..ROWS {
        let window = &bytes[2 * SEQ_LEN * i..2 * (SEQ_LEN * i + SEQ_LEN + 1)];
        let file = scratch.path(&format!("row-{i}.bin"));
        std::fs::write(&file, window).unwrap();
        let path = format!("data.path={}", file.display());
        let sets = [
            "model.vocab=256",
            "data.source=tokens",
            &path,
            "train.steps=1",
        ];
        let run = small_run(0, 1, 1, &sets);
        row_losses.push(run.losses[0] as f64);
    }
    let reference = row_losses.iter().sum::<f64>() / ROWS as f64;
    // Rows in micro-batches of 2 vs one row at a time: other matmul shapes, other rounding.
    let r = ((evaluated as f64 - reference) / reference).abs();
    assert!(
        r < 1e-6,
        "validation {evaluated} vs reference {reference} (rel {r:e})"
    );
    // The rows differ, so the reference is not one number repeated.
    let spread = row_losses.iter().cloned().fold(f64::NAN, f64::max)
        - row_losses.iter().cloned().fold(f64::NAN, f64::min);
    assert!(spread > 0.01, "{row_losses:?}");
}

/// val_loss of each line of metrics.jsonl that has one, as (step, loss).
fn metrics_val_losses(dir: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("val_loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["val_loss"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[test]
fn val_loss_under_mpirun_equals_the_local_backend_and_reaches_the_files() {
    let scratch = Scratch::new("val-mpi");
    let (train, val) = bytes_data(&scratch);
    let mut args: Vec<String> = vec!["train".into(), "--quiet".into()];
    let model: Vec<String> = TEST_MODEL.iter().map(|s| s.to_string()).collect();
    let run_sets = [
        "train.steps=30",
        "train.lr=1e-2",
        "train.warmup_steps=3",
        "train.threads=1",
        "parallel.bucket_mb=0.01",
        "train.micro_batch=2",
        "train.global_batch=4",
    ];
    let extra = sets(&train, &val);
    for s in model
        .iter()
        .cloned()
        .chain(run_sets.iter().map(|s| s.to_string()))
        .chain(extra.iter().cloned())
    {
        args.extend(["--set".into(), s]);
    }
    let local = small_run(
        0,
        2,
        1,
        &extra.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let expected: Vec<(u64, f32)> = local.val_losses[1..].to_vec();

    // The local backend through the command: metrics.jsonl and summary.json.
    let out_local = scratch.path("out-local");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .args(["--simulate", "2", "--set"])
        .arg(format!("output.dir={}", out_local.display()))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(metrics_val_losses(&out_local), expected);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_local.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        summary["initial_val_loss"].as_f64().unwrap() as f32,
        local.val_losses[0].1
    );

    if !mpirun_available() {
        return;
    }
    let out_mpi = scratch.path("out-mpi");
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .arg("--set")
        .arg(format!("output.dir={}", out_mpi.display()))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_mpi.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["backend"], "mpi");
    let mpi = metrics_val_losses(&out_mpi);
    assert_eq!(mpi.len(), expected.len());
    for (a, b) in mpi.iter().zip(&expected) {
        assert_eq!(a.0, b.0);
        assert!(
            rel(a.1, b.1) < 1e-6,
            "step {}: mpi {} vs local {}",
            a.0,
            a.1,
            b.1
        );
    }
}

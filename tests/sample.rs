//! `kiln sample` against transformers: greedy decoding of the Hugging Face fixture equals the
//! argmax continuation the fixture script computed with transformers (whose best logit leads
//! the second by the margins stored with it, far above f32 rounding), from `--init-from` and
//! from a kiln checkpoint of the same weights; sampling is deterministic for a seed.

mod common;

use common::{output_text, Scratch};
use kiln::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// `kiln sample` with `args`; its stdout.
fn sample(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("sample")
        .args(args)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn parse_ids(stdout: &str) -> Vec<u32> {
    stdout
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect()
}

#[test]
fn greedy_from_init_from_equals_transformers_argmax() {
    let r = reference();
    let prompt = r["prompt_text"].as_str().unwrap();
    let want = ids(&r["greedy_ids"]);
    assert_eq!(
        Tokenizer::Gpt2.encode(prompt).unwrap(),
        ids(&r["prompt_ids"])
    );
    let f = fixture().display().to_string();
    let n = want.len().to_string();
    let base = ["--init-from", &f, "--prompt", prompt, "--temperature", "0"];
    let got = sample(&[&base[..], &["--max-tokens", &n, "--ids"]].concat());
    assert_eq!(parse_ids(&got), want);
    let text = sample(&[&base[..], &["--max-tokens", &n]].concat());
    assert_eq!(text, format!("{}\n", Tokenizer::Gpt2.decode(&want)));
}

#[test]
fn greedy_from_a_kiln_checkpoint_of_the_fixture_equals_transformers_argmax() {
    let r = reference();
    let scratch = Scratch::new("sample-ck");
    let ck = scratch.path("ck").display().to_string();
    let f = fixture().display().to_string();
    // One step at a learning rate that moves no weight: a checkpoint of the fixture.
    let sets = [
        format!("model.init_from={f}"),
        "model.qkv_bias=qkv".into(),
        "model.tie_embeddings=true".into(),
        "model.seq_len=32".into(),
        "data.source=tokens".into(),
        format!("data.path={f}/tokens.bin"),
        "train.steps=1".into(),
        "train.global_batch=2".into(),
        "train.micro_batch=2".into(),
        "train.lr=1e-30".into(),
        "train.threads=1".into(),
        format!("checkpoint.dir={ck}"),
        format!("output.dir={}", scratch.path("run").display()),
    ];
    common::train_process(sets);
    let want = ids(&r["greedy_ids"]);
    let n = want.len().to_string();
    let prompt = r["prompt_text"].as_str().unwrap();
    let got = sample(&[
        "--checkpoint",
        &ck,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        &n,
        "--ids",
    ]);
    assert_eq!(parse_ids(&got), want);
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let f = fixture().display().to_string();
    let run = |seed: &str| {
        parse_ids(&sample(&[
            "--init-from",
            &f,
            "--prompt",
            "a b c",
            "--temperature",
            "3",
            "--top-k",
            "40",
            "--max-tokens",
            "24",
            "--seed",
            seed,
            "--ids",
        ]))
    };
    let a = run("5");
    assert_eq!(a.len(), 24);
    assert!(a.iter().all(|&t| t < 384), "ids within the vocab: {a:?}");
    assert_eq!(run("5"), a, "same seed, same tokens");
    assert_ne!(run("6"), a, "another seed, other tokens (at temperature 3)");
}

/// Without --tokenizer, a checkpoint samples with the tokenizer its data was prepared with
/// (`meta.json` beside the token file, as `kiln prepare-data` writes it): "Hello" is five
/// byte tokens, all inside the fixture's vocab of 384, but one GPT-2 token (15496) outside it.
#[test]
fn a_checkpoint_samples_with_its_datas_tokenizer() {
    let scratch = Scratch::new("sample-tokenizer");
    let data = scratch.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(fixture().join("tokens.bin"), data.join("train.bin")).unwrap();
    std::fs::write(data.join("meta.json"), r#"{"tokenizer": "bytes"}"#).unwrap();
    let ck = scratch.path("ck").display().to_string();
    let f = fixture().display().to_string();
    common::train_process([
        format!("model.init_from={f}"),
        "model.qkv_bias=qkv".into(),
        "model.tie_embeddings=true".into(),
        "model.seq_len=16".into(),
        "data.source=tokens".into(),
        format!("data.path={}", data.join("train.bin").display()),
        "train.steps=1".into(),
        "train.global_batch=2".into(),
        "train.micro_batch=2".into(),
        "train.threads=1".into(),
        format!("checkpoint.dir={ck}"),
        format!("output.dir={}", scratch.path("run").display()),
    ]);
    let sampled = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["sample", "--checkpoint", &ck, "--prompt", "Hello"])
            .args(["--max-tokens", "4", "--ids"])
            .args(extra)
            .env("KILN_LOG", "warn")
            .output()
            .unwrap()
    };
    let bytes = sampled(&[]);
    assert!(bytes.status.success(), "{}", output_text(&bytes));
    assert_eq!(parse_ids(&String::from_utf8_lossy(&bytes.stdout)).len(), 4);
    let gpt2 = sampled(&["--tokenizer", "gpt2"]);
    assert_eq!(gpt2.status.code(), Some(2), "{}", output_text(&gpt2));
    assert!(String::from_utf8_lossy(&gpt2.stderr).contains("token id 15496"));
}

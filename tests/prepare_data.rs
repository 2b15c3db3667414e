//! `kiln prepare-data`: the token files hold the documents' ids in order, each followed by
//! <|endoftext|>, split at the tail fraction; directories expand in sorted order; existing
//! outputs are kept unless --force; a failed run leaves the directory as it was.

mod common;

use common::{output_text, Scratch};
use kiln::data::prepare::{prepare, PrepareOptions};
use kiln::tokenizer::{Tokenizer, GPT2_EOT};
use std::path::{Path, PathBuf};
use std::process::Command;

const SHAKESPEARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/shakespeare");

fn play(name: &str) -> PathBuf {
    Path::new(SHAKESPEARE).join(name)
}

fn read_u16(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 2, 0);
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect()
}

fn options(tokenizer: Tokenizer, inputs: Vec<PathBuf>, out: PathBuf, val: f64) -> PrepareOptions {
    PrepareOptions {
        tokenizer,
        inputs,
        out,
        val_fraction: val,
        force: false,
        progress: false,
        format: kiln::data::prepare::DataFormat::Text,
    }
}

/// The reference stream: each document's ids, then the end-of-text id.
fn stream(tokenizer: Tokenizer, files: &[PathBuf]) -> Vec<u32> {
    let mut ids = Vec::new();
    for f in files {
        ids.extend(
            tokenizer
                .encode(&std::fs::read_to_string(f).unwrap())
                .unwrap(),
        );
        ids.extend(tokenizer.eot());
    }
    ids
}

#[test]
fn gpt2_documents_end_with_eot_and_val_is_the_tail() {
    let scratch = Scratch::new("prepare-gpt2");
    let files = vec![play("hamlet.txt"), play("macbeth.txt")];
    let out = scratch.path("out");
    let (meta, _) = prepare(&options(Tokenizer::Gpt2, files.clone(), out.clone(), 0.1)).unwrap();
    let reference = stream(Tokenizer::Gpt2, &files);
    let (train, val) = (
        read_u16(&out.join("train.bin")),
        read_u16(&out.join("val.bin")),
    );
    let n_val = (reference.len() as f64 * 0.1).round() as usize;
    assert_eq!(val.len(), n_val);
    assert_eq!(train, reference[..reference.len() - n_val]);
    assert_eq!(val, reference[reference.len() - n_val..]);
    assert_eq!(*val.last().unwrap(), GPT2_EOT);
    assert_eq!(train.iter().filter(|&&t| t == GPT2_EOT).count(), 1);
    // Hamlet's first line, as GPT-2 writes it: "Scene I. Elsinore." …
    assert_eq!(train[..3], Tokenizer::Gpt2.encode("Scene I.").unwrap()[..]);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(json["tokenizer"], "gpt2");
    assert_eq!(json["vocab_size"], 50257);
    assert_eq!(json["train_tokens"], train.len() as u64);
    assert_eq!(json["val_tokens"], val.len() as u64);
    let hamlet_tokens = Tokenizer::Gpt2
        .encode(&std::fs::read_to_string(&files[0]).unwrap())
        .unwrap();
    assert_eq!(json["sources"][0]["tokens"], hamlet_tokens.len() as u64 + 1);
    assert_eq!(json["sources"][1]["bytes"], 1636);
    assert_eq!(meta.train_tokens + meta.val_tokens, reference.len() as u64);
}

#[test]
fn bytes_tokenizer_concatenates_the_files_and_a_directory_is_sorted() {
    let scratch = Scratch::new("prepare-bytes");
    let dir = scratch.path("corpus");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    // Written out of order; a sub-directory is not a document.
    std::fs::write(dir.join("b.txt"), "second é\n").unwrap();
    std::fs::write(dir.join("a.txt"), "first\n").unwrap();
    std::fs::write(dir.join("sub/c.txt"), "not read").unwrap();
    let out = scratch.path("out");
    let extra = play("macbeth.txt");
    prepare(&options(
        Tokenizer::Bytes,
        vec![dir, extra.clone()],
        out.clone(),
        0.0,
    ))
    .unwrap();
    let mut expected: Vec<u32> = b"first\nsecond \xc3\xa9\n"
        .iter()
        .map(|&b| b as u32)
        .collect();
    expected.extend(std::fs::read(&extra).unwrap().iter().map(|&b| b as u32));
    assert_eq!(read_u16(&out.join("train.bin")), expected);
    assert_eq!(std::fs::metadata(out.join("val.bin")).unwrap().len(), 0);
}

#[test]
fn existing_outputs_are_kept_without_force_and_replaced_with_it() {
    let scratch = Scratch::new("prepare-force");
    let out = scratch.path("out");
    let first = options(
        Tokenizer::Bytes,
        vec![play("macbeth.txt")],
        out.clone(),
        0.5,
    );
    prepare(&first).unwrap();
    let before = std::fs::read(out.join("train.bin")).unwrap();
    let second = options(Tokenizer::Gpt2, vec![play("hamlet.txt")], out.clone(), 0.1);
    let e = prepare(&second).unwrap_err().to_string();
    assert!(e.contains("train.bin") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(out.join("train.bin")).unwrap(), before);
    prepare(&PrepareOptions {
        force: true,
        ..second
    })
    .unwrap();
    let train = read_u16(&out.join("train.bin"));
    let all = stream(Tokenizer::Gpt2, &[play("hamlet.txt")]);
    assert_eq!(train[..], all[..train.len()]);
}

#[test]
fn a_bad_file_late_in_the_list_leaves_the_directory_as_it_was() {
    let scratch = Scratch::new("prepare-atomic");
    let out = scratch.path("out");
    let good = options(Tokenizer::Gpt2, vec![play("macbeth.txt")], out.clone(), 0.1);
    prepare(&good).unwrap();
    let names = ["train.bin", "val.bin", "meta.json"];
    let before: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(out.join(n)).unwrap())
        .collect();
    let latin1 = scratch.path("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").unwrap();
    let e = prepare(&PrepareOptions {
        force: true,
        inputs: vec![play("hamlet.txt"), latin1.clone()],
        ..good
    })
    .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(
        msg.contains("latin1.txt") && msg.contains("offset 3"),
        "{msg}"
    );
    let after: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(out.join(n)).unwrap())
        .collect();
    assert_eq!(before, after, "outputs unchanged");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        3,
        "no partial files"
    );
    // A fresh nested --out that fails is removed again, parents included.
    let nested = scratch.path("new/deeper/out");
    let e = prepare(&options(Tokenizer::Gpt2, vec![latin1], nested, 0.1)).unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
    assert!(!scratch.path("new").exists());
}

#[test]
fn the_command_reports_tokens_per_second_and_the_files() {
    let scratch = Scratch::new("prepare-cli");
    let out = scratch.path("out");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "prepare-data",
            "--tokenizer",
            "gpt2",
            "--val-fraction",
            "0.25",
        ])
        .arg(play("hamlet.txt"))
        .arg(play("macbeth.txt"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let total = stream(Tokenizer::Gpt2, &[play("hamlet.txt"), play("macbeth.txt")]).len();
    let val = (total as f64 * 0.25).round() as usize;
    let stderr = String::from_utf8_lossy(&o.stderr);
    let expect = format!("→ {total} gpt2 tokens");
    assert!(stderr.contains(&expect), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    assert!(
        stderr.contains(&format!("{} train.bin, {val} val.bin", total - val)),
        "{stderr}"
    );
    assert_eq!(read_u16(&out.join("val.bin")).len(), val);
}

/// A Hugging Face tokenizer.json (the byte-level fixture, scripts/make_hf_tokenizer_fixture.py):
/// each document as transformers' `tokenizer(text)` encodes it, then the eos_token of its
/// tokenizer_config.json; uint16 files, as its 1,200 ids fit.
#[test]
fn a_hugging_face_tokenizer_prepares_documents_as_transformers_encodes_them() {
    let scratch = Scratch::new("prepare-hf");
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tokenizers/bytelevel"
    );
    let tokenizer = Tokenizer::from_name(dir).unwrap();
    let files = vec![play("hamlet.txt"), play("macbeth.txt")];
    let out = scratch.path("out");
    let (meta, _) = prepare(&options(tokenizer.clone(), files.clone(), out.clone(), 0.0)).unwrap();
    let reference = stream(tokenizer.clone(), &files);
    assert_eq!(read_u16(&out.join("train.bin")), reference);
    // Each document starts with the post-processor's <|begin_of_text|> and ends with eos.
    let (bos, eos) = (reference[0], tokenizer.eot().unwrap());
    assert_eq!(reference.iter().filter(|&&t| t == bos).count(), 2);
    assert_eq!(*reference.last().unwrap(), eos);
    assert_eq!(meta.dtype, "uint16 little-endian");
    assert_eq!(meta.vocab_size, 1200);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert!(json["tokenizer"]
        .as_str()
        .unwrap()
        .ends_with("bytelevel/tokenizer.json"));
}

/// A word-level tokenizer.json of 70,000 words, written here: beyond 16 bits, so the files are
/// uint32 (meta.json says so), the ids above 65,535 survive, and `data.path` reads them back:
/// a GPT of vocab 70,000 trains on them.
#[test]
fn a_vocabulary_beyond_16_bits_writes_uint32_files_that_training_reads() {
    let scratch = Scratch::new("prepare-u32");
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..70_000).map(|i| (format!("w{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    let tok_dir = scratch.path("tok");
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::write(tok_dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let words: Vec<String> = (0..400u32)
        .map(|i| format!("w{}", 69_999 - (i * 7919) % 70_000))
        .collect();
    let text = scratch.path("words.txt");
    std::fs::write(&text, words.join(" ")).unwrap();
    let out = scratch.path("out");
    let t = Tokenizer::from_name(tok_dir.to_str().unwrap()).unwrap();
    let (meta, _) = prepare(&options(t, vec![text], out.clone(), 0.0)).unwrap();
    assert_eq!(meta.dtype, "uint32 little-endian");
    let bytes = std::fs::read(out.join("train.bin")).unwrap();
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<u32> = words.iter().map(|w| w[1..].parse().unwrap()).collect();
    assert_eq!(ids, want);
    assert!(ids.iter().any(|&i| i > 65_535));

    common::train_process([
        "model.vocab=70000".to_string(),
        "model.d_model=8".into(),
        "model.n_heads=2".into(),
        "model.n_layers=1".into(),
        "model.max_seq_len=16".into(),
        "data.source=tokens".into(),
        format!("data.path={}", out.join("train.bin").display()),
        "train.steps=2".into(),
        "train.global_batch=2".into(),
        "train.micro_batch=2".into(),
        format!("output.dir={}", scratch.path("run").display()),
    ]);
    // A vocab below the tokenizer's is refused, naming the meta.json beside the file.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "--quiet",
            "--set",
            "model.vocab=65536",
            "--set",
            "data.source=\"tokens\"",
        ])
        .args([
            "--set",
            &format!("data.path={}", out.join("train.bin").display()),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("meta.json") && stderr.contains("vocab_size` = 70000"),
        "{stderr}"
    );
}

//! Instruction data (issue 27): JSONL records rendered with a model's chat template, tokenized,
//! and masked so that the loss is on the assistant turns only — held to transformers'
//! `apply_chat_template` and fast tokenizer offsets (tests/fixtures/hf-tokenizers, made by
//! scripts/make_hf_tokenizer_fixture.py: a Llama 3 template and Qwen2's ChatML).

mod common;

use common::Scratch;
use kiln::data::chat::{parse_record, ChatTemplate};
use kiln::data::prepare::{prepare, DataFormat, PrepareOptions};
use kiln::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf-tokenizers");
const STYLES: [&str; 2] = ["bytelevel", "sentencepiece"];

fn reference(style: &str) -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{style}/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn records() -> PathBuf {
    Path::new(FIXTURES).join("chat.jsonl")
}

fn options(tokenizer: Tokenizer, inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
    PrepareOptions {
        tokenizer,
        inputs,
        out,
        val_fraction: 0.0,
        force: false,
        progress: false,
        format: DataFormat::Jsonl,
    }
}

#[test]
fn the_chat_template_renders_as_transformers_does() {
    let lines = std::fs::read_to_string(records()).unwrap();
    for style in STYLES {
        let dir = Path::new(FIXTURES).join(style);
        let template = ChatTemplate::beside(&dir.join("tokenizer.json"))
            .unwrap()
            .unwrap();
        let want = reference(style)["chat"]["texts"].clone();
        for (i, line) in lines.lines().enumerate() {
            let messages = parse_record(line, &records(), i + 1).unwrap();
            let (text, turns) = template.render_conversation(&messages).unwrap();
            assert_eq!(text, want[i].as_str().unwrap(), "{style} record {i}");
            let assistants = messages.iter().filter(|m| m.role == "assistant").count();
            assert_eq!(turns.len(), assistants, "{style} record {i}");
        }
    }
}

/// prepare-data --format jsonl: the ids are transformers' `apply_chat_template(tokenize=True)`,
/// the mask marks exactly the tokens inside assistant turns, and meta.json counts both.
#[test]
fn jsonl_records_become_ids_and_label_masks() {
    for style in STYLES {
        let scratch = Scratch::new(&format!("instruct-{style}"));
        let out = scratch.path("out");
        let tokenizer = Tokenizer::from_name(&format!("{FIXTURES}/{style}")).unwrap();
        let (meta, _) = prepare(&options(tokenizer, vec![records()], out.clone())).unwrap();
        let chat = &reference(style)["chat"];
        let ids: Vec<u32> = std::fs::read(out.join("train.bin"))
            .unwrap()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect();
        let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
        assert_eq!(ids, want, "{style}: ids");
        let mask = std::fs::read(out.join("train.mask.bin")).unwrap();
        let want_mask: Vec<u8> = serde_json::from_value(chat["mask"].clone()).unwrap();
        assert_eq!(mask, want_mask, "{style}: mask");
        let trained: u64 = want_mask.iter().map(|&m| m as u64).sum();
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(json["trained_tokens"][0], trained, "{style}");
        assert_eq!(
            json["masked_tokens"][0],
            want_mask.len() as u64 - trained,
            "{style}"
        );
        assert_eq!(json["records"][0], 3, "{style}");
        assert_eq!(json["rendering"], "chat_template");
        assert_eq!(meta.train_tokens, want.len() as u64);
    }
}

/// Without a chat template (the GPT-2 tokenizer), a prompt/response record is the prompt's ids
/// (masked), the response's and end-of-text (trained); a `messages` record is refused.
#[test]
fn prompt_and_response_without_a_template() {
    let scratch = Scratch::new("instruct-gpt2");
    let input = scratch.path("pairs.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Q: 2+2?\", \"response\": \" A: 4\"}\n\n",
    )
    .unwrap();
    let out = scratch.path("out");
    prepare(&options(Tokenizer::Gpt2, vec![input], out.clone())).unwrap();
    let prompt = Tokenizer::Gpt2.encode("Q: 2+2?").unwrap();
    let reply = Tokenizer::Gpt2.encode(" A: 4").unwrap();
    let mask = std::fs::read(out.join("train.mask.bin")).unwrap();
    let mut want = vec![0u8; prompt.len()];
    want.resize(prompt.len() + reply.len() + 1, 1);
    assert_eq!(mask, want);

    let chat = scratch.path("chat.jsonl");
    std::fs::copy(records(), &chat).unwrap();
    let err = prepare(&options(
        Tokenizer::Gpt2,
        vec![chat.clone()],
        scratch.path("o2"),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(chat.to_str().unwrap()) && err.contains("chat template"),
        "{err}"
    );
}

/// Bad records and templates: one line naming the file (and line), exit 2, nothing written.
#[test]
fn bad_records_and_templates_are_one_line_and_exit_two() {
    let scratch = Scratch::new("instruct-bad");
    let bad = scratch.path("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"only\"}\n",
    )
    .unwrap();
    let tok = scratch.path("tok");
    std::fs::create_dir_all(&tok).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/bytelevel/tokenizer.json"),
        tok.join("tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{{ raise_exception('Conversation roles must alternate') }}",
    });
    std::fs::write(tok.join("tokenizer_config.json"), config.to_string()).unwrap();
    for (tokenizer, input, says) in [
        (
            format!("{FIXTURES}/bytelevel"),
            bad.clone(),
            format!("{}: line 2", bad.display()),
        ),
        (
            tok.display().to_string(),
            records(),
            "roles must alternate".to_string(),
        ),
    ] {
        let out_dir = scratch.path("out");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "prepare-data",
                "--quiet",
                "--format",
                "jsonl",
                "--tokenizer",
                &tokenizer,
            ])
            .args(["--out", out_dir.to_str().unwrap(), input.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}", common::output_text(&o));
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&says), "{stderr}");
        assert!(!out_dir.exists(), "nothing written: {stderr}");
    }
}

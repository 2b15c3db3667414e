//! The tokenizers against references: GPT-2 ids from Hugging Face's GPT2TokenizerFast on a
//! multi-script text (tests/fixtures/tokenizer, written by scripts/make_tokenizer_fixture.py),
//! round trips, and cutting a text at `split_points` giving the same ids as the whole.

use kiln::tokenizer::{split_points, Tokenizer, GPT2_EOT};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture_text(rel: &str) -> String {
    let path = format!("{FIXTURES}/{rel}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn reference_ids() -> Vec<u32> {
    let json: serde_json::Value =
        serde_json::from_str(&fixture_text("tokenizer/multiscript.ids.json")).expect("json");
    json["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn gpt2_ids_equal_hugging_face_on_the_multiscript_text() {
    let text = fixture_text("tokenizer/multiscript.txt");
    let reference = reference_ids();
    let ids = Tokenizer::Gpt2.encode(&text).unwrap();
    if ids != reference {
        let first = ids.iter().zip(&reference).position(|(a, b)| a != b);
        panic!(
            "ids differ from GPT2TokenizerFast (kiln {} ids, reference {}), first at {first:?}",
            ids.len(),
            reference.len()
        );
    }
    // The fixture must exercise the special token: the text writes it 5 times, plus broken
    // spellings that must stay text.
    assert_eq!(ids.iter().filter(|&&t| t == GPT2_EOT).count(), 5);
}

#[test]
fn gpt2_known_ids() {
    let t = Tokenizer::Gpt2;
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.encode("a<|endoftext|>b").unwrap(), vec![64, GPT2_EOT, 65]);
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.eot(), Some(50256));
    assert_eq!(
        t.decode(&[15496, 995, GPT2_EOT]),
        "Hello world<|endoftext|>"
    );
}

#[test]
fn decode_of_encode_is_the_text() {
    for rel in [
        "tokenizer/multiscript.txt",
        "shakespeare/hamlet.txt",
        "shakespeare/macbeth.txt",
    ] {
        let text = fixture_text(rel);
        for t in [Tokenizer::Gpt2, Tokenizer::Bytes] {
            assert_eq!(
                t.decode(&t.encode(&text).unwrap()),
                text,
                "{} on {rel}",
                t.name()
            );
        }
    }
}

#[test]
fn bytes_tokenizer_is_the_utf8_bytes() {
    let t = Tokenizer::Bytes;
    assert_eq!(t.encode("aé").unwrap(), vec![97, 0xc3, 0xa9]);
    assert_eq!(t.vocab_size(), 256);
    assert_eq!(t.eot(), None);
    // No special tokens: `<|endoftext|>` is 13 bytes.
    assert_eq!(t.encode("<|endoftext|>").unwrap().len(), 13);
}

#[test]
fn decode_is_lossy_on_partial_characters_and_unknown_ids() {
    // A sample can end inside a character: the cut bytes become U+FFFD, the rest stays.
    let t = Tokenizer::Bytes;
    assert_eq!(t.decode(&[97, 0xc3]), "a\u{FFFD}");
    assert_eq!(t.decode(&[97, 300]), "a\u{FFFD}");
    let g = Tokenizer::Gpt2;
    let wave = g.encode("👋").unwrap();
    assert!(wave.len() > 1, "the emoji is several byte-level tokens");
    assert_eq!(g.decode(&wave[..1]), "\u{FFFD}");
    assert_eq!(g.decode(&[15496, 60000]), "Hello\u{FFFD}");
}

#[test]
fn from_name_accepts_the_names_and_names_the_choices() {
    for t in [Tokenizer::Gpt2, Tokenizer::Bytes] {
        assert_eq!(Tokenizer::from_name(&t.name()).unwrap(), t);
    }
    let e = Tokenizer::from_name("gpt3").unwrap_err().to_string();
    assert!(e.contains("`gpt3`") && e.contains("gpt2, bytes"), "{e}");
    assert_eq!(
        kiln::error::KilnError::config("").exit_code(),
        Tokenizer::from_name("x").unwrap_err().exit_code()
    );
}

/// Encoding the pieces between cut points must give the ids of the whole text, at every cut.
fn assert_cuts_preserve_ids(text: &str) {
    let whole = Tokenizer::Gpt2.encode(text).unwrap();
    let cuts = split_points(text, 1);
    let mut pieces = Vec::new();
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&text.len())) {
        assert!(c > start, "cuts increase");
        pieces.extend(Tokenizer::Gpt2.encode(&text[start..c]).unwrap());
        start = c;
    }
    assert_eq!(pieces, whole, "{} cuts", cuts.len());
}

#[test]
fn split_points_do_not_change_gpt2_ids() {
    let hamlet = fixture_text("shakespeare/hamlet.txt");
    assert!(
        split_points(&hamlet, 1).len() > 100,
        "Hamlet has many cut points"
    );
    assert_cuts_preserve_ids(&hamlet);
    assert_cuts_preserve_ids(&fixture_text("tokenizer/multiscript.txt"));
    // Whitespace on either side of a newline (ASCII and Unicode) is never cut.
    let tricky = "a\n b\nc \nd\u{a0}\ne\n\u{3000}f\n\ng\n<|endoftext|>\nh'\n's\n\n";
    assert_cuts_preserve_ids(tricky);
    assert_eq!(
        split_points(tricky, 1)
            .iter()
            .map(|&c| &tricky[c..c + 1])
            .collect::<String>(),
        "c<h'",
        "cuts only after a newline between non-whitespace"
    );
    // min_len spaces the cuts.
    let cuts = split_points(&hamlet, 1000);
    assert!(cuts.windows(2).all(|w| w[1] - w[0] >= 1000) && cuts[0] >= 1000);
}

/// A Hugging Face tokenizer fixture (scripts/make_hf_tokenizer_fixture.py) and the ids
/// transformers' AutoTokenizer gave.
fn hf_fixture(name: &str) -> (Tokenizer, serde_json::Value) {
    let dir = format!("{FIXTURES}/hf-tokenizers/{name}");
    let reference = serde_json::from_str(&fixture_text(&format!(
        "hf-tokenizers/{name}/reference.json"
    )))
    .expect("json");
    (
        Tokenizer::from_name(&dir).expect("tokenizer.json"),
        reference,
    )
}

/// A byte-level BPE (Llama 3 / Qwen style) and a SentencePiece-style BPE with byte fallback
/// (Llama 2 / TinyLlama style): kiln's ids are transformers' on the multi-script text and
/// on short strings (spaces, tabs, accents, CJK, emoji), special tokens included, and
/// decoding gives transformers' text.
#[test]
fn hugging_face_tokenizers_equal_transformers() {
    let text = fixture_text("tokenizer/multiscript.txt");
    for name in ["bytelevel", "sentencepiece"] {
        let (t, r) = hf_fixture(name);
        let ids = t.encode(&text).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["multiscript_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{name}: ids of multiscript.txt");
        assert_eq!(
            t.decode(&ids),
            r["multiscript_decoded"].as_str().unwrap(),
            "{name}"
        );
        for case in r["short"].as_array().unwrap() {
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                t.encode(case["text"].as_str().unwrap()).unwrap(),
                want,
                "{name}: {case}"
            );
        }
        assert_eq!(
            t.vocab_size() as u64,
            r["vocab_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(t.eot().map(u64::from), r["eos_id"].as_u64(), "{name}: eos");
        assert_eq!(
            Tokenizer::from_name(&t.name()).unwrap(),
            t,
            "{name}: by its name"
        );
    }
    // The sentencepiece fixture's small alphabet sends CJK and emoji through byte fallback.
    let (t, _) = hf_fixture("sentencepiece");
    assert!(t.decode(&t.encode("東京 🙂").unwrap()).contains("東京 🙂"));
}

#[test]
fn a_tokenizer_json_that_does_not_parse_names_the_file() {
    let dir = std::env::temp_dir().join(format!("kiln-bad-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_name(dir.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(file.to_str().unwrap()) && err.contains("tokenizer.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

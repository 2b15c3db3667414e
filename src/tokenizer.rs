//! Text to token ids and back (issue 12): GPT-2's byte-level BPE, one token per byte, or a
//! Hugging Face `tokenizer.json` (issue 27: Llama, Qwen, Phi tokenizers) through Hugging Face's
//! own `tokenizers` crate.
//!
//! `gpt2` is tiktoken's `r50k_base`, GPT-2's exact vocabulary and merges compiled into the
//! `tiktoken-rs` crate, so nothing is downloaded at run time. It is checked against Hugging
//! Face's `GPT2TokenizerFast` on `tests/fixtures/tokenizer/` (ASCII, accents, CJK, emoji,
//! whitespace runs, `<|endoftext|>` inside text).

use crate::error::{KilnError, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tiktoken_rs::CoreBPE;

/// GPT-2's end-of-text token, `<|endoftext|>`: its last id.
pub const GPT2_EOT: u32 = 50256;

/// A tokenizer kiln can prepare data with and sample through.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// GPT-2's byte-level BPE (`r50k_base`): 50257 ids, `<|endoftext|>` = 50256.
    Gpt2,
    /// One token per UTF-8 byte: 256 ids, no end-of-text token.
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(Arc<HfTokenizer>),
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// A Hugging Face tokenizer: `tokenizer.json`, and the end-of-sequence token that
/// `tokenizer_config.json` beside it names.
#[derive(Debug)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The tokenizer.json file.
    path: PathBuf,
    eos: Option<u32>,
}

/// The names [`Tokenizer::from_name`] accepts, for messages.
pub const TOKENIZER_NAMES: &str =
    "gpt2, bytes, or a Hugging Face tokenizer.json (or the directory holding it)";

impl Tokenizer {
    /// The tokenizer called `name`: `gpt2`, `bytes`, or the path of a Hugging Face
    /// `tokenizer.json` or of the directory holding it. Errors name the value or the file.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "gpt2" => Ok(Tokenizer::Gpt2),
            "bytes" => Ok(Tokenizer::Bytes),
            path if Path::new(path).exists() => Ok(Tokenizer::HuggingFace(Arc::new(
                HfTokenizer::open(Path::new(path))?,
            ))),
            other => Err(KilnError::config(format!(
                "tokenizer `{other}` is not one of {TOKENIZER_NAMES}"
            ))),
        }
    }

    /// The name `from_name` takes (for a Hugging Face tokenizer, its tokenizer.json's path).
    pub fn name(&self) -> String {
        match self {
            Tokenizer::Gpt2 => "gpt2".into(),
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::HuggingFace(t) => t.path.display().to_string(),
        }
    }

    /// Number of ids (a model trained on this tokenizer needs at least this vocab).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Gpt2 => GPT2_EOT as usize + 1,
            Tokenizer::Bytes => 256,
            // Added tokens included, as `len(tokenizer)` counts them in transformers.
            Tokenizer::HuggingFace(t) => t.inner.get_vocab_size(true),
        }
    }

    /// The end-of-text id that separates documents, if the tokenizer has one (a Hugging Face
    /// tokenizer's `eos_token`).
    pub fn eot(&self) -> Option<u32> {
        match self {
            Tokenizer::Gpt2 => Some(GPT2_EOT),
            Tokenizer::Bytes => None,
            Tokenizer::HuggingFace(t) => t.eos,
        }
    }

    /// Whether a long text may be cut into pieces encoded independently (at
    /// [`split_points`]) with the ids of the whole: not for a Hugging Face tokenizer, whose
    /// post-processor adds a beginning-of-text token to every piece it encodes.
    pub fn splits(&self) -> bool {
        !matches!(self, Tokenizer::HuggingFace(_))
    }

    /// Token ids of `text`. For `gpt2`, `<|endoftext|>` written in the text becomes 50256, as
    /// Hugging Face's `GPT2TokenizerFast` does (it holds it as an added special token and splits
    /// it out before the byte-level BPE).
    /// A Hugging Face tokenizer encodes as `tokenizer(text)` does in transformers: special
    /// tokens included (its post-processor's beginning-of-text token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Gpt2 => Ok(gpt2().encode_with_special_tokens(text)),
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::HuggingFace(t) => t.encode(text),
        }
    }

    /// Ids of `text` with no special tokens added (a chat template's text already holds them,
    /// and a reply continues a prompt), and each id's byte range in `text`. The ranges come
    /// from the tokenizer for a Hugging Face tokenizer, and from each id's bytes otherwise.
    pub fn encode_spans(&self, text: &str) -> Result<(Vec<u32>, Vec<std::ops::Range<usize>>)> {
        if let Tokenizer::HuggingFace(t) = self {
            let encoding = t
                .inner
                .encode(text, false)
                .map_err(|e| KilnError::file(&t.path, format!("cannot encode a text: {e}")))?;
            let spans = encoding.get_offsets().iter().map(|&(a, b)| a..b).collect();
            return Ok((encoding.get_ids().to_vec(), spans));
        }
        let ids = self.encode(text)?;
        let mut at = 0;
        let spans = ids
            .iter()
            .map(|&id| {
                let len = self.decode_bytes(&[id]).len();
                at += len;
                at - len..at
            })
            .collect();
        Ok((ids, spans))
    }

    /// The text of `ids`. Bytes that do not form UTF-8 (a character cut by the end of a sample,
    /// or ids out of the vocabulary) become U+FFFD instead of an error: a sampler prints what it
    /// has.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The bytes of `ids`; an id outside the vocabulary contributes the bytes of U+FFFD.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();
        match self {
            Tokenizer::Gpt2 => {
                let bpe = gpt2();
                let mut out = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    match bpe.decode_bytes(&[id]) {
                        Ok(bytes) => out.extend_from_slice(&bytes),
                        Err(_) => out.extend_from_slice(REPLACEMENT),
                    }
                }
                out
            }
            Tokenizer::Bytes => ids
                .iter()
                .flat_map(|&id| match u8::try_from(id) {
                    Ok(b) => vec![b],
                    Err(_) => REPLACEMENT.to_vec(),
                })
                .collect(),
            // The tokenizer's decoder joins pieces (byte fallback, ▁ for spaces), so the text
            // of all ids at once, special tokens skipped as transformers' `decode(...,
            // skip_special_tokens=True)` does.
            Tokenizer::HuggingFace(t) => t.inner.decode(ids, true).unwrap_or_default().into_bytes(),
        }
    }
}

impl HfTokenizer {
    /// Reads `path` (a tokenizer.json, or a directory holding one) and the `eos_token` of the
    /// `tokenizer_config.json` beside it, if any. Errors name the file.
    pub fn open(path: &Path) -> Result<HfTokenizer> {
        let file = match path.is_dir() {
            true => path.join("tokenizer.json"),
            false => path.to_path_buf(),
        };
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| {
            KilnError::file(&file, format!("is not a Hugging Face tokenizer.json: {e}"))
        })?;
        let config = file.with_file_name("tokenizer_config.json");
        let eos = match std::fs::read_to_string(&config) {
            Err(_) => None,
            Ok(text) => {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| KilnError::file(&config, format!("is not JSON: {e}")))?;
                // `eos_token` is a string, or an AddedToken object with `content`.
                let eos = &value["eos_token"];
                match eos.as_str().or_else(|| eos["content"].as_str()) {
                    None => None,
                    Some(token) => Some(inner.token_to_id(token).ok_or_else(|| {
                        KilnError::file(
                            &config,
                            format!("key `eos_token`: `{token}` is not in {}", file.display()),
                        )
                    })?),
                }
            }
        };
        Ok(HfTokenizer {
            inner,
            path: file,
            eos,
        })
    }

    /// The tokenizer.json file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self.inner.encode(text, true) {
            Ok(encoding) => Ok(encoding.get_ids().to_vec()),
            // (A truncation or padding setting in the file that cannot apply, for one.)
            Err(e) => Err(KilnError::file(
                &self.path,
                format!("cannot encode a text: {e}"),
            )),
        }
    }
}

/// The r50k_base BPE, built once per process: building it parses 50k base64 ranks and compiles
/// the pre-tokenizer regex (tens of milliseconds). tiktoken-rs keeps it in a `LazyLock`.
fn gpt2() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

/// Byte offsets at which `text` can be cut into pieces that `gpt2` encodes independently with
/// the same ids as the whole: just after a `\n` that sits between two non-whitespace
/// characters. GPT-2's pre-tokenizer regex only puts whitespace into whitespace pieces, and a
/// lone `\n` between non-whitespace is a piece of its own whether or not the text ends there
/// (`\s` and `\s++$` match it alike), so no piece or special token straddles the cut. Cuts are
/// at least `min_len` bytes apart; used to encode large files in parallel and report progress.
pub fn split_points(text: &str, min_len: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut cuts = Vec::new();
    let mut i = min_len.max(1);
    while i + 1 < bytes.len() {
        match bytes[i..].iter().position(|&b| b == b'\n') {
            None => break,
            Some(off) => {
                let nl = i + off;
                // `\s` is Unicode White_Space (U+00A0, U+3000 …), which `char::is_whitespace`
                // is too; the text's ends count as whitespace (no cut there).
                let before = text[..nl].chars().next_back();
                let after = text[nl + 1..].chars().next();
                let solid = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
                if solid(before) && solid(after) {
                    cuts.push(nl + 1);
                    i = nl + 1 + min_len.max(1);
                } else {
                    i = nl + 1;
                }
            }
        }
    }
    cuts
}

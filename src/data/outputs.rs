//! What `kiln prepare-data` writes, whatever the input format: the token files, meta.json,
//! and how they are written — under temporary names, put in place together at the end
//! (`publish`), so that a failure leaves the directory as it was.

use super::TokenWidth;
use crate::error::{KilnError, Result};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One input document in `meta.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentMeta {
    /// The file, as found from the inputs.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its tokens, the end-of-text token included.
    pub tokens: u64,
}

/// `meta.json`: what the token files hold.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareMeta {
    /// Tokenizer name (`gpt2`, `bytes`).
    pub tokenizer: String,
    /// Number of ids the tokenizer has: `model.vocab` must be at least this.
    pub vocab_size: usize,
    /// The id appended after every document, if any.
    pub eot: Option<u32>,
    /// Token encoding of the .bin files.
    pub dtype: String,
    /// Tokens in train.bin.
    pub train_tokens: u64,
    /// Tokens in val.bin.
    pub val_tokens: u64,
    /// The requested validation fraction.
    pub val_fraction: f64,
    /// How val.bin was taken.
    pub split: String,
    /// The documents, in stream order.
    pub sources: Vec<DocumentMeta>,
    /// Instruction data only: the label masks and what they hold.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub instruct: Option<MaskMeta>,
}

/// What `meta.json` says of instruction data (beside `PrepareMeta`'s fields).
#[derive(Debug, Clone, Serialize)]
pub struct MaskMeta {
    /// `jsonl`.
    pub format: String,
    /// The label masks: `<split>.mask.bin` beside each token file, one byte per token.
    pub mask: String,
    /// Records in train.bin and val.bin.
    pub records: [u64; 2],
    /// Tokens that are training targets (mask 1), train and val.
    pub trained_tokens: [u64; 2],
    /// Tokens that are not (prompts, system text, template markup), train and val.
    pub masked_tokens: [u64; 2],
    /// How the text was made: `chat_template` (tokenizer_config.json) or `prompt + response`.
    pub rendering: String,
}

/// Output names in the directory (the masks only for instruction data).
pub(super) const OUTPUTS: [&str; 5] = [
    "train.bin",
    "val.bin",
    "meta.json",
    "train.mask.bin",
    "val.mask.bin",
];
pub(super) fn partial(out: &Path, name: &str) -> PathBuf {
    out.join(format!(".{name}.partial"))
}

impl PrepareMeta {
    /// What `tokenizer` wrote: `tokens` in train.bin and val.bin, split at `val_fraction` as
    /// `split` says.
    pub(super) fn new(
        tokenizer: &Tokenizer,
        val_fraction: f64,
        width: TokenWidth,
        tokens: [u64; 2],
        split: &str,
        sources: Vec<DocumentMeta>,
    ) -> PrepareMeta {
        PrepareMeta {
            tokenizer: tokenizer.name(),
            vocab_size: tokenizer.vocab_size(),
            eot: tokenizer.eot(),
            dtype: width.dtype().into(),
            train_tokens: tokens[0],
            val_tokens: tokens[1],
            val_fraction,
            split: split.into(),
            sources,
            instruct: None,
        }
    }
}

/// Writes `meta` to meta.json's temporary name (`publish` puts it in place).
pub(super) fn write_meta(out: &Path, meta: &PrepareMeta) -> Result<()> {
    let meta_path = partial(out, "meta.json");
    let text = serde_json::to_string_pretty(meta).expect("meta serialises") + "\n";
    std::fs::write(&meta_path, text).map_err(|e| KilnError::io(&meta_path, e))
}

/// Renames the finished `names` into place and removes the directory's other outputs (an older
/// run's masks must not outlive it). Last: until here, the existing outputs are untouched.
pub(super) fn publish(out: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let to = out.join(name);
        std::fs::rename(partial(out, name), &to).map_err(|e| KilnError::io(&to, e))?;
    }
    for name in OUTPUTS.iter().filter(|n| !names.contains(n)) {
        let _ = std::fs::remove_file(out.join(name));
    }
    Ok(())
}

pub(super) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| KilnError::file(path, format!("cannot read input: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        KilnError::file(
            path,
            format!(
                "is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

pub(super) fn write_ids(
    file: &mut std::fs::File,
    path: &Path,
    ids: &[u32],
    width: TokenWidth,
) -> Result<()> {
    let bytes: Vec<u8> = match width {
        TokenWidth::U16 => ids.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect(),
        TokenWidth::U32 => ids.iter().flat_map(|&t| t.to_le_bytes()).collect(),
    };
    file.write_all(&bytes).map_err(|e| KilnError::io(path, e))
}

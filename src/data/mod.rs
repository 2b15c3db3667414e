//! Training data. A source produces row `i` of step `t`'s global batch from (data seed, t, i)
//! alone, so every rank can build its own contiguous slice of rows and the global batch is the
//! same at every world size (docs/ARCHITECTURE.md, "Contracts").

pub mod chat;
mod file;
mod instruct;
mod markov;
mod outputs;
pub mod prepare;

pub use file::FileSource;
pub use markov::MarkovSource;

use crate::config::DataConfig;
use crate::error::{KilnError, Result};
use crate::model::MicroBatch;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// A deterministic source of training rows.
pub trait TokenSource: Send + Sync {
    /// Fills `out` (length seq_len + 1) with row `row` of step `step`'s global batch.
    fn fill_row(&self, step: u64, row: u64, out: &mut [u32]);
    /// One line describing the source for the logs.
    fn describe(&self) -> String;
    /// Fills `out` (length seq_len + 1, aligned with `fill_row`'s row) with the label mask of
    /// the row: 1 where the token is a training target, 0 where it is not (instruction data's
    /// prompts). `false`, leaving `out` alone, for a source without masks: every token trains.
    fn fill_mask(&self, _step: u64, _row: u64, _out: &mut [u8]) -> bool {
        false
    }
    /// The loss floor in nats per token, when the source knows it (markov).
    fn entropy_rate(&self) -> Option<f64> {
        None
    }
}

/// Builds the source `[data]` asks for; file errors name the file.
pub fn open(cfg: &DataConfig, vocab: usize, seq_len: usize) -> Result<Box<dyn TokenSource>> {
    match cfg.source.as_str() {
        "markov" => Ok(Box::new(MarkovSource::new(
            cfg.seed,
            cfg.markov_symbols,
            cfg.markov_sharpness,
        ))),
        "text" => Ok(Box::new(FileSource::text(
            required_path(cfg)?,
            cfg.seed,
            vocab,
            seq_len,
        )?)),
        "tokens" => Ok(Box::new(FileSource::tokens(
            required_path(cfg)?,
            cfg.seed,
            vocab,
            seq_len,
        )?)),
        other => {
            crate::config::check_choice("data.source", other, crate::config::DATA_SOURCES)?;
            unreachable!("data.source `{other}` is listed but not opened here")
        }
    }
}

fn required_path(cfg: &DataConfig) -> Result<&str> {
    if cfg.path.is_empty() {
        return Err(KilnError::config(format!(
            "key `data.path`: data.source = \"{}\" needs a file",
            cfg.source
        )));
    }
    Ok(&cfg.path)
}

/// Builds the micro-batch of rows `[first_row, first_row + rows)` of step `step` on `device`.
/// With a masked source, the targets are weighted so that the mean of the micro-batch losses
/// over all rows of `scope` (a step's global batch, an evaluation set) is the mean loss over the
/// trained targets of `scope` — as transformers averages over the labels that are not -100 —
/// whatever the micro-batch size, accumulation or world size.
pub fn micro_batch(
    source: &dyn TokenSource,
    step: u64,
    first_row: u64,
    rows: usize,
    seq_len: usize,
    device: &Device,
    scope: std::ops::Range<u64>,
) -> MicroBatch {
    let mut row = vec![0u32; seq_len + 1];
    let mut inputs = Vec::with_capacity(rows * seq_len);
    let mut targets = Vec::with_capacity(rows * seq_len);
    for r in 0..rows as u64 {
        source.fill_row(step, first_row + r, &mut row);
        inputs.extend(row[..seq_len].iter().map(|&t| t as i64));
        targets.extend(row[1..].iter().map(|&t| t as i64));
    }
    let tensor =
        |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [rows, seq_len]), device);
    MicroBatch {
        inputs: tensor(inputs),
        targets: tensor(targets),
        weights: target_weights(source, step, first_row, rows, seq_len, scope)
            .map(|w| Tensor::from_data(TensorData::new(w, [rows, seq_len]), device)),
    }
}

/// Each target's weight, `mask × (targets in scope ÷ trained targets in scope)`; `None` for a
/// source without masks. Every rank counts the scope's trained targets from the data itself (it
/// is deterministic in the step), so no collective is needed.
fn target_weights(
    source: &dyn TokenSource,
    step: u64,
    first_row: u64,
    rows: usize,
    seq_len: usize,
    scope: std::ops::Range<u64>,
) -> Option<Vec<f32>> {
    let mut mask = vec![0u8; seq_len + 1];
    if !source.fill_mask(step, first_row, &mut mask) {
        return None;
    }
    let mut trained = 0u64;
    for r in scope.clone() {
        source.fill_mask(step, r, &mut mask);
        trained += mask[1..].iter().map(|&m| m as u64).sum::<u64>();
    }
    let all = (scope.end - scope.start) * seq_len as u64;
    let scale = match trained {
        0 => 0.0,
        n => (all as f64 / n as f64) as f32,
    };
    let mut weights = Vec::with_capacity(rows * seq_len);
    for r in 0..rows as u64 {
        source.fill_mask(step, first_row + r, &mut mask);
        weights.extend(mask[1..].iter().map(|&m| m as f32 * scale));
    }
    Some(weights)
}

/// The meta.json beside the token file `path` (`Null` when there is none).
fn meta_beside(path: &str) -> Result<serde_json::Value> {
    let meta = std::path::Path::new(path).with_file_name("meta.json");
    let Ok(text) = std::fs::read_to_string(&meta) else {
        return Ok(serde_json::Value::Null);
    };
    serde_json::from_str(&text).map_err(|e| KilnError::file(&meta, format!("is not JSON: {e}")))
}

/// Refuses a token file made by a tokenizer with more ids than the model's `vocab` (its
/// meta.json's `vocab_size`): some ids could not be read, even if this file happens to hold
/// none of them.
pub fn check_vocab(path: &str, vocab: usize) -> Result<()> {
    match meta_beside(path)?["vocab_size"].as_u64() {
        Some(n) if n as usize > vocab => Err(KilnError::file(
            std::path::Path::new(path).with_file_name("meta.json"),
            format!(
                "key `vocab_size` = {n}: the tokenizer that made {path} has more ids than the \
                 model's vocab ({vocab})"
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether the token file `path` has a label mask (instruction data: its meta.json says
/// `"format": "jsonl"`).
pub fn masked(path: &str) -> Result<bool> {
    Ok(meta_beside(path)?["format"] == "jsonl")
}

/// How wide the ids of a token file are: little-endian uint16, or uint32 for a vocabulary
/// beyond 65,536 ids (Llama 3's 128,256, Phi-4's 200,064). `kiln prepare-data` records it in
/// the `meta.json` beside the files, where `data.path` and `data.val_path` find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenWidth {
    /// Two bytes per id (nanoGPT's and llm.c's files, and the default without a meta.json).
    U16,
    /// Four bytes per id.
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a `vocab`-id tokenizer.
    pub fn for_vocab(vocab: usize) -> TokenWidth {
        match vocab <= 1 << 16 {
            true => TokenWidth::U16,
            false => TokenWidth::U32,
        }
    }

    /// Bytes per id.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// `meta.json`'s `dtype`.
    pub fn dtype(self) -> &'static str {
        match self {
            TokenWidth::U16 => "uint16 little-endian",
            TokenWidth::U32 => "uint32 little-endian",
        }
    }

    /// The width of the token file at `path`: `meta.json`'s `dtype` beside it, uint16 without
    /// one. Errors name the meta.json.
    pub fn of_file(path: &str) -> Result<TokenWidth> {
        let meta = meta_beside(path)?;
        match meta["dtype"].as_str() {
            None => Ok(TokenWidth::U16),
            Some(d) if d.starts_with("uint16") => Ok(TokenWidth::U16),
            Some(d) if d.starts_with("uint32") => Ok(TokenWidth::U32),
            Some(d) => Err(crate::error::KilnError::file(
                std::path::Path::new(path).with_file_name("meta.json"),
                format!("key `dtype`: `{d}` is not uint16 or uint32 little-endian"),
            )),
        }
    }
}

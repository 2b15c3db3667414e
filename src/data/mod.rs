//! Training data. A source produces row `i` of step `t`'s global batch from (data seed, t, i)
//! alone, so every rank can build its own contiguous slice of rows and the global batch is the
//! same at every world size (docs/ARCHITECTURE.md, "Contracts").

pub mod chat;
mod file;
mod instruct;
mod markov;
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
pub fn micro_batch(
    source: &dyn TokenSource,
    step: u64,
    first_row: u64,
    rows: usize,
    seq_len: usize,
    device: &Device,
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
    }
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
        let meta = std::path::Path::new(path).with_file_name("meta.json");
        let Ok(text) = std::fs::read_to_string(&meta) else {
            return Ok(TokenWidth::U16);
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::error::KilnError::file(&meta, format!("is not JSON: {e}")))?;
        match value["dtype"].as_str() {
            None => Ok(TokenWidth::U16),
            Some(d) if d.starts_with("uint16") => Ok(TokenWidth::U16),
            Some(d) if d.starts_with("uint32") => Ok(TokenWidth::U32),
            Some(d) => Err(crate::error::KilnError::file(
                &meta,
                format!("key `dtype`: `{d}` is not uint16 or uint32 little-endian"),
            )),
        }
    }
}

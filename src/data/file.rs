//! File sources: the bytes of a UTF-8 text file (vocab 256), or a flat token file as written
//! by nanoGPT's prepare scripts (raw little-endian u16), llm.c (a 256×i32 header with magic
//! 20240520, then u16 tokens) or `kiln prepare-data` (u16, or u32 when its meta.json says so).
//! Rows start at seeded random offsets.

use super::{TokenSource, TokenWidth};
use crate::error::{KilnError, Result};
use crate::rng::Rng;

/// Random windows over a token sequence held in memory: `data.source = "text"` (one token per
/// byte of a UTF-8 file) or `"tokens"` (flat little-endian uint16 tokens).
pub struct FileSource {
    tokens: Ids,
    seed: u64,
    description: String,
}

/// Token ids as the file stores them (half the memory for the common uint16 files).
enum Ids {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Ids {
    fn len(&self) -> usize {
        match self {
            Ids::U16(v) => v.len(),
            Ids::U32(v) => v.len(),
        }
    }

    /// Copies ids `start..start + out.len()` into `out`.
    fn copy_to(&self, start: usize, out: &mut [u32]) {
        let end = start + out.len();
        match self {
            Ids::U16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, &t)| *o = t as u32),
            Ids::U32(v) => out.copy_from_slice(&v[start..end]),
        }
    }

    /// The first id not below `vocab`, with its position.
    fn first_out_of(&self, vocab: usize) -> Option<(usize, u32)> {
        match self {
            Ids::U16(v) => v
                .iter()
                .position(|&t| t as usize >= vocab)
                .map(|i| (i, v[i] as u32)),
            Ids::U32(v) => v
                .iter()
                .position(|&t| t as usize >= vocab)
                .map(|i| (i, v[i])),
        }
    }
}

fn check(path: &str, tokens: &Ids, vocab: usize, seq_len: usize, what: &str) -> Result<()> {
    if tokens.len() < seq_len + 1 {
        return Err(KilnError::file(
            path,
            format!(
                "holds {} {what}; training needs at least seq_len + 1 = {}",
                tokens.len(),
                seq_len + 1
            ),
        ));
    }
    if let Some((i, t)) = tokens.first_out_of(vocab) {
        return Err(KilnError::file(
            path,
            format!("token id {t} at position {i} is not below the model's vocab ({vocab})"),
        ));
    }
    Ok(())
}

fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| KilnError::file(path, format!("cannot read data file: {e}")))
}

const LLMC_MAGIC: i32 = 20240520;
const LLMC_HEADER_BYTES: usize = 256 * 4;

impl FileSource {
    /// A UTF-8 text file, one token per byte; errors name the file.
    pub fn text(path: &str, seed: u64, vocab: usize, seq_len: usize) -> Result<Self> {
        let bytes = read(path)?;
        std::str::from_utf8(&bytes)
            .map_err(|e| KilnError::file(path, format!("is not UTF-8 text ({e})")))?;
        let tokens = Ids::U16(bytes.iter().map(|&b| b as u16).collect());
        check(path, &tokens, vocab, seq_len, "bytes")?;
        let description = format!("text source {path}: {} bytes", tokens.len());
        Ok(FileSource {
            tokens,
            seed,
            description,
        })
    }

    /// A token file (raw uint16 or uint32 as the meta.json beside it says, or uint16 with
    /// llm.c's header); errors name the file.
    pub fn tokens(path: &str, seed: u64, vocab: usize, seq_len: usize) -> Result<Self> {
        let width = TokenWidth::of_file(path)?;
        let bytes = read(path)?;
        let is_llmc = bytes.len() >= LLMC_HEADER_BYTES
            && i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) == LLMC_MAGIC;
        let body = if is_llmc {
            let count = i32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
            let body = &bytes[LLMC_HEADER_BYTES..];
            if body.len() < count * 2 {
                return Err(KilnError::file(
                    path,
                    format!(
                        "llm.c header announces {count} tokens but the file holds {}",
                        body.len() / 2
                    ),
                ));
            }
            &body[..count * 2]
        } else {
            &bytes[..]
        };
        let width = if is_llmc { TokenWidth::U16 } else { width };
        if body.len() % width.bytes() != 0 {
            return Err(KilnError::file(
                path,
                format!(
                    "length {} is not a multiple of {}; expected {} tokens",
                    body.len(),
                    width.bytes(),
                    width.dtype()
                ),
            ));
        }
        let tokens = match width {
            TokenWidth::U16 => Ids::U16(
                body.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            TokenWidth::U32 => Ids::U32(
                body.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        };
        check(path, &tokens, vocab, seq_len, "tokens")?;
        let description = format!("token file {path}: {} tokens", tokens.len());
        Ok(FileSource {
            tokens,
            seed,
            description,
        })
    }
}

impl FileSource {
    /// Number of tokens held.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Fills `out` with the tokens from `start` on (fixed windows, as validation reads them).
    pub fn fill_window(&self, start: usize, out: &mut [u32]) {
        self.tokens.copy_to(start, out);
    }
}

impl TokenSource for FileSource {
    fn fill_row(&self, step: u64, row: u64, out: &mut [u32]) {
        let mut rng = Rng::derive(self.seed, &[step, row]);
        let start = rng.below((self.tokens.len() - out.len() + 1) as u64) as usize;
        self.tokens.copy_to(start, out);
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

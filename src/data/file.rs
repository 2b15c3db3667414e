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
    /// Instruction data's label mask, one byte per token (`<name>.mask.bin`).
    mask: Option<Vec<u8>>,
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

/// The label mask of instruction data (`kiln prepare-data --format jsonl`): `train.mask.bin`
/// beside `train.bin` when the meta.json beside them names masks; one byte per token.
fn read_mask(path: &str, tokens: usize) -> Result<Option<Vec<u8>>> {
    if !super::masked(path)? {
        return Ok(None);
    }
    let mask_path = match path.strip_suffix(".bin") {
        Some(stem) => format!("{stem}.mask.bin"),
        None => format!("{path}.mask.bin"),
    };
    let mask = std::fs::read(&mask_path).map_err(|e| {
        KilnError::file(
            &mask_path,
            format!("cannot read the label mask that meta.json names: {e}"),
        )
    })?;
    if mask.len() != tokens {
        return Err(KilnError::file(
            &mask_path,
            format!(
                "holds {} bytes; {path} has {tokens} tokens (one mask byte each)",
                mask.len()
            ),
        ));
    }
    Ok(Some(mask))
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
            mask: None,
            seed,
            description,
        })
    }

    /// A token file (raw uint16 or uint32 as the meta.json beside it says, or uint16 with
    /// llm.c's header); errors name the file.
    pub fn tokens(path: &str, seed: u64, vocab: usize, seq_len: usize) -> Result<Self> {
        let width = TokenWidth::of_file(path)?;
        super::check_vocab(path, vocab)?;
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
        let mask = read_mask(path, tokens.len())?;
        let description = match &mask {
            None => format!("token file {path}: {} tokens", tokens.len()),
            Some(m) => format!(
                "token file {path}: {} tokens, {} of them trained (label mask)",
                tokens.len(),
                m.iter().filter(|&&b| b != 0).count()
            ),
        };
        Ok(FileSource {
            tokens,
            mask,
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

    /// Fills `out` with the label mask from `start` on; `false` without a mask.
    pub fn fill_mask_window(&self, start: usize, out: &mut [u8]) -> bool {
        match &self.mask {
            Some(m) => {
                out.copy_from_slice(&m[start..start + out.len()]);
                true
            }
            None => false,
        }
    }

    fn window_start(&self, step: u64, row: u64, len: usize) -> usize {
        let mut rng = Rng::derive(self.seed, &[step, row]);
        rng.below((self.tokens.len() - len + 1) as u64) as usize
    }
}

impl TokenSource for FileSource {
    fn fill_row(&self, step: u64, row: u64, out: &mut [u32]) {
        let start = self.window_start(step, row, out.len());
        self.tokens.copy_to(start, out);
    }

    fn fill_mask(&self, step: u64, row: u64, out: &mut [u8]) -> bool {
        let start = self.window_start(step, row, out.len());
        self.fill_mask_window(start, out)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

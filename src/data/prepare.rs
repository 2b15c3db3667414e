//! `kiln prepare-data`: text files → nanoGPT-style `train.bin` / `val.bin` (flat little-endian
//! uint16 tokens, what `data.source = "tokens"` and `data.val_path` read) and `meta.json`.
//!
//! Documents are the input files, in the order given (a directory's files sorted by name), each
//! followed by the tokenizer's end-of-text token (GPT-2's `<|endoftext|>`, as nanoGPT's
//! openwebtext preparation appends it; the bytes tokenizer has none). The validation split is
//! the tail `val_fraction` of the token stream, as nanoGPT's shakespeare preparation takes the
//! last 10%: no document sampling, so the split is reproducible from the inputs alone.
//!
//! Outputs are written under temporary names and renamed at the end, and every input is checked
//! (exists, not empty, UTF-8) before that, so a user error leaves the output directory as it
//! was.

use super::outputs::{partial, publish, read_text, write_ids, write_meta, OUTPUTS};
pub use super::outputs::{DocumentMeta, MaskMeta, PrepareMeta};
use super::TokenWidth;
use crate::error::{KilnError, Result};
use crate::tokenizer::{split_points, Tokenizer, TOKENIZER_NAMES};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `kiln prepare-data`'s command line.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// `gpt2` (GPT-2's byte-level BPE, 50257 ids; documents end with <|endoftext|> = 50256),
    /// `bytes` (one token per UTF-8 byte, 256 ids, documents simply concatenated), or a Hugging
    /// Face tokenizer.json or the model directory holding it (each document encoded as
    /// transformers' `tokenizer(text)` does, then its `eos_token` from tokenizer_config.json;
    /// uint32 files when the vocabulary exceeds 65,536 ids).
    #[arg(long, default_value = "gpt2", value_parser = parse_tokenizer)]
    pub tokenizer: Tokenizer,
    /// UTF-8 text files, one document each; a directory stands for its files, sorted by name.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output directory: train.bin, val.bin (little-endian uint16 tokens) and meta.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The last F of the token stream (the end of the last documents) goes to val.bin, as
    /// nanoGPT takes the last 10%. 0 writes an empty val.bin.
    #[arg(long, value_name = "F", default_value_t = 0.1, value_parser = parse_fraction)]
    pub val_fraction: f64,
    /// Replace existing train.bin, val.bin and meta.json in DIR (otherwise an error).
    #[arg(long)]
    pub force: bool,
    /// `text` (UTF-8 files, one document each) or `jsonl` (instruction data: one record per
    /// line, `{"prompt", "response"}` or `{"messages": [{"role", "content"}, …]}`, rendered
    /// with the tokenizer's chat template; the loss only on the replies: train.mask.bin).
    #[arg(long, value_enum, default_value = "text")]
    pub format: DataFormat,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_tokenizer(name: &str) -> std::result::Result<Tokenizer, String> {
    Tokenizer::from_name(name).map_err(|e| match Path::new(name).exists() {
        true => e.to_string(),
        false => format!("expected one of {TOKENIZER_NAMES}"),
    })
}

fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        _ => Err("expected a number in [0, 1)".into()),
    }
}

/// Runs `kiln prepare-data` and prints what it wrote.
pub fn run(args: &PrepareArgs) -> Result<()> {
    use std::io::IsTerminal;
    let opts = PrepareOptions {
        tokenizer: args.tokenizer.clone(),
        inputs: args.inputs.clone(),
        out: args.out.clone(),
        val_fraction: args.val_fraction,
        force: args.force,
        progress: !args.quiet && std::io::stderr().is_terminal(),
        format: args.format,
    };
    let (meta, seconds) = prepare(&opts)?;
    let bytes: u64 = meta.sources.iter().map(|d| d.bytes).sum();
    eprintln!(
        "kiln: {} documents, {:.1} MB of text → {} {} tokens in {:.1} s ({:.0}k tokens/s): \
         {} train.bin, {} val.bin in {}",
        meta.sources.len(),
        bytes as f64 / 1e6,
        meta.train_tokens + meta.val_tokens,
        meta.tokenizer,
        seconds,
        (meta.train_tokens + meta.val_tokens) as f64 / seconds.max(1e-9) / 1e3,
        meta.train_tokens,
        meta.val_tokens,
        opts.out.display()
    );
    Ok(())
}

/// What the inputs hold.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// UTF-8 text, one document per file.
    Text,
    /// Instruction records, one JSON object per line (`super::chat`).
    Jsonl,
}

/// What `kiln prepare-data` was asked to do.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// How text becomes ids.
    pub tokenizer: Tokenizer,
    /// Files and directories (a directory's regular files, sorted by name, not recursing).
    pub inputs: Vec<PathBuf>,
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// Fraction of the token stream, from its end, that goes to `val.bin`; in [0, 1).
    pub val_fraction: f64,
    /// Replace existing outputs.
    pub force: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// What the inputs hold.
    pub format: DataFormat,
}

/// Text per parallel encoding task: large enough that the per-task cost vanishes, small enough
/// for a progress bar that moves and for both cores to work on one large file.
const CHUNK_BYTES: usize = 1 << 20;

/// Runs the preparation; returns the metadata written and the wall time in seconds.
pub fn prepare(opts: &PrepareOptions) -> Result<(PrepareMeta, f64)> {
    let started = Instant::now();
    let files = expand_inputs(&opts.inputs)?;
    check_outputs(&opts.out, opts.force)?;
    // The directories this run creates, deepest first, to remove again after an error.
    let created: Vec<PathBuf> = opts
        .out
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| KilnError::file(&opts.out, format!("cannot create the directory: {e}")))?;
    let result = match opts.format {
        DataFormat::Text => write_outputs(opts, &files),
        DataFormat::Jsonl => {
            super::instruct::write_outputs(&opts.tokenizer, &opts.out, opts.val_fraction, &files)
        }
    };
    if result.is_err() {
        for name in OUTPUTS {
            let _ = std::fs::remove_file(partial(&opts.out, name));
        }
        for dir in &created {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result.map(|meta| (meta, started.elapsed().as_secs_f64()))
}

/// The input files in stream order, each checked to exist and to be non-empty.
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input)
            .map_err(|e| KilnError::file(input, format!("cannot read input: {e}")))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| KilnError::file(input, format!("cannot list directory: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            if entries.is_empty() {
                return Err(KilnError::file(
                    input,
                    "directory holds no files to tokenize",
                ));
            }
            entries.sort();
            for path in entries {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                files.push((path, len));
            }
        } else {
            files.push((input.clone(), meta.len()));
        }
    }
    if let Some((path, _)) = files.iter().find(|(_, len)| *len == 0) {
        return Err(KilnError::file(path, "is empty; expected UTF-8 text"));
    }
    Ok(files)
}

pub(super) fn check_outputs(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(KilnError::file(out, "--out must be a directory"));
    }
    if force {
        return Ok(());
    }
    match OUTPUTS.iter().map(|n| out.join(n)).find(|p| p.exists()) {
        Some(p) => Err(KilnError::file(
            p,
            "exists; pass --force to replace it, or choose another --out",
        )),
        None => Ok(()),
    }
}

fn write_outputs(opts: &PrepareOptions, files: &[(PathBuf, u64)]) -> Result<PrepareMeta> {
    let tokenizer = &opts.tokenizer;
    // uint16 files where every id fits (GPT-2's 50257 do), uint32 beyond (Llama 3's 128256).
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let all_path = partial(&opts.out, "train.bin");
    let mut all = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&all_path)
        .map_err(|e| KilnError::io(&all_path, e))?;
    let total_bytes: u64 = files.iter().map(|(_, len)| len).sum();
    let bar = progress_bar(opts.progress, total_bytes);
    let started = Instant::now();
    let mut num_tokens = 0u64;
    let mut sources = Vec::with_capacity(files.len());
    for (path, _) in files {
        let text = read_text(path)?;
        let chunks = chunk_bounds(tokenizer, &text);
        // Encode chunk groups in parallel, write them in order as they complete in order.
        let mut doc_tokens = 0u64;
        for group in chunks.chunks(rayon::current_num_threads().max(1) * 2) {
            let encoded: Vec<Vec<u32>> = group
                .par_iter()
                .map(|&(a, b)| tokenizer.encode(&text[a..b]))
                .collect::<Result<_>>()?;
            for (ids, &(a, b)) in encoded.iter().zip(group) {
                write_ids(&mut all, &all_path, ids, width)?;
                doc_tokens += ids.len() as u64;
                bar.inc((b - a) as u64);
            }
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.0}k tokens/s",
                (num_tokens + doc_tokens) as f64 / elapsed / 1e3
            ));
        }
        if let Some(eot) = tokenizer.eot() {
            write_ids(&mut all, &all_path, &[eot], width)?;
            doc_tokens += 1;
        }
        num_tokens += doc_tokens;
        sources.push(DocumentMeta {
            path: path.display().to_string(),
            bytes: text.len() as u64,
            tokens: doc_tokens,
        });
    }
    bar.finish_and_clear();

    let val_tokens = ((num_tokens as f64) * opts.val_fraction).round() as u64;
    let train_tokens = num_tokens - val_tokens;
    if train_tokens == 0 {
        return Err(KilnError::config(format!(
            "--val-fraction {} leaves no training tokens out of {num_tokens}",
            opts.val_fraction
        )));
    }
    // The tail goes to val.bin; train.bin is the stream file cut short.
    let val_path = partial(&opts.out, "val.bin");
    let mut val = std::fs::File::create(&val_path).map_err(|e| KilnError::io(&val_path, e))?;
    let bytes = width.bytes() as u64;
    all.seek(SeekFrom::Start(train_tokens * bytes))
        .map_err(|e| KilnError::io(&all_path, e))?;
    std::io::copy(&mut (&mut all).take(val_tokens * bytes), &mut val)
        .map_err(|e| KilnError::io(&val_path, e))?;
    all.set_len(train_tokens * bytes)
        .map_err(|e| KilnError::io(&all_path, e))?;
    for (f, p) in [(&all, &all_path), (&val, &val_path)] {
        f.sync_all().map_err(|e| KilnError::io(p, e))?;
    }

    let meta = PrepareMeta::new(
        tokenizer,
        opts.val_fraction,
        width,
        [train_tokens, val_tokens],
        "val.bin is the last val_fraction of the token stream",
        sources,
    );
    write_meta(&opts.out, &meta)?;
    publish(&opts.out, &OUTPUTS[..3])?;
    Ok(meta)
}

/// Byte ranges of `text` to encode independently: for GPT-2, cut only where the ids cannot
/// change (see [`split_points`]); bytes can be cut anywhere.
fn chunk_bounds(tokenizer: &Tokenizer, text: &str) -> Vec<(usize, usize)> {
    let cuts: Vec<usize> = match tokenizer {
        Tokenizer::Gpt2 => split_points(text, CHUNK_BYTES),
        // A Hugging Face tokenizer's post-processor adds its beginning-of-text token to every
        // piece: a document is encoded whole (documents still encode in parallel).
        Tokenizer::HuggingFace(_) => Vec::new(),
        // Any cut gives the same bytes; `&str` slicing only needs a character boundary.
        Tokenizer::Bytes => {
            let mut cuts: Vec<usize> = (1..text.len().div_ceil(CHUNK_BYTES))
                .map(|i| (i * CHUNK_BYTES..text.len()).find(|&c| text.is_char_boundary(c)))
                .map(|c| c.unwrap_or(text.len()))
                .filter(|&c| c < text.len())
                .collect();
            cuts.dedup();
            cuts
        }
    };
    let mut bounds = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for c in cuts.into_iter().chain(std::iter::once(text.len())) {
        bounds.push((start, c));
        start = c;
    }
    bounds
}

fn progress_bar(show: bool, total_bytes: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes}  {msg}  eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

//! `kiln prepare-data --format jsonl`: instruction records → token files plus label masks.
//!
//! Each record becomes one document: its conversation rendered with the chat template of the
//! tokenizer's tokenizer_config.json (`super::chat`), tokenized without added special tokens
//! (the template writes them), as transformers' `apply_chat_template(..., tokenize=True)` does.
//! Without a chat template, a `{"prompt", "response"}` record is the prompt's ids (with the
//! tokenizer's beginning-of-text token, if it adds one), the response's, then end-of-text.
//!
//! `train.mask.bin` / `val.mask.bin` hold one byte per token: 1 where the token is a training
//! target (inside an assistant turn: the reply and the tokens that close it), 0 elsewhere (the
//! prompt, system text, template markup). The validation split takes whole records from the
//! end, so no conversation is cut.

use super::chat::{parse_record, ChatTemplate, Message};
use super::outputs::{
    partial, publish, read_text, write_ids, write_meta, DocumentMeta, MaskMeta, PrepareMeta,
    OUTPUTS,
};
use super::TokenWidth;
use crate::error::{KilnError, Result};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One record's ids and label mask.
struct Encoded {
    ids: Vec<u32>,
    mask: Vec<u8>,
}

fn encode_record(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    messages: &[Message],
    file: &Path,
    line_no: usize,
) -> Result<Encoded> {
    if let Some(template) = template {
        let (text, turns) = template.render_conversation(messages)?;
        let (ids, spans) = tokenizer.encode_spans(&text)?;
        let mask = spans
            .iter()
            .map(|s| turns.iter().any(|t| t.contains(&s.start)) as u8)
            .collect();
        return Ok(Encoded { ids, mask });
    }
    match messages {
        [user, assistant] if user.role == "user" && assistant.role == "assistant" => {
            let prompt = tokenizer.encode(&user.content)?;
            let (reply, _) = tokenizer.encode_spans(&assistant.content)?;
            let mut mask = vec![0u8; prompt.len()];
            mask.resize(prompt.len() + reply.len(), 1);
            let mut ids = prompt;
            ids.extend(reply);
            if let Some(eot) = tokenizer.eot() {
                ids.push(eot);
                mask.push(1);
            }
            Ok(Encoded { ids, mask })
        }
        _ => Err(KilnError::file(
            file,
            format!(
                "line {line_no}: a `messages` conversation needs a chat template, and the \
                 tokenizer `{}` has none (tokenizer_config.json's `chat_template`)",
                tokenizer.name()
            ),
        )),
    }
}

/// Reads, renders and encodes every record of `files`, in order.
fn encode_files(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    files: &[(PathBuf, u64)],
) -> Result<(Vec<Encoded>, Vec<DocumentMeta>)> {
    let mut records = Vec::new();
    let mut sources = Vec::new();
    for (path, len) in files {
        let text = read_text(path)?;
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect();
        let encoded: Vec<Encoded> = lines
            .par_iter()
            .map(|&(n, line)| {
                let messages = parse_record(line, path, n)?;
                encode_record(tokenizer, template, &messages, path, n)
            })
            .collect::<Result<_>>()?;
        if encoded.is_empty() {
            return Err(KilnError::file(
                path,
                "holds no records (one JSON object per line)",
            ));
        }
        sources.push(DocumentMeta {
            path: path.display().to_string(),
            bytes: *len,
            tokens: encoded.iter().map(|e| e.ids.len() as u64).sum(),
        });
        records.extend(encoded);
    }
    Ok((records, sources))
}

/// Writes one split's token file and mask; returns (tokens, trained tokens).
fn write_split(
    out: &Path,
    name: &str,
    records: &[Encoded],
    width: TokenWidth,
) -> Result<(u64, u64)> {
    let ids_path = partial(out, &format!("{name}.bin"));
    let mask_path = partial(out, &format!("{name}.mask.bin"));
    let mut ids = std::fs::File::create(&ids_path).map_err(|e| KilnError::io(&ids_path, e))?;
    let mut mask = std::fs::File::create(&mask_path).map_err(|e| KilnError::io(&mask_path, e))?;
    let (mut tokens, mut trained) = (0u64, 0u64);
    for r in records {
        write_ids(&mut ids, &ids_path, &r.ids, width)?;
        mask.write_all(&r.mask)
            .map_err(|e| KilnError::io(&mask_path, e))?;
        tokens += r.ids.len() as u64;
        trained += r.mask.iter().map(|&m| m as u64).sum::<u64>();
    }
    for (f, p) in [(&ids, &ids_path), (&mask, &mask_path)] {
        f.sync_all().map_err(|e| KilnError::io(p, e))?;
    }
    Ok((tokens, trained))
}

/// `prepare` for instruction data (the directory checks and the clean-up after an error are
/// `prepare`'s).
pub(super) fn write_outputs(
    tokenizer: &Tokenizer,
    out: &Path,
    val_fraction: f64,
    files: &[(PathBuf, u64)],
) -> Result<PrepareMeta> {
    let template = match tokenizer {
        Tokenizer::HuggingFace(t) => ChatTemplate::beside(t.path())?,
        _ => None,
    };
    let (records, sources) = encode_files(tokenizer, template.as_ref(), files)?;
    let val_records = ((records.len() as f64) * val_fraction).round() as usize;
    let train_records = records.len() - val_records;
    if train_records == 0 {
        return Err(KilnError::config(format!(
            "--val-fraction {} leaves no training records out of {}",
            val_fraction,
            records.len()
        )));
    }
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let (train_tokens, train_trained) =
        write_split(out, "train", &records[..train_records], width)?;
    let (val_tokens, val_trained) = write_split(out, "val", &records[train_records..], width)?;
    let mut meta = PrepareMeta::new(
        tokenizer,
        val_fraction,
        width,
        [train_tokens, val_tokens],
        "val.bin holds the last val_fraction of the records, whole",
        sources,
    );
    meta.instruct = Some(MaskMeta {
        format: "jsonl".into(),
        mask: "train.mask.bin, val.mask.bin: one byte per token, 1 = a training target".into(),
        records: [train_records as u64, val_records as u64],
        trained_tokens: [train_trained, val_trained],
        masked_tokens: [train_tokens - train_trained, val_tokens - val_trained],
        rendering: match template {
            Some(_) => "chat_template".into(),
            None => "prompt + response".into(),
        },
    });
    write_meta(out, &meta)?;
    publish(out, &OUTPUTS)?;
    Ok(meta)
}

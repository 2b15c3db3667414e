//! Hugging Face GPT-2 checkpoints in and out (issue 12): `model.init_from` starts a run from
//! one, `kiln export --format hf` writes one, and `kiln sample --init-from` samples from one.
//! kiln's GPT is GPT-2's architecture with the same `[d_in, d_out]` matrix layout, so the
//! mapping is names, the LM head's transpose, and the key bias (see `names`).

mod config;
mod export;
mod load;
mod names;
pub mod peft;
mod weights;

pub use config::{config_json, HfConfig};
pub use export::{export_hf, write_hf_dir};
pub use load::HfCheckpoint;
pub use names::{decoder_name, hf_name, Transform};
pub use weights::HfWeights;

use crate::config::{ModelConfig, QkvBias};

/// The `model_type`s of the Llama-family decoders `crate::llama` trains.
pub const DECODER_MODEL_TYPES: &[&str] = &["llama", "qwen2", "phi3"];
use crate::error::{KilnError, Result};
use crate::model::GptConfig;
use std::path::Path;

/// The model `[model]` describes when `model.init_from` is set: the checkpoint's shape.
///
/// Override rule: `model.preset` is ignored (the file is the preset); a shape key
/// (`d_model`, `n_layers`, `n_heads`, `vocab`, `max_seq_len`) may be given only with the
/// file's value — a different one could not load the weights, so it is an error naming both
/// rather than a silent winner; `seq_len` may shorten training below `n_positions`.
/// `model.qkv_bias` is free: `"qv"` drops the key bias, which computes the same function.
/// Tying follows `tie_word_embeddings` unless `model.tie_embeddings` says otherwise: `false`
/// unties a tied file (the head starts as the embedding); `true` on an untied file is refused
/// (its head would be dropped).
pub fn model_from_file(m: &ModelConfig) -> Result<GptConfig> {
    let path = Path::new(&m.init_from);
    let hf = HfCheckpoint::open(path)?.config(m.n_heads)?;
    let mut model = hf.shape();
    let file = || {
        if path.is_dir() {
            path.join("config.json").display().to_string()
        } else {
            path.display().to_string()
        }
    };
    for (key, given, field, value) in [
        ("d_model", m.d_model, "n_embd", model.d_model),
        ("n_layers", m.n_layers, "n_layer", model.n_layers),
        ("n_heads", m.n_heads, "n_head", model.n_heads),
        ("vocab", m.vocab, "vocab_size", model.vocab),
        (
            "max_seq_len",
            m.max_seq_len,
            "n_positions",
            model.max_seq_len,
        ),
    ] {
        if let Some(v) = given.filter(|&v| v != value) {
            return Err(KilnError::config(format!(
                "key `model.{key}` = {v} disagrees with model.init_from {} ({field} = {value}); leave it out or give the file's value",
                file()
            )));
        }
    }
    if let Some(v) = m.seq_len {
        if v == 0 || v > model.max_seq_len {
            return Err(KilnError::config(format!(
                "key `model.seq_len` = {v}: must be between 1 and n_positions = {} of model.init_from {}",
                model.max_seq_len,
                file()
            )));
        }
        model.seq_len = v;
    }
    // Tying comes from the file. Untying a tied file is a choice (the head starts as the
    // embedding); tying an untied one would drop its head, which is refused.
    model.tie_embeddings = match m.tie_embeddings {
        Some(true) if !hf.tie_word_embeddings => {
            return Err(KilnError::config(format!(
                "key `model.tie_embeddings` = true: model.init_from {} has an LM head of its own (tie_word_embeddings = false); leave the key out",
                file()
            )))
        }
        Some(tie) => tie,
        None => hf.tie_word_embeddings,
    };
    model.key_bias = m.qkv_bias == QkvBias::Qkv;
    Ok(model)
}

//! Llama-family decoders from Hugging Face checkpoints (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `Phi3ForCausalLM`): RMSNorm, rotary positions (Llama 3 scaling,
//! LongRoPE, partial rotation), a SiLU-gated MLP, grouped-query attention, fused or separate
//! projections, tied or untied embeddings.
//!
//! The model is ordinary burn modules trained through the public API ([`crate::api`]), as a
//! user's model is: kiln's engine, strategies and checkpoints know nothing of it.
//! `kiln train` takes this path when `model.init_from` names a directory whose `config.json`
//! says `model_type` `llama`, `qwen2` or `phi3`.

mod config;
mod generate;
mod load;
mod model;
mod rope;

pub use config::{DecoderConfig, Family, Llama3Scaling, LongRope, RopeScaling};
pub use generate::KvCache;
pub use load::{config_path, from_hf, from_values};
pub use model::{Attention, Decoder, DecoderLayer, DecoderStack, GatedMlp};

use crate::api::{Fit, RankInfo, TrainModule, Trainer};
use crate::config::{Config, ModelConfig};
use crate::error::{KilnError, Result};
use crate::plan::Plan;
use crate::train::{RunOptions, RunOutcome, TokenBatches, ValRows};
use burn::tensor::Device;
use std::path::Path;

pub use crate::hf::DECODER_MODEL_TYPES as MODEL_TYPES;

/// Whether `[model]` asks for a Llama-family checkpoint: `model.init_from` holds a
/// `config.json` whose `model_type` is one of [`MODEL_TYPES`]. (Anything else, unreadable
/// files included, goes the GPT-2 path, whose reader reports it.)
pub fn selected(model: &ModelConfig) -> bool {
    if model.init_from.is_empty() {
        return false;
    }
    let path = config_path(Path::new(&model.init_from));
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    value["model_type"]
        .as_str()
        .is_some_and(|t| MODEL_TYPES.contains(&t))
}

/// `kiln train` of the checkpoint `model.init_from` names, on the token data `[data]` names,
/// with `[train]`'s validation: ranks as threads with `simulate`, else this process's rank.
pub fn train(config: &Config, simulate: Option<usize>, options: RunOptions) -> Result<RunOutcome> {
    check_model_keys(&config.model)?;
    let trainer = Trainer::new(config.clone()).with_options(options);
    let trainer = match simulate {
        Some(n) => trainer.simulate(n),
        None => trainer,
    };
    trainer.fit(|rank| fit(config, rank))
}

/// One rank's model and data.
fn fit(config: &Config, rank: RankInfo) -> Result<Fit<Decoder>> {
    let model = from_hf(Path::new(&config.model.init_from), &Device::flex())?;
    let cfg = model.config();
    let seq_len = seq_len(&config.model, cfg)?;
    if let Some(window) = cfg.sliding_window.filter(|&w| w < seq_len) {
        return Err(KilnError::config(format!(
            "key `model.seq_len` = {seq_len}: longer than the sliding_window ({window}) of \
             model.init_from {}; kiln's attention is full causal, so train at most {window} tokens",
            config.model.init_from
        )));
    }
    if let Some(tie) = config
        .model
        .tie_embeddings
        .filter(|&t| t != cfg.tie_word_embeddings)
    {
        return Err(KilnError::config(format!(
            "key `model.tie_embeddings` = {tie}: model.init_from {} has tie_word_embeddings = {}; \
             leave the key out",
            config.model.init_from, cfg.tie_word_embeddings
        )));
    }
    check_markov(config, cfg.vocab)?;
    let names: Vec<String> = model.units().iter().map(|u| u.name().to_string()).collect();
    let plan = Plan::resolve_training(config, rank.world, &names)?;
    let train = TokenBatches::open(&config.data, cfg.vocab, seq_len, plan.global_batch)?;
    let eval = ValRows::open(config, plan.global_batch, cfg.vocab, seq_len)?;
    let fit = Fit::new(model, train);
    Ok(match eval {
        Some(rows) => fit.with_eval(rows),
        None => fit,
    })
}

/// The shape comes from `config.json`: `[model]`'s GPT shape keys are refused rather than
/// silently ignored; `model.seq_len` (the training length) defaults to
/// `max_position_embeddings`, at most 2048.
fn check_model_keys(m: &ModelConfig) -> Result<()> {
    for (key, given) in [
        ("d_model", m.d_model),
        ("n_layers", m.n_layers),
        ("n_heads", m.n_heads),
        ("vocab", m.vocab),
        ("max_seq_len", m.max_seq_len),
    ] {
        if let Some(v) = given {
            return Err(KilnError::config(format!(
                "key `model.{key}` = {v}: the shape of model.init_from {} comes from its \
                 config.json; leave it out",
                m.init_from
            )));
        }
    }
    Ok(())
}

fn seq_len(m: &ModelConfig, cfg: &DecoderConfig) -> Result<usize> {
    let max = cfg.max_position_embeddings;
    match m.seq_len {
        Some(t) if t == 0 || t > max => Err(KilnError::config(format!(
            "key `model.seq_len` = {t}: must be between 1 and max_position_embeddings = {max} \
             of model.init_from {}",
            m.init_from
        ))),
        Some(t) => Ok(t),
        None => Ok(max.min(2048)),
    }
}

/// The markov source draws symbols below `data.markov_symbols`, which must be token ids.
fn check_markov(config: &Config, vocab: usize) -> Result<()> {
    let d = &config.data;
    if d.source == "markov" && (d.markov_symbols < 2 || d.markov_symbols > vocab) {
        return Err(KilnError::config(format!(
            "key `data.markov_symbols`: {} must be between 2 and the model's vocab ({vocab})",
            d.markov_symbols
        )));
    }
    Ok(())
}

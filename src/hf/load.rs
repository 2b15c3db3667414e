//! Reading a Hugging Face GPT-2 checkpoint (`model.init_from`): a `save_pretrained` directory
//! (`config.json` + `model.safetensors`, or shards listed by `model.safetensors.index.json`) or
//! a bare `.safetensors` file (its `config.json` beside it when there is one). Only headers are
//! read up front; a unit's tensors are then read with `pread` of their byte ranges
//! ([`TensorFileReader`]), so a rank reads what it initialises, one unit at a time, and never
//! the whole file.

use super::config::HfConfig;
use super::names::{hf_name, Transform};
use super::weights::HfWeights;
use crate::error::{KilnError, Result};
use crate::flat::UnitLayout;
use crate::model::ParamSpec;
use std::path::Path;

/// An opened Hugging Face GPT-2 checkpoint.
pub struct HfCheckpoint {
    /// `config.json`, when there is one.
    config: Option<HfConfig>,
    weights: HfWeights,
}

impl HfCheckpoint {
    /// Opens `path` and reads its headers (and `config.json`).
    pub fn open(path: &Path) -> Result<HfCheckpoint> {
        let config_path = match path.is_dir() {
            true => path.join("config.json"),
            false => path.with_file_name("config.json"),
        };
        let weights = HfWeights::open(path)?;
        let config = if path.is_dir() || config_path.is_file() {
            Some(HfConfig::read(&config_path)?)
        } else {
            None
        };
        Ok(HfCheckpoint { config, weights })
    }

    /// The checkpoint's `config.json`, or, for a bare `.safetensors` file without one, the
    /// shape its tensors imply with `n_heads` heads (the one thing tensors do not tell).
    pub fn config(&self, n_heads: Option<usize>) -> Result<HfConfig> {
        if let Some(c) = &self.config {
            return Ok(c.clone());
        }
        let shape = |name: &str| {
            self.shape(name).ok_or_else(|| {
                KilnError::file(self.path(), format!("has no tensor `{name}` (and no config.json beside it to say the model's shape)"))
            })
        };
        let wte = shape("transformer.wte.weight")?;
        let wpe = shape("transformer.wpe.weight")?;
        let n_layer = (0..)
            .take_while(|l| {
                self.shape(&format!("transformer.h.{l}.ln_1.weight"))
                    .is_some()
            })
            .count();
        let n_head = n_heads.ok_or_else(|| {
            KilnError::config(format!(
                "key `model.n_heads`: needed to load {}, a bare .safetensors file without a config.json beside it",
                self.path().display()
            ))
        })?;
        let config = HfConfig {
            model_type: None,
            vocab_size: wte[0],
            n_positions: wpe[0],
            n_embd: wte[1],
            n_layer,
            n_head,
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: self.shape("lm_head.weight").is_none(),
            add_cross_attention: false,
        };
        Ok(config)
    }

    /// The path the user gave.
    pub fn path(&self) -> &Path {
        self.weights.path()
    }

    /// The shape of tensor `name`, accepting files saved from a bare `GPT2Model` (no
    /// `transformer.` prefix).
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.weights.shape(&aliases(name))
    }

    /// Unit `layout`'s flat buffer (padded, padding zero) from the checkpoint.
    pub fn unit(&self, specs: &[ParamSpec], layout: &UnitLayout) -> Result<Vec<f32>> {
        let mut buf = vec![0.0f32; layout.padded_len];
        for (spec, entry) in specs.iter().zip(&layout.params) {
            let (mut name, transform) = hf_name(&spec.path).ok_or_else(|| {
                KilnError::file(
                    self.path(),
                    format!("kiln's `{}` has no GPT-2 counterpart", spec.path),
                )
            })?;
            // An untied kiln head loaded from a tied checkpoint starts as the embedding.
            if transform == Transform::Transpose && self.shape(&name).is_none() {
                name = "transformer.wte.weight".into();
            }
            let for_what = format!("kiln's `{}`", spec.path);
            let hf =
                self.weights
                    .read(&aliases(&name), &transform.hf_shape(&spec.shape), &for_what)?;
            transform.to_kiln(&spec.shape, &hf, &mut buf[entry.range()]);
        }
        Ok(buf)
    }
}

/// `name` and its spelling in a file saved from a bare `GPT2Model`.
fn aliases(name: &str) -> [&str; 2] {
    [name, name.strip_prefix("transformer.").unwrap_or(name)]
}

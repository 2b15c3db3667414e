//! A Hugging Face GPT-2 `config.json`: read (the model's shape for `model.init_from`), checked
//! for what kiln's GPT does not implement, and written (`kiln export --format hf`).

use crate::error::{KilnError, Result};
use crate::model::GptConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

/// The fields of transformers' `GPT2Config` that decide the function the model computes.
/// Dropout rates and generation settings are not among them: kiln trains without dropout and
/// the loss of a model in `eval()` mode does not depend on them.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `gpt2` (anything else is another architecture).
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of learned positions (the longest sequence).
    pub n_positions: usize,
    /// Width.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width; `null` means 4 × n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// GELU variant.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Scores scaled by 1/sqrt(head_dim).
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Scores further scaled by 1/(layer + 1) (a Mistral-era variant).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Upcast and reorder the score computation (mixed-precision only).
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// LM head = wte transposed.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Cross-attention blocks (encoder-decoder use).
    #[serde(default)]
    pub add_cross_attention: bool,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// kiln's LayerNorm epsilon (src/model/gpt.rs), which a checkpoint must share.
const KILN_LN_EPS: f64 = 1e-5;

impl HfConfig {
    /// Reads and checks `path` (a `config.json`); every error names the file and the field.
    pub fn read(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KilnError::file(path, format!("cannot read the model config: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::file(path, format!("is not JSON: {e}")))?;
        // Another architecture's file says so before its fields are read as GPT-2's.
        if let Some(t) = value["model_type"].as_str().filter(|&t| t != "gpt2") {
            let msg = match super::DECODER_MODEL_TYPES.contains(&t) {
                // Reached by the commands that know only the built-in GPT (`kiln estimate`,
                // `kiln dump-data`, `bench`); `kiln train`, `export` and `sample` take decoders.
                true => format!(
                    "field `model_type`: \"{t}\": this command reads GPT-2 checkpoints only; \
                     kiln train, kiln export and kiln sample take {t} models"
                ),
                false => format!(
                    "field `model_type`: \"{t}\" is not one kiln trains (gpt2, {})",
                    super::DECODER_MODEL_TYPES.join(", ")
                ),
            };
            return Err(KilnError::file(path, msg));
        }
        let cfg: HfConfig = serde_path_to_error::deserialize(&value).map_err(|e| {
            KilnError::file(
                path,
                format!(
                    "field `{}`: {} (expected a GPT-2 config.json)",
                    e.path(),
                    e.inner()
                ),
            )
        })?;
        cfg.check().map_err(|msg| KilnError::file(path, msg))?;
        Ok(cfg)
    }

    /// What kiln's GPT cannot compute, as `field: why`.
    fn check(&self) -> std::result::Result<(), String> {
        let field = |name: &str, value: &dyn std::fmt::Display, expected: &str| {
            Err(format!(
                "`{name}` = {value} is not supported: kiln's GPT implements {expected}"
            ))
        };
        if let Some(t) = &self.model_type {
            if t != "gpt2" {
                return field("model_type", &format!("\"{t}\""), "\"gpt2\" only");
            }
        }
        // gelu_pytorch_tanh is the same function as gelu_new (transformers' faster kernel).
        if !["gelu_new", "gelu_pytorch_tanh"].contains(&self.activation_function.as_str()) {
            return field(
                "activation_function",
                &format!("\"{}\"", self.activation_function),
                "GELU's tanh approximation (\"gelu_new\")",
            );
        }
        if (self.layer_norm_epsilon - KILN_LN_EPS).abs() > 1e-12 {
            return field("layer_norm_epsilon", &self.layer_norm_epsilon, "1e-5");
        }
        if let Some(inner) = self.n_inner {
            if inner != 4 * self.n_embd {
                return field("n_inner", &inner, "an MLP of 4 × n_embd (null)");
            }
        }
        if !self.scale_attn_weights {
            return field(
                "scale_attn_weights",
                &false,
                "scores scaled by 1/sqrt(head_dim)",
            );
        }
        if self.scale_attn_by_inverse_layer_idx {
            return field(
                "scale_attn_by_inverse_layer_idx",
                &true,
                "scores scaled by 1/sqrt(head_dim) alone",
            );
        }
        if self.add_cross_attention {
            return field(
                "add_cross_attention",
                &true,
                "a decoder without cross-attention",
            );
        }
        // reorder_and_upcast_attn only changes the precision of the scores in f16/bf16; in f32
        // it computes the same function, so it is accepted.
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if v == 0 {
                return Err(format!("`{name}` = 0: expected at least 1"));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(format!(
                "`n_head` = {} does not divide `n_embd` = {}",
                self.n_head, self.n_embd
            ));
        }
        Ok(())
    }

    /// The model shape, trained at `n_positions` (callers may shorten `seq_len`). The key bias
    /// and the tying are the caller's: kiln's `model.qkv_bias` and `model.tie_embeddings`.
    pub fn shape(&self) -> GptConfig {
        GptConfig {
            vocab: self.vocab_size,
            d_model: self.n_embd,
            n_layers: self.n_layer,
            n_heads: self.n_head,
            max_seq_len: self.n_positions,
            seq_len: self.n_positions,
            key_bias: true,
            tie_embeddings: self.tie_word_embeddings,
        }
    }
}

/// The `config.json` transformers needs to build `model` as a `GPT2LMHeadModel`. Dropouts are
/// zero: kiln trained without them, so this is the model it trained.
pub fn config_json(model: &GptConfig) -> Value {
    // GPT-2's <|endoftext|>, when the vocabulary has it (transformers warns about an id
    // outside the vocabulary).
    let eot = crate::tokenizer::GPT2_EOT;
    let eot = (model.vocab > eot as usize).then_some(eot);
    json!({
        "bos_token_id": eot,
        "eos_token_id": eot,
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab,
        "n_positions": model.max_seq_len,
        "n_ctx": model.max_seq_len,
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": KILN_LN_EPS,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": model.tie_embeddings,
        "add_cross_attention": false,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    })
}

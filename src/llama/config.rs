//! A Llama-family `config.json` (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `Phi3ForCausalLM`):
//! read, checked field
//! by field, and kept as written. Every field either decides the function kiln computes (and is
//! implemented), or provably does not (ids, generation and bookkeeping settings); anything else
//! is refused with one line naming it — a config kiln half-understands would train a different
//! model than the one the user downloaded, silently.
//!
//! Both spellings of the rotary settings are read: transformers ≥ 5 writes `rope_parameters`
//! (`rope_type`, `rope_theta`, the scaling keys); older files on the Hub have `rope_theta` and
//! `rope_scaling` (`type` or `rope_type`).

use crate::error::{KilnError, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Which Hugging Face architecture: they differ in their biases and their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2 and 3, TinyLlama, SmolLM, Mistral-style dense models).
    Llama,
    /// `Qwen2ForCausalLM`: biases on the query, key and value projections.
    Qwen2,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5-mini, Phi-4-mini): fused `qkv_proj` and
    /// `gate_up_proj`, partial rotary, LongRoPE.
    Phi3,
}

impl Family {
    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Phi3 => "phi3",
        }
    }

    /// transformers' class name, for `architectures`.
    pub fn class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// Llama 3's frequency-dependent rotary scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    /// Long wavelengths are divided by this.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: f64,
}

/// Phi-3's LongRoPE (`rope_type = "longrope"`): per-frequency divisors, the short ones for
/// sequences up to the original context, the long ones beyond; cos and sin scaled by
/// `attention_factor`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LongRope {
    /// Divisors of the inverse frequencies up to `original_max_position_embeddings`.
    pub short_factor: Vec<f64>,
    /// Divisors beyond it.
    pub long_factor: Vec<f64>,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
    /// The scale of cos and sin.
    pub attention_factor: f64,
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// `θ^(-2i/d)` as is.
    None,
    /// Llama 3's bands.
    Llama3(Llama3Scaling),
    /// Phi-3's LongRoPE.
    LongRope(LongRope),
}

/// The shape and function of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecoderConfig {
    /// Which architecture.
    pub family: Family,
    /// Vocabulary size.
    pub vocab: usize,
    /// Width.
    pub hidden: usize,
    /// The gated MLP's width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads`: grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm's epsilon.
    pub rms_norm_eps: f64,
    /// The rotary base.
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled.
    pub rope_scaling: RopeScaling,
    /// Leading dimensions of each head that rotate (`head_dim × partial_rotary_factor`); the
    /// rest pass through.
    pub rotary_dim: usize,
    /// One `qkv_proj` and one `gate_up_proj` matrix (Phi-3) instead of three and two.
    pub fused_projections: bool,
    /// Biases on the query, key and value projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases in the gated MLP.
    pub mlp_bias: bool,
    /// The LM head is the token embedding (no `lm_head.weight` of its own).
    pub tie_word_embeddings: bool,
    /// The longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Phi-3's sliding attention window: a training length beyond it is refused
    /// (`crate::llama`), below it the window changes nothing.
    pub sliding_window: Option<usize>,
}

/// Fields any transformers config may carry that do not change what a causal LM computes:
/// ids, labels for classification heads, generation and serialisation settings.
const BOOKKEEPING: &[&str] = &[
    "_name_or_path",
    "architectures",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "eos_token_id",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "initializer_range",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
    "use_cache",
];

/// The model-specific fields kiln reads (below), per family.
const LLAMA_FIELDS: &[&str] = &[
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "pretraining_tp",
    "tie_word_embeddings",
    // Checked below: only their "off" values are accepted.
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
];
const PHI3_FIELDS: &[&str] = &[
    "resid_pdrop",
    "embd_pdrop",
    "original_max_position_embeddings",
    "partial_rotary_factor",
    // Checked against the training length in `crate::llama`.
    "sliding_window",
];
const QWEN2_FIELDS: &[&str] = &[
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
];

impl DecoderConfig {
    /// Reads and checks `path` (a `config.json`); every error names the file and the field.
    pub fn read(path: &Path) -> Result<(DecoderConfig, Value)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KilnError::file(path, format!("cannot read the model config: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::file(path, format!("is not JSON: {e}")))?;
        let cfg = Self::from_json(&value).map_err(|msg| KilnError::file(path, msg))?;
        Ok((cfg, value))
    }

    /// Checks a parsed `config.json`; the error is the message without the file name.
    pub fn from_json(value: &Value) -> std::result::Result<DecoderConfig, String> {
        let map = value
            .as_object()
            .ok_or("is not a JSON object (expected a transformers config.json)")?;
        let family = match map.get("model_type").and_then(Value::as_str) {
            Some("llama") => Family::Llama,
            Some("qwen2") => Family::Qwen2,
            Some("phi3") => Family::Phi3,
            Some(other) => {
                return Err(format!(
                "field `model_type`: \"{other}\" is not one kiln trains (gpt2, llama, qwen2, phi3)"
            ))
            }
            None => return Err("has no `model_type` (expected gpt2, llama, qwen2 or phi3)".into()),
        };
        let fields = Fields { map };
        for key in map.keys() {
            let known = BOOKKEEPING.contains(&key.as_str())
                || LLAMA_FIELDS.contains(&key.as_str())
                || (family == Family::Qwen2 && QWEN2_FIELDS.contains(&key.as_str()))
                || (family == Family::Phi3 && PHI3_FIELDS.contains(&key.as_str()));
            if !known {
                return Err(format!(
                    "field `{key}` is not one kiln implements for model_type \"{}\"; \
                     remove it if it does not change the model's function",
                    family.model_type()
                ));
            }
        }
        fields.expect_off("is_encoder_decoder", "a decoder-only model")?;
        fields.expect_off("add_cross_attention", "no cross-attention")?;
        let act = fields.string("hidden_act", "silu")?;
        if act != "silu" {
            return Err(format!(
                "field `hidden_act`: \"{act}\" is not implemented (the gated MLP uses \"silu\")"
            ));
        }
        for key in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
            let dropout = fields.number(key, 0.0)?;
            if dropout != 0.0 {
                return Err(format!(
                    "field `{key}`: {dropout}; kiln trains without dropout (every rank must \
                     compute the same function), set it to 0.0"
                ));
            }
        }
        if family == Family::Qwen2 {
            check_qwen2_attention(&fields)?;
        }
        let hidden = fields.count("hidden_size")?;
        let heads = fields.count("num_attention_heads")?;
        let kv_heads = fields.count_or("num_key_value_heads", heads)?;
        if heads % kv_heads != 0 {
            return Err(format!(
                "field `num_key_value_heads`: {kv_heads} does not divide num_attention_heads = {heads}"
            ));
        }
        let head_dim = match map.get("head_dim") {
            None | Some(Value::Null) if hidden % heads != 0 => {
                return Err(format!(
                    "field `hidden_size`: {hidden} is not a multiple of num_attention_heads = {heads} (and no head_dim)"
                ))
            }
            None | Some(Value::Null) => hidden / heads,
            Some(_) => fields.count("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "field `head_dim`: {head_dim} must be even (rotary embeddings rotate pairs)"
            ));
        }
        let max_position_embeddings = fields.count_or("max_position_embeddings", 2048)?;
        let rope = rope(&fields, family, head_dim, max_position_embeddings)?;
        let attention_bias = fields.flag("attention_bias", false)?;
        Ok(DecoderConfig {
            family,
            vocab: fields.count("vocab_size")?,
            hidden,
            intermediate: fields.count("intermediate_size")?,
            layers: fields.count("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps: fields.number("rms_norm_eps", 1e-6)?,
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            rotary_dim: rope.rotary_dim,
            fused_projections: family == Family::Phi3,
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family == Family::Llama && attention_bias,
            mlp_bias: family == Family::Llama && fields.flag("mlp_bias", false)?,
            tie_word_embeddings: fields.flag("tie_word_embeddings", false)?,
            max_position_embeddings,
            sliding_window: match family {
                Family::Phi3 => fields
                    .get("sliding_window")
                    .map(|_| fields.count("sliding_window"))
                    .transpose()?,
                _ => None,
            },
        })
    }

    /// Number of parameters (the tied head counted once).
    pub fn num_params(&self) -> usize {
        let (d, f, hd) = (self.hidden, self.intermediate, self.head_dim);
        let q = self.heads * hd;
        let kv = self.kv_heads * hd;
        let bias = |on: bool, n: usize| if on { n } else { 0 };
        let attn =
            d * q + 2 * d * kv + q * d + bias(self.qkv_bias, q + 2 * kv) + bias(self.o_bias, d);
        let mlp = 3 * d * f + bias(self.mlp_bias, 2 * f + d);
        // (Phi-3's fused matrices hold the same numbers.)
        let layer = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            d * self.vocab
        };
        self.vocab * d + self.layers * layer + d + head
    }
}

/// Qwen2's sliding-window attention is off in every released dense model; kiln implements
/// full causal attention only.
fn check_qwen2_attention(fields: &Fields) -> std::result::Result<(), String> {
    if fields.flag("use_sliding_window", false)? {
        return Err(
            "field `use_sliding_window`: true is not implemented (kiln's attention is full causal)"
                .into(),
        );
    }
    if let Some(types) = fields.map.get("layer_types").and_then(Value::as_array) {
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            return Err(format!(
                "field `layer_types`: {t} is not implemented (only \"full_attention\")"
            ));
        }
    }
    Ok(())
}

/// The rotary settings: base, scaling and how many dimensions rotate.
struct Rope {
    theta: f64,
    scaling: RopeScaling,
    rotary_dim: usize,
}

/// The rotary settings from either spelling (`rope_parameters`, or `rope_theta` +
/// `rope_scaling`), checked key by key for the scaling type.
fn rope(
    fields: &Fields,
    family: Family,
    head_dim: usize,
    max_positions: usize,
) -> std::result::Result<Rope, String> {
    let (key, params) = match fields.map.get("rope_parameters") {
        Some(Value::Object(p)) => ("rope_parameters", Some(p)),
        Some(Value::Null) | None => match fields.map.get("rope_scaling") {
            Some(Value::Object(p)) => ("rope_scaling", Some(p)),
            Some(Value::Null) | None => ("rope_scaling", None),
            Some(_) => return Err("field `rope_scaling`: expected an object or null".into()),
        },
        Some(_) => return Err("field `rope_parameters`: expected an object".into()),
    };
    let in_params = |name: &str| params.and_then(|p| p.get(name)).filter(|v| !v.is_null());
    let number = |name: &str, default: f64| match in_params(name) {
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("field `{key}.{name}`: expected a positive number")),
        None => fields.number(name, default),
    };
    let theta = number("rope_theta", 10000.0)?;
    if theta <= 1.0 {
        return Err(format!(
            "field `rope_theta`: {theta} must be a number above 1"
        ));
    }
    let partial = number("partial_rotary_factor", 1.0)?;
    if family != Family::Phi3 && partial != 1.0 {
        return Err(format!(
            "field `partial_rotary_factor`: {partial} is not implemented for model_type \"{}\"",
            family.model_type()
        ));
    }
    // transformers: `int(head_dim * partial_rotary_factor)`.
    let rotary_dim = (head_dim as f64 * partial) as usize;
    if rotary_dim == 0 || rotary_dim % 2 != 0 || partial > 1.0 {
        return Err(format!(
            "field `partial_rotary_factor`: {partial} × head_dim {head_dim} must give an even \
             number of rotated dimensions, at most head_dim"
        ));
    }
    let kind = in_params("rope_type")
        .or_else(|| in_params("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    let extra: &[&str] = match kind {
        "default" => &[],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "longrope" => &[
            "factor",
            "attention_factor",
            "short_factor",
            "long_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return Err(format!(
            "field `{key}.rope_type`: \"{other}\" is not implemented (default, llama3, longrope)"
        ))
        }
    };
    if let Some(p) = params {
        if let Some(k) = p
            .keys()
            .find(|k| !common.contains(&k.as_str()) && !extra.contains(&k.as_str()))
        {
            return Err(format!(
                "field `{key}.{k}` is not implemented for rope_type \"{kind}\""
            ));
        }
    }
    let required = |name: &str| {
        in_params(name)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("field `{key}.{name}`: expected a positive number"))
    };
    let scaling = match kind {
        "llama3" => {
            let s = Llama3Scaling {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?,
            };
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(format!(
                    "field `{key}.high_freq_factor`: must exceed low_freq_factor"
                ));
            }
            RopeScaling::Llama3(s)
        }
        "longrope" => {
            RopeScaling::LongRope(long_rope(fields, key, params, rotary_dim, max_positions)?)
        }
        _ => RopeScaling::None,
    };
    Ok(Rope {
        theta,
        scaling,
        rotary_dim,
    })
}

/// transformers' `_compute_longrope_parameters`: the original context from the rotary
/// settings or the top level; `factor` defaults to max / original positions, and the
/// attention factor to `sqrt(1 + ln(factor) / ln(original))` (1 when factor ≤ 1).
fn long_rope(
    fields: &Fields,
    key: &str,
    params: Option<&Map<String, Value>>,
    rotary_dim: usize,
    max_positions: usize,
) -> std::result::Result<LongRope, String> {
    let get = |name: &str| params.and_then(|p| p.get(name)).filter(|v| !v.is_null());
    let factors = |name: &str| -> std::result::Result<Vec<f64>, String> {
        let list: Vec<f64> = get(name)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect())
            .ok_or_else(|| format!("field `{key}.{name}`: expected a list of numbers"))?;
        if list.len() != rotary_dim / 2 || list.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(format!(
                "field `{key}.{name}`: expected {} positive numbers (one per rotated pair), found {}",
                rotary_dim / 2,
                list.len()
            ));
        }
        Ok(list)
    };
    let original = match get("original_max_position_embeddings") {
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                format!(
                    "field `{key}.original_max_position_embeddings`: expected a positive integer"
                )
            })?,
        None => fields.count("original_max_position_embeddings")?,
    };
    let factor = match get("factor") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("field `{key}.factor`: expected a number"))?,
        None => max_positions as f64 / original as f64,
    };
    let attention_factor = match get("attention_factor") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("field `{key}.attention_factor`: expected a number"))?,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// Typed reads of a config's fields; messages name the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn count(&self, key: &str) -> std::result::Result<usize, String> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| format!("field `{key}`: {v} is not a positive integer")),
            None => Err(format!("has no `{key}`")),
        }
    }

    fn count_or(&self, key: &str, default: usize) -> std::result::Result<usize, String> {
        match self.get(key) {
            Some(_) => self.count(key),
            None => Ok(default),
        }
    }

    fn number(&self, key: &str, default: f64) -> std::result::Result<f64, String> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("field `{key}`: {v} is not a number ≥ 0")),
            None => Ok(default),
        }
    }

    fn flag(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        match self.get(key) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("field `{key}`: {v} is not true or false")),
            None => Ok(default),
        }
    }

    fn string(&self, key: &str, default: &str) -> std::result::Result<String, String> {
        match self.get(key) {
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("field `{key}`: {v} is not a string")),
            None => Ok(default.to_string()),
        }
    }

    fn expect_off(&self, key: &str, why: &str) -> std::result::Result<(), String> {
        if self.flag(key, false)? {
            return Err(format!("field `{key}`: true is not implemented ({why})"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                   "rope_theta": 500000.0},
               "transformers_version": "5.25.0", "use_cache": true})
    }

    #[test]
    fn reads_both_rope_spellings() {
        let new = DecoderConfig::from_json(&llama()).unwrap();
        let mut old = llama();
        let params = old["rope_parameters"].take();
        old.as_object_mut().unwrap().remove("rope_parameters");
        old["rope_theta"] = params["rope_theta"].clone();
        old["rope_scaling"] = params;
        old["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("rope_theta");
        assert_eq!(DecoderConfig::from_json(&old).unwrap(), new);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(new.head_dim, 16);
        assert!(matches!(new.rope_scaling, RopeScaling::Llama3(s) if s.factor == 8.0));
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        for (key, value, says) in [
            ("model_type", json!("mixtral"), "model_type"),
            ("sliding_window_size", json!(4), "sliding_window_size"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("attention_dropout", json!(0.1), "attention_dropout"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            (
                "rope_parameters",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
        ] {
            let mut cfg = llama();
            cfg[key] = value;
            let err = DecoderConfig::from_json(&cfg).unwrap_err();
            assert!(err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn counts_parameters_like_transformers() {
        // LlamaForCausalLM(vocab 300, d 64, ffn 96, 2 layers, 4 heads, 2 kv heads), untied:
        // 300·64 (embed) + 2·(64·64 + 2·64·32 + 64·64 + 3·64·96 + 2·64) + 64 + 64·300.
        let cfg = DecoderConfig::from_json(&llama()).unwrap();
        assert_eq!(
            cfg.num_params(),
            19200 + 2 * (4096 + 4096 + 4096 + 18432 + 128) + 64 + 19200
        );
    }
}

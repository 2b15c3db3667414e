//! The sections of fine-tuning on a budget: `[lora]` (LoRA and QLoRA adapters, as Hugging Face
//! PEFT configures them) and `[fp16]` (the loss scaling of `train.precision = "fp16"`, as
//! DeepSpeed configures it). Read by `api::lora` and `optim::LossScaler`.

use serde::{Deserialize, Serialize};

/// `[lora]`: low-rank adapters (Hu et al., 2021) on a frozen base, as Hugging Face PEFT's
/// `LoraConfig`: each targeted linear weight `W` computes with `W + (alpha / r) · A·B`, and only
/// `A` and `B` train. Off unless `r` or `init_from` is set. Models trained through the library
/// API (Llama-family checkpoints, your own burn model).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the adapters (PEFT's `r`); setting it turns LoRA on.
    pub r: Option<usize>,
    /// Scale numerator (PEFT's `lora_alpha`, default 8): the update is scaled by `alpha / r`.
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`). Only 0: kiln adds the update
    /// into the weight (burn's reparameterisation), where input dropout has no place.
    pub dropout: f64,
    /// Linear modules to adapt, PEFT's `target_modules`: a name matches a module whose path is
    /// it or ends with `.name` (`["q_proj", "v_proj"]`); `["all-linear"]` adapts every linear
    /// module except `lm_head`.
    pub targets: Vec<String>,
    /// A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to start
    /// from; `r`, `alpha` and `targets` then come from its config.
    pub init_from: String,
    /// `"nf4"`: QLoRA — the frozen base's linear weights (all but `lm_head`, as bitsandbytes'
    /// `load_in_4bit`) stored in 4-bit NF4 blocks of 64 and dequantized per unit for compute;
    /// `"none"` keeps them in f32.
    pub quantize: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: None,
            alpha: None,
            dropout: 0.0,
            targets: Vec::new(),
            init_from: String::new(),
            quantize: "none".into(),
        }
    }
}

impl LoraConfig {
    /// Whether LoRA is on.
    pub fn enabled(&self) -> bool {
        self.r.is_some() || !self.init_from.is_empty()
    }
}

/// `[fp16]`: loss scaling for `train.precision = "fp16"`, DeepSpeed's `fp16` keys and
/// semantics (`DynamicLossScaler`). The loss is multiplied by the scale before the backward so
/// that small gradients survive fp16; the f32 gradients are divided by it before clipping and
/// AdamW. A step whose gradients overflow (inf or NaN on any rank) is skipped by every rank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Fp16Config {
    /// A fixed scale; 0 scales dynamically.
    pub loss_scale: f64,
    /// Dynamic: the first scale is `2^initial_scale_power`.
    pub initial_scale_power: u32,
    /// Dynamic: after this many steps without overflow the scale doubles.
    pub loss_scale_window: u64,
    /// Dynamic: overflows in a row before the scale halves.
    pub hysteresis: u32,
    /// Dynamic: refill the hysteresis after every step without overflow (not only after a
    /// window).
    pub consecutive_hysteresis: bool,
    /// Dynamic: the scale never goes below this.
    pub min_loss_scale: f64,
}

impl Default for Fp16Config {
    fn default() -> Self {
        Fp16Config {
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        }
    }
}

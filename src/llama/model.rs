//! The Llama-family decoder as ordinary burn modules, trained through kiln's public API
//! ([`crate::api::TrainModule`]) like any user's model. Field names mirror transformers'
//! module tree (`model.layers.0.self_attn.q_proj`), so a parameter's kiln path is its Hugging
//! Face name up to burn's spelling (`gamma` for RMSNorm's `weight`, linear weights stored
//! `[d_in, d_out]`: see `super::names`).

use super::config::DecoderConfig;
use super::rope;
use crate::api::{TrainModule, Unit};
use crate::model::fused::causal_attention;
use crate::model::MicroBatch;
use burn::module::Module;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::{DType, Device, FloatDType, Tensor};
use std::sync::Arc;

/// `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Phi3ForCausalLM`: the decoder and, when untied,
/// its LM head.
#[derive(Module, Debug)]
pub struct Decoder {
    /// The decoder stack (transformers' `model`).
    pub model: DecoderStack,
    /// The LM head, `[hidden, vocab]`; `None` when tied to the token embedding.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    cfg: Arc<DecoderConfig>,
    /// The `config.json` the model was read from, as written: its description in checkpoints
    /// and the config an export writes back.
    #[module(skip)]
    hf_config: Arc<serde_json::Value>,
}

/// Embedding, layers and final norm.
#[derive(Module, Debug)]
pub struct DecoderStack {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// The final RMSNorm.
    pub norm: RmsNorm,
}

/// One pre-norm decoder layer: attention and a gated MLP, each with a residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// Grouped-query self-attention.
    pub self_attn: Attention,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// `down(silu(gate(x)) · up(x))`.
    pub mlp: GatedMlp,
}

/// Causal self-attention with rotary positions and `kv_heads` key/value heads shared by
/// groups of query heads. The projections are three matrices, or one fused `qkv_proj`
/// (Phi-3), as the checkpoint has them.
#[derive(Module, Debug)]
pub struct Attention {
    /// `[hidden, heads · head_dim]`.
    pub q_proj: Option<Linear>,
    /// `[hidden, kv_heads · head_dim]`.
    pub k_proj: Option<Linear>,
    /// `[hidden, kv_heads · head_dim]`.
    pub v_proj: Option<Linear>,
    /// `[hidden, (heads + 2 · kv_heads) · head_dim]`: queries, keys, values side by side.
    pub qkv_proj: Option<Linear>,
    /// `[heads · head_dim, hidden]`.
    pub o_proj: Linear,
}

/// The SiLU-gated MLP, `down(silu(gate(x)) · up(x))`; gate and up are two matrices, or one
/// fused `gate_up_proj` (Phi-3, gate first).
#[derive(Module, Debug)]
pub struct GatedMlp {
    /// `[hidden, intermediate]`.
    pub gate_proj: Option<Linear>,
    /// `[hidden, intermediate]`.
    pub up_proj: Option<Linear>,
    /// `[hidden, 2 · intermediate]`.
    pub gate_up_proj: Option<Linear>,
    /// `[intermediate, hidden]`.
    pub down_proj: Linear,
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    // Zeros: the values come from the checkpoint (or the caller's initialiser), and a
    // billion-parameter model should not draw random numbers first.
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

fn rms_norm(cfg: &DecoderConfig, device: &Device) -> RmsNorm {
    RmsNormConfig::new(cfg.hidden)
        .with_epsilon(cfg.rms_norm_eps)
        .init(device)
}

impl Decoder {
    /// A decoder of `cfg`'s shape (read from `hf_config`) with zero matrices and unit norm
    /// gains, to be filled from a checkpoint (`super::load`).
    pub fn empty(cfg: DecoderConfig, hf_config: serde_json::Value, device: &Device) -> Decoder {
        let (d, hd, f) = (cfg.hidden, cfg.head_dim, cfg.intermediate);
        let (fused, split) = (cfg.fused_projections, !cfg.fused_projections);
        let proj = |on: bool, d_out: usize, bias: bool| on.then(|| linear(d, d_out, bias, device));
        let layer = || DecoderLayer {
            input_layernorm: rms_norm(&cfg, device),
            self_attn: Attention {
                q_proj: proj(split, cfg.heads * hd, cfg.qkv_bias),
                k_proj: proj(split, cfg.kv_heads * hd, cfg.qkv_bias),
                v_proj: proj(split, cfg.kv_heads * hd, cfg.qkv_bias),
                qkv_proj: proj(fused, (cfg.heads + 2 * cfg.kv_heads) * hd, cfg.qkv_bias),
                o_proj: linear(cfg.heads * hd, d, cfg.o_bias, device),
            },
            post_attention_layernorm: rms_norm(&cfg, device),
            mlp: GatedMlp {
                gate_proj: proj(split, f, cfg.mlp_bias),
                up_proj: proj(split, f, cfg.mlp_bias),
                gate_up_proj: proj(fused, 2 * f, cfg.mlp_bias),
                down_proj: linear(f, d, cfg.mlp_bias, device),
            },
        };
        let model = DecoderStack {
            embed_tokens: EmbeddingConfig::new(cfg.vocab, d)
                .with_initializer(Initializer::Zeros)
                .init(device),
            layers: (0..cfg.layers).map(|_| layer()).collect(),
            norm: rms_norm(&cfg, device),
        };
        let lm_head = (!cfg.tie_word_embeddings).then(|| linear(d, cfg.vocab, false, device));
        Decoder {
            model,
            lm_head,
            cfg: Arc::new(cfg),
            hf_config: Arc::new(hf_config),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The logits `[batch · seq, vocab]` of the final hidden states `x` (`[batch, seq, hidden]`):
    /// the final norm, then the LM head (the embedding, transposed, when tied).
    pub fn logits(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, t, d] = x.dims();
        let x = rms(&self.model.norm, x).reshape([b * t, d]);
        match &self.lm_head {
            Some(head) => x.matmul(head.weight.val()),
            None => x.matmul(self.model.embed_tokens.weight.val().transpose()),
        }
    }

    fn layer_forward(&self, layer: &DecoderLayer, x: Tensor<3>) -> Tensor<3> {
        let h = rms(&layer.input_layernorm, x.clone());
        let x = x + self.attention(&layer.self_attn, h);
        let h = rms(&layer.post_attention_layernorm, x.clone());
        x + self.mlp(&layer.mlp, h)
    }

    pub(super) fn mlp(&self, mlp: &GatedMlp, h: Tensor<3>) -> Tensor<3> {
        let f = self.cfg.intermediate;
        let (gate, up) = match (&mlp.gate_up_proj, &mlp.gate_proj, &mlp.up_proj) {
            (Some(gate_up), _, _) => {
                let both = dense(h, gate_up);
                (both.clone().narrow(2, 0, f), both.narrow(2, f, f))
            }
            (None, Some(gate), Some(up)) => (dense(h.clone(), gate), dense(h, up)),
            _ => unreachable!("Decoder::empty builds gate and up, or gate_up"),
        };
        dense(silu(gate) * up, &mlp.down_proj)
    }

    /// Queries, keys and values `[batch, t, n · head_dim]` from one fused matrix or three.
    pub(super) fn qkv(&self, attn: &Attention, x: Tensor<3>) -> [Tensor<3>; 3] {
        let (q, kv) = (
            self.cfg.heads * self.cfg.head_dim,
            self.cfg.kv_heads * self.cfg.head_dim,
        );
        match (&attn.qkv_proj, &attn.q_proj, &attn.k_proj, &attn.v_proj) {
            (Some(fused), ..) => {
                let all = dense(x, fused);
                [
                    all.clone().narrow(2, 0, q),
                    all.clone().narrow(2, q, kv),
                    all.narrow(2, q + kv, kv),
                ]
            }
            (None, Some(wq), Some(wk), Some(wv)) => {
                [dense(x.clone(), wq), dense(x.clone(), wk), dense(x, wv)]
            }
            _ => unreachable!("Decoder::empty builds q, k and v, or qkv"),
        }
    }

    fn attention(&self, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let cfg = &self.cfg;
        let (h, kv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let (inv_freq, scale) = rope::inv_freq(cfg, t);
        let dtype = x.dtype();
        // The tables are made in f32 and rotate in the compute dtype, as transformers' do.
        let (cos, sin) = rope::tables(&inv_freq, scale, t, &x.device());
        let (cos, sin) = (in_dtype(cos, dtype), in_dtype(sin, dtype));
        let [q, k, v] = self.qkv(attn, x);
        let q = rope::apply(heads(q, h), &cos, &sin);
        let k = rope::apply(heads(k, kv), &cos, &sin);
        let v = heads(v, kv);
        // kiln's fused attention kernel computes in f32: scores, softmax and the weighted sum
        // (transformers' eager attention takes its softmax in f32 too).
        let f32 = |y: Tensor<4>| in_dtype(y, DType::F32);
        let att = causal_attention(f32(q), f32(repeat_kv(k, h)), f32(repeat_kv(v, h)));
        let att = in_dtype(att, dtype);
        self.o_proj(attn, att.swap_dims(1, 2).reshape([b, t, h * hd]))
    }

    /// The attention's output projection of the heads' outputs `[batch, t, heads · head_dim]`.
    pub(super) fn o_proj(&self, attn: &Attention, heads: Tensor<3>) -> Tensor<3> {
        dense(heads, &attn.o_proj)
    }
}

/// Grouped-query attention: `[batch, kv_heads, t, head_dim]` keys or values for `heads` query
/// heads, query head i reading key/value head i / (heads / kv_heads), as transformers'
/// `repeat_kv` lays them out.
pub(super) fn repeat_kv(y: Tensor<4>, heads: usize) -> Tensor<4> {
    let [b, kv, t, hd] = y.dims();
    match heads / kv {
        1 => y,
        group => y
            .reshape([b, kv, 1, t, hd])
            .expand([b, kv, group, t, hd])
            .reshape([b, heads, t, hd]),
    }
}

/// `x` in `dtype` (itself when it is already).
pub(super) fn in_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    match x.dtype() == dtype {
        true => x,
        false => x.cast(FloatDType::from(dtype)),
    }
}

/// RMSNorm with its statistics in f32 whatever the compute dtype, as transformers'
/// `LlamaRMSNorm`: upcast, normalise, cast back, then the gain (in the compute dtype).
pub(super) fn rms(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return norm.forward(x);
    }
    let x = x.cast(FloatDType::F32);
    let mean_square = x.clone().powi_scalar(2).mean_dim(2);
    let y = x * (mean_square + norm.epsilon).sqrt().recip();
    y.cast(FloatDType::from(dtype)) * norm.gamma.val().unsqueeze::<3>()
}

/// `x W + b` on `[batch, seq, d_in]` as one 2-D matmul over batch × seq rows (burn flex runs
/// the 2-D form faster than its batched linear).
fn dense(x: Tensor<3>, layer: &Linear) -> Tensor<3> {
    let [b, t, d_in] = x.dims();
    let w = layer.weight.val();
    let d_out = w.dims()[1];
    let y = x.reshape([b * t, d_in]).matmul(w);
    let y = match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze::<2>(),
        None => y,
    };
    y.reshape([b, t, d_out])
}

impl TrainModule for Decoder {
    type Batch = MicroBatch;
    type Activation = Tensor<3>;

    /// The embedding, one unit per layer (`blocks.i`, as the GPT names them, so that
    /// `train.recompute = "every:K"` reads the same), then the final norm and head with the
    /// loss. A tied head borrows the embedding.
    fn units(&self) -> Vec<Unit> {
        let mut units = vec![Unit::with_paths("embed", ["model.embed_tokens"])];
        units.extend(
            (0..self.cfg.layers)
                .map(|i| Unit::with_paths(format!("blocks.{i}"), [format!("model.layers.{i}")])),
        );
        units.push(match self.cfg.tie_word_embeddings {
            true => Unit::with_paths("head", ["model.norm"]).borrowing("model.embed_tokens.weight"),
            false => Unit::with_paths("head", ["model.norm", "lm_head"]),
        });
        units
    }

    fn forward_unit(&self, unit: usize, x: Option<Tensor<3>>, batch: &MicroBatch) -> Tensor<3> {
        let layers = self.cfg.layers;
        match unit {
            0 => self.model.embed_tokens.forward(batch.inputs.clone()),
            u if u <= layers => self.layer_forward(
                &self.model.layers[u - 1],
                x.expect("a layer follows a unit"),
            ),
            _ => {
                let x = x.expect("the head follows the layers");
                let [b, t, _] = x.dims();
                // The loss and its softmax in f32 whatever the compute dtype: a bf16 log-softmax
                // over the vocabulary would round every probability to 8 bits.
                let logp = log_softmax(in_dtype(self.logits(x), DType::F32), 1);
                let targets = batch.targets.clone().reshape([b * t, 1]);
                batch.loss(logp.gather(1, targets).neg())
            }
        }
    }

    /// `llama`, `qwen2` or `phi3` (transformers' `model_type`).
    fn name(&self) -> String {
        self.cfg.family.model_type().to_string()
    }

    /// The Hugging Face `config.json`, under `hf_config`.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "hf_config": *self.hf_config })
    }
}

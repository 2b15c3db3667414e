//! A GPT-2 style decoder: token + learned position embeddings, pre-LayerNorm blocks with causal
//! multi-head self-attention and a 4× GELU MLP, final LayerNorm and an LM head that is a matrix
//! of its own or, tied, the token embedding transposed (GPT-2's).

use super::fused::{causal_attention, gelu_tanh};
use super::{Init, MicroBatch, ModelUnits, Param, ParamRef, ParamSpec, UnitModel};
use crate::error::Result;
use burn::tensor::activation::log_softmax;
use burn::tensor::module::{embedding, layer_norm};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Shape of a GPT.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads per block.
    pub n_heads: usize,
    /// Number of learned positions (the longest sequence the model accepts).
    pub max_seq_len: usize,
    /// Sequence length used for training (≤ `max_seq_len`).
    pub seq_len: usize,
    /// Whether the attention has a key bias (`model.qkv_bias = "qkv"`). Absent from
    /// checkpoints written before the key existed: false, as they were.
    #[serde(default)]
    pub key_bias: bool,
    /// Whether the LM head is the token embedding transposed (`model.tie_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
}

impl GptConfig {
    /// A named preset, or `None` if the name is unknown.
    pub fn preset(name: &str) -> Option<Self> {
        let (vocab, d_model, n_layers, n_heads, seq) = match name {
            "tiny" => (256, 256, 4, 4, 128),
            "small" => (256, 512, 8, 8, 256),
            "gpt2-124m" => (50304, 768, 12, 12, 1024),
            _ => return None,
        };
        Some(GptConfig {
            vocab,
            d_model,
            n_layers,
            n_heads,
            max_seq_len: seq,
            seq_len: seq,
            key_bias: false,
            tie_embeddings: false,
        })
    }

    /// Names of the presets, for error messages.
    pub const PRESETS: &'static str = "tiny, small, gpt2-124m";

    /// Total parameter count.
    pub fn num_params(&self) -> usize {
        let gpt = Gpt::new(*self);
        (0..gpt.num_units())
            .flat_map(|u| gpt.unit_params(u))
            .map(|p| p.numel())
            .sum()
    }
}

/// The GPT as a [`UnitModel`]: unit 0 = embeddings, units 1..=L = blocks, unit L+1 = head + loss.
#[derive(Debug, Clone)]
pub struct Gpt {
    cfg: GptConfig,
}

const LN_EPS: f64 = 1e-5;
const INIT_STD: f32 = 0.02;

impl Gpt {
    /// A GPT of this shape (parameters live outside, in flat buffers).
    pub fn new(cfg: GptConfig) -> Self {
        Gpt { cfg }
    }

    /// The shape.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    fn block_params(&self, layer: usize) -> Vec<ParamSpec> {
        let d = self.cfg.d_model;
        // GPT-2 scales the residual projections by 1/sqrt(2 L) so the residual stream's variance
        // does not grow with depth (Radford et al. 2019, §2.3).
        let resid_std = INIT_STD / ((2 * self.cfg.n_layers) as f32).sqrt();
        let p = |name: &str, shape: Vec<usize>, init: Init, decay: bool| ParamSpec {
            path: format!("blocks.{layer}.{name}"),
            shape,
            init,
            decay,
        };
        vec![
            p("ln1.weight", vec![d], Init::Ones, false),
            p("ln1.bias", vec![d], Init::Zeros, false),
            p(
                "attn.qkv.weight",
                vec![d, 3 * d],
                Init::Normal(INIT_STD),
                true,
            ),
            // By default query and value biases only: a key bias adds the same score to every
            // key of a query, which softmax cancels, so its gradient is exactly zero in exact
            // arithmetic and pure rounding noise in f32 — noise that Adam would normalise into
            // full-size updates (Whisper drops it for the same reason). GPT-2's weights have
            // one, so `model.qkv_bias = "qkv"` keeps it.
            if self.cfg.key_bias {
                p("attn.qkv.bias", vec![3 * d], Init::Zeros, false)
            } else {
                p("attn.qv.bias", vec![2 * d], Init::Zeros, false)
            },
            p(
                "attn.proj.weight",
                vec![d, d],
                Init::Normal(resid_std),
                true,
            ),
            p("attn.proj.bias", vec![d], Init::Zeros, false),
            p("ln2.weight", vec![d], Init::Ones, false),
            p("ln2.bias", vec![d], Init::Zeros, false),
            p(
                "mlp.fc.weight",
                vec![d, 4 * d],
                Init::Normal(INIT_STD),
                true,
            ),
            p("mlp.fc.bias", vec![4 * d], Init::Zeros, false),
            p(
                "mlp.proj.weight",
                vec![4 * d, d],
                Init::Normal(resid_std),
                true,
            ),
            p("mlp.proj.bias", vec![d], Init::Zeros, false),
        ]
    }

    /// The head unit's logits `[batch × seq, vocab]` for the last block's output `x`: `ln_f`,
    /// then the LM head. `params` are the head's (`forward_unit`'s, borrowed ones included).
    /// The head's loss is computed from these; `kiln sample` uses them directly.
    pub fn logits(&self, params: &[Param], x: Tensor<3>) -> Tensor<2> {
        let GptConfig {
            vocab, d_model: d, ..
        } = self.cfg;
        let [b, t, _] = x.dims();
        let x = layer_norm(x, params[0].tensor(), Some(params[1].tensor()), LN_EPS);
        // Untied: `lm_head.weight` [d, vocab]; tied: the borrowed `wte.weight` [vocab, d],
        // transposed.
        let x = x.reshape([b * t, d]);
        if self.cfg.tie_embeddings {
            params[2].matmul(x, [vocab, d], true)
        } else {
            params[2].matmul(x, [d, vocab], false)
        }
    }

    fn block_forward(&self, params: &[Param], x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let h = self.cfg.n_heads;
        let hd = d / h;
        let a = layer_norm(
            x.clone(),
            params[0].tensor(),
            Some(params[1].tensor()),
            LN_EPS,
        );
        let qkv_bias = if self.cfg.key_bias {
            params[3].tensor()
        } else {
            let qv_bias = &params[3].tensor();
            let zeros = Tensor::<1>::zeros([d], &qv_bias.device());
            Tensor::cat(
                vec![
                    qv_bias.clone().narrow(0, 0, d),
                    zeros,
                    qv_bias.clone().narrow(0, d, d),
                ],
                0,
            )
        };
        let qkv = dense(a, &params[2], [d, 3 * d], &qkv_bias);
        let heads = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, t, h, hd])
                .swap_dims(1, 2)
        };
        let att = causal_attention(heads(0), heads(1), heads(2));
        let att = att.swap_dims(1, 2).reshape([b, t, d]);
        let x = x + dense(att, &params[4], [d, d], &params[5].tensor());
        let m = layer_norm(
            x.clone(),
            params[6].tensor(),
            Some(params[7].tensor()),
            LN_EPS,
        );
        let m = gelu_tanh(dense(m, &params[8], [d, 4 * d], &params[9].tensor()));
        x + dense(m, &params[10], [4 * d, d], &params[11].tensor())
    }
}

/// `x W + b` on `[batch, seq, d_in]` with `W` of `shape` `[d_in, d_out]`, as one 2-D matmul over
/// batch × seq rows: burn flex runs the 2-D form faster than its batched linear (measured on the
/// tiny preset's shapes).
fn dense(x: Tensor<3>, w: &Param, shape: [usize; 2], b: &Tensor<1>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let y = w.matmul(x.reshape([batch * seq, d_in]), shape, false) + b.clone().unsqueeze::<2>();
    y.reshape([batch, seq, shape[1]])
}

impl ModelUnits for Gpt {
    fn num_units(&self) -> usize {
        self.cfg.n_layers + 2
    }

    fn unit_name(&self, unit: usize) -> String {
        match unit {
            0 => "embed".into(),
            u if u <= self.cfg.n_layers => format!("blocks.{}", u - 1),
            _ => "head".into(),
        }
    }

    fn unit_params(&self, unit: usize) -> Vec<ParamSpec> {
        let GptConfig {
            vocab,
            d_model: d,
            max_seq_len,
            ..
        } = self.cfg;
        let p = |path: &str, shape: Vec<usize>, init: Init, decay: bool| ParamSpec {
            path: path.into(),
            shape,
            init,
            decay,
        };
        match unit {
            0 => vec![
                p("wte.weight", vec![vocab, d], Init::Normal(INIT_STD), true),
                p(
                    "wpe.weight",
                    vec![max_seq_len, d],
                    Init::Normal(INIT_STD),
                    true,
                ),
            ],
            u if u <= self.cfg.n_layers => self.block_params(u - 1),
            _ => {
                let mut head = vec![
                    p("ln_f.weight", vec![d], Init::Ones, false),
                    p("ln_f.bias", vec![d], Init::Zeros, false),
                ];
                if !self.cfg.tie_embeddings {
                    head.push(p(
                        "lm_head.weight",
                        vec![d, vocab],
                        Init::Normal(INIT_STD),
                        true,
                    ));
                }
                head
            }
        }
    }

    /// Blocks and the head read their matrices only through matmuls; the embedding looks rows
    /// up (burn's embedding keeps its table in the graph), so it recomputes when released.
    fn matmul_weights(&self, unit: usize) -> Option<Vec<bool>> {
        let specs = self.unit_params(unit);
        let borrowed = self.borrowed_params(unit).len();
        (unit > 0).then(|| {
            specs
                .iter()
                .map(|p| p.shape.len() == 2)
                .chain(std::iter::repeat_n(true, borrowed))
                .collect()
        })
    }

    fn borrowed_params(&self, unit: usize) -> Vec<ParamRef> {
        if self.cfg.tie_embeddings && unit == self.num_units() - 1 {
            vec![ParamRef { unit: 0, index: 0 }]
        } else {
            Vec::new()
        }
    }
}

impl UnitModel for Gpt {
    fn forward_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<Tensor<3>>,
        batch: &MicroBatch,
    ) -> Result<Tensor<3>> {
        Ok(self.forward_gpt_unit(unit, params, input, batch))
    }
}

impl Gpt {
    fn forward_gpt_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<Tensor<3>>,
        batch: &MicroBatch,
    ) -> Tensor<3> {
        let GptConfig {
            vocab,
            d_model: d,
            max_seq_len,
            ..
        } = self.cfg;
        match unit {
            0 => {
                let [_, t] = batch.inputs.dims();
                let tok = embedding(params[0].tensor().reshape([vocab, d]), batch.inputs.clone());
                let pos = params[1].tensor().reshape([max_seq_len, d]).narrow(0, 0, t);
                tok + pos.unsqueeze::<3>()
            }
            u if u <= self.cfg.n_layers => self.block_forward(
                params,
                input.expect("a block needs the previous unit's output"),
            ),
            _ => {
                let x = input.expect("the head needs the last block's output");
                let [b, t, _] = x.dims();
                let logp = log_softmax(self.logits(params, x), 1);
                let targets = batch.targets.clone().reshape([b * t, 1]);
                batch.loss(logp.gather(1, targets).neg())
            }
        }
    }
}

impl Gpt {
    /// Sequence length the model is trained with.
    pub fn seq_len(&self) -> usize {
        self.cfg.seq_len
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.cfg.vocab
    }
}

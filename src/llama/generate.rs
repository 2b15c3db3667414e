//! Incremental decoding with a key/value cache (`kiln sample`): each layer keeps the rotated
//! keys and the values of every token seen, so a new token costs one position's projections
//! and one row of attention instead of a forward pass over the whole window.

use super::model::{repeat_kv, Attention, Decoder, DecoderLayer};
use super::rope;
use crate::error::{KilnError, Result};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// The keys and values of the tokens fed so far, per layer (`[1, kv_heads, len, head_dim]`).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Decoder {
    /// The logits of the token after `ids` (`[vocab]`), feeding `ids` at the positions after the
    /// `cache.len()` tokens `cache` holds, and adding their keys and values to it. With an empty
    /// cache this is the forward pass over `ids`; then one id at a time continues it. An empty
    /// `ids` is an error.
    pub fn next_logits(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        device: &Device,
    ) -> Result<Vec<f32>> {
        let n = ids.len();
        if n == 0 {
            return Err(KilnError::config("no token ids to feed the decoder"));
        }
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let mut x = self.model.embed_tokens.forward(input);
        cache.layers.resize_with(self.model.layers.len(), || None);
        let start = cache.len;
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = self.cached_layer(layer, x, slot, start);
        }
        cache.len += n;
        let logits = self.logits(x.narrow(1, n - 1, 1)).into_data();
        Ok(logits.try_to_vec::<f32>().expect("f32 logits"))
    }

    fn cached_layer(
        &self,
        layer: &DecoderLayer,
        x: Tensor<3>,
        slot: &mut Option<(Tensor<4>, Tensor<4>)>,
        start: usize,
    ) -> Tensor<3> {
        let h = layer.input_layernorm.forward(x.clone());
        let x = x + self.cached_attention(&layer.self_attn, h, slot, start);
        let h = layer.post_attention_layernorm.forward(x.clone());
        x + self.mlp(&layer.mlp, h)
    }

    /// Attention of the `n` new positions `start..start + n` over every cached and new key.
    fn cached_attention(
        &self,
        attn: &Attention,
        x: Tensor<3>,
        slot: &mut Option<(Tensor<4>, Tensor<4>)>,
        start: usize,
    ) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let cfg = self.config();
        let (h, kv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let total = start + n;
        let heads = |y: Tensor<3>, k: usize| y.reshape([b, n, k, hd]).swap_dims(1, 2);
        // transformers computes the rotary frequencies for the longest position of each call
        // (LongRoPE switches factors there), and the angles at the absolute positions.
        let (inv_freq, scale) = rope::inv_freq(cfg, total);
        let (cos, sin) = rope::tables(&inv_freq, scale, total, &x.device());
        let (cos, sin) = (cos.narrow(2, start, n), sin.narrow(2, start, n));
        let [q, k, v] = self.qkv(attn, x);
        let q = rope::apply(heads(q, h), &cos, &sin);
        let k = rope::apply(heads(k, kv), &cos, &sin);
        let v = heads(v, kv);
        let (k, v) = match slot.take() {
            Some((k0, v0)) => (Tensor::cat(vec![k0, k], 2), Tensor::cat(vec![v0, v], 2)),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let scores = q.matmul(repeat_kv(k, h).swap_dims(2, 3)) / (hd as f64).sqrt();
        // Query i (position start + i) sees keys 0..=start + i.
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask =
            Tensor::<4>::from_data(TensorData::new(mask, [1, 1, n, total]), &scores.device());
        let probs = softmax(scores + mask, 3);
        let att = probs.matmul(repeat_kv(v, h));
        self.o_proj(attn, att.swap_dims(1, 2).reshape([b, n, h * hd]))
    }
}

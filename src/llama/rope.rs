//! Rotary position embeddings as transformers computes them for Llama-family models: the
//! "rotate half" layout (dimension i pairs with i + d/2, not with its neighbour), inverse
//! frequencies `θ^(-2i/d)` rounded to f32, Llama 3's frequency-dependent scaling, Phi-3's
//! LongRoPE and partial rotation (only the first `rotary_dim` dimensions of a head turn).

use super::config::{DecoderConfig, Llama3Scaling, RopeScaling};
use burn::tensor::{Device, Tensor, TensorData};

/// The inverse frequencies for rows of `seq_len` positions, one per rotated pair
/// (`rotary_dim / 2` of them) in f32 as transformers keeps them, and the scale of cos and sin.
pub fn inv_freq(cfg: &DecoderConfig, seq_len: usize) -> (Vec<f32>, f32) {
    let dim = cfg.rotary_dim;
    let power = |i: usize| cfg.rope_theta.powf((2 * i) as f64 / dim as f64);
    match &cfg.rope_scaling {
        RopeScaling::None => ((0..dim / 2).map(|i| (1.0 / power(i)) as f32).collect(), 1.0),
        RopeScaling::Llama3(s) => (
            (0..dim / 2)
                .map(|i| llama3((1.0 / power(i)) as f32, s))
                .collect(),
            1.0,
        ),
        RopeScaling::LongRope(l) => {
            // transformers switches to the long factors once a sequence outgrows the
            // original context.
            let ext = match seq_len > l.original_max_position_embeddings {
                true => &l.long_factor,
                false => &l.short_factor,
            };
            let freqs = (0..dim / 2).map(|i| (1.0 / (ext[i] * power(i))) as f32);
            (freqs.collect(), l.attention_factor as f32)
        }
    }
}

/// transformers' `_compute_llama3_parameters` for one frequency: wavelengths longer than the
/// original context divided by `factor`, shorter than `original / high_freq_factor` kept, a
/// smooth blend between.
fn llama3(freq: f32, s: &Llama3Scaling) -> f32 {
    let freq = freq as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let scaled = if wavelen > low_wavelen {
        freq / s.factor
    } else if wavelen < high_wavelen {
        freq
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    };
    scaled as f32
}

/// `(cos, sin)`, each `[1, 1, seq, rotary_dim]`, for positions `0..seq`, times `scale`: the
/// angle of pair i at position p is `p · inv_freq[i]` (an f32 product, as transformers forms
/// it), repeated over both halves of the rotated dimensions.
pub fn tables(inv_freq: &[f32], scale: f32, seq: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let half = inv_freq.len();
    let dim = 2 * half;
    let mut cos = vec![0.0f32; seq * dim];
    let mut sin = vec![0.0f32; seq * dim];
    for p in 0..seq {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = (p as f32 * f) as f64;
            let (s, c) = angle.sin_cos();
            for j in [i, i + half] {
                cos[p * dim + j] = c as f32 * scale;
                sin[p * dim + j] = s as f32 * scale;
            }
        }
    }
    let shape = [1, 1, seq, dim];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// `x · cos + rotate_half(x) · sin` on the first `rotary_dim` (cos's last dimension) of
/// `[batch, heads, seq, head_dim]`, where `rotate_half([x1, x2]) = [-x2, x1]`; the other
/// dimensions pass through.
pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let head_dim = x.dims()[3];
    let dim = cos.dims()[3];
    let (rot, pass) = match dim == head_dim {
        true => (x, None),
        false => (
            x.clone().narrow(3, 0, dim),
            Some(x.narrow(3, dim, head_dim - dim)),
        ),
    };
    let half = dim / 2;
    let x1 = rot.clone().narrow(3, 0, half);
    let x2 = rot.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let turned = rot * cos.clone() + rotated * sin.clone();
    match pass {
        None => turned,
        Some(pass) => Tensor::cat(vec![turned, pass], 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_bands() {
        // Llama 3.1's settings: factor 8, low 1, high 4, original 8192.
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        // A high frequency (wavelength 2π < 2048) is kept; a low one (wavelength > 8192) is
        // divided by 8; one in between is blended.
        assert_eq!(llama3(1.0, &s), 1.0);
        let low = 2.0 * std::f32::consts::PI / 20000.0;
        assert!((llama3(low, &s) - low / 8.0).abs() < 1e-12);
        let mid = 2.0 * std::f64::consts::PI / 4096.0;
        let smooth = (8192.0 / 4096.0 - 1.0) / 3.0;
        let want = (1.0 - smooth) * mid / 8.0 + smooth * mid;
        assert!((llama3(mid as f32, &s) as f64 - want).abs() < 1e-9);
    }
}

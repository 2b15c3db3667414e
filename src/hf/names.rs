//! kiln's module paths ↔ the tensor names transformers writes for `GPT2LMHeadModel`. Both use
//! GPT-2's Conv1D layout `[d_in, d_out]` for every block matrix, so only the LM head (an
//! `nn.Linear`, `[vocab, d]`) is transposed, and kiln's query/value-only bias is GPT-2's
//! `c_attn.bias` without its middle (key) third.

/// How a kiln parameter's values relate to the Hugging Face tensor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Same shape, same order.
    Same,
    /// kiln `[d, vocab]` is HF `[vocab, d]` transposed.
    Transpose,
    /// kiln `[2d]` (q, v) is HF `[3d]` (q, k, v) without k. Exact: a key bias adds the same
    /// score to every key of a query, which softmax cancels.
    DropKey,
}

impl Transform {
    /// The Hugging Face shape of a kiln parameter of shape `shape`.
    pub fn hf_shape(self, shape: &[usize]) -> Vec<usize> {
        match self {
            Transform::Same => shape.to_vec(),
            Transform::Transpose => shape.iter().rev().copied().collect(),
            Transform::DropKey => vec![shape[0] / 2 * 3],
        }
    }

    /// kiln's values from the Hugging Face tensor `hf` (of shape `hf_shape(shape)`).
    pub fn to_kiln(self, shape: &[usize], hf: &[f32], out: &mut [f32]) {
        match self {
            Transform::Same => out.copy_from_slice(hf),
            Transform::Transpose => transpose(hf, shape[1], shape[0], out),
            Transform::DropKey => {
                let d = shape[0] / 2;
                out[..d].copy_from_slice(&hf[..d]);
                out[d..].copy_from_slice(&hf[2 * d..]);
            }
        }
    }

    /// The Hugging Face tensor from kiln's values; the key bias kiln does not have is zero
    /// (which, as above, computes the same function).
    pub fn to_hf(self, shape: &[usize], kiln: &[f32]) -> Vec<f32> {
        match self {
            Transform::Same => kiln.to_vec(),
            Transform::Transpose => {
                let mut out = vec![0.0; kiln.len()];
                transpose(kiln, shape[0], shape[1], &mut out);
                out
            }
            Transform::DropKey => {
                let d = shape[0] / 2;
                let mut out = vec![0.0; 3 * d];
                out[..d].copy_from_slice(&kiln[..d]);
                out[2 * d..].copy_from_slice(&kiln[d..]);
                out
            }
        }
    }
}

/// `src` is `[rows, cols]` row-major; `out` becomes `[cols, rows]`.
fn transpose(src: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[r * cols + c];
        }
    }
}

/// The Hugging Face name (as `GPT2LMHeadModel` saves it, `transformer.` prefix included) of a
/// kiln module path, and how the values relate; `None` for a path GPT-2 has no tensor for.
pub fn hf_name(path: &str) -> Option<(String, Transform)> {
    let t = |rest: &str| Some((format!("transformer.{rest}"), Transform::Same));
    match path {
        "wte.weight" | "wpe.weight" | "ln_f.weight" | "ln_f.bias" => return t(path),
        "lm_head.weight" => return Some(("lm_head.weight".into(), Transform::Transpose)),
        _ => {}
    }
    let rest = path.strip_prefix("blocks.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, transform) = match name {
        "ln1.weight" => ("ln_1.weight", Transform::Same),
        "ln1.bias" => ("ln_1.bias", Transform::Same),
        "ln2.weight" => ("ln_2.weight", Transform::Same),
        "ln2.bias" => ("ln_2.bias", Transform::Same),
        "attn.qkv.weight" => ("attn.c_attn.weight", Transform::Same),
        "attn.qkv.bias" => ("attn.c_attn.bias", Transform::Same),
        "attn.qv.bias" => ("attn.c_attn.bias", Transform::DropKey),
        "attn.proj.weight" => ("attn.c_proj.weight", Transform::Same),
        "attn.proj.bias" => ("attn.c_proj.bias", Transform::Same),
        "mlp.fc.weight" => ("mlp.c_fc.weight", Transform::Same),
        "mlp.fc.bias" => ("mlp.c_fc.bias", Transform::Same),
        "mlp.proj.weight" => ("mlp.c_proj.weight", Transform::Same),
        "mlp.proj.bias" => ("mlp.c_proj.bias", Transform::Same),
        _ => return None,
    };
    Some((format!("transformer.h.{layer}.{hf}"), transform))
}

/// transformers' name for a Llama-family decoder's parameter at kiln path `path` (of `shape`),
/// and how the values relate. The decoder's modules mirror transformers' tree
/// (`model.layers.0.self_attn.q_proj`), so the names agree up to burn's spelling: `gamma` for
/// an RMSNorm's `weight`, and linear weights stored `[d_in, d_out]` (PyTorch's `nn.Linear`
/// keeps `[d_out, d_in]`: transposed). The token embedding is `[vocab, hidden]` in both.
pub fn decoder_name(path: &str, shape: &[usize]) -> (String, Transform) {
    if let Some(stem) = path.strip_suffix(".gamma") {
        return (format!("{stem}.weight"), Transform::Same);
    }
    let is_embedding = path == "model.embed_tokens.weight";
    match shape.len() == 2 && !is_embedding {
        true => (path.to_string(), Transform::Transpose),
        false => (path.to_string(), Transform::Same),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_head_names_follow_transformers() {
        assert_eq!(
            hf_name("blocks.3.attn.qkv.weight"),
            Some(("transformer.h.3.attn.c_attn.weight".into(), Transform::Same))
        );
        assert_eq!(
            hf_name("blocks.0.mlp.proj.bias"),
            Some(("transformer.h.0.mlp.c_proj.bias".into(), Transform::Same))
        );
        assert_eq!(
            hf_name("blocks.1.ln2.weight").unwrap().0,
            "transformer.h.1.ln_2.weight"
        );
        assert_eq!(hf_name("wpe.weight").unwrap().0, "transformer.wpe.weight");
        assert_eq!(hf_name("lm_head.weight").unwrap().1, Transform::Transpose);
        assert_eq!(hf_name("blocks.x.ln1.weight"), None);
        assert_eq!(hf_name("blocks.0.attn.k.bias"), None);
    }

    #[test]
    fn transforms_round_trip() {
        let kiln: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let hf = Transform::Transpose.to_hf(&[2, 3], &kiln);
        assert_eq!(hf, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let mut back = vec![0.0; 6];
        Transform::Transpose.to_kiln(&[2, 3], &hf, &mut back);
        assert_eq!(back, kiln);

        let qv = [1.0, 2.0, 5.0, 6.0];
        let hf = Transform::DropKey.to_hf(&[4], &qv);
        assert_eq!(hf, [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]);
        let mut back = [0.0; 4];
        Transform::DropKey.to_kiln(&[4], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut back);
        assert_eq!(back, qv);
        assert_eq!(Transform::DropKey.hf_shape(&[4]), [6]);
        assert_eq!(Transform::Transpose.hf_shape(&[2, 3]), [3, 2]);
    }

    #[test]
    fn decoder_names_follow_transformers() {
        for (path, shape, name, transform) in [
            (
                "model.embed_tokens.weight",
                vec![300, 64],
                "model.embed_tokens.weight",
                Transform::Same,
            ),
            (
                "model.layers.1.self_attn.q_proj.weight",
                vec![64, 64],
                "model.layers.1.self_attn.q_proj.weight",
                Transform::Transpose,
            ),
            (
                "model.layers.1.self_attn.q_proj.bias",
                vec![64],
                "model.layers.1.self_attn.q_proj.bias",
                Transform::Same,
            ),
            (
                "model.layers.0.input_layernorm.gamma",
                vec![64],
                "model.layers.0.input_layernorm.weight",
                Transform::Same,
            ),
            (
                "model.norm.gamma",
                vec![64],
                "model.norm.weight",
                Transform::Same,
            ),
            (
                "lm_head.weight",
                vec![64, 300],
                "lm_head.weight",
                Transform::Transpose,
            ),
        ] {
            assert_eq!(
                decoder_name(path, &shape),
                (name.to_string(), transform),
                "{path}"
            );
        }
    }
}

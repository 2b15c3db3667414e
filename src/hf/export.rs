//! `kiln export --format hf`: a directory transformers' `from_pretrained` loads —
//! `model.safetensors` (f32, transformers' names) and `config.json` — for the GPT and, through
//! [`write_hf_dir`], any architecture that names its parameters. Written one unit at a time
//! to temporary names and renamed, like `output.export`, so a failure leaves no half-written
//! file under a final name.

use super::config::config_json;
use super::names::{hf_name, Transform};
use crate::error::{KilnError, Result};
use crate::model::GptConfig;
use crate::tensor_file::{StoredDtype, TensorFileWriter};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `out_dir/model.safetensors` and `out_dir/config.json` for `model`, whose
/// parameters are `params` (path, shape) with values `read(path, shape)`. A tied model writes only
/// `transformer.wte.weight` (transformers ties `lm_head.weight` to it on load); kiln's
/// query/value-only bias (`model.qkv_bias = "qv"`) is written with a zero key bias, which
/// computes the same function (softmax cancels a key bias), so every kiln GPT is exported.
pub fn export_hf(
    out_dir: &Path,
    model: &GptConfig,
    params: &[(String, Vec<usize>)],
    dtype: StoredDtype,
    read: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
) -> Result<()> {
    let name = |path: &str, _shape: &[usize]| {
        hf_name(path).ok_or_else(|| {
            KilnError::config(format!(
                "parameter `{path}` has no GPT-2 counterpart; transformers cannot load this model"
            ))
        })
    };
    write_hf_dir(out_dir, &config_json(model), params, dtype, name, read)
}

/// Writes a Hugging Face directory for any architecture: `config` (its dtype set to `dtype`'s),
/// and each of `params` (path, shape; values from `read(path, shape)`, one parameter in memory
/// at a time) as `dtype`, under the name and in the layout `name(path, shape)` gives it.
pub fn write_hf_dir(
    out_dir: &Path,
    config: &Value,
    params: &[(String, Vec<usize>)],
    dtype: StoredDtype,
    name: impl Fn(&str, &[usize]) -> Result<(String, Transform)>,
    mut read: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut tensors = Vec::new();
    let mut names = Vec::new();
    for (path, shape) in params {
        let (hf, transform) = name(path, shape)?;
        tensors.push((hf.clone(), transform.hf_shape(shape)));
        names.push((hf, transform));
    }
    if out_dir.is_file() {
        return Err(KilnError::file(
            out_dir,
            "is a file; expected a directory to write model.safetensors and config.json into",
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| {
        KilnError::file(out_dir, format!("cannot create the output directory: {e}"))
    })?;
    let weights = out_dir.join("model.safetensors");
    let tmp = out_dir.join(".model.safetensors.tmp");
    let _ = std::fs::remove_file(&tmp);
    // transformers refuses a safetensors file whose metadata has no `format`.
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let written = (|| {
        let writer = TensorFileWriter::create_as(&tmp, &tensors, &metadata, dtype)?;
        for ((path, shape), (hf, transform)) in params.iter().zip(&names) {
            writer.write(hf, 0, &transform.to_hf(shape, &read(path, shape)?))?;
        }
        writer.finish()?;
        std::fs::rename(&tmp, &weights).map_err(|e| KilnError::io(&weights, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    let config_path = out_dir.join("config.json");
    let text = serde_json::to_string_pretty(&with_dtype(config, dtype)).expect("JSON serialises");
    let tmp = out_dir.join(".config.json.tmp");
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, &config_path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            KilnError::io(&config_path, e)
        })
}

/// `config` saying the weights are `dtype` (transformers' `dtype`, or the older `torch_dtype`
/// where the config has that key), so that `from_pretrained` loads them as written.
fn with_dtype(config: &Value, dtype: StoredDtype) -> Value {
    let torch = match dtype {
        StoredDtype::F32 => "float32",
        StoredDtype::BF16 => "bfloat16",
        StoredDtype::F16 => "float16",
        StoredDtype::U8 => "uint8",
    };
    let mut config = config.clone();
    if let Some(c) = config.as_object_mut() {
        let key = match c.contains_key("torch_dtype") && !c.contains_key("dtype") {
            true => "torch_dtype",
            false => "dtype",
        };
        c.insert(key.into(), Value::String(torch.into()));
    }
    config
}

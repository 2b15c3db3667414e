//! Reading a Hugging Face GPT-2 checkpoint (`model.init_from`): a `save_pretrained` directory
//! (`config.json` + `model.safetensors`, or shards listed by `model.safetensors.index.json`) or
//! a bare `.safetensors` file (its `config.json` beside it when there is one). Only headers are
//! read up front; a unit's tensors are then read with `pread` of their byte ranges
//! ([`TensorFileReader`]), so a rank reads what it initialises, one unit at a time, and never
//! the whole file.

use super::config::HfConfig;
use super::names::{hf_name, Transform};
use crate::error::{KilnError, Result};
use crate::flat::UnitLayout;
use crate::model::ParamSpec;
use crate::tensor_file::TensorFileReader;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An opened Hugging Face checkpoint.
pub struct HfCheckpoint {
    /// The path the user gave (for messages).
    path: PathBuf,
    /// `config.json`, when there is one.
    config: Option<HfConfig>,
    files: Vec<TensorFileReader>,
    /// Tensor name (as the file spells it) → index into `files`.
    index: HashMap<String, usize>,
}

const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

impl HfCheckpoint {
    /// Opens `path` and reads its headers (and `config.json`).
    pub fn open(path: &Path) -> Result<HfCheckpoint> {
        let (config_path, weight_files) = if path.is_dir() {
            (path.join("config.json"), weight_files(path)?)
        } else if path.is_file() {
            let beside = path.with_file_name("config.json");
            (beside, vec![path.to_path_buf()])
        } else {
            return Err(KilnError::file(
                path,
                "model.init_from: no such file or directory (expected a save_pretrained directory or a .safetensors file)",
            ));
        };
        let config = if path.is_dir() || config_path.is_file() {
            Some(HfConfig::read(&config_path)?)
        } else {
            None
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, f) in weight_files.iter().enumerate() {
            let reader = TensorFileReader::open(f)?;
            for name in reader.names() {
                index.insert(name.to_string(), i);
            }
            files.push(reader);
        }
        Ok(HfCheckpoint {
            path: path.to_path_buf(),
            config,
            files,
            index,
        })
    }

    /// The checkpoint's `config.json`, or, for a bare `.safetensors` file without one, the
    /// shape its tensors imply with `n_heads` heads (the one thing tensors do not tell).
    pub fn config(&self, n_heads: Option<usize>) -> Result<HfConfig> {
        if let Some(c) = &self.config {
            return Ok(c.clone());
        }
        let shape = |name: &str| {
            self.shape(name).ok_or_else(|| {
                KilnError::file(&self.path, format!("has no tensor `{name}` (and no config.json beside it to say the model's shape)"))
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
                self.path.display()
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
        &self.path
    }

    /// Where tensor `name` is, accepting files saved from a bare `GPT2Model` (no
    /// `transformer.` prefix).
    fn locate(&self, name: &str) -> Option<(&TensorFileReader, &str)> {
        let short = name.strip_prefix("transformer.").unwrap_or(name);
        [name, short].into_iter().find_map(|n| {
            let (key, &i) = self.index.get_key_value(n)?;
            Some((&self.files[i], key.as_str()))
        })
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (file, key) = self.locate(name)?;
        file.shape(key).map(<[usize]>::to_vec)
    }

    /// Reads the whole Hugging Face tensor `name`, checking it has `shape`; errors name the
    /// tensor and the file.
    fn read_tensor(&self, name: &str, shape: &[usize], for_path: &str) -> Result<Vec<f32>> {
        let (file, key) = self.locate(name).ok_or_else(|| {
            KilnError::file(
                &self.path,
                format!("has no tensor `{name}` (for kiln's `{for_path}`)"),
            )
        })?;
        let found = file.shape(key).unwrap_or_default();
        if found != shape {
            return Err(KilnError::file(
                &self.path,
                format!("tensor `{name}` has shape {found:?}, expected {shape:?} (for kiln's `{for_path}`)"),
            ));
        }
        let mut out = vec![0.0f32; shape.iter().product()];
        file.read(key, 0, &mut out)?;
        Ok(out)
    }

    /// Unit `layout`'s flat buffer (padded, padding zero) from the checkpoint.
    pub fn unit(&self, specs: &[ParamSpec], layout: &UnitLayout) -> Result<Vec<f32>> {
        let mut buf = vec![0.0f32; layout.padded_len];
        for (spec, entry) in specs.iter().zip(&layout.params) {
            let (mut name, transform) = hf_name(&spec.path).ok_or_else(|| {
                KilnError::file(
                    &self.path,
                    format!("kiln's `{}` has no GPT-2 counterpart", spec.path),
                )
            })?;
            // An untied kiln head loaded from a tied checkpoint starts as the embedding.
            if transform == Transform::Transpose && self.locate(&name).is_none() {
                name = "transformer.wte.weight".into();
            }
            let hf = self.read_tensor(&name, &transform.hf_shape(&spec.shape), &spec.path)?;
            transform.to_kiln(&spec.shape, &hf, &mut buf[entry.range()]);
        }
        Ok(buf)
    }
}

/// The weight files of a `save_pretrained` directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(WEIGHTS_INDEX);
    let text = std::fs::read_to_string(&index_path).map_err(|_| {
        KilnError::file(
            dir,
            format!("holds neither {WEIGHTS} nor {WEIGHTS_INDEX} (pytorch_model.bin is not read: save with safe_serialization=True)"),
        )
    })?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| KilnError::file(&index_path, format!("is not JSON: {e}")))?;
    let map = index["weight_map"].as_object().ok_or_else(|| {
        KilnError::file(
            &index_path,
            "has no `weight_map` object (tensor name → file)",
        )
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let name = file.as_str().ok_or_else(|| {
            KilnError::file(&index_path, "`weight_map` values must be file names")
        })?;
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

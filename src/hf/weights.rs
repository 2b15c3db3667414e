//! The tensors of a Hugging Face checkpoint, whatever its architecture: a `save_pretrained`
//! directory (`model.safetensors`, or shards listed by `model.safetensors.index.json`) or a
//! bare `.safetensors` file. Only headers are read up front; a tensor is read with `pread` of
//! its byte range ([`TensorFileReader`]), widened to f32 from the file's F32, BF16 or F16.

use crate::error::{KilnError, Result};
use crate::tensor_file::TensorFileReader;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The weight files of a checkpoint, indexed by tensor name.
pub struct HfWeights {
    /// The path the user gave (for messages).
    path: PathBuf,
    files: Vec<TensorFileReader>,
    /// Tensor name (as the file spells it) → index into `files`.
    index: HashMap<String, usize>,
}

impl HfWeights {
    /// Opens the weight files of `path` (a directory or a `.safetensors` file) and reads their
    /// headers.
    pub fn open(path: &Path) -> Result<HfWeights> {
        let weight_files = if path.is_dir() {
            weight_files(path)?
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(KilnError::file(
                path,
                "model.init_from: no such file or directory (expected a save_pretrained directory or a .safetensors file)",
            ));
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
        Ok(HfWeights {
            path: path.to_path_buf(),
            files,
            index,
        })
    }

    /// The path the user gave.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the first of `names` that the checkpoint holds is (aliases of one tensor: a
    /// file saved from a bare base model has no `transformer.`/`model.` prefix).
    pub fn locate<'a>(&self, names: &[&'a str]) -> Option<(&TensorFileReader, &str)> {
        names.iter().find_map(|n| {
            let (key, &i) = self.index.get_key_value(*n)?;
            Some((&self.files[i], key.as_str()))
        })
    }

    /// Whether the checkpoint holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of the first of `names` the checkpoint holds.
    pub fn shape(&self, names: &[&str]) -> Option<Vec<usize>> {
        let (file, key) = self.locate(names)?;
        file.shape(key).map(<[usize]>::to_vec)
    }

    /// Reads the whole tensor stored under the first of `names`, checking it has `shape`;
    /// errors name the tensor, the file and `for_what` (the kiln parameter it initialises).
    pub fn read(&self, names: &[&str], shape: &[usize], for_what: &str) -> Result<Vec<f32>> {
        let (file, key) = self.locate(names).ok_or_else(|| {
            KilnError::file(
                &self.path,
                format!("has no tensor `{}` (for {for_what})", names[0]),
            )
        })?;
        let found = file.shape(key).unwrap_or_default();
        if found != shape {
            return Err(KilnError::file(
                &self.path,
                format!("tensor `{key}` has shape {found:?}, expected {shape:?} (for {for_what})"),
            ));
        }
        let mut out = vec![0.0f32; shape.iter().product()];
        file.read(key, 0, &mut out)?;
        Ok(out)
    }
}

impl HfWeights {
    /// The Llama-family decoder parameter at kiln's `path`, of kiln's `shape` (transposed from
    /// transformers' layout where `crate::hf::decoder_name` says so).
    pub fn read_decoder(&self, path: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (name, transform) = super::decoder_name(path, shape);
        // A file saved from the bare decoder (`LlamaModel`) has no `model.` prefix.
        let bare = name.strip_prefix("model.").unwrap_or(&name).to_string();
        let hf = self.read(
            &[&name, &bare],
            &transform.hf_shape(shape),
            &format!("kiln's `{path}`"),
        )?;
        let mut out = vec![0.0f32; hf.len()];
        transform.to_kiln(shape, &hf, &mut out);
        Ok(out)
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

//! A Llama-family checkpoint from a Hugging Face directory into a [`Decoder`], parameter by
//! parameter under the names `crate::hf::decoder_name` gives.

use super::config::DecoderConfig;
use super::model::Decoder;
use crate::error::{KilnError, Result};
use crate::hf::HfWeights;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use std::path::{Path, PathBuf};

/// The `config.json` of `init_from` (a directory, or the file beside a `.safetensors` file).
pub fn config_path(init_from: &Path) -> PathBuf {
    match init_from.is_dir() {
        true => init_from.join("config.json"),
        false => init_from.with_file_name("config.json"),
    }
}

/// Reads the decoder saved at `init_from` (a `save_pretrained` directory, its weights in
/// F32, BF16 or F16) onto `device`; errors name the file and the field or tensor.
pub fn from_hf(init_from: &Path, device: &Device) -> Result<Decoder> {
    let (cfg, raw) = DecoderConfig::read(&config_path(init_from))?;
    let weights = HfWeights::open(init_from)?;
    let read = |path: &str, shape: &[usize]| weights.read_decoder(path, shape);
    filled(Decoder::empty(cfg, raw, device), read)
}

/// The decoder a `config.json` (as a checkpoint's description holds it) describes, with each
/// parameter's values from `read(kiln path, shape)` (a kiln checkpoint's, for `kiln sample`).
pub fn from_values(
    hf_config: &serde_json::Value,
    device: &Device,
    read: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
) -> Result<Decoder> {
    let cfg = DecoderConfig::from_json(hf_config).map_err(KilnError::config)?;
    filled(Decoder::empty(cfg, hf_config.clone(), device), read)
}

fn filled(model: Decoder, read: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>) -> Result<Decoder> {
    let mut loader = Loader {
        path: Vec::new(),
        read,
        error: None,
    };
    let model = model.map(&mut loader);
    match loader.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// Replaces every parameter with `read(path, shape)`.
struct Loader<R> {
    path: Vec<String>,
    read: R,
    error: Option<KilnError>,
}

impl<R: FnMut(&str, &[usize]) -> Result<Vec<f32>>> ModuleMapper for Loader<R> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let path = self.path.join(".");
        let shape: [usize; D] = param.shape().dims();
        match (self.read)(&path, &shape) {
            Ok(values) => {
                param.map(|t| Tensor::from_data(TensorData::new(values, shape), &t.device()))
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

//! `kiln sample`: continues a prompt with a trained model (a kiln checkpoint) or a Hugging Face
//! checkpoint (`--init-from`: GPT-2, or a Llama-family decoder), one process, full parameters,
//! on the training device (`train.device`). Greedy at temperature 0; otherwise softmax sampling
//! over the `top_k` most likely tokens with a random stream keyed by (seed, position), so a
//! seed gives the same text every time. A Llama-family decoder keeps a key/value cache (one
//! position's work per new token; `--no-kv-cache` reruns the whole context instead, for
//! comparison); the GPT reruns its window (the last `max_seq_len` tokens) for each token.

mod cli;

pub use cli::{run as run_command, SampleArgs};

use crate::checkpoint::{read_unit_params, CheckpointReader};
use crate::config::{Config, ModelConfig};
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::hf::HfCheckpoint;
use crate::init::InitSource;
use crate::model::{Gpt, GptConfig, MicroBatch, ModelUnits, Param, UnitModel};
use crate::rng::Rng;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::Path;

/// How to continue a prompt.
#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Sample among the k most likely tokens; 0 = all.
    pub top_k: usize,
    /// Seed of the sampling stream.
    pub seed: u64,
}

/// A model to sample from: the built-in GPT, or a Llama-family decoder.
pub enum Sampler {
    /// kiln's GPT (or GPT-2) with its flat parameters.
    Gpt(Weights),
    /// A Llama, Qwen2 or Phi-3 decoder.
    Decoder(Box<crate::llama::Decoder>),
}

impl Sampler {
    /// The model of the kiln checkpoint in `dir` (verified first) on `device`, and the config
    /// of the run that wrote it.
    pub fn from_checkpoint(dir: &Path, device: &Device) -> Result<(Sampler, Config)> {
        let manifest = crate::checkpoint::verify(dir)?;
        let Some(hf_config) = manifest.model["model"].get("hf_config") else {
            let weights = Weights::from_checkpoint(dir)?;
            let config = weights
                .config
                .clone()
                .expect("a checkpoint has its run's config");
            return Ok((Sampler::Gpt(weights), config));
        };
        // Frozen parameters come from the base the run started from; LoRA adapters are merged.
        let mut values = crate::checkpoint::ModelValues::open(dir, &manifest)?;
        let read = |path: &str, shape: &[usize]| values.merged(path, shape);
        let model = crate::llama::from_values(hf_config, device, read)?;
        Ok((Sampler::Decoder(Box::new(model)), manifest.config.clone()))
    }

    /// The Hugging Face checkpoint at `path` on `device`.
    pub fn from_hf(path: &Path, device: &Device) -> Result<Sampler> {
        let model = ModelConfig {
            init_from: path.display().to_string(),
            ..ModelConfig::default()
        };
        match crate::llama::selected(&model) {
            true => Ok(Sampler::Decoder(Box::new(crate::llama::from_hf(
                path, device,
            )?))),
            false => Ok(Sampler::Gpt(Weights::from_hf(path)?)),
        }
    }

    /// Number of token ids the model reads.
    pub fn vocab(&self) -> usize {
        match self {
            Sampler::Gpt(w) => w.model.config().vocab,
            Sampler::Decoder(d) => d.config().vocab,
        }
    }

    /// `opts.max_tokens` tokens after `prompt`; a decoder uses its key/value cache unless
    /// `kv_cache` is false.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &SampleOptions,
        device: &Device,
        kv_cache: bool,
    ) -> Result<Vec<u32>> {
        let vocab = self.vocab();
        if prompt.is_empty() {
            return Err(KilnError::config(
                "--prompt: empty; the model needs at least one token to continue",
            ));
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(KilnError::config(format!(
                "--prompt: token id {id} is not below the model's vocab ({vocab}); is --tokenizer the one it was trained with?"
            )));
        }
        let mut ids = prompt.to_vec();
        let mut cache = crate::llama::KvCache::default();
        for i in 0..opts.max_tokens {
            let logits = match self {
                Sampler::Gpt(w) => w.next_logits(&ids, device),
                Sampler::Decoder(d) if kv_cache => {
                    d.next_logits(&ids[cache.len()..], &mut cache, device)?
                }
                Sampler::Decoder(d) => d.next_logits(&ids, &mut Default::default(), device)?,
            };
            let mut rng = Rng::derive(opts.seed, &[ids.len() as u64, i as u64]);
            ids.push(choose(&logits, opts, &mut rng));
        }
        Ok(ids[prompt.len()..].to_vec())
    }
}

/// A model with its full parameters, ready to run.
pub struct Weights {
    /// The model.
    pub model: Gpt,
    /// Layout of `params` (world 1).
    pub layout: ModelLayout,
    /// Every unit's flat buffer.
    pub params: Vec<Vec<f32>>,
    /// The config of the run that trained it (a kiln checkpoint), for the tokenizer and device.
    pub config: Option<Config>,
}

impl Weights {
    /// The parameters of the kiln checkpoint in `dir` (verified first).
    pub fn from_checkpoint(dir: &Path) -> Result<Weights> {
        let manifest = crate::checkpoint::verify(dir)?;
        let reader = CheckpointReader::open(dir, &manifest)?;
        let model = Gpt::new(manifest.gpt(dir)?);
        let layout = ModelLayout::new(&model, 1);
        let params = layout
            .units
            .iter()
            .enumerate()
            .map(|(u, unit)| {
                let mut buf = vec![0.0; unit.padded_len];
                read_unit_params(&reader, u, &mut buf[..unit.numel]).map(|()| buf)
            })
            .collect::<Result<_>>()?;
        Ok(Weights {
            model,
            layout,
            params,
            config: Some(manifest.config),
        })
    }

    /// The parameters of a Hugging Face GPT-2 checkpoint (`model.init_from`'s rules, with its
    /// key bias and tying as the file has them).
    pub fn from_hf(path: &Path) -> Result<Weights> {
        let ckpt = HfCheckpoint::open(path)?;
        let shape: GptConfig = crate::hf::model_from_file(&ModelConfig {
            init_from: path.display().to_string(),
            qkv_bias: crate::config::QkvBias::Qkv,
            ..ModelConfig::default()
        })?;
        let model = Gpt::new(shape);
        let layout = ModelLayout::new(&model, 1);
        let init = InitSource::from_checkpoint(ckpt);
        let params = (0..layout.units.len())
            .map(|u| init.unit(&model, u, &layout.units[u]))
            .collect::<Result<_>>()?;
        Ok(Weights {
            model,
            layout,
            params,
            config: None,
        })
    }

    fn unit_tensors(&self, unit: usize, device: &Device) -> Vec<Param> {
        let own = self.layout.units[unit]
            .params
            .iter()
            .map(|p| (unit, p.range()));
        let borrowed = self
            .model
            .borrowed_params(unit)
            .into_iter()
            .map(|r| (r.unit, self.layout.units[r.unit].params[r.index].range()));
        own.chain(borrowed)
            .map(|(u, range)| {
                let data = self.params[u][range].to_vec();
                let len = data.len();
                Tensor::<1>::from_data(TensorData::new(data, [len]), device).into()
            })
            .collect()
    }

    /// The logits of the token after `context` (its last `max_seq_len` tokens).
    pub fn next_logits(&self, context: &[u32], device: &Device) -> Vec<f32> {
        let cfg = *self.model.config();
        let window = &context[context.len().saturating_sub(cfg.max_seq_len)..];
        let t = window.len();
        let ids: Vec<i64> = window.iter().map(|&i| i as i64).collect();
        let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, t]), device);
        let batch = MicroBatch {
            targets: inputs.clone(),
            inputs,
            weights: None,
        };
        let head = self.model.num_units() - 1;
        let mut x = None;
        for unit in 0..head {
            x = Some(
                self.model
                    .forward_unit(unit, &self.unit_tensors(unit, device), x, &batch)
                    .expect("the GPT's units do not fail"),
            );
        }
        let last = x
            .expect("a GPT has units before its head")
            .narrow(1, t - 1, 1);
        let logits = self
            .model
            .logits(&self.unit_tensors(head, device), last)
            .into_data();
        logits.as_slice::<f32>().expect("f32 logits").to_vec()
    }
}

/// The next token from `logits`: the first largest at temperature 0, else a draw from the
/// softmax of `logits / temperature` over the `top_k` largest (in f64, ties by id).
pub fn choose(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if opts.temperature <= 0.0 {
        return order[0] as u32;
    }
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / opts.temperature).exp())
        .collect();
    let mut u = rng.next_f64() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    *order.last().expect("a vocabulary") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_largest_and_top_one_is_greedy() {
        let logits = [0.5, 2.0, -1.0, 2.0];
        let mut rng = Rng::derive(1, &[]);
        let mut o = SampleOptions {
            max_tokens: 1,
            temperature: 0.0,
            top_k: 0,
            seed: 1,
        };
        assert_eq!(choose(&logits, &o, &mut rng), 1);
        o.temperature = 5.0;
        o.top_k = 1;
        assert_eq!(choose(&logits, &o, &mut rng), 1);
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // Two tokens with logits differing by ln 3: drawn about 3:1.
        let logits = [3f32.ln(), 0.0, -50.0];
        let o = SampleOptions {
            max_tokens: 1,
            temperature: 1.0,
            top_k: 2,
            seed: 0,
        };
        let mut counts = [0usize; 3];
        for i in 0..20000 {
            counts[choose(&logits, &o, &mut Rng::derive(9, &[i])) as usize] += 1;
        }
        let share = counts[0] as f64 / 20000.0;
        assert!((share - 0.75).abs() < 0.015, "share {share}");
        assert_eq!(counts[2], 0, "outside top-k");
    }
}

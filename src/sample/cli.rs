//! The `kiln sample` command: where the weights, the tokenizer and the device come from.

use super::{SampleOptions, Sampler};
use crate::config::Config;
use crate::error::{KilnError, Result};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// `kiln sample`'s arguments.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// A kiln checkpoint (a step directory, or a checkpoint.dir to take its latest).
    #[arg(
        long,
        required_unless_present = "init_from",
        conflicts_with = "init_from"
    )]
    pub checkpoint: Option<PathBuf>,
    /// A Hugging Face checkpoint: GPT-2 (save_pretrained directory or .safetensors file), or a
    /// Llama, Qwen2 or Phi-3 directory (its tokenizer.json is the default tokenizer).
    #[arg(long, value_name = "PATH")]
    pub init_from: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Seed of the sampling stream (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `gpt2`, `bytes` or a tokenizer.json; default: the run's `data.tokenizer` (or its
    /// prepared data's meta.json), `bytes` for a `data.source = "text"` run, the
    /// tokenizer.json of an --init-from directory, else `gpt2`.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `auto`, `cpu` or `cuda`; default: the run's `train.device` (`auto` for --init-from).
    #[arg(long)]
    pub device: Option<String>,
    /// Print the generated token ids (space-separated) instead of the text.
    #[arg(long)]
    pub ids: bool,
    /// A Llama-family decoder reruns the whole context for each token instead of keeping its
    /// keys and values (the same tokens, slower: for comparison).
    #[arg(long)]
    pub no_kv_cache: bool,
}

/// Runs `kiln sample`: prints the continuation on stdout.
pub fn run(args: &SampleArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(KilnError::config(format!(
            "--temperature: {} must be a number ≥ 0 (0 is greedy)",
            args.temperature
        )));
    }
    // The run's config (a checkpoint's) gives the default tokenizer and device.
    let checkpoint = match &args.checkpoint {
        Some(ck) => Some(crate::checkpoint::locate(
            &ck.display().to_string(),
            &crate::config::CheckpointConfig::default(),
        )?),
        None => None,
    };
    let run_config = match &checkpoint {
        // The manifest alone: the files are verified once, when the weights are read.
        Some(dir) => Some(crate::checkpoint::Manifest::read(dir)?.config),
        None => None,
    };
    let device_setting = match &args.device {
        Some(d) => d.clone(),
        None => run_config
            .as_ref()
            .map_or("auto".into(), |c| c.train.device.clone()),
    };
    let setting = crate::device::DeviceSetting::parse(&device_setting)?;
    let device = crate::device::for_rank(setting, 0, 1)?.burn_device();
    let sampler = match (&checkpoint, &args.init_from) {
        (Some(dir), _) => Sampler::from_checkpoint(dir, &device)?.0,
        (None, Some(path)) => Sampler::from_hf(path, &device)?,
        (None, None) => unreachable!("clap requires one of --checkpoint, --init-from"),
    };
    let name = match (&args.tokenizer, &run_config, &args.init_from) {
        (Some(name), _, _) => name.clone(),
        (None, Some(config), _) => run_tokenizer(config),
        // A Hugging Face directory's own tokenizer.json, when it has one.
        (None, None, Some(path)) if path.join("tokenizer.json").is_file() => {
            path.join("tokenizer.json").display().to_string()
        }
        (None, None, _) => "gpt2".into(),
    };
    let tokenizer = match Tokenizer::from_name(&name) {
        // A tokenizer.json that does not parse says so itself.
        Err(_) if !std::path::Path::new(&name).exists() => Err(KilnError::config(format!(
            "--tokenizer: `{name}` is not one of {}",
            crate::tokenizer::TOKENIZER_NAMES
        ))),
        found => found,
    }?;
    let opts = SampleOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let prompt = tokenizer.encode(&args.prompt)?;
    let out = sampler.generate(&prompt, &opts, &device, !args.no_kv_cache)?;
    if args.ids {
        let ids: Vec<String> = out.iter().map(u32::to_string).collect();
        println!("{}", ids.join(" "));
    } else {
        println!("{}", tokenizer.decode(&out));
    }
    Ok(())
}

/// The tokenizer a run's data was made with: `data.tokenizer` when the config has it, else the
/// `tokenizer` of a `meta.json` beside the token file, else `bytes` for text and `gpt2` for
/// token files (nanoGPT's and llm.c's GPT-2 files).
fn run_tokenizer(config: &Config) -> String {
    let json = serde_json::to_value(config).unwrap_or_default();
    if let Some(name) = json["data"]["tokenizer"].as_str().filter(|s| !s.is_empty()) {
        return name.to_string();
    }
    let meta = Path::new(&config.data.path).with_file_name("meta.json");
    if let Some(name) = std::fs::read_to_string(meta)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["tokenizer"].as_str().map(str::to_string))
    {
        return name;
    }
    match config.data.source.as_str() {
        "text" => "bytes".into(),
        _ => "gpt2".into(),
    }
}

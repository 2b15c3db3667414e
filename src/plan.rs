//! Config as resolved: [`Plan`] is validated once at start-up against the world size and holds
//! everything the run needs as plain values. Errors name the key and what was expected.

use crate::config::Config;
use crate::error::{KilnError, Result};
use crate::model::GptConfig;
use crate::offload::Tier;
use crate::optim::{AdamWConfig, LrSchedule};

/// The validated, resolved run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The config it came from (for manifests and summaries).
    pub config: Config,
    /// Model shape.
    pub model: GptConfig,
    /// Number of ranks.
    pub world: usize,
    /// Sequences per micro-batch per rank.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step per rank.
    pub grad_accum: usize,
    /// Sequences per optimizer step over all ranks.
    pub global_batch: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Gradient clipping threshold (0 = off).
    pub clip_grad: f64,
    /// ZeRO stage (0 = DDP).
    pub stage: u8,
    /// Bucket size in bytes (after the first, 1 MiB, bucket).
    pub bucket_bytes: usize,
    /// Where optimizer states live.
    pub offload: Tier,
}

fn bad(key: &str, msg: impl std::fmt::Display) -> KilnError {
    KilnError::config(format!("key `{key}`: {msg}"))
}

fn positive(key: &str, v: Option<usize>) -> Result<Option<usize>> {
    match v {
        Some(0) => Err(bad(key, "must be at least 1")),
        v => Ok(v),
    }
}

impl Plan {
    /// Validates `config` for `world` ranks.
    pub fn resolve(config: &Config, world: usize) -> Result<Plan> {
        let m = &config.model;
        let mut model = GptConfig::preset(&m.preset).ok_or_else(|| {
            bad(
                "model.preset",
                format!("`{}` is not one of {}", m.preset, GptConfig::PRESETS),
            )
        })?;
        if let Some(v) = positive("model.d_model", m.d_model)? {
            model.d_model = v;
        }
        if let Some(v) = positive("model.n_layers", m.n_layers)? {
            model.n_layers = v;
        }
        if let Some(v) = positive("model.n_heads", m.n_heads)? {
            model.n_heads = v;
        }
        if let Some(v) = positive("model.vocab", m.vocab)? {
            model.vocab = v;
        }
        if let Some(v) = positive("model.max_seq_len", m.max_seq_len)? {
            model.max_seq_len = v;
            model.seq_len = v;
        }
        if let Some(v) = positive("model.seq_len", m.seq_len)? {
            if v > model.max_seq_len {
                return Err(bad(
                    "model.seq_len",
                    format!(
                        "{v} exceeds the model's maximum sequence length {}",
                        model.max_seq_len
                    ),
                ));
            }
            model.seq_len = v;
        }
        if model.d_model % model.n_heads != 0 {
            return Err(bad(
                "model.n_heads",
                format!(
                    "{} does not divide model.d_model = {}",
                    model.n_heads, model.d_model
                ),
            ));
        }

        let d = &config.data;
        if !["markov", "text", "tokens"].contains(&d.source.as_str()) {
            return Err(bad(
                "data.source",
                format!("`{}` is not one of markov, text, tokens", d.source),
            ));
        }
        if d.source == "markov" {
            if d.markov_symbols < 2 || d.markov_symbols > model.vocab {
                return Err(bad(
                    "data.markov_symbols",
                    format!(
                        "{} must be between 2 and the model's vocab ({})",
                        d.markov_symbols, model.vocab
                    ),
                ));
            }
            if !(d.markov_sharpness.is_finite() && d.markov_sharpness >= 0.0) {
                return Err(bad(
                    "data.markov_sharpness",
                    format!("{} must be a number ≥ 0", d.markov_sharpness),
                ));
            }
        }

        let t = &config.train;
        if t.steps == 0 {
            return Err(bad("train.steps", "must be at least 1"));
        }
        if t.micro_batch == 0 {
            return Err(bad("train.micro_batch", "must be at least 1"));
        }
        if t.global_batch == 0 || t.global_batch % (t.micro_batch * world) != 0 {
            return Err(bad(
                "train.global_batch",
                format!(
                    "{} is not a positive multiple of train.micro_batch ({}) × world size ({}); DeepSpeed's convention is global_batch = micro_batch × grad_accum × world",
                    t.global_batch, t.micro_batch, world
                ),
            ));
        }
        let finite_positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("{v} must be a positive number")))
            }
        };
        finite_positive("train.lr", t.lr)?;
        finite_positive("train.eps", t.eps)?;
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(key, format!("{v} must be in [0, 1)")));
            }
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(bad(
                "train.min_lr_ratio",
                format!("{} must be in [0, 1]", t.min_lr_ratio),
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(bad(
                "train.weight_decay",
                format!("{} must be ≥ 0", t.weight_decay),
            ));
        }
        if !(t.clip_grad.is_finite() && t.clip_grad >= 0.0) {
            return Err(bad(
                "train.clip_grad",
                format!("{} must be ≥ 0 (0 turns clipping off)", t.clip_grad),
            ));
        }

        let p = &config.parallel;
        if p.stage > 3 {
            return Err(bad(
                "parallel.stage",
                format!("{} must be 0 (DDP), 1, 2 or 3", p.stage),
            ));
        }
        if !(p.bucket_mb.is_finite() && p.bucket_mb > 0.0) {
            return Err(bad(
                "parallel.bucket_mb",
                format!("{} must be a positive number of MiB", p.bucket_mb),
            ));
        }
        let offload = Tier::parse(&config.offload.optimizer).ok_or_else(|| {
            bad(
                "offload.optimizer",
                format!(
                    "`{}` is not one of none, cpu, nvme",
                    config.offload.optimizer
                ),
            )
        })?;
        let o = &config.offload;
        if !(o.chunk_mb.is_finite() && o.chunk_mb > 0.0) {
            return Err(bad(
                "offload.chunk_mb",
                format!("{} must be a positive number of MiB", o.chunk_mb),
            ));
        }
        if o.buffer_count == 0 {
            return Err(bad("offload.buffer_count", "must be at least 1"));
        }
        if offload == Tier::Nvme && o.nvme_path.is_empty() {
            return Err(bad(
                "offload.nvme_path",
                "must name a directory for the nvme tier",
            ));
        }
        if !["auto", "local", "mpi", "nccl"].contains(&config.comm.backend.as_str()) {
            return Err(bad(
                "comm.backend",
                format!(
                    "`{}` is not one of auto, local, mpi, nccl",
                    config.comm.backend
                ),
            ));
        }

        Ok(Plan {
            config: config.clone(),
            model,
            world,
            micro_batch: t.micro_batch,
            grad_accum: t.global_batch / (t.micro_batch * world),
            global_batch: t.global_batch,
            steps: t.steps,
            schedule: LrSchedule {
                lr: t.lr,
                min_lr_ratio: t.min_lr_ratio,
                warmup: t.warmup_steps,
                steps: t.steps,
            },
            adamw: AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
            clip_grad: t.clip_grad,
            stage: p.stage,
            bucket_bytes: (p.bucket_mb * 1024.0 * 1024.0) as usize,
            offload,
        })
    }
}

//! Config as resolved: [`Plan`] is validated once at start-up against the world size and holds
//! everything the run needs as plain values. Errors name the key and what was expected.

use crate::config::{Config, MicroBatch, ModelConfig, TrainConfig};
use crate::error::{KilnError, Result};
use crate::model::{GptConfig, ModelUnits};
use crate::offload::Tier;
use crate::optim::{AdamWConfig, DsSchedule, LrSchedule, OptimizerKind, ScheduleKind, WarmupShape};

/// The validated, resolved run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The config it came from (for manifests and summaries).
    pub config: Config,
    /// The built-in GPT's shape; `None` when the model comes from the library's user
    /// ([`crate::api`]), who describes it.
    pub model: Option<GptConfig>,
    /// The model's own description as data (a GPT: its shape), stored in checkpoint manifests
    /// and compared on resume.
    pub model_desc: serde_json::Value,
    /// Number of ranks.
    pub world: usize,
    /// Sequences per micro-batch per rank.
    pub micro_batch: usize,
    /// `train.micro_batch = "auto"`: `micro_batch` is each rank's whole share of the global
    /// batch until `memory::auto_micro_batch` chooses the largest that fits.
    pub micro_batch_auto: bool,
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
    /// `train.optimizer`.
    pub optimizer: OptimizerKind,
    /// Gradient clipping threshold (0 = off).
    pub clip_grad: f64,
    /// ZeRO stage (0 = DDP).
    pub stage: u8,
    /// Bucket size in bytes (after the first, 1 MiB, bucket).
    pub bucket_bytes: usize,
    /// Where optimizer states live.
    pub offload: Tier,
    /// Where ZeRO-3 keeps the parameter shards (`offload.param`; `None` below stage 3).
    pub param_offload: Tier,
    /// `train.device`: which device each rank computes on is chosen where it runs.
    pub device: crate::device::DeviceSetting,
    /// `train.recompute` resolved: one flag per unit, whether it recomputes its forward in
    /// backward. (Under ZeRO-3 a released embedding recomputes whatever this says.)
    pub recompute: Vec<bool>,
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
    /// Validates `config` for `world` ranks and the built-in GPT that `[model]` describes,
    /// trained on the data `[data]` names.
    pub fn resolve(config: &Config, world: usize) -> Result<Plan> {
        let model = resolve_model(&config.model)?;
        // The built-in GPT keeps its own flat layout outside burn's module tree, where LoRA's
        // reparameterisation and freezing by module path live (`api::lora`).
        for (key, set) in [
            ("lora", config.lora.enabled()),
            ("train.freeze", !config.train.freeze.is_empty()),
            ("train.precision", config.train.precision != "f32"),
        ] {
            if set {
                return Err(bad(
                    key,
                    "applies to models trained through the library API (Llama, Qwen2 and \
                     Phi-3 checkpoints, your own burn model), not to the built-in GPT",
                ));
            }
        }

        let d = &config.data;
        crate::config::check_choice("data.source", &d.source, crate::config::DATA_SOURCES)?;
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

        let gpt = crate::model::Gpt::new(model);
        let names: Vec<String> = (0..gpt.num_units()).map(|u| gpt.unit_name(u)).collect();
        let mut plan = Plan::resolve_training(config, world, &names)?;
        plan.model = Some(model);
        plan.model_desc = serde_json::to_value(model).expect("a GptConfig is plain data");
        Ok(plan)
    }

    /// Validates the model-agnostic part of `config` — `[train]`, `[parallel]`, `[offload]`,
    /// `[comm]` — for `world` ranks and a model whose units are `unit_names` (for
    /// `train.recompute`). `[model]` and `[data]` are not read: the library's user brings both.
    pub fn resolve_training(config: &Config, world: usize, unit_names: &[String]) -> Result<Plan> {
        let t = &config.train;
        if t.steps == 0 {
            return Err(bad("train.steps", "must be at least 1"));
        }
        check_threads(t)?;
        crate::config::check_choice("train.precision", &t.precision, crate::config::PRECISIONS)?;
        check_fp16(config)?;
        let batch = resolve_batch(t, world)?;
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
        let param_offload = Tier::parse(&o.param).ok_or_else(|| {
            bad(
                "offload.param",
                format!("`{}` is not one of none, cpu, nvme", o.param),
            )
        })?;
        if param_offload != Tier::None && p.stage != 3 {
            return Err(bad(
                "offload.param",
                format!(
                    "`{}` needs parallel.stage = 3 (parameters are sharded only there; stage is {})",
                    o.param, p.stage
                ),
            ));
        }
        if (offload == Tier::Nvme || param_offload == Tier::Nvme) && o.nvme_path.is_empty() {
            return Err(bad(
                "offload.nvme_path",
                "must name a directory for the nvme tier",
            ));
        }
        let backend = &config.comm.backend;
        crate::config::check_choice("comm.backend", backend, crate::config::COMM_BACKENDS)?;

        Ok(Plan {
            config: config.clone(),
            model: None,
            model_desc: serde_json::Value::Null,
            world,
            micro_batch: batch.micro,
            micro_batch_auto: t.micro_batch == Some(MicroBatch::Auto),
            grad_accum: batch.accum,
            global_batch: batch.global,
            steps: t.steps,
            schedule: resolve_schedule(t)?,
            adamw: AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
            optimizer: {
                crate::config::check_choice("train.optimizer", &t.optimizer, OptimizerKind::NAMES)?;
                OptimizerKind::parse(&t.optimizer).expect("checked just above")
            },
            clip_grad: t.clip_grad,
            stage: p.stage,
            bucket_bytes: (p.bucket_mb * 1024.0 * 1024.0) as usize,
            offload,
            param_offload,
            device: crate::device::DeviceSetting::parse(&t.device)?,
            recompute: resolve_recompute(&t.recompute, unit_names)?,
        })
    }

    /// The built-in GPT's shape.
    ///
    /// # Panics
    /// On a plan for a user's model: only the GPT's own paths (the CLI's data, validation,
    /// sampling and memory formulas) call this.
    pub fn gpt(&self) -> &GptConfig {
        self.model
            .as_ref()
            .expect("a path of the built-in GPT reached with a user's model")
    }
}

/// `train.threads`: at most the cores this process may use. More compute threads than cores
/// only adds contention, and a typo like 100000 would spend minutes creating threads before
/// anything is said — so the launcher checks it too, before it builds a rank's thread pool.
pub fn check_threads(t: &TrainConfig) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if t.threads > cores {
        return Err(bad(
            "train.threads",
            format!(
                "{} is more than the {cores} cores this process may use (0 = cores ÷ ranks on this machine)",
                t.threads
            ),
        ));
    }
    Ok(())
}

/// `train.recompute` as one flag per unit, the units named `names`.
fn resolve_recompute(setting: &crate::config::Recompute, names: &[String]) -> Result<Vec<bool>> {
    setting.resolve(names).map_err(|e| {
        bad(
            "train.recompute",
            format!("{e}; expected {}", crate::config::RECOMPUTE_FORMS),
        )
    })
}

/// `[fp16]` is usable when `train.precision = "fp16"` reads it (otherwise it is not read, as
/// DeepSpeed's `fp16` keys are not while `enabled` is false): a static `loss_scale` beside a
/// dynamic-scaling key set away from its default is a conflict, named.
fn check_fp16(config: &Config) -> Result<()> {
    if config.train.precision != "fp16" {
        return Ok(());
    }
    let f = &config.fp16;
    let d = crate::config::Fp16Config::default();
    if f.loss_scale > 0.0 {
        let dynamic = [
            (
                "initial_scale_power",
                f.initial_scale_power != d.initial_scale_power,
            ),
            (
                "loss_scale_window",
                f.loss_scale_window != d.loss_scale_window,
            ),
            ("hysteresis", f.hysteresis != d.hysteresis),
            (
                "consecutive_hysteresis",
                f.consecutive_hysteresis != d.consecutive_hysteresis,
            ),
            ("min_loss_scale", f.min_loss_scale != d.min_loss_scale),
        ];
        if let Some((key, _)) = dynamic.iter().find(|(_, set)| *set) {
            return Err(bad(
                &format!("fp16.{key}"),
                format!(
                    "tunes dynamic loss scaling, but fp16.loss_scale = {} fixes the scale; \
                     leave one of them out",
                    f.loss_scale
                ),
            ));
        }
    }
    crate::optim::LossScaler::new(f).map(|_| ())
}

/// `config::load_layers` for the built-in GPT: a recipe, a DeepSpeed config and `--set`s,
/// with DeepSpeed's model-scaled "auto" sizes taken from the GPT `[model]` describes.
pub fn load_layers(
    path: Option<&std::path::Path>,
    deepspeed: Option<&std::path::Path>,
    sets: &[String],
) -> Result<(Config, crate::config::Translation)> {
    crate::config::load_layers(path, deepspeed, sets, &|model| {
        let gpt = crate::model::Gpt::new(resolve_model(model)?);
        Ok(gpt.unit_params(1).iter().map(|p| p.numel()).sum())
    })
}

/// The model shape `[model]` describes: the preset with any fields overridden.
pub fn resolve_model(m: &ModelConfig) -> Result<GptConfig> {
    if !m.init_from.is_empty() {
        return crate::hf::model_from_file(m);
    }
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
    model.key_bias = m.qkv_bias == crate::config::QkvBias::Qkv;
    model.tie_embeddings = m.tie_embeddings.unwrap_or(false);
    if model.d_model % model.n_heads != 0 {
        return Err(bad(
            "model.n_heads",
            format!(
                "{} does not divide model.d_model = {}",
                model.n_heads, model.d_model
            ),
        ));
    }
    Ok(model)
}

/// Global batch, micro-batch and accumulation steps, with global = micro × accum × world.
struct Batch {
    global: usize,
    micro: usize,
    accum: usize,
}

/// Micro-batch size when neither it nor both other batch keys are given.
const DEFAULT_MICRO_BATCH: usize = 8;

/// Any two of global_batch, micro_batch and grad_accum determine the third, as in DeepSpeed;
/// all three must agree. With fewer, micro_batch defaults to 8, then grad_accum to 1 — except
/// that with none given the global batch is 8 (kiln's default recipe).
fn resolve_batch(t: &TrainConfig, world: usize) -> Result<Batch> {
    let micro_batch = match t.micro_batch {
        Some(MicroBatch::Auto) => return resolve_auto_batch(t, world),
        m => m.and_then(MicroBatch::size),
    };
    for (key, v) in [
        ("train.global_batch", t.global_batch),
        ("train.micro_batch", micro_batch),
        ("train.grad_accum", t.grad_accum),
    ] {
        positive(key, v)?;
    }
    let not_multiple = |global: usize, of: &str| {
        bad(
            "train.global_batch",
            format!(
                "{global} is not a positive multiple of {of} × world size ({world}); DeepSpeed's convention is global_batch = micro_batch × grad_accum × world"
            ),
        )
    };
    let (global, micro, accum) = match (t.global_batch, micro_batch, t.grad_accum) {
        (Some(g), Some(m), Some(a)) => {
            if g != m * a * world {
                return Err(KilnError::config(format!(
                    "keys `train.global_batch` = {g}, `train.micro_batch` = {m} and `train.grad_accum` = {a} disagree: {m} × {a} × world {world} = {} (DeepSpeed: train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world); give any two",
                    m * a * world
                )));
            }
            (g, m, a)
        }
        (Some(g), None, Some(a)) => {
            if g % (a * world) != 0 {
                return Err(not_multiple(g, &format!("train.grad_accum ({a})")));
            }
            (g, g / (a * world), a)
        }
        (None, m, a) if m.is_some() || a.is_some() => {
            let (m, a) = (m.unwrap_or(DEFAULT_MICRO_BATCH), a.unwrap_or(1));
            (m * a * world, m, a)
        }
        (g, m, _) => {
            let (g, m) = (g.unwrap_or(8), m.unwrap_or(DEFAULT_MICRO_BATCH));
            if g % (m * world) != 0 {
                return Err(not_multiple(g, &format!("train.micro_batch ({m})")));
            }
            (g, m, g / (m * world))
        }
    };
    Ok(Batch {
        global,
        micro,
        accum,
    })
}

/// `train.micro_batch = "auto"`: the global batch (given, or 8) split evenly over the ranks,
/// one micro-batch each until the memory estimate chooses (`memory::auto_micro_batch`); the
/// accumulation is then what the choice leaves, so `train.grad_accum` may not be given.
fn resolve_auto_batch(t: &TrainConfig, world: usize) -> Result<Batch> {
    if t.grad_accum.is_some() {
        return Err(bad(
            "train.grad_accum",
            "is chosen with train.micro_batch = \"auto\" (micro × accum = each rank's share of train.global_batch); give train.global_batch only",
        ));
    }
    positive("train.global_batch", t.global_batch)?;
    let global = t.global_batch.unwrap_or(8);
    if global % world != 0 {
        return Err(bad(
            "train.global_batch",
            format!("{global} is not a multiple of the world size ({world})"),
        ));
    }
    Ok(Batch {
        global,
        micro: global / world,
        accum: 1,
    })
}

/// The learning-rate schedule `train.schedule` names, with its keys checked.
fn resolve_schedule(t: &TrainConfig) -> Result<LrSchedule> {
    let deepspeed_names = ["warmup", "warmup_decay", "warmup_cosine"];
    let name = t.schedule.as_str();
    if !["cosine", "constant"].contains(&name) && !deepspeed_names.contains(&name) {
        return Err(bad(
            "train.schedule",
            format!("`{name}` is not one of cosine, constant, warmup, warmup_decay, warmup_cosine"),
        ));
    }
    // A key that would silently do nothing is an error: the user meant something by it.
    let only_for = |key: &str, set: bool, names: &[&str]| {
        if set && !names.contains(&name) {
            Err(bad(
                key,
                format!(
                    "applies to train.schedule = {}, not `{name}`",
                    names.join(" | ")
                ),
            ))
        } else {
            Ok(())
        }
    };
    only_for(
        "train.warmup_type",
        t.warmup_type.is_some(),
        &deepspeed_names,
    )?;
    only_for(
        "train.warmup_min_lr",
        t.warmup_min_lr.is_some(),
        &["warmup", "warmup_decay"],
    )?;
    only_for(
        "train.warmup_min_ratio",
        t.warmup_min_ratio.is_some(),
        &["warmup_cosine"],
    )?;
    only_for(
        "train.decay_steps",
        t.decay_steps.is_some(),
        &["cosine", "warmup_decay", "warmup_cosine"],
    )?;
    let shape = match &t.warmup_type {
        None => WarmupShape::Log,
        Some(s) => WarmupShape::parse(s).ok_or_else(|| {
            bad(
                "train.warmup_type",
                format!("`{s}` is not one of log, linear"),
            )
        })?,
    };
    let warmup_min_lr = t.warmup_min_lr.unwrap_or(0.0);
    if !(warmup_min_lr.is_finite() && (0.0..=t.lr).contains(&warmup_min_lr)) {
        return Err(bad(
            "train.warmup_min_lr",
            format!("{warmup_min_lr} must be between 0 and train.lr ({})", t.lr),
        ));
    }
    for (key, v) in [
        ("train.warmup_min_ratio", t.warmup_min_ratio.unwrap_or(0.0)),
        ("train.min_lr_ratio", t.min_lr_ratio),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(bad(key, format!("{v} must be in [0, 1]")));
        }
    }
    let decay_steps = positive("train.decay_steps", t.decay_steps.map(|v| v as usize))?
        .map_or(t.steps, |v| v as u64);
    let deepspeed = |schedule| ScheduleKind::DeepSpeed { shape, schedule };
    let kind = match name {
        "cosine" => ScheduleKind::Cosine {
            min_lr_ratio: t.min_lr_ratio,
        },
        "constant" => ScheduleKind::Constant,
        "warmup" => deepspeed(DsSchedule::WarmupLr { warmup_min_lr }),
        "warmup_decay" => deepspeed(DsSchedule::WarmupDecayLr { warmup_min_lr }),
        _ => deepspeed(DsSchedule::WarmupCosineLr {
            warmup_min_ratio: t.warmup_min_ratio.unwrap_or(0.0),
            cos_min_ratio: t.min_lr_ratio,
        }),
    };
    Ok(LrSchedule {
        lr: t.lr,
        warmup: t.warmup_steps,
        decay_steps,
        kind,
    })
}

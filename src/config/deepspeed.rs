//! DeepSpeed's `ds_config.json` read as kiln keys (`kiln train --deepspeed FILE`).
//!
//! Every key DeepSpeed users set for a feature kiln has becomes the kiln key with the same
//! meaning (DeepSpeed's config-json documentation is the reference; its sizes are element
//! counts). A key kiln cannot honour is an error naming it and why; a key that only tunes
//! DeepSpeed's internals is a warning naming it. `"auto"` — what the Hugging Face Trainer writes
//! and then fills in from its own arguments — takes kiln's value for that key instead (from
//! `--config`, `--set`, or kiln's default).

use crate::error::{KilnError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// What a DeepSpeed config says, in kiln's terms.
#[derive(Debug, Default)]
pub struct Translation {
    /// kiln keys and values, applied between the base recipe and `--set` overrides.
    pub sets: Vec<(String, toml::Value)>,
    /// Keys kiln ignores, one line each (`FILE: key …`).
    pub warnings: Vec<String>,
    /// How a key was read where that is not obvious, one line each.
    pub notes: Vec<String>,
}

/// Reads `path`. `block_params` gives the parameter count of one transformer block of the
/// configured model (DeepSpeed's stage-3 prefetch budget is in elements; kiln's in units).
pub fn translate(path: &Path, block_params: &dyn Fn() -> Result<usize>) -> Result<Translation> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KilnError::file(path, format!("cannot read DeepSpeed config: {e}")))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| {
        KilnError::file(
            path,
            format!("not valid JSON: {e} (expected a DeepSpeed config object)"),
        )
    })?;
    let Value::Object(root) = root else {
        return Err(KilnError::file(
            path,
            "expected a JSON object (a DeepSpeed config)",
        ));
    };
    let mut r = Reader {
        path: path.to_path_buf(),
        out: Translation::default(),
    };
    // The scheduler last: its warmup_max_lr replaces the optimizer's lr, as under DeepSpeed.
    let (scheduler, rest): (Vec<_>, Vec<_>) = root.iter().partition(|(k, _)| *k == "scheduler");
    for (key, v) in rest.into_iter().chain(scheduler) {
        r.top_level(key, v, block_params)?;
    }
    if !root.contains_key("scheduler") {
        // DeepSpeed without a scheduler keeps the optimizer's learning rate from the first step.
        r.set("train.schedule", "constant");
        r.set("train.warmup_steps", 0i64);
    }
    Ok(r.out)
}

struct Reader {
    path: PathBuf,
    out: Translation,
}

/// DeepSpeed keys that tune only DeepSpeed's own machinery; kiln has nothing to set for them.
const INTERNALS: &[&str] = &[
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "dump_state",
    "memory_breakdown",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "monitor_config",
    "aio",
    "checkpoint",
    "timers",
    "autotuning",
    "sparse_gradients",
    "prescale_gradients",
    "gradient_predivide_factor",
    "disable_allgather",
    "zero_optimization.sub_group_size",
    "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save",
    "zero_optimization.round_robin_gradients",
    "zero_optimization.elastic_checkpoint",
    "zero_optimization.ignore_unused_parameters",
    "zero_optimization.load_from_fp32_weights",
    "zero_optimization.memory_efficient_linear",
    "zero_optimization.use_multi_rank_bucket_allreduce",
    "zero_optimization.stage3_module_granularity_threshold",
    "zero_optimization.model_persistence_threshold",
    "zero_optimization.log_trace_cache_warnings",
    "zero_optimization.pipeline_loading_checkpoint",
    "zero_optimization.override_module_apply",
    "zero_optimization.legacy_stage1",
    "zero_optimization.stage3_use_all_reduce_for_fetch_params",
    "zero_optimization.allgather_partitions",
    "zero_optimization.allgather_bucket_size",
    "zero_optimization.offload_optimizer.pipeline",
    "zero_optimization.offload_optimizer.pipeline_read",
    "zero_optimization.offload_optimizer.pipeline_write",
    "zero_optimization.offload_optimizer.fast_init",
    "activation_checkpointing.contiguous_memory_optimization",
    "activation_checkpointing.number_checkpoints",
    "activation_checkpointing.synchronize_checkpoint_boundary",
    "activation_checkpointing.profile",
    "optimizer.params.torch_adam",
    "optimizer.params.fused",
    "scheduler.params.last_batch_iteration",
];

/// Sections that switch on a feature kiln does not have; harmless while `enabled` is false.
const UNSUPPORTED_FEATURES: &[(&str, &str)] = &[
    (
        "amp",
        "kiln trains in f32; mixed precision is not built yet",
    ),
    (
        "bf16",
        "kiln trains in f32; mixed precision is not built yet",
    ),
    (
        "fp16",
        "kiln trains in f32; fp16 with loss scaling is not built",
    ),
    ("elasticity", "elastic batch sizes are not built"),
    (
        "curriculum_learning",
        "curriculum learning is not built; the data rows depend only on (seed, step)",
    ),
    (
        "data_efficiency",
        "data sampling and routing are not built; the data rows depend only on (seed, step)",
    ),
    ("compression_training", "compression training is not built"),
    ("sparse_attention", "sparse attention is not built"),
];

impl Reader {
    fn set(&mut self, key: &str, v: impl Into<toml::Value>) {
        self.out.sets.push((key.to_string(), v.into()));
    }

    fn error(&self, key: &str, msg: impl std::fmt::Display) -> KilnError {
        KilnError::file(&self.path, format!("`{key}`: {msg}"))
    }

    fn warn(&mut self, key: &str, why: &str) {
        let line = format!("{}: `{key}` {why}; ignored", self.path.display());
        self.out.warnings.push(line);
    }

    fn note(&mut self, line: String) {
        self.out
            .notes
            .push(format!("{}: {line}", self.path.display()));
    }

    fn top_level(
        &mut self,
        key: &str,
        v: &Value,
        block_params: &dyn Fn() -> Result<usize>,
    ) -> Result<()> {
        match key {
            "train_batch_size" => self.int_to(key, v, "train.global_batch")?,
            "train_micro_batch_size_per_gpu" => self.int_to(key, v, "train.micro_batch")?,
            "gradient_accumulation_steps" => self.int_to(key, v, "train.grad_accum")?,
            "gradient_clipping" => {
                if let Some(x) = self.number(key, v)? {
                    self.set("train.clip_grad", x);
                }
            }
            "steps_per_print" => self.int_to(key, v, "output.log_every")?,
            // kiln always times compute, exposed communication and the optimizer
            // (metrics.jsonl; the output.log_every line).
            "wall_clock_breakdown" => {
                self.boolean(key, v)?;
            }
            "optimizer" => self.optimizer(self.object(key, v)?)?,
            "scheduler" => self.scheduler(self.object(key, v)?)?,
            "zero_optimization" => self.zero(self.object(key, v)?, block_params)?,
            "activation_checkpointing" => self.activation_checkpointing(self.object(key, v)?)?,
            "communication_data_type" => self.fp32_only(key, v)?,
            "data_types" => {
                for (k, dv) in self.object(key, v)? {
                    let full = format!("{key}.{k}");
                    match k.as_str() {
                        "grad_accum_dtype" => self.fp32_only(&full, dv)?,
                        _ => self.warn(&full, "is not a DeepSpeed key kiln knows"),
                    }
                }
            }
            _ => {
                if let Some((_, why)) = UNSUPPORTED_FEATURES.iter().find(|(k, _)| *k == key) {
                    if self.enabled(key, v)? {
                        return Err(self.error(&format!("{key}.enabled"), why));
                    }
                } else if INTERNALS.contains(&key) {
                    self.warn(key, "only tunes DeepSpeed's internals");
                } else {
                    self.warn(key, "is not a DeepSpeed key kiln knows");
                }
            }
        }
        Ok(())
    }

    fn optimizer(&mut self, o: &Map<String, Value>) -> Result<()> {
        let kind = match o.get("type") {
            Some(v) => self.string("optimizer.type", v)?,
            None => return Err(self.error("optimizer.type", "missing; expected Adam or AdamW")),
        };
        let adam = kind.eq_ignore_ascii_case("adam");
        if !adam && !kind.eq_ignore_ascii_case("adamw") {
            return Err(self.error(
                "optimizer.type",
                format!("`{kind}` is not implemented; kiln's optimizer is AdamW (Adam, AdamW)"),
            ));
        }
        let empty = Map::new();
        let params = match o.get("params") {
            Some(v) => self.object("optimizer.params", v)?,
            None => &empty,
        };
        let mut weight_decay = 0.0;
        let mut adam_w_mode = true;
        for (k, v) in params {
            let key = format!("optimizer.params.{k}");
            match k.as_str() {
                "lr" => self.number_to(&key, v, "train.lr")?,
                "eps" => self.number_to(&key, v, "train.eps")?,
                "weight_decay" => {
                    if let Some(x) = self.number(&key, v)? {
                        weight_decay = x;
                        self.set("train.weight_decay", x);
                    }
                }
                "betas" => {
                    if v.as_str() == Some("auto") {
                        continue;
                    }
                    let pair = v
                        .as_array()
                        .filter(|a| a.len() == 2)
                        .and_then(|a| Some((a[0].as_f64()?, a[1].as_f64()?)))
                        .ok_or_else(|| {
                            self.error(&key, "expected two numbers, e.g. [0.9, 0.999]")
                        })?;
                    self.set("train.beta1", pair.0);
                    self.set("train.beta2", pair.1);
                }
                "adam_w_mode" => adam_w_mode = self.boolean(&key, v)?.unwrap_or(true),
                "bias_correction" => {
                    if self.boolean(&key, v)? == Some(false) {
                        return Err(self.error(&key, "false is not implemented; kiln's AdamW always corrects the moment bias (PyTorch semantics)"));
                    }
                }
                "amsgrad" => {
                    if self.boolean(&key, v)? == Some(true) {
                        return Err(self.error(&key, "true is not implemented"));
                    }
                }
                _ => self.ignore(&key),
            }
        }
        if adam && !adam_w_mode && weight_decay != 0.0 {
            return Err(self.error("optimizer.params.adam_w_mode", "false (L2 weight decay added to the gradient) is not implemented; kiln's AdamW decays decoupled, which is DeepSpeed's default"));
        }
        if adam {
            self.note(
                "optimizer `Adam` is read as AdamW (DeepSpeed's default, adam_w_mode = true)"
                    .into(),
            );
        }
        if weight_decay != 0.0 {
            self.note("weight_decay applies to weights, not to biases or LayerNorm gains (the Hugging Face Trainer's parameter groups; kiln always does this)".into());
        }
        Ok(())
    }

    fn scheduler(&mut self, o: &Map<String, Value>) -> Result<()> {
        let kind = match o.get("type") {
            Some(v) => self.string("scheduler.type", v)?,
            None => {
                return Err(self.error(
                    "scheduler.type",
                    "missing; expected WarmupLR, WarmupDecayLR or WarmupCosineLR",
                ))
            }
        };
        let (schedule, cosine) = match kind.as_str() {
            "WarmupLR" => ("warmup", false),
            "WarmupDecayLR" => ("warmup_decay", false),
            "WarmupCosineLR" => ("warmup_cosine", true),
            _ => return Err(self.error("scheduler.type", format!("`{kind}` is not implemented; kiln has WarmupLR, WarmupDecayLR and WarmupCosineLR"))),
        };
        self.set("train.schedule", schedule);
        let empty = Map::new();
        let params = match o.get("params") {
            Some(v) => self.object("scheduler.params", v)?,
            None => &empty,
        };
        // DeepSpeed's defaults for absent keys, written out so that kiln's own defaults do not
        // stand in for them ("auto" is different: it asks for kiln's value).
        for (ds_key, kiln_key, default) in [
            (
                "warmup_num_steps",
                "train.warmup_steps",
                toml::Value::Integer(1000),
            ),
            ("warmup_type", "train.warmup_type", "log".into()),
            ("cos_min_ratio", "train.min_lr_ratio", 0.0001.into()),
        ] {
            let applies = ds_key != "cos_min_ratio" || cosine;
            if applies && !params.contains_key(ds_key) {
                self.set(kiln_key, default);
            }
        }
        if kind == "WarmupDecayLR" && !params.contains_key("warmup_max_lr") {
            // WarmupDecayLR's own default peak, which replaces the optimizer's lr.
            self.set("train.lr", 0.001);
            self.note("WarmupDecayLR without warmup_max_lr peaks at DeepSpeed's default 0.001, not the optimizer's lr".into());
        }
        if schedule != "warmup" && !params.contains_key("total_num_steps") {
            return Err(self.error(
                "scheduler.params.total_num_steps",
                format!("{kind} needs it (\"auto\" takes train.steps)"),
            ));
        }
        for (k, v) in params {
            let key = format!("scheduler.params.{k}");
            match (k.as_str(), cosine) {
                ("warmup_num_steps", _) => self.int_to(&key, v, "train.warmup_steps")?,
                ("warmup_type", _) => {
                    if v.as_str() != Some("auto") {
                        let s = self.string(&key, v)?;
                        if s != "log" && s != "linear" {
                            return Err(
                                self.error(&key, format!("`{s}` is not one of log, linear"))
                            );
                        }
                        self.set("train.warmup_type", s);
                    }
                }
                ("total_num_steps", _) => self.int_to(&key, v, "train.decay_steps")?,
                ("warmup_min_lr", false) => self.number_to(&key, v, "train.warmup_min_lr")?,
                ("warmup_max_lr", false) => self.number_to(&key, v, "train.lr")?,
                ("warmup_min_ratio", true) => self.number_to(&key, v, "train.warmup_min_ratio")?,
                ("cos_min_ratio", true) => self.number_to(&key, v, "train.min_lr_ratio")?,
                _ => self.ignore(&key),
            }
        }
        Ok(())
    }

    fn zero(
        &mut self,
        o: &Map<String, Value>,
        block_params: &dyn Fn() -> Result<usize>,
    ) -> Result<()> {
        for (k, v) in o {
            let key = format!("zero_optimization.{k}");
            match k.as_str() {
                "stage" => {
                    if let Some(n) = self.int(&key, v)? {
                        if n > 3 {
                            return Err(self.error(&key, format!("{n} must be 0, 1, 2 or 3")));
                        }
                        self.set("parallel.stage", n as i64);
                    }
                }
                "overlap_comm" | "contiguous_gradients" | "reduce_scatter" => {
                    if self.boolean(&key, v)? == Some(false) {
                        self.warn(&key, "= false: kiln always overlaps gradient communication with backward, packs gradients contiguously and reduce-scatters at stages 2 and 3");
                    }
                }
                "reduce_bucket_size" => {
                    if let Some(n) = self.int(&key, v)? {
                        let mib = n as f64 * 4.0 / (1 << 20) as f64;
                        self.set("parallel.bucket_mb", mib);
                    }
                }
                "stage3_prefetch_bucket_size" => {
                    if let Some(n) = self.int(&key, v)? {
                        let block = block_params()?.max(1);
                        let units = (n as usize / block).max(1);
                        self.set("parallel.prefetch", units as i64);
                        self.note(format!("{key} = {n} elements → parallel.prefetch = {units} unit(s) of {block} parameters"));
                    }
                }
                "stage3_param_persistence_threshold" => {
                    self.int_to(&key, v, "parallel.persist_threshold")?
                }
                "offload_optimizer" => self.offload_optimizer(self.object(&key, v)?)?,
                "cpu_offload" => {
                    // Before offload_optimizer existed, stage 2 took this flag.
                    if self.boolean(&key, v)? == Some(true) {
                        self.set("offload.optimizer", "cpu");
                    }
                }
                "offload_param" => {
                    let dev = match self.object(&key, v)?.get("device") {
                        Some(d) => self.string(&format!("{key}.device"), d)?,
                        None => "none".into(),
                    };
                    if dev != "none" {
                        return Err(self.error(&format!("{key}.device"), format!("`{dev}`: kiln offloads optimizer states only; parameters stay in memory (use offload_optimizer)")));
                    }
                }
                "cpu_offload_params" => {
                    if self.boolean(&key, v)? == Some(true) {
                        return Err(self.error(
                            &key,
                            "kiln offloads optimizer states only; parameters stay in memory",
                        ));
                    }
                }
                "zero_quantized_weights"
                | "zero_quantized_gradients"
                | "zero_quantized_nontrainable_weights" => {
                    if self.boolean(&key, v)? == Some(true) {
                        return Err(self.error(&key, "quantized communication is not built (kiln keeps f32 results bitwise equal to DDP)"));
                    }
                }
                "zero_hpz_partition_size" | "mics_shard_size" => {
                    if self.int(&key, v)?.is_some_and(|n| n > 1) {
                        return Err(self.error(
                            &key,
                            "hierarchical partitioning is not built; every rank holds one shard",
                        ));
                    }
                }
                _ => self.ignore(&key),
            }
        }
        Ok(())
    }

    fn offload_optimizer(&mut self, o: &Map<String, Value>) -> Result<()> {
        for (k, v) in o {
            let key = format!("zero_optimization.offload_optimizer.{k}");
            match k.as_str() {
                "device" => {
                    let dev = self.string(&key, v)?;
                    if !["none", "cpu", "nvme"].contains(&dev.as_str()) {
                        return Err(
                            self.error(&key, format!("`{dev}` is not one of none, cpu, nvme"))
                        );
                    }
                    self.set("offload.optimizer", dev);
                }
                "nvme_path" => {
                    let p = self.string(&key, v)?;
                    self.set("offload.nvme_path", p);
                }
                "buffer_count" => self.int_to(&key, v, "offload.buffer_count")?,
                "pin_memory" => {
                    if self.boolean(&key, v)? == Some(true) {
                        self.warn(&key, "= true: pinned memory only speeds up GPU transfers; kiln's cpu tier is ordinary host memory");
                    }
                }
                "ratio" => {
                    if self.number(&key, v)?.is_some_and(|r| r != 1.0) {
                        return Err(self.error(
                            &key,
                            "partial offload is not built; the whole optimizer state moves (1.0)",
                        ));
                    }
                }
                _ => self.ignore(&key),
            }
        }
        Ok(())
    }

    fn activation_checkpointing(&mut self, o: &Map<String, Value>) -> Result<()> {
        // kiln's model is built in, so the section itself switches recompute on (under
        // DeepSpeed the model code must call deepspeed.checkpointing for it to act).
        self.set("train.recompute", true);
        for (k, v) in o {
            let key = format!("activation_checkpointing.{k}");
            match k.as_str() {
                "cpu_checkpointing" => {
                    if self.boolean(&key, v)? == Some(true) {
                        return Err(self.error(&key, "activations are recomputed, not moved to host memory; offloading them is not built"));
                    }
                }
                "partition_activations" => {
                    if self.boolean(&key, v)? == Some(true) {
                        self.warn(&key, "splits activations across model-parallel ranks; kiln is data-parallel only");
                    }
                }
                _ => self.ignore(&key),
            }
        }
        Ok(())
    }

    /// A key kiln does nothing with: a warning, worded by whether DeepSpeed knows it.
    fn ignore(&mut self, key: &str) {
        if INTERNALS.contains(&key) {
            self.warn(key, "only tunes DeepSpeed's internals");
        } else {
            self.warn(key, "is not a DeepSpeed key kiln knows");
        }
    }

    fn fp32_only(&mut self, key: &str, v: &Value) -> Result<()> {
        match v {
            Value::Null => Ok(()),
            Value::String(s) if ["fp32", "float32", "float", "auto"].contains(&s.as_str()) => {
                Ok(())
            }
            _ => Err(self.error(
                key,
                format!("{v}: kiln computes and communicates in f32 only"),
            )),
        }
    }

    fn object<'a>(&self, key: &str, v: &'a Value) -> Result<&'a Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.error(key, format!("expected an object, got {v}")))
    }

    /// `enabled` of a feature section; `"auto"` leaves it to kiln, which has it off.
    fn enabled(&self, key: &str, v: &Value) -> Result<bool> {
        match self.object(key, v)?.get("enabled") {
            None => Ok(false),
            Some(e) => Ok(self.boolean(&format!("{key}.enabled"), e)?.unwrap_or(false)),
        }
    }

    /// A boolean, or `None` for "auto".
    fn boolean(&self, key: &str, v: &Value) -> Result<Option<bool>> {
        match v {
            Value::Bool(b) => Ok(Some(*b)),
            Value::String(s) if s == "auto" => Ok(None),
            _ => Err(self.error(key, format!("expected true, false or \"auto\", got {v}"))),
        }
    }

    /// A number, or `None` for "auto".
    fn number(&self, key: &str, v: &Value) -> Result<Option<f64>> {
        match v {
            Value::Number(n) => Ok(n.as_f64()),
            Value::String(s) if s == "auto" => Ok(None),
            _ => Err(self.error(key, format!("expected a number or \"auto\", got {v}"))),
        }
    }

    /// A whole number ≥ 0 (DeepSpeed configs often write sizes as 5e8), or `None` for "auto".
    fn int(&self, key: &str, v: &Value) -> Result<Option<u64>> {
        let Some(x) = self.number(key, v)? else {
            return Ok(None);
        };
        if x < 0.0 || x.fract() != 0.0 || x > i64::MAX as f64 {
            return Err(self.error(key, format!("expected a whole number ≥ 0, got {v}")));
        }
        Ok(Some(x as u64))
    }

    fn string(&self, key: &str, v: &Value) -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.error(key, format!("expected a string, got {v}")))
    }

    fn int_to(&mut self, key: &str, v: &Value, kiln_key: &str) -> Result<()> {
        if let Some(n) = self.int(key, v)? {
            self.set(kiln_key, n as i64);
        }
        Ok(())
    }

    fn number_to(&mut self, key: &str, v: &Value, kiln_key: &str) -> Result<()> {
        if let Some(x) = self.number(key, v)? {
            self.set(kiln_key, x);
        }
        Ok(())
    }
}

//! The sections of a DeepSpeed config that map onto kiln features: optimizer, scheduler,
//! zero_optimization (with offload_optimizer) and activation_checkpointing.

use super::Reader;
use crate::error::Result;
use serde_json::{Map, Value};

impl Reader {
    pub(super) fn optimizer(&mut self, o: &Map<String, Value>) -> Result<()> {
        let kind = match o.get("type") {
            Some(v) => self.string("optimizer.type", v)?,
            None => return Err(self.error("optimizer.type", "missing; expected Adam or AdamW")),
        };
        let adam = kind.eq_ignore_ascii_case("adam");
        let lion = kind.eq_ignore_ascii_case("lion");
        if !adam && !lion && !kind.eq_ignore_ascii_case("adamw") {
            return Err(self.error(
                "optimizer.type",
                format!("`{kind}` is not implemented; kiln maps Adam, AdamW (train.optimizer = \"adamw\") and Lion (\"lion\")"),
            ));
        }
        self.set("train.optimizer", if lion { "lion" } else { "adamw" });
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

    pub(super) fn scheduler(&mut self, o: &Map<String, Value>) -> Result<()> {
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

    pub(super) fn zero(
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
                "offload_param" => self.offload_param(self.object(&key, v)?)?,
                "cpu_offload_params" => {
                    // Before offload_param existed, stage 3 took this flag.
                    if self.boolean(&key, v)? == Some(true) {
                        self.set("offload.param", "cpu");
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
                "buffer_count" => self.int_to(&key, v, "offload.buffer_count")?,
                "ratio" => {
                    if self.number(&key, v)?.is_some_and(|r| r != 1.0) {
                        return Err(self.error(
                            &key,
                            "partial offload is not built; the whole optimizer state moves (1.0)",
                        ));
                    }
                }
                _ => self.offload_key(&key, k, v, "offload.optimizer")?,
            }
        }
        Ok(())
    }

    fn offload_param(&mut self, o: &Map<String, Value>) -> Result<()> {
        for (k, v) in o {
            let key = format!("zero_optimization.offload_param.{k}");
            self.offload_key(&key, k, v, "offload.param")?;
        }
        Ok(())
    }

    /// A key both offload sections have: `device` (to `tier_key`), `nvme_path` (kiln has one
    /// for both tiers), `pin_memory`; anything else is ignored with a warning.
    fn offload_key(&mut self, key: &str, k: &str, v: &Value, tier_key: &str) -> Result<()> {
        match k {
            "device" => {
                let dev = self.string(key, v)?;
                if !["none", "cpu", "nvme"].contains(&dev.as_str()) {
                    return Err(self.error(key, format!("`{dev}` is not one of none, cpu, nvme")));
                }
                self.set(tier_key, dev);
            }
            "nvme_path" => {
                let p = self.string(key, v)?;
                let earlier = self
                    .out
                    .sets
                    .iter()
                    .rev()
                    .find(|(k, _)| k == "offload.nvme_path");
                if let Some((_, set)) = earlier {
                    if set.as_str() != Some(p.as_str()) {
                        return Err(self.error(key, format!("`{p}` differs from the other offload section's nvme_path; kiln keeps both tiers' files under one offload.nvme_path")));
                    }
                }
                self.set("offload.nvme_path", p);
            }
            "pin_memory" => {
                if self.boolean(key, v)? == Some(true) {
                    self.warn(key, "= true: pinned memory only speeds up GPU transfers; kiln's cpu tier is ordinary host memory");
                }
            }
            _ => self.ignore(key),
        }
        Ok(())
    }

    pub(super) fn activation_checkpointing(&mut self, o: &Map<String, Value>) -> Result<()> {
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
}

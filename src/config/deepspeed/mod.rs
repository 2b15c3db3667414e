//! DeepSpeed's `ds_config.json` read as kiln keys (`kiln train --deepspeed FILE`).
//!
//! Every key DeepSpeed users set for a feature kiln has becomes the kiln key with the same
//! meaning (DeepSpeed's config-json documentation is the reference; its sizes are element
//! counts). A key kiln cannot honour is an error naming it and why; a key that only tunes
//! DeepSpeed's internals is a warning naming it. `"auto"` — what the Hugging Face Trainer writes
//! and then fills in from its own arguments — takes kiln's value for that key instead (from
//! `--config`, `--set`, or kiln's default).

mod sections;
mod tables;

use crate::error::{KilnError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use tables::{INTERNALS, UNSUPPORTED_FEATURES};

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
            "bf16" => self.bf16(self.object(key, v)?)?,
            "fp16" => self.fp16(self.object(key, v)?)?,
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

    /// A key kiln does nothing with: a warning, worded by whether DeepSpeed knows it.
    fn ignore(&mut self, key: &str) {
        if INTERNALS.contains(&key) {
            self.warn(key, "only tunes DeepSpeed's internals");
        } else {
            self.warn(key, "is not a DeepSpeed key kiln knows");
        }
    }

    /// `bf16`: `enabled` true computes in bf16 (`train.precision`); `"auto"` leaves kiln's
    /// setting. kiln keeps f32 master weights, gradients and optimizer state, so a config asking
    /// for them in bf16 is refused.
    fn bf16(&mut self, o: &Map<String, Value>) -> Result<()> {
        for (k, v) in o {
            let full = format!("bf16.{k}");
            match k.as_str() {
                "enabled" => {
                    if self.boolean(&full, v)? == Some(true) {
                        self.set("train.precision", "bf16");
                    }
                }
                "bf16_master_weights_and_grads" | "bf16_optimizer_states" => {
                    if self.boolean(&full, v)? == Some(true) {
                        return Err(self.error(
                            &full,
                            "kiln keeps master weights, gradients and optimizer state in f32",
                        ));
                    }
                }
                _ => self.ignore(&full),
            }
        }
        Ok(())
    }

    /// `fp16`: `enabled` true computes in fp16 with loss scaling (`train.precision`, `[fp16]`,
    /// DeepSpeed's key names); `"auto"` leaves `train.precision` to kiln's settings, the scaling
    /// keys then apply if it is fp16; `false` makes the section inert.
    fn fp16(&mut self, o: &Map<String, Value>) -> Result<()> {
        if let Some(e) = o.get("enabled") {
            if self.boolean("fp16.enabled", e)? == Some(false) {
                return Ok(());
            }
        }
        for (k, v) in o {
            let full = format!("fp16.{k}");
            match k.as_str() {
                "enabled" => {
                    if self.boolean(&full, v)? == Some(true) {
                        self.set("train.precision", "fp16");
                    }
                }
                "loss_scale" | "min_loss_scale" => {
                    if let Some(x) = self.number(&full, v)? {
                        self.set(&full, x);
                    }
                }
                "initial_scale_power" | "loss_scale_window" | "hysteresis" => {
                    self.int_to(&full, v, &full)?
                }
                "consecutive_hysteresis" => {
                    if let Some(b) = self.boolean(&full, v)? {
                        self.set(&full, b);
                    }
                }
                "fp16_master_weights_and_grads" => {
                    if self.boolean(&full, v)? == Some(true) {
                        return Err(
                            self.error(&full, "kiln keeps master weights and gradients in f32")
                        );
                    }
                }
                _ => self.ignore(&full),
            }
        }
        Ok(())
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

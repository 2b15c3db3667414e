//! `manifest.json`: everything needed to load a checkpoint at any world size and stage, and to
//! refuse one that does not belong to this run.

use crate::config::Config;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The format tag; a reader refuses any other.
pub const FORMAT: &str = "kiln-checkpoint-1";

/// One rank's file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
}

/// Where training continues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataPosition {
    /// The next optimizer step (= steps completed). Rows are a pure function of
    /// (data source, step, row), so this is the whole data-loader state.
    pub next_step: u64,
    /// Sequences per step over all ranks.
    pub global_batch: usize,
    /// The source, as its log line describes it.
    pub source: String,
}

/// The checkpoint's table of contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// `FORMAT`.
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Ranks that wrote it; rank r's file holds shard r of every unit at this world size.
    pub world: usize,
    /// ZeRO stage it was written from (informational: any stage loads it).
    pub stage: u8,
    /// Offload tier it was written from (informational).
    pub offload: String,
    /// The model's own description as data (`Plan::model_desc`): the built-in GPT's shape, or
    /// what a library user's model says of itself. Checkpoints written before user models
    /// existed hold a GPT shape here, which reads as the same JSON.
    pub model: serde_json::Value,
    /// The flat layout at `world`: unit names, parameter paths, shapes, offsets, padding.
    pub layout: ModelLayout,
    /// The whole config of the run that wrote it (optimizer hyper-parameters included).
    pub config: Config,
    /// FNV-1a of the config's JSON, to tell at a glance whether two runs share a config.
    pub config_hash: String,
    /// Data position. There is no other RNG state: initialisation is seeded per parameter and
    /// only used before step 0, and the data rows are stateless.
    pub data: DataPosition,
    /// One entry per rank, in rank order.
    pub files: Vec<FileEntry>,
    /// fp16's loss scale and its history (`train.precision = "fp16"`), so that a resumed run
    /// scales and skips as the uninterrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::optim::LossScaler>,
}

/// FNV-1a over the config's JSON text.
pub fn config_hash(config: &Config) -> String {
    let text = serde_json::to_string(config).expect("config serialises");
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serialises")
}

/// The keys whose values differ between two JSON objects, as `a.b.c`, with both values.
pub fn differing_keys(here: &Value, there: &Value, prefix: &str) -> Vec<(String, String, String)> {
    match (here, there) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    differing_keys(
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        &p,
                    )
                })
                .collect()
        }
        _ if here == there => Vec::new(),
        _ => vec![(prefix.to_string(), here.to_string(), there.to_string())],
    }
}

impl Manifest {
    /// The built-in GPT's shape this checkpoint was written for, or an error naming the
    /// manifest when it holds another model (GPT-only commands: sample, export to HF).
    pub fn gpt(&self, dir: &Path) -> Result<crate::model::GptConfig> {
        serde_json::from_value(self.model.clone()).map_err(|_| {
            KilnError::file(
                dir.join("manifest.json"),
                "holds a model other than kiln's built-in GPT; this command reads GPT checkpoints",
            )
        })
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            KilnError::file(
                &path,
                if e.kind() == std::io::ErrorKind::NotFound {
                    "missing: not a kiln checkpoint directory".to_string()
                } else {
                    format!("cannot read: {e}")
                },
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| KilnError::file(&path, format!("malformed manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(KilnError::file(
                &path,
                format!("format `{}`, expected `{FORMAT}`", manifest.format),
            ));
        }
        if manifest.files.len() != manifest.world {
            return Err(KilnError::file(
                &path,
                format!(
                    "lists {} files for {} ranks",
                    manifest.files.len(),
                    manifest.world
                ),
            ));
        }
        Ok(manifest)
    }

    /// Errors unless this checkpoint can continue `plan`: the model must be the same, and so
    /// must the data stream (`data.*` and the resolved global batch). World size, stage, tier,
    /// steps and optimizer settings may change; returns the keys that did, for the log.
    pub fn check_compatible(&self, dir: &Path, plan: &Plan) -> Result<Vec<String>> {
        let config = &plan.config;
        let path = dir.join("manifest.json");
        // A GPT's shape is compared as a GptConfig reads it, so that fields added since (with
        // serde defaults) do not count as differences in older checkpoints.
        let theirs = match plan.model {
            Some(_) => serde_json::from_value::<crate::model::GptConfig>(self.model.clone())
                .map(|m| to_json(&m))
                .unwrap_or_else(|_| self.model.clone()),
            None => self.model.clone(),
        };
        let model_diff = differing_keys(&plan.model_desc, &theirs, "model");
        if let Some((key, here, there)) = model_diff.first() {
            return Err(KilnError::file(
                &path,
                format!(
                    "written for another model: {key} is {here} here, {there} in the checkpoint"
                ),
            ));
        }
        if plan.optimizer.name() != self.config.train.optimizer {
            return Err(KilnError::file(
                &path,
                format!(
                    "written with train.optimizer = \"{}\", which keeps other state than \"{}\" here; resume with the same optimizer",
                    self.config.train.optimizer,
                    plan.optimizer.name()
                ),
            ));
        }
        // The global batch is compared resolved: the keys that give it (any two of
        // global_batch, micro_batch, grad_accum) may legitimately change with the world size.
        let diff = differing_keys(&to_json(config), &to_json(&self.config), "");
        let mut stream: Vec<(String, String, String)> = diff
            .iter()
            .filter(|(k, _, _)| k.starts_with("data."))
            .cloned()
            .collect();
        if plan.global_batch != self.data.global_batch {
            stream.push((
                "the global batch (train.global_batch)".into(),
                plan.global_batch.to_string(),
                self.data.global_batch.to_string(),
            ));
        }
        if let Some((key, here, there)) = stream.first() {
            return Err(KilnError::file(
                &path,
                format!(
                    "incompatible config: {key} is {here} here, {there} in the checkpoint (the data position would not carry over)"
                ),
            ));
        }
        Ok(diff
            .into_iter()
            .map(|(k, _, _)| k)
            .filter(|k| !k.starts_with("model.") && !k.starts_with("checkpoint."))
            .collect())
    }
}

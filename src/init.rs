//! Where the initial parameters come from: the seed (`train.seed`) or a Hugging Face checkpoint
//! (`model.init_from`). One seam for every strategy: each asks for one unit at a time and keeps
//! what it holds (ZeRO-3: its shard), so the whole model is never materialised on one rank and
//! the values never depend on the world size or the stage. A resumed run overwrites them with
//! the checkpoint's.

use crate::error::Result;
use crate::flat::{init_unit, UnitLayout};
use crate::hf::HfCheckpoint;
use crate::model::ModelUnits;
use std::path::Path;

/// The source of a run's initial parameters.
pub enum InitSource {
    /// Seeded random values (`crate::flat::init_unit`).
    Seed(u64),
    /// A Hugging Face GPT-2 checkpoint, read unit by unit; opened at the first unit that
    /// needs it (a model that brings its own values, such as a library user's, never does).
    HuggingFace {
        /// `model.init_from`.
        path: String,
        /// The opened checkpoint.
        opened: std::sync::OnceLock<HfCheckpoint>,
    },
}

impl InitSource {
    /// Seeded values (`train.seed`), or the Hugging Face checkpoint `init_from`
    /// (`model.init_from`) when it is not empty. Opening a checkpoint reads only its headers.
    pub fn new(init_from: &str, seed: u64) -> InitSource {
        if init_from.is_empty() {
            InitSource::Seed(seed)
        } else {
            InitSource::HuggingFace {
                path: init_from.to_string(),
                opened: std::sync::OnceLock::new(),
            }
        }
    }

    /// The checkpoint `ckpt`, already opened.
    pub fn from_checkpoint(ckpt: HfCheckpoint) -> InitSource {
        let path = ckpt.path().display().to_string();
        InitSource::HuggingFace {
            path,
            opened: std::sync::OnceLock::from(ckpt),
        }
    }

    /// Unit `unit`'s flat buffer, padded to `layout.padded_len` with zeros.
    pub fn unit(
        &self,
        model: &dyn ModelUnits,
        unit: usize,
        layout: &UnitLayout,
    ) -> Result<Vec<f32>> {
        let specs = model.unit_params(unit);
        if let Some(values) = model.initial_unit(unit) {
            // The model brought its own values (a user's burn module): laid out and padded.
            let mut buf = vec![0.0f32; layout.padded_len];
            buf[..values.len()].copy_from_slice(&values);
            return Ok(buf);
        }
        match self {
            InitSource::Seed(seed) => Ok(init_unit(&specs, layout, *seed)),
            InitSource::HuggingFace { path, opened } => {
                let ckpt = match opened.get() {
                    Some(c) => c,
                    None => {
                        let _ = opened.set(HfCheckpoint::open(Path::new(path))?);
                        opened.get().expect("just set")
                    }
                };
                ckpt.unit(&specs, layout)
            }
        }
    }
}

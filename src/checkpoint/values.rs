//! A checkpoint's whole model, parameter by parameter, for the commands that read it
//! (`kiln export`, `kiln sample`): trainable parameters from the checkpoint's rank files
//! (whatever world size wrote them), frozen ones from the checkpoint the run started from
//! (`model.init_from`: a checkpoint holds only what training changed), and LoRA adapters
//! either kept apart (`--format peft`) or merged into their weights.

use super::manifest::Manifest;
use super::shards::{CheckpointReader, PARAM};
use crate::error::{KilnError, Result};
use crate::flat::ParamEntry;
use crate::hf::peft::{AdapterModules, AdapterShape, Factors};
use crate::hf::HfWeights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where kiln keeps a LoRA factor of the weight of `module`: `{module}.weight.lora.{a|b}`.
fn factor_of(path: &str) -> Option<(&str, char)> {
    let (weight, factor) = path.rsplit_once(".lora.")?;
    let module = weight.strip_suffix(".weight")?;
    match factor {
        "a" => Some((module, 'a')),
        "b" => Some((module, 'b')),
        _ => None,
    }
}

/// The values of a checkpoint's parameters.
pub struct ModelValues<'a> {
    dir: PathBuf,
    manifest: &'a Manifest,
    reader: CheckpointReader<'a>,
    /// Trainable parameters: path → (unit, entry).
    trained: BTreeMap<String, (usize, &'a ParamEntry)>,
    /// The base's weights, opened at the first frozen parameter.
    base: Option<HfWeights>,
    /// LoRA: its shape, and each adapted module's `[d_in, d_out]` and factors.
    lora: Option<(AdapterShape, AdapterModules)>,
}

impl<'a> ModelValues<'a> {
    /// Opens the checkpoint in `dir` (verified: `manifest`).
    pub fn open(dir: &Path, manifest: &'a Manifest) -> Result<ModelValues<'a>> {
        let reader = CheckpointReader::open(dir, manifest)?;
        let trained = manifest
            .layout
            .units
            .iter()
            .enumerate()
            .flat_map(|(u, unit)| unit.params.iter().map(move |p| (p.path.clone(), (u, p))))
            .collect();
        let mut values = ModelValues {
            dir: dir.to_path_buf(),
            manifest,
            reader,
            trained,
            base: None,
            lora: None,
        };
        values.lora = values.read_lora()?;
        Ok(values)
    }

    fn read_lora(&self) -> Result<Option<(AdapterShape, AdapterModules)>> {
        let desc = &self.manifest.model["lora"];
        if desc.is_null() {
            return Ok(None);
        }
        let bad = || {
            KilnError::file(
                self.dir.join("manifest.json"),
                "has an unreadable `model.lora`",
            )
        };
        let shape = AdapterShape {
            r: desc["r"].as_u64().ok_or_else(bad)? as usize,
            alpha: desc["alpha"].as_f64().ok_or_else(bad)?,
            targets: serde_json::from_value(desc["targets"].clone()).map_err(|_| bad())?,
        };
        let mut modules = AdapterModules::new();
        for (path, (u, entry)) in &self.trained {
            let Some((module, factor)) = factor_of(path) else {
                continue;
            };
            let values = self.read_trained(*u, entry)?;
            let slot = modules.entry(module.to_string()).or_insert((
                [0, 0],
                Factors {
                    a: Vec::new(),
                    b: Vec::new(),
                },
            ));
            match factor {
                'a' => (slot.0[0], slot.1.a) = (entry.shape[0], values),
                _ => (slot.0[1], slot.1.b) = (entry.shape[1], values),
            }
        }
        Ok(Some((shape, modules)))
    }

    fn read_trained(&self, unit: usize, entry: &ParamEntry) -> Result<Vec<f32>> {
        let mut out = vec![0.0; entry.len];
        self.reader.read(PARAM, unit, entry.range(), &mut out)?;
        Ok(out)
    }

    /// The LoRA adapters (shape; module → `[d_in, d_out]` and factors), if the run had any.
    pub fn adapters(&self) -> Option<&(AdapterShape, AdapterModules)> {
        self.lora.as_ref()
    }

    /// Every parameter of the model but the LoRA factors, as (path, shape), in the order the
    /// model lists them: a library model's description lists frozen ones too.
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        match self.manifest.model["params"].as_array() {
            Some(all) => all
                .iter()
                .filter_map(|p| {
                    let path = p["path"].as_str()?;
                    let shape = serde_json::from_value(p["shape"].clone()).ok()?;
                    factor_of(path).is_none().then(|| (path.to_string(), shape))
                })
                .collect(),
            None => self
                .manifest
                .layout
                .units
                .iter()
                .flat_map(|u| u.params.iter().map(|p| (p.path.clone(), p.shape.clone())))
                .collect(),
        }
    }

    /// The value of the parameter at `path` (kiln's layout), its LoRA update merged in.
    pub fn merged(&mut self, path: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut w = match self.trained.get(path) {
            Some(&(u, entry)) => self.read_trained(u, entry)?,
            None => self.frozen(path, shape)?,
        };
        let module = path.strip_suffix(".weight").unwrap_or("");
        if let Some((lora, modules)) = &self.lora {
            if let Some(([d_in, d_out], f)) = modules.get(module) {
                add_update(&mut w, f, lora.r, lora.alpha / lora.r as f64, *d_in, *d_out);
            }
        }
        Ok(w)
    }

    /// A frozen parameter, from the Hugging Face checkpoint the run started from.
    fn frozen(&mut self, path: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let init_from = self.manifest.config.model.init_from.clone();
        if self.manifest.model["model"].get("hf_config").is_none() || init_from.is_empty() {
            return Err(KilnError::file(
                self.dir.join("manifest.json"),
                format!("parameter `{path}` was frozen, so the checkpoint does not hold it, and the run did not start from a Hugging Face checkpoint kiln can read it from"),
            ));
        }
        if self.base.is_none() {
            self.base = Some(HfWeights::open(Path::new(&init_from)).map_err(|e| {
                KilnError::file(&init_from, format!("the base model of checkpoint {} (it holds only the trained parameters): {e}", self.dir.display()))
            })?);
        }
        let base = self.base.as_ref().expect("opened above");
        base.read_decoder(path, shape)
    }
}

/// `w += scale · (a · b)` for `w` `[d_in, d_out]`, `a` `[d_in, r]`, `b` `[r, d_out]`, as burn's
/// `LoraAdapter` composes it: the product, then the scale, then the sum.
fn add_update(w: &mut [f32], f: &Factors, r: usize, scale: f64, d_in: usize, d_out: usize) {
    let mut row = vec![0.0f32; d_out];
    for i in 0..d_in {
        row.fill(0.0);
        for k in 0..r {
            let a = f.a[i * r + k];
            for (acc, b) in row.iter_mut().zip(&f.b[k * d_out..(k + 1) * d_out]) {
                *acc += a * b;
            }
        }
        for (w, d) in w[i * d_out..(i + 1) * d_out].iter_mut().zip(&row) {
            *w += *d * scale as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_paths_and_the_merged_update() {
        assert_eq!(factor_of("m.q_proj.weight.lora.a"), Some(("m.q_proj", 'a')));
        assert_eq!(factor_of("m.q_proj.weight"), None);
        // [2, 1] · [1, 3], scaled by 2, added to ones.
        let f = Factors {
            a: vec![1.0, 2.0],
            b: vec![1.0, 0.5, -1.0],
        };
        let mut w = vec![1.0; 6];
        add_update(&mut w, &f, 1, 2.0, 2, 3);
        assert_eq!(w, [3.0, 2.0, -1.0, 5.0, 3.0, -3.0]);
    }
}

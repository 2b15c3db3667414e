//! Hugging Face PEFT LoRA adapters in and out: `adapter_config.json` and
//! `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them and
//! `PeftModel.from_pretrained` reads them.
//!
//! PEFT names a module's factors `base_model.model.{module}.lora_A.weight` (`[r, d_in]`) and
//! `…lora_B.weight` (`[d_out, r]`), in `torch.nn.Linear`'s `[out, in]` layout. kiln's factors
//! follow burn's `[d_in, d_out]` layout — `A` is `[d_in, r]`, `B` is `[r, d_out]` — so each
//! crosses over transposed. kiln's module paths are PEFT's module names: the Llama-family
//! decoders mirror transformers' module tree, and a user's model is named as burn names it.

use super::names::Transform;
use super::HfWeights;
use crate::error::{KilnError, Result};
use crate::tensor_file::TensorFileWriter;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

/// What an adapter is: PEFT's `r`, `lora_alpha` and `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterShape {
    /// Rank.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r · A·B`.
    pub alpha: f64,
    /// Module names as PEFT matches them (a path, or its last components).
    pub targets: Vec<String>,
}

/// One module's factors in kiln's layout: `a` is `[d_in, r]`, `b` is `[r, d_out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    /// The down projection, `[d_in, r]` row-major.
    pub a: Vec<f32>,
    /// The up projection, `[r, d_out]` row-major.
    pub b: Vec<f32>,
}

/// Adapted modules by path: each one's `[d_in, d_out]` and factors.
pub type AdapterModules = BTreeMap<String, ([usize; 2], Factors)>;

/// A PEFT adapter directory, opened: its shape and its tensors.
pub struct PeftAdapter {
    /// The adapter's rank, scale and targets.
    pub shape: AdapterShape,
    dir: std::path::PathBuf,
    weights: HfWeights,
}

fn tensor_name(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.lora_{factor}.weight")
}

impl PeftAdapter {
    /// Opens the adapter in `dir`; a setting kiln does not implement is one line naming the
    /// file and the field.
    pub fn open(dir: &Path) -> Result<PeftAdapter> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            KilnError::file(
                &path,
                format!("lora.init_from: cannot read ({e}); expected a PEFT adapter directory"),
            )
        })?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::file(&path, format!("is not JSON: {e}")))?;
        let shape = read_config(&config).map_err(|msg| KilnError::file(&path, msg))?;
        let weights = HfWeights::open(&dir.join(WEIGHTS))?;
        Ok(PeftAdapter {
            shape,
            dir: dir.to_path_buf(),
            weights,
        })
    }

    /// The factors of `module` (a linear map `d_in → d_out`), in kiln's layout.
    pub fn factors(&self, module: &str, d_in: usize, d_out: usize) -> Result<Factors> {
        let r = self.shape.r;
        let for_what = format!("the LoRA adapter of `{module}`");
        let read = |factor: &str, hf_shape: [usize; 2]| -> Result<Vec<f32>> {
            let name = tensor_name(module, factor);
            let hf = self.weights.read(&[&name], &hf_shape, &for_what)?;
            let mut out = vec![0.0; hf.len()];
            let kiln_shape = [hf_shape[1], hf_shape[0]];
            Transform::Transpose.to_kiln(&kiln_shape, &hf, &mut out);
            Ok(out)
        };
        Ok(Factors {
            a: read("A", [r, d_in])?,
            b: read("B", [d_out, r])?,
        })
    }

    /// Errors unless every tensor of the file belongs to one of `modules` (an adapter for a
    /// module the model lacks would silently not apply).
    pub fn check_covers(&self, modules: &[String]) -> Result<()> {
        let file = self.dir.join(WEIGHTS);
        let reader = crate::tensor_file::TensorFileReader::open(&file)?;
        let known: std::collections::HashSet<String> = modules
            .iter()
            .flat_map(|m| [tensor_name(m, "A"), tensor_name(m, "B")])
            .collect();
        let stray = reader
            .names()
            .find(|n| !known.contains(*n))
            .map(str::to_string);
        match stray {
            Some(name) => Err(KilnError::file(
                &file,
                format!("tensor `{name}` adapts no module of this model that lora targets; is this the adapter of another base model?"),
            )),
            None => Ok(()),
        }
    }
}

/// The adapter's shape from `adapter_config.json`; settings kiln does not implement are
/// refused, one line each.
fn read_config(config: &Value) -> std::result::Result<AdapterShape, String> {
    let peft_type = config["peft_type"].as_str().unwrap_or("");
    if peft_type != "LORA" {
        return Err(format!(
            "peft_type is `{peft_type}`; kiln reads LORA adapters"
        ));
    }
    let r = config["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or("`r` must be a positive integer")? as usize;
    let alpha = config["lora_alpha"]
        .as_f64()
        .ok_or("`lora_alpha` must be a number")?;
    let targets = match &config["target_modules"] {
        Value::Array(names) => names
            .iter()
            .map(|n| n.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("`target_modules` must be a list of module names")?,
        Value::String(s) if s == "all-linear" => vec![s.clone()],
        Value::String(s) => {
            return Err(format!(
                "`target_modules` is the regular expression `{s}`; kiln reads a list of module names or \"all-linear\""
            ))
        }
        _ => return Err("`target_modules` must be a list of module names".into()),
    };
    let unsupported = [
        (
            "use_dora",
            config["use_dora"].as_bool() == Some(true),
            "DoRA",
        ),
        (
            "use_rslora",
            config["use_rslora"].as_bool() == Some(true),
            "rank-stabilised scaling (kiln scales by lora_alpha / r)",
        ),
        (
            "fan_in_fan_out",
            config["fan_in_fan_out"].as_bool() == Some(true),
            "Conv1D-layout adapters",
        ),
        (
            "bias",
            config["bias"].as_str().is_some_and(|b| b != "none"),
            "trained biases",
        ),
        (
            "modules_to_save",
            !is_empty(&config["modules_to_save"]),
            "fully trained extra modules",
        ),
        (
            "layers_to_transform",
            !is_empty(&config["layers_to_transform"]),
            "a layer subset",
        ),
        (
            "rank_pattern",
            !is_empty(&config["rank_pattern"]),
            "per-module ranks",
        ),
        (
            "alpha_pattern",
            !is_empty(&config["alpha_pattern"]),
            "per-module alphas",
        ),
    ];
    if let Some((field, _, what)) = unsupported.iter().find(|(_, set, _)| *set) {
        return Err(format!(
            "`{field}` asks for {what}, which kiln does not implement"
        ));
    }
    Ok(AdapterShape { r, alpha, targets })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `out_dir` for the
/// adapters `modules` (module path → factors, with each module's `[d_in, d_out]`); `base` is
/// the base model's path and `task_type` PEFT's (`CAUSAL_LM` for a decoder). Temporary names
/// and renames, so a failure leaves no half-written file under a final name.
pub fn write_adapter(
    out_dir: &Path,
    shape: &AdapterShape,
    base: &str,
    task_type: Option<&str>,
    modules: &AdapterModules,
) -> Result<()> {
    if out_dir.is_file() {
        return Err(KilnError::file(
            out_dir,
            "is a file; expected a directory to write the adapter into",
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| {
        KilnError::file(out_dir, format!("cannot create the output directory: {e}"))
    })?;
    let r = shape.r;
    let mut tensors = Vec::new();
    for (module, ([d_in, d_out], _)) in modules {
        tensors.push((tensor_name(module, "A"), vec![r, *d_in]));
        tensors.push((tensor_name(module, "B"), vec![*d_out, r]));
    }
    let weights = out_dir.join(WEIGHTS);
    let tmp = out_dir.join(".adapter_model.safetensors.tmp");
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let written = (|| {
        let writer = TensorFileWriter::create(&tmp, &tensors, &metadata)?;
        for (module, ([d_in, d_out], f)) in modules {
            let a = Transform::Transpose.to_hf(&[*d_in, r], &f.a);
            let b = Transform::Transpose.to_hf(&[r, *d_out], &f.b);
            writer.write(&tensor_name(module, "A"), 0, &a)?;
            writer.write(&tensor_name(module, "B"), 0, &b)?;
        }
        writer.finish()?;
        std::fs::rename(&tmp, &weights).map_err(|e| KilnError::io(&weights, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": shape.alpha,
        "lora_dropout": 0.0,
        "target_modules": shape.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let path = out_dir.join(CONFIG);
    let tmp = out_dir.join(".adapter_config.json.tmp");
    let text = serde_json::to_string_pretty(&config).expect("JSON serialises") + "\n";
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            KilnError::io(&path, e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_kiln_lacks_are_refused_by_name() {
        let base =
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        assert_eq!(read_config(&base).unwrap().targets, ["q_proj"]);
        for (field, value) in [
            ("use_dora", json!(true)),
            ("bias", json!("all")),
            ("modules_to_save", json!(["lm_head"])),
            ("target_modules", json!(".*proj")),
            ("r", json!(0)),
        ] {
            let mut c = base.clone();
            c[field] = value;
            let err = read_config(&c).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}

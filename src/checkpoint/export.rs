//! Full parameters as one f32 safetensors file, tensor names = module paths, shapes as in the
//! model (`output.export` at the end of a run, `kiln consolidate` from a checkpoint). Written
//! one unit at a time to a temporary name and renamed, so a crash never leaves a half-written
//! file under the final name.

use super::ModelValues;
use super::TensorFileWriter;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::model::FrozenParam;
use crate::tensor_file::StoredDtype;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `params` (one unpadded buffer per unit, following `layout`) and the parameters
/// outside the layout (`extra`: a user model's frozen ones) to `path`.
pub fn export_safetensors(
    path: &str,
    layout: &ModelLayout,
    params: &[Vec<f32>],
    extra: &[FrozenParam],
) -> Result<()> {
    write_params_with(
        Path::new(path),
        layout,
        extra,
        &BTreeMap::new(),
        |u, buf| {
            buf.copy_from_slice(&params[u][..buf.len()]);
            Ok(())
        },
    )
}

/// Creates the directory `target` will be written to: at start-up for `output.export`, so that
/// a path that cannot be written fails before the training rather than after it.
pub fn create_parent_dir(target: &Path) -> Result<()> {
    match target.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir)
            .map_err(|e| KilnError::file(dir, format!("cannot create the output directory: {e}"))),
        None => Ok(()),
    }
}

/// Writes every unit's parameters to `target`; `fill(u, buf)` provides unit u's unpadded
/// buffer. Only one unit is held at a time.
pub fn write_params(
    target: &Path,
    layout: &ModelLayout,
    metadata: &BTreeMap<String, String>,
    fill: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    write_params_with(target, layout, &[], metadata, fill)
}

fn write_params_with(
    target: &Path,
    layout: &ModelLayout,
    extra: &[FrozenParam],
    metadata: &BTreeMap<String, String>,
    fill: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    create_parent_dir(target)?;
    let tmp = target.with_extension("safetensors.tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = write_tmp(&tmp, layout, extra, metadata, fill)
        .and_then(|()| std::fs::rename(&tmp, target).map_err(|e| KilnError::io(target, e)));
    if written.is_err() {
        // A full disk, say: leave nothing half-written behind (and free its space).
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_tmp(
    tmp: &Path,
    layout: &ModelLayout,
    extra: &[FrozenParam],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>)> = layout
        .units
        .iter()
        .flat_map(|u| u.params.iter().map(|p| (p.path.clone(), p.shape.clone())))
        .chain(
            extra
                .iter()
                .map(|(path, shape, _)| (path.clone(), shape.clone())),
        )
        .collect();
    let writer = TensorFileWriter::create(tmp, &tensors, metadata)?;
    for (u, unit) in layout.units.iter().enumerate() {
        let mut buf = vec![0.0f32; unit.numel];
        fill(u, &mut buf)?;
        for p in &unit.params {
            writer.write(&p.path, 0, &buf[p.range()])?;
        }
    }
    for (path, _, values) in extra {
        writer.write(path, 0, values)?;
    }
    writer.finish()
}

/// `kiln export --format hf|peft|kiln [--merge] CHECKPOINT OUT`: the parameters of a
/// checkpoint (a step directory, or a checkpoint.dir to take its latest) as a Hugging Face
/// directory (`--merge`: LoRA adapters added into their weights), as a PEFT adapter
/// directory, or as one safetensors file with kiln's names (`kiln consolidate`).
pub fn export_command(
    format: &str,
    merge: bool,
    dtype: &str,
    checkpoint: &Path,
    out: &Path,
) -> Result<()> {
    let dir = super::locate(
        &checkpoint.display().to_string(),
        &crate::config::CheckpointConfig::default(),
    )?;
    let dtype = match dtype {
        "f32" => StoredDtype::F32,
        "bf16" => StoredDtype::BF16,
        "f16" => StoredDtype::F16,
        other => {
            return Err(KilnError::config(format!(
                "--dtype: `{other}` is not one of f32, bf16, f16"
            )))
        }
    };
    if dtype != StoredDtype::F32 && format != "hf" {
        return Err(KilnError::config(format!(
            "--dtype: writes an hf export's weights in another precision; --format is {format}"
        )));
    }
    if merge && format != "hf" {
        return Err(KilnError::config(format!(
            "--merge: adds LoRA adapters into the weights of an hf export; --format is {format}"
        )));
    }
    match format {
        "hf" => export_hf(&dir, merge, dtype, out)?,
        "peft" => export_peft(&dir, out)?,
        "kiln" => super::consolidate(&dir, out)?,
        other => {
            return Err(KilnError::config(format!(
                "--format: `{other}` is not one of hf, peft, kiln"
            )))
        }
    }
    eprintln!("kiln: wrote {} from {}", out.display(), dir.display());
    Ok(())
}

fn export_hf(dir: &Path, merge: bool, dtype: StoredDtype, out: &Path) -> Result<()> {
    let manifest = super::verify(dir)?;
    let mut values = ModelValues::open(dir, &manifest)?;
    if values.adapters().is_some() && !merge {
        return Err(KilnError::config(format!(
            "checkpoint {} holds LoRA adapters: --format peft writes them as an adapter, \
             --format hf --merge the model with them added into its weights",
            dir.display()
        )));
    }
    let params = values.params();
    let read = |p: &str, s: &[usize]| values.merged(p, s);
    // A model read from a Hugging Face directory (a Llama-family decoder) carries its
    // config.json in its description and names its parameters as transformers does.
    match manifest.model["model"].get("hf_config") {
        Some(config) => {
            let name = |p: &str, s: &[usize]| Ok(crate::hf::decoder_name(p, s));
            crate::hf::write_hf_dir(out, config, &params, dtype, name, read)?;
            copy_beside(Path::new(&manifest.config.model.init_from), out)
        }
        None => crate::hf::export_hf(out, &manifest.gpt(dir)?, &params, dtype, read),
    }
}

fn export_peft(dir: &Path, out: &Path) -> Result<()> {
    let manifest = super::verify(dir)?;
    let values = ModelValues::open(dir, &manifest)?;
    let Some((shape, modules)) = values.adapters() else {
        return Err(KilnError::config(format!(
            "--format peft: checkpoint {} was trained without [lora]; --format hf writes its model",
            dir.display()
        )));
    };
    let decoder = manifest.model["model"].get("hf_config").is_some();
    let base = &manifest.config.model.init_from;
    let task = decoder.then_some("CAUSAL_LM");
    crate::hf::peft::write_adapter(out, shape, base, task, modules)
}

/// The files of a Hugging Face directory that are not weights — the tokenizer, its config and
/// chat template, generation settings — copied from the checkpoint the run started from, so
/// that the export loads with `AutoTokenizer` too. Files it lacks are skipped.
fn copy_beside(init_from: &Path, out: &Path) -> Result<()> {
    const FILES: [&str; 4] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ];
    for name in FILES {
        let from = init_from.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(|e| KilnError::io(&to, e))?;
        }
    }
    Ok(())
}

//! `output.export`: the final parameters as one f32 safetensors file, tensor names = module paths,
//! shapes as in the model. Written to a temporary name and renamed, so a crash never leaves a
//! half-written file under the final name.

use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// Writes `params` (one unpadded buffer per unit, following `layout`) to `path`.
pub fn export_safetensors(path: &str, layout: &ModelLayout, params: &[Vec<f32>]) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (unit, buf) in layout.units.iter().zip(params) {
        for p in &unit.params {
            let data: Vec<u8> = buf[p.range()]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            bytes.push((p.path.clone(), p.shape.clone(), data));
        }
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).expect("shape matches data"),
            )
        })
        .collect();
    let target = Path::new(path);
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            KilnError::file(
                dir,
                format!("cannot create the directory of output.export: {e}"),
            )
        })?;
    }
    let tmp = target.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, &None, &tmp)
        .map_err(|e| KilnError::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, target).map_err(|e| KilnError::io(target, e))
}

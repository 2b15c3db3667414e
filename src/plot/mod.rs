//! `kiln plot RUN_DIR`: PNG files from a run's `metrics.jsonl` (issue 14).
//!
//! - `loss.png`: training loss (and validation loss when the run has it) and, on the right
//!   axis, the learning rate, over steps;
//! - `memory.png`: model-state bytes by kind, stacked, with the process's peak resident set
//!   and its peak by phase as lines;
//! - `step_time.png`: step time split into compute, exposed communication and optimizer,
//!   stacked.
//!
//! Drawn with plotters' bitmap backend. Text is rasterised by ab_glyph from DejaVu Sans,
//! compiled in (`assets/fonts`, Debian's fonts-dejavu-core 2.37, Bitstream Vera licence), so
//! nothing depends on the machine's fonts or fontconfig.

mod charts;

use crate::error::{KilnError, Result};
use charts::{Chart, Series};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One metrics.jsonl line, as far as plots need it.
struct Point {
    step: f64,
    row: Value,
}

impl Point {
    fn get(&self, key: &str) -> Option<f64> {
        key.split('.')
            .try_fold(&self.row, |v, k| v.get(k))
            .and_then(Value::as_f64)
    }
}

fn series(points: &[Point], name: &str, key: &str, scale: f64) -> Series {
    Series {
        name: name.to_string(),
        points: points
            .iter()
            .filter_map(|p| Some((p.step, p.get(key)? * scale)))
            .collect(),
    }
}

/// Writes the PNGs of `run_dir`'s metrics.jsonl into `out` (default `run_dir/plots`); returns
/// their paths.
pub fn plot(run_dir: &Path, out: Option<&Path>) -> Result<Vec<PathBuf>> {
    let metrics = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .map_err(|e| KilnError::file(&metrics, format!("cannot read the run's metrics: {e}")))?;
    let mut points = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: Value = serde_json::from_str(line).map_err(|e| {
            KilnError::file(&metrics, format!("line {}: not a JSON object: {e}", i + 1))
        })?;
        let step = row.get("step").and_then(Value::as_f64).ok_or_else(|| {
            KilnError::file(&metrics, format!("line {}: no `step` number", i + 1))
        })?;
        points.push(Point { step, row });
    }
    if points.is_empty() {
        return Err(KilnError::file(&metrics, "has no steps to plot"));
    }
    let out = out.map_or_else(|| run_dir.join("plots"), Path::to_path_buf);
    std::fs::create_dir_all(&out)
        .map_err(|e| KilnError::file(&out, format!("cannot create the plot directory: {e}")))?;
    let mib = 1.0 / (1u64 << 20) as f64;

    let mut loss = vec![series(&points, "train loss", "loss", 1.0)];
    let val = series(&points, "val loss", "val_loss", 1.0);
    if !val.points.is_empty() {
        loss.push(val);
    }
    let loss_chart = Chart {
        title: "loss and learning rate".into(),
        y_label: "loss (nats/token)".into(),
        lines: loss,
        stacked: Vec::new(),
        secondary: Some(series(&points, "learning rate", "lr", 1.0)),
    };

    let kinds = [
        ("parameters", "memory.params_full"),
        ("parameter shards", "memory.param_shards"),
        ("gradients", "memory.grads"),
        ("optimizer states", "memory.optimizer"),
        ("comm buffers", "memory.comm_buffers"),
        ("gathered units", "memory.gathered"),
    ];
    let stacked: Vec<Series> = kinds
        .iter()
        .map(|(n, k)| series(&points, n, k, mib))
        .filter(|s| s.points.iter().any(|p| p.1 > 0.0))
        .collect();
    let mut lines = vec![series(&points, "peak RSS (process)", "peak_rss_mb", 1.0)];
    for (n, k) in [
        ("forward peak", "phase_peak.forward_mb"),
        ("backward peak", "phase_peak.backward_mb"),
        ("optimizer-step peak", "phase_peak.optimizer_mb"),
        ("checkpoint-save peak", "phase_peak.checkpoint_mb"),
    ] {
        let s = series(&points, n, k, 1.0);
        if !s.points.is_empty() {
            lines.push(s);
        }
    }
    let memory_chart = Chart {
        title: "memory: model states by kind (stacked, rank 0) and peaks".into(),
        y_label: "MiB".into(),
        lines,
        stacked,
        secondary: None,
    };

    let compute = Series {
        name: "compute".into(),
        points: points
            .iter()
            .filter_map(|p| {
                let rest =
                    p.get("comm_wait_ms").unwrap_or(0.0) + p.get("optimizer_ms").unwrap_or(0.0);
                Some((p.step, (p.get("step_ms")? - rest).max(0.0)))
            })
            .collect(),
    };
    let time_chart = Chart {
        title: "step time (stacked)".into(),
        y_label: "ms".into(),
        lines: Vec::new(),
        stacked: vec![
            compute,
            series(&points, "exposed communication", "comm_wait_ms", 1.0),
            series(&points, "optimizer", "optimizer_ms", 1.0),
        ],
        secondary: None,
    };

    let mut written = Vec::new();
    for (name, chart) in [
        ("loss.png", loss_chart),
        ("memory.png", memory_chart),
        ("step_time.png", time_chart),
    ] {
        let path = out.join(name);
        chart
            .draw(&path)
            .map_err(|e| KilnError::file(&path, format!("cannot draw: {e}")))?;
        written.push(path);
    }
    Ok(written)
}

/// `kiln plot`: writes the PNGs and names them.
pub fn run(run_dir: &Path, out: Option<&Path>) -> Result<()> {
    for path in plot(run_dir, out)? {
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(())
}

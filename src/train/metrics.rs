//! Run outputs on rank 0: `metrics.jsonl` (one object per optimizer step) and `summary.json`.

use crate::error::{KilnError, Result};
use crate::memory::phases::PhasePeaks;
use crate::strategy::MemoryReport;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: u64,
    /// Mean token loss over the global batch.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// fp16: the loss scale after this step (halved after an overflow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// fp16: the gradients overflowed and every rank skipped this step.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Mean token loss over the validation rows after this step (`data.val_path`), at the
    /// steps where it is computed (`train.eval_every`); absent at the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    /// Wall time of the step, ms.
    pub step_ms: f64,
    /// Time the step waited for gradient communication, ms.
    pub comm_wait_ms: f64,
    /// Time of the AdamW update, optimizer-state transfers included, ms.
    pub optimizer_ms: f64,
    /// Time spent uploading each unit's parameters to the device and downloading its gradients,
    /// ms (host wall time; on the CPU, flex's copies). See [`crate::engine::Engine::take_transfer_ms`].
    pub transfer_ms: f64,
    /// Global-batch tokens per second.
    pub tokens_per_s: f64,
    /// Model-state bytes by kind on this rank.
    pub memory: MemoryReport,
    /// Peak resident set size of the process so far (VmHWM), MiB.
    pub peak_rss_mb: f64,
    /// Peak resident set of the process within each phase of this step, MiB (issue 14; see
    /// [`crate::memory::phases`]); `null` for a phase that did not run or is not metered.
    pub phase_peak: PhasePeaks,
    /// Minor page faults of the process during the step, up to this record: pages the kernel
    /// mapped and zeroed for it (with `--simulate`, every rank's). Mostly freed memory coming
    /// back; `train.keep_freed_memory` removes them.
    pub minor_faults: u64,
    /// Device memory burn's allocator holds at the end of the step (pages kept for reuse
    /// included), MiB; `null` on the CPU.
    pub gpu_reserved_mb: Option<f64>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The step the model has reached: `train.steps`, or fewer when stopped by a signal.
    pub steps: u64,
    /// A stop signal (SIGTERM, SIGINT, SIGUSR1) ended the run after `steps`, before
    /// `train.steps`; `--resume` continues it.
    pub stopped_by_signal: bool,
    /// Ranks.
    pub world: usize,
    /// ZeRO stage.
    pub stage: u8,
    /// Collective backend.
    pub backend: String,
    /// Mean loss of the last `final_loss_window` steps.
    pub final_loss: f64,
    /// Steps averaged into `final_loss`.
    pub final_loss_window: usize,
    /// The last validation loss (`train.eval_every`; absent without validation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The lowest validation loss of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_val_loss: Option<f64>,
    /// The step after which `best_val_loss` was measured (0: before training).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_val_step: Option<u64>,
    /// The validation loss before the first step (a run that starts from step 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_val_loss: Option<f64>,
    /// The data's entropy rate (markov), nats/token: the loss floor.
    pub entropy_rate: Option<f64>,
    /// final_loss ÷ entropy_rate.
    pub loss_over_entropy: Option<f64>,
    /// Parameter count.
    pub num_params: usize,
    /// Median step time, ms.
    pub median_step_ms: f64,
    /// Tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Peak resident set size of the process (VmHWM), MiB.
    pub peak_rss_mb: f64,
    /// The run's peak resident set within each phase, MiB (the largest over its steps).
    pub phase_peak: PhasePeaks,
    /// What `kiln estimate` predicts for the peak resident set of this process, MiB.
    pub predicted_peak_rss_mb: f64,
    /// Model-state bytes by kind on rank 0.
    pub memory: MemoryReport,
    /// Minor page faults of the process over the whole run, start-up included.
    pub minor_faults: u64,
    /// Wall time of the run, s.
    pub wall_s: f64,
}

/// Appends step records to `dir/metrics.jsonl` (created fresh for each run).
pub struct MetricsWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl`: a new file, or (a resumed run) the existing one, appended to.
    pub fn create(dir: &str, append: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| KilnError::file(dir, format!("cannot create output.dir: {e}")))?;
        let path = Path::new(dir).join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|e| KilnError::io(&path, e))?;
        Ok(MetricsWriter {
            file: std::io::BufWriter::new(file),
            path,
        })
    }

    /// Writes one line and flushes it, so a crashed run keeps its metrics.
    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record).expect("records serialise");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| KilnError::io(&self.path, e))
    }
}

/// Writes `dir/summary.json`.
pub fn write_summary(dir: &str, summary: &Summary) -> Result<()> {
    let path = Path::new(dir).join("summary.json");
    let text = serde_json::to_string_pretty(summary).expect("summary serialises");
    std::fs::write(&path, text + "\n").map_err(|e| KilnError::io(&path, e))
}

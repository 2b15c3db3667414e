//! Memory by phase (issue 14): the peak resident set within forward, backward, the optimizer
//! step and a checkpoint save, per step, so that "which phase runs out" is read, not guessed.
//!
//! Linux keeps one high-water mark per process (VmHWM in `/proc/self/status`), and writing `5`
//! to `/proc/self/clear_refs` resets it to the current resident set (Linux ≥ 4.0; checked in
//! this container, kernel 6.18). The meter reads the mark when a phase ends and resets it when
//! the next begins, so each reading is the peak of one phase. Costs two small file operations
//! per phase (measured: see README "Memory by phase").
//!
//! The mark belongs to the process: with `--simulate N` the N ranks share it, so only the
//! process's first rank meters, and its figure is the peak of the whole process while that rank
//! was in the phase (the ranks move through a step together, held by its collectives). Because
//! the meter resets the mark, the run's peak is the largest reading it has taken
//! ([`PhaseMeter::run_peak`]), not VmHWM at the end.

use serde::Serialize;

/// A part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward of a micro-batch.
    Forward = 0,
    /// Backward of a micro-batch (gradient hand-off to the strategy included).
    Backward = 1,
    /// The strategy's step: communication that finishes there, clipping, AdamW.
    Optimizer = 2,
    /// Saving a checkpoint.
    Checkpoint = 3,
    /// Anything else: data, the loss all-reduce, metrics.
    Other = 4,
}

/// Peak resident set of each phase of one step (or of the run), MiB. `None`: the phase did not
/// run (no checkpoint was saved at that step) or memory is not metered.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct PhasePeaks {
    /// Forward, over the step's micro-batches.
    pub forward_mb: Option<f64>,
    /// Backward, over the step's micro-batches.
    pub backward_mb: Option<f64>,
    /// The optimizer step.
    pub optimizer_mb: Option<f64>,
    /// The checkpoint save.
    pub checkpoint_mb: Option<f64>,
}

impl PhasePeaks {
    /// The larger of each phase's peak.
    pub fn max(self, other: PhasePeaks) -> PhasePeaks {
        let m = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        PhasePeaks {
            forward_mb: m(self.forward_mb, other.forward_mb),
            backward_mb: m(self.backward_mb, other.backward_mb),
            optimizer_mb: m(self.optimizer_mb, other.optimizer_mb),
            checkpoint_mb: m(self.checkpoint_mb, other.checkpoint_mb),
        }
    }

    /// The phase with the largest peak and its peak, MiB.
    pub fn largest(&self) -> Option<(&'static str, f64)> {
        [
            ("forward", self.forward_mb),
            ("backward", self.backward_mb),
            ("optimizer step", self.optimizer_mb),
            ("checkpoint save", self.checkpoint_mb),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Meters the phases of one process (see the module doc). A disabled meter (the default, and
/// every rank but the process's first) does nothing.
#[derive(Debug)]
pub struct PhaseMeter {
    enabled: bool,
    current: Phase,
    /// Peak bytes of each phase since the last [`PhaseMeter::take_step`]; 0 = did not run.
    peaks: [u64; 5],
    run_peak: u64,
}

impl Default for PhaseMeter {
    fn default() -> Self {
        PhaseMeter {
            enabled: false,
            current: Phase::Other,
            peaks: [0; 5],
            run_peak: 0,
        }
    }
}

impl PhaseMeter {
    /// A meter that meters when `enabled` and the kernel can reset the mark.
    pub fn new(enabled: bool) -> Self {
        let enabled = enabled && reset_high_water_mark();
        PhaseMeter {
            enabled,
            run_peak: high_water_mark(),
            ..Default::default()
        }
    }

    /// Whether this meter measures.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Ends the current phase (its peak is the mark now) and starts `phase` with a fresh mark.
    pub fn enter(&mut self, phase: Phase) {
        if !self.enabled || phase == self.current {
            return;
        }
        let peak = high_water_mark();
        let i = self.current as usize;
        self.peaks[i] = self.peaks[i].max(peak);
        self.run_peak = self.run_peak.max(peak);
        reset_high_water_mark();
        self.current = phase;
    }

    /// The peaks of the phases since the last call (one step), then starts afresh.
    pub fn take_step(&mut self) -> PhasePeaks {
        // The phase still running (usually Other) is read into the run's peak only.
        let now = high_water_mark();
        self.run_peak = self.run_peak.max(now);
        let peaks = std::mem::take(&mut self.peaks);
        let mb = |b: u64| (self.enabled && b > 0).then(|| b as f64 / (1 << 20) as f64);
        PhasePeaks {
            forward_mb: mb(peaks[Phase::Forward as usize]),
            backward_mb: mb(peaks[Phase::Backward as usize]),
            optimizer_mb: mb(peaks[Phase::Optimizer as usize]),
            checkpoint_mb: mb(peaks[Phase::Checkpoint as usize]),
        }
    }

    /// The process's peak resident set since the meter was made, bytes: the largest reading,
    /// which is VmHWM itself when the meter is disabled.
    pub fn run_peak(&mut self) -> u64 {
        self.run_peak = self.run_peak.max(high_water_mark());
        self.run_peak
    }
}

/// VmHWM of this process, bytes; 0 if unknown.
pub fn high_water_mark() -> u64 {
    peak_rss_bytes()
}

/// Resets VmHWM to the current resident set; false where the kernel does not allow it.
fn reset_high_water_mark() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process (VmHWM from /proc/self/status), bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

//! The memory estimate of one process: what each of its ranks holds, by kind, and the predicted
//! peak resident set (`kiln estimate`, the preflight check, the run's start and end lines).
//!
//! Model states are exact (the trainer's own accounting, [`super::rank_model_states`]). The
//! rest follows one step's backward, where the peak is: when unit `u`'s backward runs, the
//! process holds the graphs of the kept units up to `u` (ZeRO-3's regathered units' without
//! their matrices), the input of every recomputed unit up to `u` and, if `u` recomputes, its
//! rebuilt graph; and the parameter tensors those graphs hold.
//! - **graph sizes** (per micro-batch of `b` sequences of `t` tokens, f32): burn's autodiff graph
//!   keeps about 23·t·d floats per block plus h·t² for the attention probabilities (the fused
//!   GELU and attention of `model::fused` save their input and P); the head 4.75·t·V (logits,
//!   log-softmax and their gradients); the embedding's graph is one [b, t, d] sum, counted with
//!   the inputs.
//! - **coefficients**: fitted by weighted least squares (relative error) to the measured peak
//!   resident set (VmHWM, `peak_rss_mb` in summary.json) of 191 two-step runs on a 2-core
//!   machine (`scripts/memory_matrix.py --raw`, refitted by `scripts/memory_fit.py`; the runs
//!   are `scripts/memory_runs.jsonl`): tiny and small × stages 0–3 × offload none/nvme ×
//!   recompute off/on/every:2 at 1, 2 and 4 simulated ranks, 2 ranks under mpirun; and d_model
//!   1024, vocab 8192, seq_len 512, 12 layers of d_model 128, and gpt2-124m at seq_len 256, at
//!   stages 0 and 3, recompute off/on, 1 and 2 ranks. Run again on 2026-12-07, when `kiln train`
//!   stopped gathering the final parameters it had no use for (the earlier fit's 0.98 × Ψ per
//!   rank was mostly that copy, at the end of the run). The fit: activations 0.85 × the graphs
//!   above; 0.98 × the parameter tensors the graphs hold (the engine's per-unit tensors); 0.55
//!   × the model's parameter bytes Ψ per rank, even under ZeRO-3 (the engine computes on whole
//!   units, and the allocator keeps some of what a step freed); 41.1 MiB per rank (its threads,
//!   their stacks and allocator arenas, burn's buffers); 26.8 MiB per process (binary,
//!   runtime); 11.8 MiB more under a launcher (the MPI library's buffers and progress thread).
//!   Over the 191 runs: median error 2.4%, max 17.1%, four runs outside ±10%, all
//!   under-predictions with recompute (d_model 1024 at ZeRO-3: −17.1% at 2 ranks, −10.9% at 1;
//!   seq_len 512: −13.0%, −10.9%). Refitted without one shape at a time, the fit predicts it
//!   within 4–18% (gpt2-124m within 10.4%); without tiny or small, within 16% and 19%.
//!   Identical runs differ by up to 13% here (138, 140 and 156 MiB for one run of 12 layers of
//!   d_model 128 repeated, in an earlier fit's runs), which bounds what any such fit can
//!   promise.

use super::model_states::{plan_layout, rank_model_states, unit_param_bytes};
use crate::model::{Gpt, ModelUnits};
use crate::plan::Plan;
use crate::strategy::MemoryReport;
use serde::Serialize;

const MIB: f64 = (1 << 20) as f64;

/// The fitted coefficients (module doc).
const ACTIVATIONS: f64 = 0.852;
const PARAMS_IN_GRAPHS: f64 = 0.980;
const WHOLE_MODEL: f64 = 0.546;
const PER_RANK_MIB: f64 = 41.1;
const PER_PROCESS_MIB: f64 = 26.8;
const LAUNCHER_MIB: f64 = 11.8;

/// The process an estimate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `n` ranks as threads of this process: `--simulate n`, or a run of one rank without a
    /// launcher.
    Threads(usize),
    /// One rank started by a launcher (mpirun, srun): the MPI library comes on top.
    Launched,
}

impl Process {
    /// The process `comm` runs in: the local backend's ranks are threads of one process (all
    /// of `--simulate N`, or a world of 1 without a launcher); any other backend's rank was
    /// launched.
    pub fn running(comm: &dyn crate::comm::Communicator) -> Self {
        match comm.backend() {
            "local" => Process::Threads(comm.world()),
            _ => Process::Launched,
        }
    }

    /// Ranks in the process.
    pub fn ranks(self) -> usize {
        match self {
            Process::Threads(n) => n,
            Process::Launched => 1,
        }
    }
}

/// What one process holds, by kind, and its predicted peak resident set.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Estimate {
    /// Ranks sharing this process (1 under mpirun, N with `--simulate N`).
    pub ranks: usize,
    /// Model states of one rank: exactly what its strategy's `memory()` reports after a step.
    pub rank_states: MemoryReport,
    /// Activations of one rank's micro-batch at the peak, bytes.
    pub rank_activations: usize,
    /// One rank's compute workspace at the peak (see the module doc), bytes.
    pub rank_workspace: usize,
    /// Binary, runtime, the launcher's library and the ranks' threads, bytes.
    pub baseline: usize,
    /// Predicted peak resident set of the process, bytes.
    pub peak: usize,
}

/// One rank's model states by kind, for a log line: `params …`, `grads …`, `optimizer …`, and
/// the kinds that are not zero.
pub fn states_breakdown(s: &MemoryReport) -> Vec<String> {
    let mut parts = vec![format!("params {}", bytes(s.params_full + s.param_shards))];
    if s.params_offloaded > 0 {
        parts.push(format!("(+{} on disk)", bytes(s.params_offloaded)));
    }
    parts.extend([
        format!("grads {}", bytes(s.grads)),
        format!("optimizer {}", bytes(s.optimizer)),
    ]);
    if s.optimizer_offloaded > 0 {
        parts.push(format!("(+{} on disk)", bytes(s.optimizer_offloaded)));
    }
    if s.frozen_params > 0 {
        parts.push(format!("frozen params {}", bytes(s.frozen_params)));
    }
    if s.comm_buffers > 0 {
        parts.push(format!("comm buffers {}", bytes(s.comm_buffers)));
    }
    if s.gathered > 0 {
        parts.push(format!("gathered units {}", bytes(s.gathered)));
    }
    parts
}

impl Estimate {
    /// Bytes one rank adds to the process.
    pub fn per_rank(&self) -> usize {
        self.rank_states.total() + self.rank_activations + self.rank_workspace
    }

    /// A one-line breakdown: `1 rank × (params …, grads …, …) + baseline …`.
    pub fn breakdown(&self) -> String {
        let mut parts = states_breakdown(&self.rank_states);
        parts.push(format!("activations {}", bytes(self.rank_activations)));
        parts.push(format!("workspace {}", bytes(self.rank_workspace)));
        format!(
            "{} rank{} × ({}) + baseline {}",
            self.ranks,
            if self.ranks == 1 { "" } else { "s" },
            parts.join(", "),
            bytes(self.baseline)
        )
    }
}

/// Estimates `process` running ranks of `plan`. Allocates nothing the size of the model.
pub fn estimate(plan: &Plan, process: Process) -> Estimate {
    let ranks = process.ranks();
    let layout = plan_layout(plan);
    let rank_states = rank_model_states(plan, &layout);
    let backwards = unit_backwards(plan, &layout);
    let unit_bytes: Vec<f64> = (0..layout.units.len())
        .map(|u| unit_param_bytes(&layout, |v| v == u) as f64)
        .collect();
    let peak = backward_peak(plan, &unit_bytes, &backwards);
    let rank_activations = (ACTIVATIONS * peak.activations) as usize;
    let whole_model: f64 = unit_bytes.iter().sum();
    let rank_workspace =
        (PARAMS_IN_GRAPHS * peak.params_in_graphs + WHOLE_MODEL * whole_model) as usize;
    let launcher = if process == Process::Launched {
        LAUNCHER_MIB
    } else {
        0.0
    };
    let baseline = ((PER_PROCESS_MIB + launcher + PER_RANK_MIB * ranks as f64) * MIB) as usize;
    let per_rank = rank_states.total() + rank_activations + rank_workspace;
    Estimate {
        ranks,
        rank_states,
        rank_activations,
        rank_workspace,
        baseline,
        peak: per_rank.saturating_mul(ranks).saturating_add(baseline),
    }
}

/// What a unit's backward starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitBackward {
    /// Its graph and the parameter tensors in it, kept since the forward.
    Kept,
    /// Its graph without its matrices (released by ZeRO-3), which are refilled for its backward.
    Regathered,
    /// Its input only: its forward runs again first (`train.recompute`, or a unit ZeRO-3
    /// releases that the model cannot run with released weights: the embedding).
    Recomputed,
}

/// Each unit's [`UnitBackward`], by the engine's rule: `train.recompute` resolved, and under
/// ZeRO-3 with `parallel.reshard_after_forward` every unit it releases after forward.
pub fn unit_backwards(plan: &Plan, layout: &crate::flat::ModelLayout) -> Vec<UnitBackward> {
    let persistent =
        super::model_states::persistent_units(layout, plan.config.parallel.persist_threshold);
    let released = super::model_states::zero3_released_units(plan, &persistent);
    let released = |u: usize| plan.stage == 3 && released[u];
    let model = Gpt::new(*plan.gpt());
    (0..layout.units.len())
        .map(|u| {
            if plan.recompute.get(u).copied().unwrap_or(false) {
                UnitBackward::Recomputed
            } else if !released(u) {
                UnitBackward::Kept
            } else if model.matmul_weights(u).is_some() {
                UnitBackward::Regathered
            } else {
                UnitBackward::Recomputed
            }
        })
        .collect()
}

/// One moment of the backward: the activation bytes held, and the parameter bytes the graphs
/// hold as tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Held {
    activations: f64,
    params_in_graphs: f64,
}

/// The moment of one micro-batch's backward that holds the most (module doc): units' backward
/// runs from the last to the first, and at unit `u`'s, the kept units up to `u` hold their
/// graphs and parameter tensors, the regathered ones their graphs, the recomputed ones their
/// input, and `u` its parameters as tensors (refilled, or with its rebuilt graph if it
/// recomputes). In f64: a shape a user typed can overflow integer products, and the result
/// saturates instead.
fn backward_peak(plan: &Plan, unit_bytes: &[f64], backwards: &[UnitBackward]) -> Held {
    let m = plan.gpt();
    let (b, t, d, h) = (
        plan.micro_batch as f64,
        m.seq_len as f64,
        m.d_model as f64,
        m.n_heads as f64,
    );
    let last = backwards.len().saturating_sub(1);
    let graph = |u: usize| match u {
        0 => 0.0,
        u if u == last => 4.75 * t * m.vocab as f64,
        _ => 23.0 * t * d + h * t * t,
    };
    let cost = |h: &Held| ACTIVATIONS * h.activations + PARAMS_IN_GRAPHS * h.params_in_graphs;
    let mut kept = Held::default();
    let mut worst = Held::default();
    // Forward order: what units 0..=u leave behind, then the moment of u's backward.
    for (u, &backward) in backwards.iter().enumerate() {
        let held = match backward {
            UnitBackward::Recomputed => {
                kept.activations += 4.0 * b * t * d;
                Held {
                    activations: kept.activations + 4.0 * b * graph(u),
                    params_in_graphs: kept.params_in_graphs + unit_bytes[u],
                }
            }
            // The graph keeps the unit's LayerNorm gains and biases, a few d floats: not
            // counted.
            UnitBackward::Regathered => {
                kept.activations += 4.0 * b * graph(u);
                Held {
                    params_in_graphs: kept.params_in_graphs + unit_bytes[u],
                    ..kept
                }
            }
            UnitBackward::Kept => {
                kept.activations += 4.0 * b * graph(u);
                kept.params_in_graphs += unit_bytes[u];
                kept
            }
        };
        if cost(&held) > cost(&worst) {
            worst = held;
        }
    }
    worst
}

/// Bytes for people: `512.0 MiB`, `3.1 GiB`, `2.9 TiB`.
pub fn bytes(n: usize) -> String {
    let n = n as f64;
    let units = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in units {
        let unit = (1u64 << shift) as f64;
        if n >= unit {
            return format!("{:.1} {name}", n / unit);
        }
    }
    format!("{n} B")
}

//! The memory estimate of one process: what each of its ranks holds, by kind, and the predicted
//! peak resident set (the seed of issue 14's `kiln estimate`).
//!
//! Model states are exact (the trainer's own accounting, [`super::rank_model_states`]). The
//! other terms were fitted to measured peaks (VmHWM, `peak_rss_mb` in summary.json) of 3-step
//! runs on this 2-core machine, 2026-11: tiny and small presets at micro-batch 1–16, with and
//! without recompute; tiny with seq_len 8/64, n_heads 1/16, vocab 2048, 8 layers, d_model
//! 32–1024; gpt2-124m at seq 256; stages 0–3 at 1, 2 and 4 simulated ranks; the nvme tier.
//! Over those 47 runs the predicted peak is within ±10% of the measured one, except models under
//! 1M parameters (up to +200%: the fixed workspace term dominates there) and d_model 128 at
//! micro-batch 1 (−20%) and gpt2-124m without recompute (+12%).
//! - **baseline**: a run of a 30k-parameter model at micro-batch 1 peaks at 20.7 MiB with one
//!   rank, 28.9 MiB with two and 43.2 MiB with four (binary, mimalloc, threads and their
//!   stacks): 13.5 MiB per process plus 7.5 MiB per rank.
//! - **activations** (per micro-batch of `b` sequences of `t` tokens): burn's autodiff graph
//!   keeps about 43·t·d floats per block plus 3·h·t² for the attention scores (decomposed
//!   attention), and the head 4.75·t·V (logits, log-softmax and their gradients); fitted by
//!   least squares over the variations above. With recompute, each unit's input (t·d) is kept
//!   and only one unit's graph exists at a time: the larger of a block's and the head's.
//! - **workspace**: what a step allocates besides states and activations: the engine's copies
//!   of each unit's parameters as tensors, gradient tensors on their way to the buckets, the
//!   gradient scratch buffer, gemm packing and allocator slack. Fitted as a·Ψ + u·U + k, Ψ the
//!   model's (padded) parameter bytes and U the largest unit's: without recompute the graph
//!   holds every unit's parameter tensors (a = 1.8, u = 3.3, k = 12 MiB); with recompute one
//!   unit's at a time (a = 0.9, u = 2.5, k = 35 MiB). It does not shrink with ZeRO-3: the engine
//!   computes on whole units (measured: 364 MiB per rank at 1 and at 2 ranks, d_model 1024).

use super::model_states::{largest_unit_bytes, plan_layout, rank_model_states, unit_param_bytes};
use crate::plan::Plan;
use crate::strategy::MemoryReport;
use serde::Serialize;

const MIB: f64 = (1 << 20) as f64;

/// What one process holds, by kind, and its predicted peak resident set.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Estimate {
    /// Ranks sharing this process (1 under mpirun, N with `--simulate N`).
    pub ranks: usize,
    /// Model states of one rank: exactly what its strategy's `memory()` reports after a step.
    pub rank_states: MemoryReport,
    /// Activations of one rank's micro-batch, bytes.
    pub rank_activations: usize,
    /// One rank's compute workspace (see the module doc), bytes.
    pub rank_workspace: usize,
    /// Binary, allocator and threads of the process, bytes.
    pub baseline: usize,
    /// Predicted peak resident set of the process, bytes.
    pub peak: usize,
}

impl Estimate {
    /// Bytes one rank adds to the process.
    pub fn per_rank(&self) -> usize {
        self.rank_states.total() + self.rank_activations + self.rank_workspace
    }

    /// A one-line breakdown: `1 rank × (params …, grads …, …) + baseline …`.
    pub fn breakdown(&self) -> String {
        let s = &self.rank_states;
        let mut parts = vec![
            format!("params {}", bytes(s.params_full + s.param_shards)),
            format!("grads {}", bytes(s.grads)),
            format!("optimizer {}", bytes(s.optimizer)),
        ];
        if s.optimizer_offloaded > 0 {
            parts.push(format!("(+{} on disk)", bytes(s.optimizer_offloaded)));
        }
        if s.comm_buffers > 0 {
            parts.push(format!("comm buffers {}", bytes(s.comm_buffers)));
        }
        if s.gathered > 0 {
            parts.push(format!("gathered units {}", bytes(s.gathered)));
        }
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

/// Estimates the process running `ranks` ranks of `plan` (all `plan.world` under `--simulate`,
/// one under a launcher). Allocates nothing the size of the model.
pub fn estimate(plan: &Plan, ranks: usize) -> Estimate {
    let layout = plan_layout(plan);
    let rank_states = rank_model_states(plan, &layout);
    let recompute = recompute_units(plan);
    let rank_activations = activation_bytes(plan, &recompute);
    let kept = unit_param_bytes(&layout, |u| !recompute[u]) as f64;
    let recomputed = unit_param_bytes(&layout, |u| recompute[u]) as f64;
    let largest = largest_unit_bytes(&layout) as f64;
    // A kept unit's graph holds its parameter tensors until its backward; a recomputed unit's
    // parameters are uploaded twice, once per forward, and dropped after each.
    let rank_workspace = if kept == 0.0 {
        0.9 * recomputed + 2.5 * largest + 35.0 * MIB
    } else {
        1.8 * kept + 0.9 * recomputed + 3.3 * largest + 12.0 * MIB
    } as usize;
    let baseline = ((13.5 + 7.5 * ranks as f64) * MIB) as usize;
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

/// Which units recompute: `train.recompute` resolved, and under ZeRO-3 with
/// `parallel.reshard_after_forward` every unit it releases after forward (the engine's rule).
pub fn recompute_units(plan: &Plan) -> Vec<bool> {
    if plan.stage < 3 {
        return plan.recompute.clone();
    }
    let layout = plan_layout(plan);
    let persistent =
        super::model_states::persistent_units(&layout, plan.config.parallel.persist_threshold);
    super::model_states::zero3_recompute_units(plan, &persistent)
}

/// Activation bytes of one micro-batch (module doc). A kept unit holds its graph from its
/// forward to its backward; a recomputed one holds its input, and its graph exists only during
/// its own backward, one unit at a time. In f64: a shape a user typed can overflow integer
/// products, and the result saturates instead.
fn activation_bytes(plan: &Plan, recompute: &[bool]) -> usize {
    let m = &plan.model;
    let (b, t, d, h) = (
        plan.micro_batch as f64,
        m.seq_len as f64,
        m.d_model as f64,
        m.n_heads as f64,
    );
    let vocab = m.vocab as f64;
    let block = 43.0 * t * d + 3.0 * h * t * t;
    let head = 4.75 * t * vocab;
    let last = recompute.len().saturating_sub(1);
    // The embedding's graph is one [b, t, d] sum: counted with the inputs.
    let graph = |u: usize| match u {
        0 => 0.0,
        u if u == last => head,
        _ => block,
    };
    let kept: f64 = (0..recompute.len())
        .filter(|&u| !recompute[u])
        .map(graph)
        .sum();
    let inputs = recompute.iter().filter(|&&r| r).count() as f64 * t * d;
    let rebuilt = (0..recompute.len())
        .filter(|&u| recompute[u])
        .map(graph)
        .fold(0.0, f64::max);
    (4.0 * b * (kept + inputs + rebuilt)) as usize
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

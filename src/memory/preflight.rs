//! Preflight (issue 13): before a rank allocates anything, compare the memory estimate of the
//! processes on this machine with what they may use, and refuse a run that cannot fit with one
//! line naming the estimate, the limit and a setting that would fit.

use super::estimate::{bytes, estimate, Estimate, Process};
use super::limit::{process_limit, MemoryLimit};
use super::model_states::{largest_unit_bytes, plan_layout};
use crate::error::{KilnError, Result};
use crate::offload::Tier;
use crate::plan::Plan;

/// Where the ranks of a run live, as far as memory is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// This process: N ranks as threads (`--simulate N`), or one rank under a launcher.
    pub process: Process,
    /// Processes of this run on this machine, which share its memory (mpirun's local size).
    pub processes_here: usize,
}

/// Checks `plan` against the memory this process may use; logs the estimate next to the limit.
/// Does nothing with `train.preflight = false` or where no limit can be read.
pub fn preflight(plan: &Plan, residency: Residency) -> Result<()> {
    if !plan.config.train.preflight {
        return Ok(());
    }
    let Some(limit) = process_limit() else {
        return Ok(());
    };
    check(plan, residency, &limit)
}

/// Resolves `train.micro_batch = "auto"` in `plan` against the memory this process may use
/// ([`auto_micro_batch`]); returns the choice, or `None` when the plan has a fixed micro-batch.
/// Where no limit can be read the rank's whole share is one micro-batch.
pub fn choose_micro_batch(plan: &mut Plan, residency: Residency) -> Result<Option<AutoChoice>> {
    if !plan.micro_batch_auto {
        return Ok(None);
    }
    let Some(limit) = process_limit() else {
        tracing::warn!(
            "train.micro_batch = \"auto\": this machine's memory limit cannot be read; using {} (no accumulation)",
            plan.micro_batch * plan.grad_accum
        );
        return Ok(None);
    };
    let choice = auto_micro_batch(plan, residency, &limit)?;
    choice.apply(plan);
    Ok(Some(choice))
}

/// [`preflight`] against a given limit.
pub fn check(plan: &Plan, residency: Residency, limit: &MemoryLimit) -> Result<()> {
    let here = residency.processes_here.max(1);
    let est = estimate(plan, residency.process);
    let need = need_here(&est, here);
    tracing::debug!(
        "preflight: estimate {} ({}) of {} ({})",
        bytes(need),
        est.breakdown(),
        bytes(limit.bytes as usize),
        limit.source
    );
    if need as u64 <= limit.bytes {
        return Ok(());
    }
    let per = if here > 1 {
        format!(
            "{} per process × {here} processes on this machine = {}",
            bytes(est.peak),
            bytes(need)
        )
    } else {
        bytes(need)
    };
    Err(KilnError::config(format!(
        "preflight: this run needs about {per} of memory ({}) but {} may use {} ({}); {} — or set train.preflight = false to run anyway",
        est.breakdown(),
        if here > 1 { "they" } else { "this process" },
        bytes(limit.bytes as usize),
        limit.source,
        suggestion(plan, residency, limit.bytes)
    )))
}

/// The share of the memory limit `train.micro_batch = "auto"` keeps free: the estimate is held
/// to ±15% of measured peaks (tests/memory_estimate.rs) and mostly errs high; the margin covers
/// what it misses of allocator fragmentation and the libraries' own buffers.
pub const AUTO_MARGIN: f64 = 0.15;

/// What `train.micro_batch = "auto"` chose.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoChoice {
    /// The micro-batch.
    pub micro: usize,
    /// Micro-batches per step on each rank.
    pub accum: usize,
    /// Its estimate, bytes, for the processes on this machine.
    pub need: usize,
    /// What the processes may use, less the margin.
    pub budget: usize,
    /// The next size up and its estimate, if there is one.
    pub next: Option<(usize, usize)>,
}

impl AutoChoice {
    /// The log line.
    pub fn describe(&self) -> String {
        let next = match self.next {
            Some((m, need)) => format!("; {m} would need {}", bytes(need)),
            None => "; no larger one divides the rank's share of the global batch".into(),
        };
        format!(
            "train.micro_batch = \"auto\": {} (× grad_accum {}), estimated {} of the {} left after a {:.0}% margin{next}",
            self.micro,
            self.accum,
            bytes(self.need),
            bytes(self.budget),
            AUTO_MARGIN * 100.0
        )
    }

    /// Puts the choice into `plan`.
    pub fn apply(&self, plan: &mut Plan) {
        plan.micro_batch = self.micro;
        plan.grad_accum = self.accum;
    }
}

/// `train.micro_batch = "auto"`: the largest micro-batch that divides each rank's share of the
/// global batch and whose estimate fits `limit` less [`AUTO_MARGIN`]. An error names the smallest
/// micro-batch's need and a setting that would fit.
pub fn auto_micro_batch(
    plan: &Plan,
    residency: Residency,
    limit: &MemoryLimit,
) -> Result<AutoChoice> {
    let here = residency.processes_here.max(1);
    let share = plan.micro_batch * plan.grad_accum;
    let budget = (limit.bytes as f64 * (1.0 - AUTO_MARGIN)) as usize;
    let with = |micro: usize| {
        let mut p = plan.clone();
        p.micro_batch = micro;
        p.grad_accum = share / micro;
        p
    };
    let need = |micro: usize| need_here(&estimate(&with(micro), residency.process), here);
    let sizes: Vec<usize> = (1..=share).rev().filter(|m| share % m == 0).collect();
    let mut next = None;
    for &micro in &sizes {
        let n = need(micro);
        if n <= budget {
            return Ok(AutoChoice {
                micro,
                accum: share / micro,
                need: n,
                budget,
                next,
            });
        }
        next = Some((micro, n));
    }
    let smallest = with(1);
    Err(KilnError::config(format!(
        "key `train.micro_batch`: \"auto\" finds none that fits: a micro-batch of 1 needs about {} but {} may use {} ({}) less a {:.0}% margin; {}",
        bytes(need(1)),
        if here > 1 { "the processes on this machine" } else { "this process" },
        bytes(limit.bytes as usize),
        limit.source,
        AUTO_MARGIN * 100.0,
        suggestion(&smallest, residency, budget as u64)
    )))
}

fn need_here(est: &Estimate, processes_here: usize) -> usize {
    est.peak.saturating_mul(processes_here)
}

/// One candidate: the keys it changes and the plan it gives.
struct Candidate {
    changes: Vec<String>,
    plan: Plan,
}

/// Candidates in the order they are offered: every combination of a higher ZeRO stage, the nvme
/// tier (on this CPU backend `cpu` holds the states in the same memory as `none`), at stage 3
/// the parameters in files too, recompute and a smaller micro-batch, preferring (in that
/// order) the stage, the tiers, recompute, and a micro-batch as large as possible.
fn candidates(plan: &Plan) -> Vec<Candidate> {
    let m = plan.micro_batch;
    let micros: Vec<usize> = (1..=m).rev().filter(|d| m % d == 0).collect();
    let tiers = if plan.offload == Tier::Nvme {
        vec![false]
    } else {
        vec![false, true]
    };
    let recomputes = if plan.recompute.iter().all(|&r| r) {
        vec![false]
    } else {
        vec![false, true]
    };
    let params = if plan.param_offload == Tier::Nvme {
        vec![false]
    } else {
        vec![false, true]
    };
    let mut out = Vec::new();
    for &micro in &micros {
        for &recompute in &recomputes {
            for (&nvme, &param_nvme) in tiers
                .iter()
                .flat_map(|t| params.iter().map(move |p| (t, p)))
            {
                for stage in plan.stage..=3 {
                    if param_nvme && stage != 3 {
                        continue;
                    }
                    let mut p = plan.clone();
                    let mut changes = Vec::new();
                    if stage != plan.stage {
                        p.stage = stage;
                        p.config.parallel.stage = stage;
                        changes.push(format!("parallel.stage={stage}"));
                    }
                    if nvme {
                        p.offload = Tier::Nvme;
                        p.config.offload.optimizer = "nvme".into();
                        changes.push("offload.optimizer=nvme".into());
                    }
                    if param_nvme {
                        p.param_offload = Tier::Nvme;
                        p.config.offload.param = "nvme".into();
                        changes.push("offload.param=nvme".into());
                    }
                    if recompute {
                        p.config.train.recompute = crate::config::Recompute::All;
                        p.recompute = vec![true; plan.recompute.len()];
                        changes.push("train.recompute=true".into());
                    }
                    if micro != m {
                        p.micro_batch = micro;
                        p.grad_accum = plan.grad_accum * (m / micro);
                        p.config.train.micro_batch = Some(crate::config::MicroBatch::Size(micro));
                        p.config.train.grad_accum = Some(p.grad_accum);
                        changes.push(format!(
                            "train.micro_batch={micro} (with train.grad_accum={} for the same global batch)",
                            p.grad_accum
                        ));
                    }
                    if !changes.is_empty() {
                        out.push(Candidate { changes, plan: p });
                    }
                }
            }
        }
    }
    out
}

/// What to change: the first candidate that fits, else how many ranks would, else a smaller
/// model.
fn suggestion(plan: &Plan, residency: Residency, limit: u64) -> String {
    let here = residency.processes_here.max(1);
    let fits = |p: &Plan, process: Process, here: usize| {
        need_here(&estimate(p, process), here) as u64 <= limit
    };
    if let Some(c) = candidates(plan)
        .into_iter()
        .find(|c| fits(&c.plan, residency.process, here))
    {
        return format!("this would fit: --set {}", c.changes.join(" --set "));
    }
    let tried = "no setting of parallel.stage, offload.optimizer, offload.param, train.recompute or train.micro_batch fits";
    // The leanest setting, one rank per process and one process per machine, at growing world
    // sizes: ZeRO-3 divides the model states, not the unit a rank computes on.
    let mut lean = candidates(plan)
        .pop()
        .map_or_else(|| plan.clone(), |c| c.plan);
    lean.stage = 3;
    lean.config.parallel.stage = 3;
    for world in (0..=16).map(|k| 1usize << k) {
        if world <= plan.world {
            continue;
        }
        lean.world = world;
        if fits(&lean, Process::Launched, 1) {
            return format!(
                "{tried}; use more ranks (about {world} with one process per machine like this one, at parallel.stage=3 with offload.optimizer=nvme, offload.param=nvme, train.recompute=true and train.micro_batch=1) or a smaller model"
            );
        }
    }
    let unit = largest_unit_bytes(&plan_layout(plan));
    format!(
        "{tried}, nor does any number of ranks (each rank computes on whole units, and the largest holds {} of parameters); use a smaller model",
        bytes(unit)
    )
}

//! `kiln estimate`: the estimate of the configured run and of every stage × offload tier ×
//! recompute setting as a table (the seeds' per-GPU table), or as JSON. The same
//! [`estimate()`](super::estimate()) as the preflight check and the start-of-run log line.

use super::estimate::{bytes, estimate, Estimate, Process};
pub use super::variant::{recompute_name, variant};
use crate::config::Recompute;
use crate::error::Result;
use crate::offload::Tier;
use crate::plan::Plan;
use serde::Serialize;

/// One row: a setting and its estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// ZeRO stage.
    pub stage: u8,
    /// Optimizer-state tier (`none`, `cpu`, `nvme`).
    pub offload: String,
    /// `train.recompute` as typed (`false`, `true`, `every:2`, or the list).
    pub recompute: String,
    /// Parameter bytes of one rank in memory (full and shards).
    pub params_bytes: usize,
    /// Parameter-shard bytes in files (`offload.param = "nvme"`), not in memory.
    pub params_offloaded_bytes: usize,
    /// Gradient bytes of one rank.
    pub grads_bytes: usize,
    /// Optimizer-state bytes in memory of one rank.
    pub optimizer_bytes: usize,
    /// Optimizer-state bytes in files (nvme), not in memory.
    pub optimizer_offloaded_bytes: usize,
    /// Communication buffers of one rank.
    pub comm_buffers_bytes: usize,
    /// ZeRO-3 gathered units of one rank, at their peak.
    pub gathered_bytes: usize,
    /// Activations of one rank's micro-batch.
    pub activations_bytes: usize,
    /// One rank's compute workspace.
    pub workspace_bytes: usize,
    /// The process's baseline (binary, allocator, threads).
    pub baseline_bytes: usize,
    /// Ranks in the process.
    pub ranks: usize,
    /// Predicted peak resident set of the process.
    pub predicted_peak_rss_bytes: usize,
}

impl Row {
    fn new(plan: &Plan, est: &Estimate) -> Row {
        let s = &est.rank_states;
        Row {
            stage: plan.stage,
            offload: plan.config.offload.optimizer.clone(),
            recompute: recompute_name(&plan.config.train.recompute),
            params_bytes: s.params_full + s.param_shards,
            params_offloaded_bytes: s.params_offloaded,
            grads_bytes: s.grads,
            optimizer_bytes: s.optimizer,
            optimizer_offloaded_bytes: s.optimizer_offloaded,
            comm_buffers_bytes: s.comm_buffers,
            gathered_bytes: s.gathered,
            activations_bytes: est.rank_activations,
            workspace_bytes: est.rank_workspace,
            baseline_bytes: est.baseline,
            ranks: est.ranks,
            predicted_peak_rss_bytes: est.peak,
        }
    }
}

/// What `kiln estimate --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Ranks of the launch.
    pub world: usize,
    /// Ranks in the process estimated (1 under a launcher, `world` with `--simulate`).
    pub ranks_per_process: usize,
    /// Whether the process was started by a launcher (mpirun, srun), with its MPI library.
    pub launched: bool,
    /// Parameter count.
    pub num_params: usize,
    /// The configured run.
    pub configured: Row,
    /// Every stage 0–3 × offload none/cpu/nvme × recompute off/on.
    pub matrix: Vec<Row>,
}

/// The report for `plan` run by `process`.
pub fn report(plan: &Plan, process: Process) -> Result<Report> {
    let mut matrix = Vec::new();
    for stage in 0..=3 {
        for tier in [Tier::None, Tier::Cpu, Tier::Nvme] {
            for recompute in [Recompute::Off, Recompute::All] {
                let p = variant(plan, stage, tier, recompute)?;
                matrix.push(Row::new(&p, &estimate(&p, process)));
            }
        }
    }
    Ok(Report {
        world: plan.world,
        ranks_per_process: process.ranks(),
        launched: process == Process::Launched,
        num_params: plan.gpt().num_params(),
        configured: Row::new(plan, &estimate(plan, process)),
        matrix,
    })
}

/// The report as text: the configured run by kind, then the table.
pub fn render(r: &Report) -> String {
    let c = &r.configured;
    let per = if r.launched {
        "one rank per process (mpirun)".to_string()
    } else if r.ranks_per_process == 1 {
        "one process, no launcher".to_string()
    } else {
        format!("{} ranks in this process (--simulate)", r.ranks_per_process)
    };
    let mut out = format!(
        "{} parameters, world {}, {per}\n\nconfigured run (stage {}, offload {}, recompute {}), per rank:\n",
        r.num_params, r.world, c.stage, c.offload, c.recompute
    );
    let kinds = [
        ("parameters", c.params_bytes),
        ("  offloaded to files", c.params_offloaded_bytes),
        ("gradients", c.grads_bytes),
        ("optimizer states", c.optimizer_bytes),
        ("  offloaded to files", c.optimizer_offloaded_bytes),
        ("communication buffers", c.comm_buffers_bytes),
        ("gathered units", c.gathered_bytes),
        ("activations", c.activations_bytes),
        ("workspace", c.workspace_bytes),
    ];
    for (name, b) in kinds {
        out += &format!("  {name:<24}{:>12}\n", bytes(b));
    }
    out += &format!(
        "process baseline            {:>12}\npredicted peak RSS          {:>12}  ({} rank{} + baseline)\n\n",
        bytes(c.baseline_bytes),
        bytes(c.predicted_peak_rss_bytes),
        c.ranks,
        if c.ranks == 1 { "" } else { "s" }
    );
    out +=
        "per rank, except baseline and peak (per process); 'offloaded' is on disk, not in memory\n";
    let head = [
        "stage",
        "offload",
        "recomp",
        "params",
        "grads",
        "optim",
        "offloaded",
        "comm",
        "gathered",
        "activ",
        "workspace",
        "baseline",
        "peak",
    ];
    let widths = [5, 7, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10];
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join(" ")
            + "\n"
    };
    out += &line(head.iter().map(|s| s.to_string()).collect());
    for row in &r.matrix {
        out += &line(vec![
            row.stage.to_string(),
            row.offload.clone(),
            if row.recompute == "true" { "on" } else { "off" }.into(),
            bytes(row.params_bytes),
            bytes(row.grads_bytes),
            bytes(row.optimizer_bytes),
            bytes(row.optimizer_offloaded_bytes),
            bytes(row.comm_buffers_bytes),
            bytes(row.gathered_bytes),
            bytes(row.activations_bytes),
            bytes(row.workspace_bytes),
            bytes(row.baseline_bytes),
            bytes(row.predicted_peak_rss_bytes),
        ]);
    }
    out
}

/// `kiln estimate`: prints the report (or, with `fit`, the largest model per stage and tier) for
/// `config` at `world` ranks, one process per rank or all of them in this one (`simulate`).
/// `memory_gib` defaults to what this process may use.
pub fn run(
    config: &crate::config::Config,
    world: usize,
    simulate: bool,
    json: bool,
    fit: bool,
    memory_gib: Option<f64>,
) -> Result<()> {
    use crate::error::KilnError;
    if world == 0 {
        return Err(KilnError::config(
            "--world: the number of ranks must be at least 1",
        ));
    }
    // With no batch key, train's defaults give global batch 8, which only 1, 2, 4 or 8 ranks
    // divide; an estimate at another world size takes the documented micro-batch of 8 instead.
    let mut config = config.clone();
    let t = &mut config.train;
    if t.global_batch.is_none() && t.micro_batch.is_none() && t.grad_accum.is_none() {
        t.micro_batch = Some(crate::config::MicroBatch::Size(8));
    }
    let mut plan = Plan::resolve(&config, world)?;
    // Without --simulate, a world of one runs without a launcher; more ranks need one.
    let process = if simulate || world == 1 {
        Process::Threads(world)
    } else {
        Process::Launched
    };
    let memory = || -> Result<u64> {
        match memory_gib {
            Some(g) if g.is_finite() && g > 0.0 => Ok((g * (1u64 << 30) as f64) as u64),
            Some(g) => Err(KilnError::config(format!(
                "--memory: {g} must be a positive number of GiB"
            ))),
            None => Ok(super::process_limit()
                .ok_or_else(|| {
                    KilnError::config(
                        "--memory: this machine's limit cannot be read; give --memory GIB",
                    )
                })?
                .bytes),
        }
    };
    if plan.micro_batch_auto {
        // As `kiln train` will choose: one process of `world` threads, or one rank per process.
        let residency = super::Residency {
            process,
            processes_here: if simulate { 1 } else { world },
        };
        let limit = super::MemoryLimit {
            bytes: memory()?,
            source: "--memory, or what this process may use".into(),
        };
        let choice = super::auto_micro_batch(&plan, residency, &limit)?;
        choice.apply(&mut plan);
        if !json {
            println!("{}", choice.describe());
        }
    }
    if !fit {
        let r = report(&plan, process)?;
        match json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(&r).expect("report serialises")
            ),
            false => print!("{}", render(&r)),
        }
        return Ok(());
    }
    let memory = memory()?;
    let fits = super::fit::fit(&plan, process, memory)?;
    match json {
        true => println!(
            "{}",
            serde_json::to_string_pretty(&fits).expect("fits serialise")
        ),
        false => print!("{}", super::fit::render(&plan, process, memory, &fits)),
    }
    Ok(())
}

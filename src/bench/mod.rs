//! `kiln bench …`: benchmarks that print ratios against the strongest reference available on
//! this machine, measured in the same run.

pub mod adamw;
pub mod comm;
pub mod offload;
pub mod train;

use crate::error::{KilnError, Result};
use clap::Subcommand;

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Collective bus bandwidth, kiln vs the MPI library on the same buffers (run under mpirun).
    Comm {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fused AdamW throughput at 1 and 2 threads, kiln vs PyTorch's fused CPU AdamW.
    Adamw {
        /// Parameters per step.
        #[arg(long, default_value_t = 20_000_000)]
        params: usize,
        /// Alternating rounds (each times 10 steps per contender and thread count).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// A Python with torch installed, for the reference.
        #[arg(long)]
        torch_python: Option<String>,
    },
    /// One-process training step (the configured preset, tiny by default; micro-batch 8, one
    /// thread), kiln vs PyTorch.
    Step {
        /// A Python with torch installed, to run scripts/torch_gpt.py alongside.
        #[arg(long)]
        torch_python: Option<String>,
        /// Run shape.
        #[command(flatten)]
        shape: ShapeArgs,
    },
    /// The nvme tier: optimizer-state throughput vs the disk's O_DIRECT bandwidth, and the
    /// training-step time with states on nvme vs in memory (tier cpu).
    Offload {
        /// Directory to measure (default: offload.nvme_path's default).
        #[arg(long, default_value = "/tmp")]
        dir: std::path::PathBuf,
        /// Parameters whose m and v are streamed (default: the small preset's).
        #[arg(long, default_value_t = 25_609_216)]
        params: usize,
        /// Chunk size, MiB (offload.chunk_mb).
        #[arg(long, default_value_t = 4.0)]
        chunk_mb: f64,
        /// Buffers in flight (offload.buffer_count).
        #[arg(long, default_value_t = 4)]
        buffer_count: usize,
        /// Run shape of the step comparison.
        #[command(flatten)]
        shape: ShapeArgs,
    },
    /// Weak scaling of DDP: one process vs N ranks under mpirun, micro-batch 8 per rank.
    Ddp {
        /// Number of ranks.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// A Python with torch installed: runs PyTorch's counterpart of the configured stage
        /// alongside (DDP; DDP + ZeroRedundancyOptimizer for ZeRO-1/2; FSDP2 for ZeRO-3, with
        /// the same reshard_after_forward).
        #[arg(long)]
        torch_python: Option<String>,
        /// ZeRO-3 with reshard_after_forward = true, both recomputing: kiln with
        /// train.recompute = true (every unit) against FSDP2 with activation checkpointing per
        /// block. Refused with any other stage or reshard setting.
        #[arg(long)]
        torch_recompute: bool,
        /// Run shape.
        #[command(flatten)]
        shape: ShapeArgs,
    },
}

/// The shape of a training benchmark.
#[derive(clap::Args, Debug)]
pub struct ShapeArgs {
    /// Recipe.
    #[arg(long, default_value = "configs/tiny.toml")]
    config: std::path::PathBuf,
    /// Extra overrides (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Steps per run.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Runs per contender, alternating.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Micro-batch per rank.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
}

impl ShapeArgs {
    fn shape(self) -> train::BenchShape {
        train::BenchShape {
            config: self.config,
            sets: self.sets,
            steps: self.steps,
            repeats: self.repeats,
            micro_batch: self.micro_batch,
        }
    }
}

/// How scripts/torch_gpt.py builds the configured model: kiln's preset, or the Hugging Face
/// checkpoint `model.init_from` names (loaded by transformers) at `model.seq_len`.
/// `train.precision = "bf16"` runs it under `torch.autocast` in bfloat16.
fn torch_model_args(config: &crate::config::Config) -> Vec<String> {
    let m = &config.model;
    let mut args: Vec<String> = match m.init_from.is_empty() {
        true => vec!["--preset".into(), m.preset.clone()],
        false => vec![
            "--init-from".into(),
            m.init_from.clone(),
            "--seq-len".into(),
            m.seq_len.unwrap_or(256).to_string(),
        ],
    };
    if config.train.precision != "f32" {
        args.extend(["--precision".into(), config.train.precision.clone()]);
    }
    args
}

/// Runs a benchmark.
pub fn run(what: BenchCommand) -> Result<()> {
    match what {
        BenchCommand::Comm { json } => {
            let comm = crate::comm::open("auto", &crate::comm::CommOptions::new(false))?;
            if comm.world() < 2 {
                return Err(KilnError::config(
                    "bench comm needs at least 2 ranks: run it under mpirun -np N",
                ));
            }
            let rows = comm::measure(comm.as_ref())?;
            if comm.rank() == 0 {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&rows).expect("rows serialise")
                    );
                } else {
                    print!("{}", comm::table(&rows, comm.world()));
                }
            }
            Ok(())
        }
        BenchCommand::Adamw {
            params,
            rounds,
            torch_python,
        } => {
            for threads in [1, 2] {
                let mut kiln = Vec::new();
                let mut torch = Vec::new();
                for _ in 0..rounds {
                    kiln.push(adamw::kiln_mparams_per_s(params, threads, 10));
                    if let Some(py) = &torch_python {
                        torch.push(adamw::torch_mparams_per_s(py, params, threads, 10)?);
                    }
                }
                let k = train::median_of(&kiln);
                print!("{threads} thread(s): kiln {k:.0} Mparam/s");
                if !torch.is_empty() {
                    let t = train::median_of(&torch);
                    print!(", PyTorch fused {t:.0} Mparam/s, ratio {:.2}", k / t);
                }
                println!("  ({params} parameters, medians of {rounds} alternating rounds)");
            }
            Ok(())
        }
        BenchCommand::Step {
            torch_python,
            shape,
        } => {
            let shape = shape.shape();
            let config = crate::config::load(Some(&shape.config), &shape.sets)?;
            let model = torch_model_args(&config);
            let torch = torch_python.as_deref().map(|py| (py, model.as_slice()));
            let results = train::step(&shape, torch)?;
            let kiln = results[0].median_ms();
            println!(
                "kiln (burn flex)  median {kiln:.1} ms/step over {} runs",
                results[0].step_ms.len()
            );
            if let Some(torch) = results.get(1) {
                let t = torch.median_ms();
                println!("PyTorch           median {t:.1} ms/step");
                println!(
                    "kiln speed ÷ PyTorch speed = {:.2} (ratio of medians), {:.2} (median of run-by-run ratios)",
                    t / kiln,
                    results[0].paired_speed_ratio(torch)
                );
            }
            Ok(())
        }
        BenchCommand::Offload {
            dir,
            params,
            chunk_mb,
            buffer_count,
            shape,
        } => {
            let config = crate::config::OffloadConfig {
                optimizer: "nvme".into(),
                nvme_path: dir.display().to_string(),
                chunk_mb,
                buffer_count,
                ..Default::default()
            };
            let state_bytes = 8 * params;
            let chunk_bytes = (chunk_mb * (1 << 20) as f64) as usize / 4096 * 4096;
            // The disk's reference uses transfers of at least 16 MiB, its best case.
            let (read, write) =
                offload::disk_bandwidth(&dir, state_bytes, chunk_bytes.max(16 << 20))?;
            // Moving S bytes in and S out back to back at the disk's own speeds takes S/read + S/write.
            let disk_rw = 2.0 / (1.0 / read + 1.0 / write);
            let tier = offload::tier_throughput(&config, params, 5)?;
            println!("disk O_DIRECT sequential ({}): read {read:.2} GB/s, write {write:.2} GB/s, read+write back to back {disk_rw:.2} GB/s", dir.display());
            println!("nvme tier AdamW step over {params} parameters ({:.0} MiB of m and v, {chunk_mb} MiB chunks × {buffer_count}): {tier:.2} GB/s read+written, ratio {:.2}", state_bytes as f64 / (1 << 20) as f64, tier / disk_rw);
            let mut shape = shape.shape();
            if shape.config == std::path::Path::new("configs/tiny.toml") {
                shape.config = "configs/small.toml".into();
            }
            shape
                .sets
                .push(format!("offload.nvme_path={}", dir.display()));
            shape.sets.push(format!("offload.chunk_mb={chunk_mb}"));
            shape
                .sets
                .push(format!("offload.buffer_count={buffer_count}"));
            let [cpu, nvme] = offload::step_times(&shape)?;
            let (c, n) = (cpu.median_ms(), nvme.median_ms());
            println!(
                "training step ({}): tier cpu {c:.1} ms, tier nvme {n:.1} ms, nvme ÷ cpu {:.2}",
                shape.config.display(),
                n / c
            );
            Ok(())
        }
        BenchCommand::Ddp {
            world,
            torch_python,
            torch_recompute,
            shape,
        } => {
            let mut shape = shape.shape();
            if torch_recompute {
                shape.sets.push("train.recompute=true".into());
            }
            let config = crate::config::load(Some(&shape.config), &shape.sets)?;
            let p = &config.parallel;
            // PyTorch's side recomputes only under FSDP2 with resharding; elsewhere kiln alone
            // would recompute and the ratio would compare unlike runs.
            if torch_recompute && !(p.stage == 3 && p.reshard_after_forward) {
                return Err(KilnError::config(format!(
                    "--torch-recompute: needs parallel.stage = 3 with parallel.reshard_after_forward \
                     = true (FSDP2 with activation checkpointing), not stage {} with \
                     reshard_after_forward = {}",
                    p.stage, p.reshard_after_forward
                )));
            }
            let mode = match (p.stage, p.reshard_after_forward) {
                (0, _) => "ddp",
                (1 | 2, _) => "zero1",
                (_, true) if torch_recompute => "fsdp2-recompute",
                (_, true) => "fsdp2",
                (_, false) => "fsdp2-keep",
            };
            if torch_python.is_some() && !config.model.init_from.is_empty() {
                return Err(KilnError::config(
                    "--torch-python: bench ddp compares kiln's presets with PyTorch; \
                     model.init_from is compared by bench step",
                ));
            }
            let model = torch_model_args(&config);
            let torch = torch_python
                .as_deref()
                .map(|py| (py, model.as_slice(), mode));
            let results = train::ddp(&shape, world, torch)?;
            let (s, m, i) = (
                results[0].median_ms(),
                results[1].median_ms(),
                results[2].median_ms(),
            );
            println!("one process                     median {s:.1} ms/step");
            println!("{world} ranks (mpirun)                median {m:.1} ms/step, exposed comm {:.2} ms/step", train::median_of(&results[1].comm_wait_ms));
            println!("{world} independent processes       median {i:.1} ms/step (no communication: the machine's own contention)");
            println!("weak-scaling efficiency {:.3}, overhead {:.1} ms/step ({:.1} ms over independent processes)", s / m, m - s, m - i);
            if let Some(torch) = results.get(3) {
                let t = torch.median_ms();
                println!("PyTorch {mode}, {world} ranks (gloo)  median {t:.1} ms/step; kiln speed ÷ PyTorch speed = {:.2} (ratio of medians), {:.2} (median of run-by-run ratios)", t / m, results[1].paired_speed_ratio(torch));
            }
            Ok(())
        }
    }
}

//! The training loop: the same code for every stage and world size. It builds the micro-batches
//! of this rank, runs them through the engine, and calls the strategy's step.

mod export;
mod fault;
mod job;
mod metrics;
mod validation;

pub use export::{export_safetensors, write_params};
pub use job::{gpt_job, val_loss, BatchSource, Evaluator, Job, Metrics};
pub use metrics::{peak_rss_bytes, MetricsWriter, StepRecord, Summary};

use crate::checkpoint;
use crate::comm::{agree_on, Communicator, ReduceOp};
use crate::engine::Engine;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::memory::phases::{Phase, PhaseMeter, PhasePeaks};
use crate::model::Activation;
use crate::plan::Plan;
use crate::strategy::{self, MemoryReport, MicroStep};
use indicatif::{ProgressBar, ProgressStyle};

const MIB: f64 = (1u64 << 20) as f64;
use std::sync::Arc;
use std::time::Instant;

/// Options that are about this invocation rather than the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar.
    pub quiet: bool,
    /// Don't write metrics, summary or export (tests that only want the numbers).
    pub no_outputs: bool,
    /// `--resume`: a checkpoint directory, a `checkpoint.dir`, or `latest`.
    pub resume: Option<String>,
    /// Polled once per step: when any rank sees it, every rank stops after that step (and
    /// saves a checkpoint when `checkpoint.dir` is set). See [`crate::signals`].
    pub stop: crate::signals::StopRequest,
}

/// What a run produced, on every rank.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Loss of every step (mean over the global batch).
    pub losses: Vec<f32>,
    /// Global gradient norm of every step.
    pub grad_norms: Vec<f64>,
    /// Final parameters of every unit, without padding (empty when a stop request ended the
    /// run: the checkpoint holds them).
    pub params: Vec<Vec<f32>>,
    /// The step a stop request ended the run after, before `train.steps`.
    pub stopped_at: Option<u64>,
    /// The layout the parameters follow.
    pub layout: ModelLayout,
    /// Parameters outside the layout (a user model's frozen ones) as (path, shape, values);
    /// empty when a stop request ended the run.
    pub frozen: Vec<crate::model::FrozenParam>,
    /// Rank 0's summary.
    pub summary: Summary,
    /// Validation losses as (optimizer steps done, loss); step 0 is before training. Empty
    /// without validation (`train.eval_every` = 0).
    pub val_losses: Vec<(u64, f32)>,
    /// Every evaluation's metrics as (optimizer steps done, metrics), in order.
    pub val_metrics: Vec<(u64, Metrics)>,
}

/// Trains the built-in GPT that `plan` describes as rank `comm.rank()` of `comm.world()`.
pub fn run(plan: &Plan, comm: Arc<dyn Communicator>, opts: &RunOptions) -> Result<RunOutcome> {
    run_with(plan, comm, opts, |comm| gpt_job(plan, comm))
}

/// Trains the model `job` builds (after the flight recorder is set up, so that its start-up
/// collectives are recorded) as rank `comm.rank()` of `comm.world()`. A failed run aborts the
/// communicator so that no rank is left in a collective.
pub fn run_with<B: 'static, A: Activation>(
    plan: &Plan,
    comm: Arc<dyn Communicator>,
    opts: &RunOptions,
    job: impl FnOnce(&dyn Communicator) -> Result<Job<B, A>>,
) -> Result<RunOutcome> {
    let e = match run_inner(plan, comm.clone(), opts, job) {
        Ok(outcome) => return Ok(outcome),
        Err(e) => e,
    };
    comm.abort(&e.to_string());
    match e {
        // A collective failed: keep the evidence, as a timeout does. (Not for bad input, which
        // must leave nothing behind.)
        KilnError::Comm(msg) => {
            let record = comm.dump_flight().map_or(String::new(), |p| {
                format!("; flight record in {}", p.display())
            });
            Err(KilnError::Comm(format!("{msg}{record}")))
        }
        e => Err(e),
    }
}

fn run_inner<B: 'static, A: Activation>(
    plan: &Plan,
    comm: Arc<dyn Communicator>,
    opts: &RunOptions,
    job: impl FnOnce(&dyn Communicator) -> Result<Job<B, A>>,
) -> Result<RunOutcome> {
    let started = Instant::now();
    crate::memory::allocator::keep_freed_pages(plan.config.train.keep_freed_memory);
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let fault = fault::Fault::from_env()?;
    let rank_device = crate::device::for_rank(plan.device, rank, world)?;
    if !opts.no_outputs {
        comm.set_flight_dir(std::path::Path::new(&plan.config.output.dir));
    }
    // Start-up steps that can fail on some ranks only (a file missing on one node, a full nvme
    // disk) end with the ranks agreeing on the outcome: the failure is one line, said by the
    // rank that hit it, and no rank is left in a collective.
    let Job {
        model,
        source,
        eval: validation,
        name: model_name,
        estimate,
    } = job(comm.as_ref())?;
    let layout = ModelLayout::new(model.as_ref(), world);
    comm.set_serves("the start-up checks");
    let mut strategy = agree_on(
        comm.as_ref(),
        strategy::build(plan, comm.clone(), &layout, model.as_ref()),
    )?;
    let first_step = match &opts.resume {
        Some(arg) => {
            let dir = checkpoint::locate(arg, &plan.config.checkpoint).map_err(|e| {
                // Every rank finds the same thing; rank 0 says it.
                if lead {
                    e
                } else {
                    KilnError::ReportedByAnotherRank(e.exit_code())
                }
            })?;
            checkpoint::resume(&dir, plan, comm.as_ref(), strategy.as_mut())?
        }
        None => 0,
    };
    let checkpoint_due = |step: u64| {
        let c = &plan.config.checkpoint;
        !c.dir.is_empty() && ((c.every > 0 && step % c.every == 0) || step == plan.steps)
    };
    let mut engine = Engine::new(model, layout.clone(), rank_device.burn_device(), false)
        .with_recompute_units(plan.recompute.clone());
    // VmHWM is per process: with --simulate only rank 0 meters it (memory::phases), and runs
    // without outputs (tests in one process) leave it alone.
    let meter = !opts.no_outputs && (lead || comm.backend() != "local");
    *engine.phases() = PhaseMeter::new(meter);
    let mut run_phase_peak = PhasePeaks::default();

    // Output paths are created now, so that one that cannot be written fails before training.
    let outputs = || -> Result<Option<MetricsWriter>> {
        let (checkpoints, export) = (&plan.config.checkpoint.dir, &plan.config.output.export);
        if !lead {
            return Ok(None);
        }
        if !checkpoints.is_empty() {
            checkpoint::prepare_dir(std::path::Path::new(checkpoints))?;
        }
        if opts.no_outputs {
            return Ok(None);
        }
        if !export.is_empty() {
            export::create_parent_dir(std::path::Path::new(export))?;
        }
        MetricsWriter::create(&plan.config.output.dir, first_step > 0).map(Some)
    };
    comm.set_serves("the start-up checks");
    let mut writer = agree_on(comm.as_ref(), outputs())?;
    // Only now, when everything that can fail at start-up has been checked: a run that cannot
    // start prints one line, the reason.
    tracing::info!(
        "rank {rank} (local rank {}) computes on {rank_device}",
        crate::comm::placement(rank, world).local_rank
    );
    if lead {
        tracing::info!("{}", source.describe());
        if let Some(v) = &validation {
            tracing::info!("{}", v.describe());
        }
        tracing::info!(
            "model {} ({} parameters), world {world} ({} backend), stage {}, global batch {} = micro {} × accum {} × world {world}",
            model_name,
            layout.num_params(),
            comm.backend(),
            plan.stage,
            plan.global_batch,
            plan.micro_batch,
            plan.grad_accum
        );
        // The same estimate as the preflight check: all ranks of --simulate share this process.
        if let Some(estimate) = &estimate {
            tracing::info!(
                "memory: estimate {} per process ({}); {}",
                crate::memory::estimate::bytes(estimate.peak),
                estimate.breakdown(),
                crate::memory::process_limit().map_or(
                    "the limit cannot be read".into(),
                    |l| format!(
                        "this process may use {} ({})",
                        crate::memory::estimate::bytes(l.bytes as usize),
                        l.source
                    )
                )
            );
        }
    }
    let bar = progress_bar(lead && !opts.quiet, plan.steps);
    let rows_per_rank = (plan.micro_batch * plan.grad_accum) as u64;
    let tokens_per_step = (plan.global_batch * source.tokens_per_row()) as f64;
    let mut losses = Vec::with_capacity(plan.steps as usize);
    let mut grad_norms = Vec::with_capacity(plan.steps as usize);
    let mut step_ms = Vec::with_capacity(plan.steps as usize);
    // [loss, stop]: the stop flag rides on the one all-reduce every step already does, so all
    // ranks learn of a stop request at the same step, whichever rank was signalled.
    let mut loss_buf = vec![0.0f32; 2];
    let mut stopped_at = None;
    let mut last_checkpoint = None;

    let mut val_log = validation::ValLog::default();
    if let (Some(v), 0) = (&validation, first_step) {
        let metrics = v.evaluate(&mut engine, strategy.as_mut(), comm.as_ref())?;
        val_log.record(0, metrics);
        if lead {
            bar.suspend(|| tracing::info!("step 0: validation {}", val_log.describe_last()));
        }
    }
    bar.set_position(first_step);
    for step in first_step..plan.steps {
        comm.set_step(step);
        if let Some(f) = &fault {
            f.at_step(comm.as_ref(), step)?;
        }
        let step_start = Instant::now();
        let faults_before = crate::memory::allocator::minor_page_faults();
        let mut loss_sum = 0.0f32;
        for index in 0..plan.grad_accum {
            let first_row = rank as u64 * rows_per_rank + (index * plan.micro_batch) as u64;
            let rows = first_row..first_row + plan.micro_batch as u64;
            let batch = source.batch(step, rows, engine.device())?;
            loss_sum += engine.micro_step(
                strategy.as_mut(),
                &batch,
                MicroStep {
                    index,
                    count: plan.grad_accum,
                },
            )?;
        }
        let lr = plan.schedule.at(step);
        engine.phases().enter(Phase::Optimizer);
        let stats = strategy.step(step, lr)?;
        engine.phases().enter(Phase::Other);
        loss_buf[0] = loss_sum;
        loss_buf[1] = if opts.stop.requested() { 1.0 } else { 0.0 };
        comm.set_serves("the step's loss");
        loss_buf = comm.all_reduce(loss_buf, ReduceOp::Sum).wait()?;
        let loss = loss_buf[0] / (world * plan.grad_accum) as f32;
        // A request during the last step changes nothing: the run ends there anyway.
        let stop = loss_buf[1] > 0.0 && step + 1 < plan.steps;
        if !loss.is_finite() {
            return Err(KilnError::config(format!("the loss became {loss} at step {step}; lower `train.lr` or enable `train.clip_grad`")));
        }
        let ms = step_start.elapsed().as_secs_f64() * 1e3;
        let transfer_ms = engine.take_transfer_ms();
        losses.push(loss);
        grad_norms.push(stats.grad_norm);
        step_ms.push(ms);
        let tokens_per_s = tokens_per_step / (ms / 1e3);
        // After the step's timing, so that step_ms and tokens/s are training alone.
        let val_loss = match &validation {
            Some(v) if v.due(step + 1, plan.steps) => {
                let metrics = v.evaluate(&mut engine, strategy.as_mut(), comm.as_ref())?;
                val_log.record(step + 1, metrics);
                if lead {
                    bar.suspend(|| {
                        tracing::info!("step {}: validation {}", step + 1, val_log.describe_last())
                    });
                }
                val_log.last()
            }
            _ => None,
        };
        // Before the step's metrics line, which carries the save's memory peak.
        if checkpoint_due(step + 1) || (stop && !plan.config.checkpoint.dir.is_empty()) {
            engine.phases().enter(Phase::Checkpoint);
            last_checkpoint = checkpoint::save(
                plan,
                comm.as_ref(),
                strategy.as_mut(),
                step + 1,
                &source.describe(),
            )
            .map(Some)?;
            engine.phases().enter(Phase::Other);
        }
        let phase_peak = engine.phases().take_step();
        run_phase_peak = run_phase_peak.max(phase_peak);
        let peak_rss_mb = engine.phases().run_peak() as f64 / MIB;
        if let Some(w) = writer.as_mut() {
            w.write(&StepRecord {
                step: step + 1,
                loss,
                lr,
                grad_norm: stats.grad_norm,
                val_loss,
                step_ms: ms,
                comm_wait_ms: stats.comm_wait_ms,
                optimizer_ms: stats.optimizer_ms,
                transfer_ms,
                tokens_per_s,
                memory: MemoryReport {
                    frozen_params: engine.model().frozen_bytes(),
                    ..strategy.memory()
                },
                peak_rss_mb,
                phase_peak,
                minor_faults: crate::memory::allocator::minor_page_faults()
                    .saturating_sub(faults_before),
                gpu_reserved_mb: engine
                    .device()
                    .memory_pool_usage()
                    .map(|u| u.bytes_reserved as f64 / (1 << 20) as f64),
            })?;
        }
        let log_every = plan.config.output.log_every;
        if lead && log_every > 0 && (step + 1) % log_every == 0 {
            bar.suspend(|| {
                tracing::info!(
                    "step {}/{}: loss {loss:.4}, lr {lr:.3e}, grad norm {:.3}, {ms:.0} ms (comm wait {:.1} ms, optimizer {:.1} ms), {tokens_per_s:.0} tokens/s",
                    step + 1,
                    plan.steps,
                    stats.grad_norm,
                    stats.comm_wait_ms,
                    stats.optimizer_ms
                )
            });
        }
        bar.set_position(step + 1);
        let val = val_log
            .last()
            .map_or(String::new(), |v| format!("  val {v:.4}"));
        bar.set_message(format!("loss {loss:.4}{val}  {tokens_per_s:.0} tok/s"));
        if stop {
            stopped_at = Some(step + 1);
            break;
        }
    }
    bar.finish_and_clear();

    // Stopped: the checkpoint holds the state; spend no more of the grace period on gathering.
    let (params, frozen) = match stopped_at {
        Some(_) => (Vec::new(), Vec::new()),
        None => (strategy.full_params()?, engine.model().frozen_values()?),
    };
    let tail = losses.len().min(20);
    let final_loss = losses[losses.len() - tail..]
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / tail as f64;
    let mut sorted_ms = step_ms.clone();
    sorted_ms.sort_by(f64::total_cmp);
    // No step at all when a resumed checkpoint already reached train.steps.
    let median_ms = sorted_ms.get(sorted_ms.len() / 2).copied().unwrap_or(0.0);
    let summary = Summary {
        steps: stopped_at.unwrap_or(plan.steps),
        stopped_by_signal: stopped_at.is_some(),
        world,
        stage: plan.stage,
        backend: comm.backend().to_string(),
        final_loss,
        final_loss_window: tail,
        val_loss: val_log.last().map(f64::from),
        best_val_loss: val_log.best().map(|(_, l)| f64::from(l)),
        best_val_step: val_log.best().map(|(s, _)| s),
        initial_val_loss: val_log.initial().map(f64::from),
        entropy_rate: source.entropy_rate(),
        loss_over_entropy: source
            .entropy_rate()
            .filter(|&h| h > 0.0)
            .map(|h| final_loss / h),
        num_params: layout.num_params(),
        median_step_ms: median_ms,
        tokens_per_s: tokens_per_step / (median_ms / 1e3),
        peak_rss_mb: engine.phases().run_peak() as f64 / MIB,
        phase_peak: run_phase_peak,
        // NaN (JSON null) where kiln has no formula for the model.
        predicted_peak_rss_mb: estimate.as_ref().map_or(f64::NAN, |e| e.peak as f64 / MIB),
        memory: MemoryReport {
            frozen_params: engine.model().frozen_bytes(),
            ..strategy.memory()
        },
        minor_faults: crate::memory::allocator::minor_page_faults(),
        wall_s: started.elapsed().as_secs_f64(),
    };
    if lead && !opts.no_outputs {
        let out = &plan.config.output;
        metrics::write_summary(&out.dir, &summary)?;
        if !out.export.is_empty() && stopped_at.is_none() {
            export_safetensors(&out.export, &layout, &params, &frozen)?;
        }
    }
    if let (Some(step), true) = (stopped_at, lead) {
        tracing::warn!(
            "stopped by {} after step {step} of {}: {}",
            opts.stop
                .signal_name()
                .unwrap_or("a signal to another rank"),
            plan.steps,
            match &last_checkpoint {
                Some(dir) => format!("checkpoint {}; continue with --resume", dir.display()),
                None => "no checkpoint written (checkpoint.dir is not set)".to_string(),
            }
        );
    } else if lead && !opts.no_outputs {
        tracing::info!(
            "done: {} steps, final loss {:.4}{}{}, {:.0} tokens/s, peak RSS {:.0} MiB, {:.1} s",
            plan.steps,
            final_loss,
            summary.loss_over_entropy.map_or(String::new(), |r| format!(
                " ({r:.3} × entropy rate {:.4})",
                final_loss / r
            )),
            summary.val_loss.map_or(String::new(), |v| format!(
                ", validation loss {v:.4} (best {:.4} at step {})",
                summary.best_val_loss.unwrap_or(v),
                summary.best_val_step.unwrap_or(0)
            )),
            summary.tokens_per_s,
            summary.peak_rss_mb,
            summary.wall_s
        );
        let estimated = match estimate {
            Some(_) => format!(
                ", {:.0} MiB estimated ({:+.1}%)",
                summary.predicted_peak_rss_mb,
                (summary.predicted_peak_rss_mb / summary.peak_rss_mb - 1.0) * 100.0
            ),
            None => String::new(),
        };
        tracing::info!(
            "memory: peak RSS {:.0} MiB measured{estimated}{}",
            summary.peak_rss_mb,
            if plan.config.train.keep_freed_memory {
                // Nothing is returned to the kernel, so every phase reads the high-water mark.
                "; freed memory kept (train.keep_freed_memory): phases not told apart".to_string()
            } else {
                summary
                    .phase_peak
                    .largest()
                    .map_or(String::new(), |(phase, mb)| {
                        format!("; the largest phase peak is the {phase}'s, {mb:.0} MiB")
                    })
            }
        );
    }
    Ok(RunOutcome {
        losses,
        grad_norms,
        params,
        stopped_at,
        layout,
        frozen,
        summary,
        val_losses: val_log.losses,
        val_metrics: val_log.metrics,
    })
}

fn progress_bar(show: bool, steps: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len}  {msg}  eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

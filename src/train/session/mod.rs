//! One rank's run, in three parts: [`Session::start`] (everything that can fail before the
//! first step, agreed on by every rank), [`Session::step`] (one optimizer step with its
//! evaluation, checkpoint and metrics line) and [`Session::finish`] (summary, export, the last
//! log lines). The same code for every model, stage and world size.

use super::metrics::{self, MetricsWriter, StepRecord};
use super::validation::ValLog;
use super::{fault, progress_bar, Evaluator, Job, RunOptions, RunOutcome};
use crate::checkpoint;
use crate::comm::{agree_on, Communicator, ReduceOp};
use crate::engine::Engine;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::memory::phases::{Phase, PhaseMeter, PhasePeaks};
use crate::model::Activation;
use crate::plan::Plan;
use crate::strategy::{self, MemoryReport, MicroStep, StepStats, Strategy};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod report;
mod scaling;

use scaling::Scaling;

const MIB: f64 = (1u64 << 20) as f64;

/// A rank's run between start-up and the end.
pub(super) struct Session<'p, B: 'static, A: Activation> {
    plan: &'p Plan,
    opts: &'p RunOptions,
    comm: Arc<dyn Communicator>,
    rank: usize,
    lead: bool,
    started: Instant,
    fault: Option<fault::Fault>,
    engine: Engine<B, A>,
    strategy: Box<dyn Strategy>,
    layout: ModelLayout,
    source: Box<dyn super::BatchSource<Batch = B>>,
    validation: Option<Box<dyn Evaluator<B, A>>>,
    estimate: Option<crate::memory::Estimate>,
    writer: Option<MetricsWriter>,
    bar: ProgressBar,
    /// The step this run starts at (after `--resume`).
    pub first_step: u64,
    tokens_per_step: f64,
    losses: Vec<f32>,
    grad_norms: Vec<f64>,
    step_ms: Vec<f64>,
    val_log: ValLog,
    run_phase_peak: PhasePeaks,
    last_checkpoint: Option<PathBuf>,
    /// Whether the ranks have compared their first micro-batch's shape.
    shapes_agreed: bool,
    /// fp16's loss scale (`train.precision = "fp16"`).
    scaling: Scaling,
}

/// What one step measured, for its metrics line and the log.
struct StepTimes {
    loss: f32,
    lr: f64,
    stats: StepStats,
    ms: f64,
    transfer_ms: f64,
    faults_before: u64,
}

impl<'p, B: 'static, A: Activation> Session<'p, B, A> {
    /// Builds the job's model, the strategy and the outputs, resumes from a checkpoint when
    /// asked. Start-up steps that can fail on some ranks only (a file missing on one node, a
    /// full nvme disk) end with the ranks agreeing on the outcome: the failure is one line, said
    /// by the rank that hit it, and no rank is left in a collective.
    pub fn start(
        plan: &'p Plan,
        comm: Arc<dyn Communicator>,
        opts: &'p RunOptions,
        job: impl FnOnce(&dyn Communicator) -> Result<Job<B, A>>,
    ) -> Result<Self> {
        let started = Instant::now();
        crate::memory::allocator::keep_freed_pages(plan.config.train.keep_freed_memory);
        let (rank, world) = (comm.rank(), comm.world());
        let lead = rank == 0;
        let fault = fault::Fault::from_env()?;
        let rank_device = crate::device::for_rank(plan.device, rank, world)?;
        if !opts.no_outputs {
            comm.set_flight_dir(Path::new(&plan.config.output.dir));
        }
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
        let (first_step, resumed_scale) = resume(plan, opts, comm.as_ref(), strategy.as_mut())?;
        let scaling = Scaling::start(plan, resumed_scale, fault)?;
        let mut engine = Engine::new(model, layout.clone(), rank_device.burn_device(), false)
            .with_recompute_units(plan.recompute.clone());
        // VmHWM is per process: with --simulate only rank 0 meters it (memory::phases), and
        // runs without outputs (tests in one process) leave it alone.
        let meter = !opts.no_outputs && (lead || comm.backend() != "local");
        *engine.phases() = PhaseMeter::new(meter);
        comm.set_serves("the start-up checks");
        let writer = agree_on(comm.as_ref(), create_outputs(plan, opts, lead, first_step))?;
        // Only now, when everything that can fail at start-up has been checked: a run that
        // cannot start prints one line, the reason.
        tracing::info!(
            "rank {rank} (local rank {}) computes on {rank_device}",
            crate::comm::placement(rank, world).local_rank
        );
        let tokens_per_step = (plan.global_batch * source.tokens_per_row()) as f64;
        let run = Session {
            plan,
            opts,
            rank,
            lead,
            started,
            fault,
            engine,
            strategy,
            layout,
            source,
            validation,
            estimate,
            writer,
            bar: progress_bar(lead && !opts.quiet, plan.steps),
            first_step,
            tokens_per_step,
            losses: Vec::with_capacity(plan.steps as usize),
            grad_norms: Vec::with_capacity(plan.steps as usize),
            step_ms: Vec::with_capacity(plan.steps as usize),
            val_log: ValLog::default(),
            run_phase_peak: PhasePeaks::default(),
            last_checkpoint: None,
            scaling,
            shapes_agreed: false,
            comm,
        };
        if lead {
            run.log_start(&model_name);
        }
        run.bar.set_position(first_step);
        Ok(run)
    }

    /// Evaluates when the evaluation is due after `done` optimizer steps; returns the
    /// validation loss then.
    pub fn evaluate_if_due(&mut self, done: u64) -> Result<Option<f32>> {
        let Some(v) = &self.validation else {
            return Ok(None);
        };
        if !v.due(done, self.plan.steps) {
            return Ok(None);
        }
        let metrics = v.evaluate(&mut self.engine, self.strategy.as_mut(), self.comm.as_ref())?;
        self.val_log.record(done, metrics);
        if self.lead {
            let line = self.val_log.describe_last();
            self.bar
                .suspend(|| tracing::info!("step {done}: validation {line}"));
        }
        Ok(self.val_log.last())
    }

    /// Runs optimizer step `step` (0-based) with its evaluation, checkpoint and metrics line.
    /// Returns whether a stop request ends the run after it.
    pub fn step(&mut self, step: u64) -> Result<bool> {
        let plan = self.plan;
        self.comm.set_step(step);
        if let Some(f) = &self.fault {
            f.at_step(self.comm.as_ref(), step)?;
        }
        let step_start = Instant::now();
        let faults_before = crate::memory::allocator::minor_page_faults();
        if let Some(scale) = self.scaling.loss_scale(self.fault, self.rank, step) {
            self.engine.set_loss_scale(scale);
        }
        let loss_sum = self.micro_steps(step)?;
        let applied = self.scaling.applied(step);
        let lr = plan.schedule.at(applied);
        self.engine.phases().enter(Phase::Optimizer);
        let grad_scale = self.scaling.grad_scale();
        let stats = self.strategy.step(applied, lr, grad_scale)?;
        self.engine.phases().enter(Phase::Other);
        let bar = &self.bar;
        let say = |line: String| bar.suspend(|| tracing::warn!("{line}"));
        self.scaling.update(step, stats.skipped, self.lead, say);
        let (loss, stop) = self.agree_on_loss(loss_sum, step)?;
        let ms = step_start.elapsed().as_secs_f64() * 1e3;
        let transfer_ms = self.engine.take_transfer_ms();
        self.losses.push(loss);
        self.grad_norms.push(stats.grad_norm);
        self.step_ms.push(ms);
        // After the step's timing, so that step_ms and tokens/s are training alone.
        let val_loss = self.evaluate_if_due(step + 1)?;
        // Before the step's metrics line, which carries the save's memory peak.
        let c = &plan.config.checkpoint;
        let due = !c.dir.is_empty()
            && ((c.every > 0 && (step + 1) % c.every == 0) || step + 1 == plan.steps);
        if due || (stop && !c.dir.is_empty()) {
            self.save_checkpoint(step + 1)?;
        }
        let times = StepTimes {
            loss,
            lr,
            stats,
            ms,
            transfer_ms,
            faults_before,
        };
        self.record_step(step, &times, val_loss)?;
        Ok(stop)
    }

    /// This rank's micro-batches of `step` through the engine; the sum of their mean losses.
    fn micro_steps(&mut self, step: u64) -> Result<f32> {
        let plan = self.plan;
        let rows_per_rank = (plan.micro_batch * plan.grad_accum) as u64;
        let mut loss_sum = 0.0f32;
        for index in 0..plan.grad_accum {
            let first_row = self.rank as u64 * rows_per_rank + (index * plan.micro_batch) as u64;
            let rows = first_row..first_row + plan.micro_batch as u64;
            let batch = self.source.batch(step, rows, self.engine.device())?;
            if !self.shapes_agreed {
                self.shapes_agreed = true;
                self.agree_on_shape(&self.source.shape(&batch))?;
            }
            let micro = MicroStep {
                index,
                count: plan.grad_accum,
            };
            loss_sum += self
                .engine
                .micro_step(self.strategy.as_mut(), &batch, micro)?;
        }
        Ok(loss_sum)
    }

    /// Errors unless every rank's first micro-batch has rank 0's shape: sources that disagree
    /// (a sequence length read from a rank-local file, say) would otherwise train on different
    /// problems without a collective ever noticing. A source that reports no shape is not
    /// compared.
    fn agree_on_shape(&self, shape: &[usize]) -> Result<()> {
        let text = format!("{shape:?}");
        self.comm
            .set_serves("the check that the micro-batch shapes agree");
        let differing = crate::comm::ranks_differing_from_first(self.comm.as_ref(), &text)?;
        if differing.is_empty() {
            return Ok(());
        }
        Err(KilnError::config(format!(
            "data: the micro-batches of rank(s) {} differ in shape from rank 0's (this rank's: \
             {text}, from {}); every rank's source must give the same shape",
            crate::comm::rank_list(&differing),
            self.source.describe()
        )))
    }

    /// The step's loss over the global batch, and whether any rank was asked to stop: the stop
    /// flag rides on the one all-reduce every step already does, so all ranks learn of a stop
    /// request at the same step, whichever rank was signalled.
    fn agree_on_loss(&self, loss_sum: f32, step: u64) -> Result<(f32, bool)> {
        let plan = self.plan;
        let stop_flag = if self.opts.stop.requested() { 1.0 } else { 0.0 };
        self.comm.set_serves("the step's loss");
        let sums = self
            .comm
            .all_reduce(vec![loss_sum, stop_flag], ReduceOp::Sum)
            .wait()?;
        let loss = sums[0] / (plan.world * plan.grad_accum) as f32;
        // Under fp16 loss scaling a non-finite loss is an overflow: the step is skipped.
        if !loss.is_finite() && self.scaling.scaler().is_none() {
            return Err(KilnError::config(format!("the loss became {loss} at step {step}; lower `train.lr` or enable `train.clip_grad`")));
        }
        // A request during the last step changes nothing: the run ends there anyway.
        Ok((loss, sums[1] > 0.0 && step + 1 < plan.steps))
    }

    fn save_checkpoint(&mut self, done: u64) -> Result<()> {
        self.engine.phases().enter(Phase::Checkpoint);
        let dir = checkpoint::save(
            self.plan,
            self.comm.as_ref(),
            self.strategy.as_mut(),
            done,
            &self.source.describe(),
            self.scaling.scaler(),
        )?;
        self.last_checkpoint = Some(dir);
        self.engine.phases().enter(Phase::Other);
        Ok(())
    }

    /// The bytes this rank holds: the strategy's, and the model's frozen parameters.
    fn memory(&self) -> MemoryReport {
        MemoryReport {
            frozen_params: self.engine.model().frozen_bytes(),
            ..self.strategy.memory()
        }
    }

    /// The step's metrics line (rank 0), log line and progress bar.
    fn record_step(&mut self, step: u64, t: &StepTimes, val_loss: Option<f32>) -> Result<()> {
        let plan = self.plan;
        let tokens_per_s = self.tokens_per_step / (t.ms / 1e3);
        let phase_peak = self.engine.phases().take_step();
        self.run_phase_peak = self.run_phase_peak.max(phase_peak);
        let peak_rss_mb = self.engine.phases().run_peak() as f64 / MIB;
        let memory = self.memory();
        if let Some(w) = self.writer.as_mut() {
            w.write(&StepRecord {
                step: step + 1,
                loss: t.loss,
                lr: t.lr,
                grad_norm: t.stats.grad_norm,
                loss_scale: self.scaling.grad_scale(),
                skipped: t.stats.skipped,
                val_loss,
                step_ms: t.ms,
                comm_wait_ms: t.stats.comm_wait_ms,
                optimizer_ms: t.stats.optimizer_ms,
                transfer_ms: t.transfer_ms,
                tokens_per_s,
                memory,
                peak_rss_mb,
                phase_peak,
                minor_faults: crate::memory::allocator::minor_page_faults()
                    .saturating_sub(t.faults_before),
                gpu_reserved_mb: self
                    .engine
                    .device()
                    .memory_pool_usage()
                    .map(|u| u.bytes_reserved as f64 / MIB),
            })?;
        }
        let unit = self.source.throughput_unit();
        let log_every = plan.config.output.log_every;
        if self.lead && log_every > 0 && (step + 1) % log_every == 0 {
            let (loss, lr, ms, s) = (t.loss, t.lr, t.ms, &t.stats);
            self.bar.suspend(|| {
                tracing::info!(
                    "step {}/{}: loss {loss:.4}, lr {lr:.3e}, grad norm {:.3}, {ms:.0} ms (comm wait {:.1} ms, optimizer {:.1} ms), {tokens_per_s:.0} {unit}/s",
                    step + 1,
                    plan.steps,
                    s.grad_norm,
                    s.comm_wait_ms,
                    s.optimizer_ms
                )
            });
        }
        self.bar.set_position(step + 1);
        let bar_unit = if unit == "tokens" { "tok" } else { unit };
        let val = self
            .val_log
            .last()
            .map_or(String::new(), |v| format!("  val {v:.4}"));
        self.bar.set_message(format!(
            "loss {:.4}{val}  {tokens_per_s:.0} {bar_unit}/s",
            t.loss
        ));
        Ok(())
    }

    /// Gathers the final parameters (not after a stop request: the checkpoint holds them, and
    /// the grace period is short; not when the caller has no use for them), writes the summary
    /// and the export, logs the end.
    pub fn finish(mut self, stopped_at: Option<u64>) -> Result<RunOutcome> {
        self.bar.finish_and_clear();
        let (params, frozen) = match stopped_at {
            _ if self.opts.no_final_params => (Vec::new(), Vec::new()),
            Some(_) => (Vec::new(), Vec::new()),
            None => (
                self.strategy.full_params()?,
                self.engine.model().frozen_values()?,
            ),
        };
        let summary = self.summary(stopped_at);
        let (plan, opts) = (self.plan, self.opts);
        if self.lead && !opts.no_outputs {
            let out = &plan.config.output;
            metrics::write_summary(&out.dir, &summary)?;
            if !out.export.is_empty() && stopped_at.is_none() {
                checkpoint::export_safetensors(&out.export, &self.layout, &params, &frozen)?;
            }
        }
        if self.lead {
            self.log_end(stopped_at, &summary);
        }
        Ok(RunOutcome {
            rank: self.rank,
            losses: self.losses,
            grad_norms: self.grad_norms,
            params,
            stopped_at,
            layout: self.layout,
            frozen,
            summary,
            val_losses: self.val_log.losses,
            val_metrics: self.val_log.metrics,
        })
    }
}

/// The step to start at: 0, or the step of the checkpoint `--resume` names, loaded into
/// `strategy`; and fp16's loss scale then.
fn resume(
    plan: &Plan,
    opts: &RunOptions,
    comm: &dyn Communicator,
    strategy: &mut dyn Strategy,
) -> Result<(u64, Option<crate::optim::LossScaler>)> {
    let Some(arg) = &opts.resume else {
        return Ok((0, None));
    };
    let dir = checkpoint::locate(arg, &plan.config.checkpoint).map_err(|e| {
        // Every rank finds the same thing; rank 0 says it.
        if comm.rank() == 0 {
            e
        } else {
            KilnError::ReportedByAnotherRank(e.exit_code())
        }
    })?;
    checkpoint::resume(&dir, plan, comm, strategy)
}

/// Creates the output paths now, so that one that cannot be written fails before training;
/// rank 0's metrics writer.
fn create_outputs(
    plan: &Plan,
    opts: &RunOptions,
    lead: bool,
    first_step: u64,
) -> Result<Option<MetricsWriter>> {
    let (checkpoints, export) = (&plan.config.checkpoint.dir, &plan.config.output.export);
    if !lead {
        return Ok(None);
    }
    if !checkpoints.is_empty() {
        checkpoint::prepare_dir(Path::new(checkpoints))?;
    }
    if opts.no_outputs {
        return Ok(None);
    }
    if !export.is_empty() {
        checkpoint::create_parent_dir(Path::new(export))?;
    }
    MetricsWriter::create(&plan.config.output.dir, first_step > 0).map(Some)
}

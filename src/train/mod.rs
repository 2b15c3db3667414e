//! The training loop: the same code for every stage and world size. It builds the micro-batches
//! of this rank, runs them through the engine, and calls the strategy's step.

mod fault;
mod job;
mod metrics;
mod session;
mod validation;

pub use crate::checkpoint::{export_safetensors, write_params};
pub use crate::memory::phases::peak_rss_bytes;
pub use job::{gpt_job, val_loss, BatchSource, Evaluator, Job, Metrics, TokenBatches};
pub use metrics::{MetricsWriter, StepRecord, Summary};
pub use validation::ValRows;

use crate::comm::Communicator;
use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::model::Activation;
use crate::plan::Plan;
use indicatif::{ProgressBar, ProgressStyle};
use session::Session;
use std::sync::Arc;

/// Options that are about this invocation rather than the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar.
    pub quiet: bool,
    /// Don't write metrics, summary or export (tests that only want the numbers).
    pub no_outputs: bool,
    /// Don't gather the final parameters into [`RunOutcome::params`]: at ZeRO-3 that gathers
    /// every unit on every rank, the whole model at once at the end of a run that never held it.
    /// `kiln train` sets it unless `output.export` needs them.
    pub no_final_params: bool,
    /// `--resume`: a checkpoint directory, a `checkpoint.dir`, or `latest`.
    pub resume: Option<String>,
    /// Polled once per step: when any rank sees it, every rank stops after that step (and
    /// saves a checkpoint when `checkpoint.dir` is set). See [`crate::signals`].
    pub stop: crate::signals::StopRequest,
}

/// What a run produced, on every rank.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The rank that produced it.
    pub rank: usize,
    /// Loss of every step (mean over the global batch).
    pub losses: Vec<f32>,
    /// Global gradient norm of every step.
    pub grad_norms: Vec<f64>,
    /// Final parameters of every unit, without padding (empty when a stop request ended the
    /// run — the checkpoint holds them — or with `RunOptions::no_final_params`).
    pub params: Vec<Vec<f32>>,
    /// The step a stop request ended the run after, before `train.steps`.
    pub stopped_at: Option<u64>,
    /// The layout the parameters follow.
    pub layout: ModelLayout,
    /// Parameters outside the layout (a user model's frozen ones) as (path, shape, values);
    /// empty when `params` is.
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
    let mut run = Session::start(plan, comm, opts, job)?;
    if run.first_step == 0 {
        run.evaluate_if_due(0)?;
    }
    let mut stopped_at = None;
    for step in run.first_step..plan.steps {
        if run.step(step)? {
            stopped_at = Some(step + 1);
            break;
        }
    }
    run.finish(stopped_at)
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

//! What a training run needs of its model and data, and nothing of the run's mechanics: the
//! unit model, the source of micro-batches, an optional evaluation and the memory estimate.
//! The built-in GPT ([`gpt_job`]) and a library user's burn module (`crate::api`) are both
//! `Job`s; the loop in `train::run_with` is the same code for both.

use super::validation::{self, Validation};
use crate::comm::{agree_on, Communicator};
use crate::data::{self, TokenSource};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{Activation, Gpt, MicroBatch, UnitModel};
use crate::plan::Plan;
use crate::strategy::Strategy;
use burn::tensor::{Device, Tensor};
use std::ops::Range;

/// A deterministic source of micro-batches (docs/ARCHITECTURE.md, "Contracts"): the rows of
/// step `t`'s global batch depend only on the data seed and `t`, and rank r of N takes its
/// contiguous slice, so every world size sees the same global batch.
pub trait BatchSource: Send + Sync {
    /// The micro-batch type the model's units read.
    type Batch;
    /// Rows `rows` (indices into step `step`'s global batch) as one micro-batch on `device`.
    fn batch(&self, step: u64, rows: Range<u64>, device: &Device) -> Result<Self::Batch>;
    /// One line describing the source for the logs and checkpoint manifests.
    fn describe(&self) -> String;
    /// The shape of `batch` (e.g. `[rows, seq_len]`), for the check at the first step that
    /// every rank's source gives micro-batches of one shape; empty (the default) skips it.
    fn shape(&self, _batch: &Self::Batch) -> Vec<usize> {
        Vec::new()
    }
    /// Number of rows, for a finite set (an evaluation set must say); `None` for a stream.
    fn num_rows(&self) -> Option<u64> {
        None
    }
    /// Tokens per row, for tokens/s (1 for data that is not token sequences: samples/s).
    fn tokens_per_row(&self) -> usize {
        1
    }
    /// What the throughput counts, for the log: `samples`, or `tokens` for a source that sets
    /// `tokens_per_row`. (metrics.jsonl calls it `tokens_per_s` either way.)
    fn throughput_unit(&self) -> &'static str {
        if self.tokens_per_row() > 1 {
            "tokens"
        } else {
            "samples"
        }
    }
    /// The loss floor in nats per token, when the source knows it (the markov source).
    fn entropy_rate(&self) -> Option<f64> {
        None
    }
}

pub use crate::model::Metrics;

/// A forward-only evaluation run through the same strategy hooks as training.
pub trait Evaluator<B: 'static, A: Activation> {
    /// One line for the log.
    fn describe(&self) -> String;
    /// Whether an evaluation is due after `done` optimizer steps of `total` (0: before training).
    fn due(&self, done: u64, total: u64) -> bool;
    /// Evaluates with the strategy's current parameters; every rank returns the same values.
    fn evaluate(
        &self,
        engine: &mut Engine<B, A>,
        strategy: &mut dyn Strategy,
        comm: &dyn Communicator,
    ) -> Result<Metrics>;
}

/// The model-specific parts of a run.
pub struct Job<B: 'static, A: Activation> {
    /// The model, unit by unit.
    pub model: Box<dyn UnitModel<B, A>>,
    /// Its training data.
    pub source: Box<dyn BatchSource<Batch = B>>,
    /// Its evaluation, if any.
    pub eval: Option<Box<dyn Evaluator<B, A>>>,
    /// What the log calls the model.
    pub name: String,
    /// The predicted peak memory per process, where kiln has a formula for the model.
    pub estimate: Option<crate::memory::Estimate>,
}

/// The metric a run reports as its validation loss.
pub fn val_loss(metrics: &Metrics) -> Option<f32> {
    metrics
        .iter()
        .find(|(name, _)| name == "loss")
        .or(metrics.first())
        .map(|&(_, v)| v)
}

/// The built-in GPT on the token data `[data]` names, with `[train]`'s validation. Start-up
/// failures on some ranks only (a file missing on one node) are agreed on, so every rank stops.
pub fn gpt_job(plan: &Plan, comm: &dyn Communicator) -> Result<Job<MicroBatch, Tensor<3>>> {
    let shape = *plan.gpt();
    comm.set_serves("the start-up checks");
    let source = agree_on(
        comm,
        TokenBatches::open(
            &plan.config.data,
            shape.vocab,
            shape.seq_len,
            plan.global_batch,
        ),
    )?;
    let eval = agree_on(comm, validation::open(plan))?
        .map(|v| Box::new(v) as Box<dyn Evaluator<MicroBatch, Tensor<3>>>);
    Ok(Job {
        model: Box::new(Gpt::new(shape)),
        source: Box::new(source),
        eval,
        name: plan.config.model.preset.clone(),
        estimate: Some(crate::memory::estimate(
            plan,
            crate::memory::Process::running(comm),
        )),
    })
}

/// A token source as micro-batches of `seq_len` tokens.
pub struct TokenBatches {
    source: Box<dyn TokenSource>,
    seq_len: usize,
    /// Rows per step: the scope a masked source's loss is averaged over.
    global_batch: usize,
}

impl TokenBatches {
    /// The training rows `[data]` names, for a token model of `vocab` and `seq_len`, in steps
    /// of `global_batch` rows.
    pub fn open(
        data: &crate::config::DataConfig,
        vocab: usize,
        seq_len: usize,
        global_batch: usize,
    ) -> Result<Self> {
        Ok(TokenBatches {
            source: data::open(data, vocab, seq_len)?,
            seq_len,
            global_batch,
        })
    }
}

impl BatchSource for TokenBatches {
    type Batch = MicroBatch;

    fn batch(&self, step: u64, rows: Range<u64>, device: &Device) -> Result<MicroBatch> {
        let n = (rows.end - rows.start) as usize;
        Ok(data::micro_batch(
            self.source.as_ref(),
            step,
            rows.start,
            n,
            self.seq_len,
            device,
            0..self.global_batch as u64,
        ))
    }

    fn describe(&self) -> String {
        self.source.describe()
    }

    fn shape(&self, batch: &MicroBatch) -> Vec<usize> {
        batch.inputs.dims().to_vec()
    }

    fn tokens_per_row(&self) -> usize {
        self.seq_len
    }

    fn entropy_rate(&self) -> Option<f64> {
        self.source.entropy_rate()
    }
}

impl Evaluator<MicroBatch, Tensor<3>> for Validation {
    fn describe(&self) -> String {
        Validation::describe(self)
    }

    fn due(&self, done: u64, total: u64) -> bool {
        Validation::due(self, done, total)
    }

    fn evaluate(
        &self,
        engine: &mut Engine,
        strategy: &mut dyn Strategy,
        comm: &dyn Communicator,
    ) -> Result<Metrics> {
        Ok(vec![("loss".into(), self.loss(engine, strategy, comm)?)])
    }
}

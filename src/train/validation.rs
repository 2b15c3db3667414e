//! Validation loss (issue 12): the mean token loss over fixed rows of `data.val_path`, computed
//! forward-only before the first step, every `train.eval_every` steps and after the last.
//!
//! The rows are the first `eval_batches × global_batch` windows of seq_len + 1 tokens, stride
//! seq_len (every target token is scored once, as in a sequential perplexity evaluation), the
//! same at every evaluation and world size. Rank r of N scores its contiguous slice in
//! micro-batches of `micro_batch` rows; each micro-batch's mean loss goes into its own slot of
//! a vector indexed by global micro-batch, the ranks sum the vectors (each slot has one
//! non-zero addend, so the sum is exact in any order), and every rank averages the slots in
//! index order. With the same `micro_batch` the value is therefore bitwise the same at every
//! world size, stage and backend; a different micro_batch changes the matmul shapes and so the
//! last bits.

use crate::comm::{Communicator, ReduceOp};
use crate::data::{self, FileSource, TokenSource};
use crate::engine::Engine;
use crate::error::{KilnError, Result};
use crate::plan::Plan;
use crate::strategy::Strategy;

/// The validation rows and when to score them.
pub struct Validation {
    windows: Windows,
    every: u64,
    /// Global micro-batches scored per evaluation.
    num_micro: usize,
    micro_batch: usize,
    seq_len: usize,
}

/// Row `i` is the window of seq_len + 1 tokens starting at `i × seq_len`.
struct Windows {
    file: FileSource,
    seq_len: usize,
}

impl TokenSource for Windows {
    fn fill_row(&self, _step: u64, row: u64, out: &mut [u32]) {
        self.file.fill_window(row as usize * self.seq_len, out);
    }

    fn fill_mask(&self, _step: u64, row: u64, out: &mut [u8]) -> bool {
        self.file.fill_mask_window(row as usize * self.seq_len, out)
    }

    fn describe(&self) -> String {
        self.file.describe()
    }
}

/// The validation set `plan` asks for: `None` when `train.eval_every` is 0. Errors name the
/// key or the file.
pub fn open(plan: &Plan) -> Result<Option<Validation>> {
    let gpt = plan.gpt();
    let Some(rows) = ValRows::open(&plan.config, plan.global_batch, gpt.vocab, gpt.seq_len)? else {
        return Ok(None);
    };
    Ok(Some(Validation {
        num_micro: rows.rows / plan.micro_batch,
        every: plan.config.train.eval_every,
        micro_batch: plan.micro_batch,
        seq_len: rows.seq_len,
        windows: rows.windows,
    }))
}

/// The validation rows of `data.val_path` for a token model of `vocab` and `seq_len`, as a
/// finite [`BatchSource`] (a library model's evaluation set: `crate::api::Fit::with_eval`).
pub struct ValRows {
    windows: Windows,
    rows: usize,
    seq_len: usize,
}

impl ValRows {
    /// The rows `[train]` and `[data]` ask for (`train.eval_batches` global batches of
    /// `global_batch` rows): `None` when `train.eval_every` is 0. Errors name the key or file.
    pub fn open(
        config: &crate::config::Config,
        global_batch: usize,
        vocab: usize,
        seq_len: usize,
    ) -> Result<Option<ValRows>> {
        let (train, data) = (&config.train, &config.data);
        if train.eval_every == 0 {
            return Ok(None);
        }
        if data.val_path.is_empty() {
            return Err(KilnError::config(format!(
                "key `train.eval_every` = {}: validation needs `data.val_path` (a uint16 token \
                 file, e.g. val.bin from `kiln prepare-data`)",
                train.eval_every
            )));
        }
        if train.eval_batches == 0 {
            return Err(KilnError::config(
                "key `train.eval_batches`: must be at least 1 when train.eval_every > 0",
            ));
        }
        // The file's own checks: readable, whole uint16 tokens, ids below the vocab.
        let file = FileSource::tokens(&data.val_path, 0, vocab, seq_len)?;
        let rows = train.eval_batches * global_batch;
        let needed = rows * seq_len + 1;
        if file.num_tokens() < needed {
            let fit = match (file.num_tokens() - 1) / seq_len / global_batch {
                0 => "not one global batch of rows fits".to_string(),
                n => format!("train.eval_batches ≤ {n} fits"),
            };
            return Err(KilnError::file(
                &data.val_path,
                format!(
                    "holds {} tokens; train.eval_batches = {} × global batch {} = {rows} rows of \
                     seq_len {seq_len} need {needed} ({fit})",
                    file.num_tokens(),
                    train.eval_batches,
                    global_batch
                ),
            ));
        }
        Ok(Some(ValRows {
            windows: Windows { file, seq_len },
            rows,
            seq_len,
        }))
    }
}

impl super::BatchSource for ValRows {
    type Batch = crate::model::MicroBatch;

    fn batch(
        &self,
        _step: u64,
        rows: std::ops::Range<u64>,
        device: &burn::tensor::Device,
    ) -> Result<Self::Batch> {
        let n = (rows.end - rows.start) as usize;
        Ok(data::micro_batch(
            &self.windows,
            0,
            rows.start,
            n,
            self.seq_len,
            device,
            0..self.rows as u64,
        ))
    }

    fn describe(&self) -> String {
        format!("{} (validation)", self.windows.describe())
    }

    fn num_rows(&self) -> Option<u64> {
        Some(self.rows as u64)
    }

    fn tokens_per_row(&self) -> usize {
        self.seq_len
    }
}

impl Validation {
    /// Whether the loss is due after `done` optimizer steps of `total` (0: before training).
    pub fn due(&self, done: u64, total: u64) -> bool {
        done % self.every == 0 || done == total
    }

    /// Rows scored per evaluation.
    pub fn num_rows(&self) -> usize {
        self.num_micro * self.micro_batch
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "validation: {} rows of {} tokens from {}, every {} steps",
            self.num_rows(),
            self.seq_len,
            self.windows.describe(),
            self.every
        )
    }

    /// The mean token loss over the validation rows with the current parameters; every rank
    /// returns the same value.
    pub fn loss(
        &self,
        engine: &mut Engine,
        strategy: &mut dyn Strategy,
        comm: &dyn Communicator,
    ) -> Result<f32> {
        let (rank, world) = (comm.rank(), comm.world());
        // global_batch = micro × accum × world, so the micro-batches divide evenly.
        let per_rank = self.num_micro / world;
        let mut slots = vec![0.0f32; self.num_micro];
        for i in 0..per_rank {
            let index = rank * per_rank + i;
            let batch = data::micro_batch(
                &self.windows,
                0,
                (index * self.micro_batch) as u64,
                self.micro_batch,
                self.seq_len,
                engine.device(),
                0..(self.num_micro * self.micro_batch) as u64,
            );
            slots[index] = engine.eval_loss(strategy, &batch)?;
        }
        comm.set_serves("the validation loss");
        let slots = comm.all_reduce(slots, ReduceOp::Sum).wait()?;
        let sum: f64 = slots.iter().map(|&l| l as f64).sum();
        Ok((sum / self.num_micro as f64) as f32)
    }
}

/// The validation losses of a run, for the metrics, the summary and the progress bar.
#[derive(Debug, Clone, Default)]
pub struct ValLog {
    /// (optimizer steps done, loss), in order; step 0 is before training.
    pub losses: Vec<(u64, f32)>,
    /// (optimizer steps done, every metric of that evaluation), in order.
    pub metrics: Vec<(u64, super::Metrics)>,
}

impl ValLog {
    /// Records an evaluation after `done` optimizer steps.
    pub fn record(&mut self, done: u64, metrics: super::Metrics) {
        if let Some(loss) = super::val_loss(&metrics) {
            self.losses.push((done, loss));
        }
        self.metrics.push((done, metrics));
    }

    /// The latest evaluation for the log: `loss 2.0110, accuracy 0.9712`.
    pub fn describe_last(&self) -> String {
        self.metrics.last().map_or(String::new(), |(_, m)| {
            m.iter()
                .map(|(name, v)| format!("{name} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// The latest loss.
    pub fn last(&self) -> Option<f32> {
        self.losses.last().map(|&(_, l)| l)
    }

    /// The lowest loss and its step.
    pub fn best(&self) -> Option<(u64, f32)> {
        self.losses
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The loss before training, when this run started from step 0.
    pub fn initial(&self) -> Option<f32> {
        self.losses
            .first()
            .filter(|&&(s, _)| s == 0)
            .map(|&(_, l)| l)
    }
}

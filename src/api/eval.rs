//! Evaluation of a user's model on a finite [`BatchSource`]: its rows in micro-batches of
//! `train.micro_batch`, rank r scoring a contiguous run of them. Each micro-batch's metrics,
//! weighted by its rows, go into their own slots of a vector indexed by micro-batch; the ranks
//! sum the vectors (one non-zero addend per slot: exact in any order) and every rank adds the
//! slots in index order — so the values are bitwise the same at every world size and stage.

use super::BatchSource;
use crate::comm::{Communicator, ReduceOp};
use crate::engine::Engine;
use crate::error::{KilnError, Result};
use crate::model::{Activation, Metrics};
use crate::plan::Plan;
use crate::strategy::Strategy;
use crate::train::Evaluator;

/// A finite evaluation set and when to score it.
pub(crate) struct SourceEval<B> {
    source: Box<dyn BatchSource<Batch = B>>,
    rows: u64,
    micro_batch: u64,
    every: u64,
}

impl<B> SourceEval<B> {
    /// Evaluates `source` every `train.eval_every` steps (0: before and after training only).
    pub fn new(source: Box<dyn BatchSource<Batch = B>>, plan: &Plan) -> Result<Self> {
        let rows = source.num_rows().filter(|&n| n > 0).ok_or_else(|| {
            KilnError::config(format!(
                "evaluation data `{}`: an evaluation set must be finite and not empty \
                 (BatchSource::num_rows)",
                source.describe()
            ))
        })?;
        Ok(SourceEval {
            source,
            rows,
            micro_batch: plan.micro_batch as u64,
            every: plan.config.train.eval_every,
        })
    }
}

impl<B: 'static, A: Activation> Evaluator<B, A> for SourceEval<B> {
    fn describe(&self) -> String {
        format!(
            "evaluation: {} rows of {}",
            self.rows,
            self.source.describe()
        )
    }

    fn due(&self, done: u64, total: u64) -> bool {
        done == 0 || done == total || (self.every > 0 && done % self.every == 0)
    }

    fn evaluate(
        &self,
        engine: &mut Engine<B, A>,
        strategy: &mut dyn Strategy,
        comm: &dyn Communicator,
    ) -> Result<Metrics> {
        let (rank, world) = (comm.rank() as u64, comm.world() as u64);
        let num_micro = self.rows.div_ceil(self.micro_batch);
        let per_rank = num_micro.div_ceil(world);
        let mut names: Vec<String> = Vec::new();
        let mut slots: Vec<f32> = Vec::new();
        // Every rank runs per_rank micro-batches, so that ZeRO-3's gathers stay matched; a rank
        // past the end repeats the last micro-batch and keeps nothing of it.
        for i in 0..per_rank {
            let index = rank * per_rank + i;
            let real = index < num_micro;
            let index = index.min(num_micro - 1);
            let start = index * self.micro_batch;
            let end = (start + self.micro_batch).min(self.rows);
            let batch = self.source.batch(0, start..end, engine.device())?;
            let metrics = engine.eval_metrics(strategy, &batch)?;
            if names.is_empty() {
                names = metrics.iter().map(|(n, _)| n.clone()).collect();
                slots = vec![0.0; num_micro as usize * names.len()];
            }
            if real {
                for (j, (_, v)) in metrics.iter().enumerate() {
                    slots[index as usize * names.len() + j] = v * (end - start) as f32;
                }
            }
        }
        comm.set_serves("the evaluation metrics");
        let slots = comm.all_reduce(slots, ReduceOp::Sum).wait()?;
        let k = names.len();
        Ok(names
            .into_iter()
            .enumerate()
            .map(|(j, name)| {
                let sum: f64 = (0..num_micro as usize)
                    .map(|i| slots[i * k + j] as f64)
                    .sum();
                (name, (sum / self.rows as f64) as f32)
            })
            .collect())
    }
}

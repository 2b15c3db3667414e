//! What a run says of itself: its start-up lines, its summary and its last lines.

use super::{Session, MIB};
use crate::model::Activation;
use crate::train::metrics::Summary;

impl<B: 'static, A: Activation> Session<'_, B, A> {
    pub(super) fn log_start(&self, model_name: &str) {
        let plan = self.plan;
        tracing::info!("{}", self.source.describe());
        if let Some(v) = &self.validation {
            tracing::info!("{}", v.describe());
        }
        tracing::info!(
            "model {model_name} ({} parameters), world {world} ({} backend), stage {}, global batch {} = micro {} × accum {} × world {world}",
            self.layout.num_params(),
            self.comm.backend(),
            plan.stage,
            plan.global_batch,
            plan.micro_batch,
            plan.grad_accum,
            world = plan.world,
        );
        // The same estimate as the preflight check: all ranks of --simulate share this process.
        if let Some(estimate) = &self.estimate {
            let bytes = crate::memory::estimate::bytes;
            tracing::info!(
                "memory: estimate {} per process ({}); {}",
                bytes(estimate.peak),
                estimate.breakdown(),
                crate::memory::process_limit().map_or(
                    "the limit cannot be read".into(),
                    |l| format!(
                        "this process may use {} ({})",
                        bytes(l.bytes as usize),
                        l.source
                    )
                )
            );
        }
    }

    pub(super) fn summary(&mut self, stopped_at: Option<u64>) -> Summary {
        let plan = self.plan;
        let tail = self.losses.len().min(20);
        let final_loss = self.losses[self.losses.len() - tail..]
            .iter()
            .map(|&l| l as f64)
            .sum::<f64>()
            / tail as f64;
        let mut sorted_ms = self.step_ms.clone();
        sorted_ms.sort_by(f64::total_cmp);
        // No step at all when a resumed checkpoint already reached train.steps.
        let median_ms = sorted_ms.get(sorted_ms.len() / 2).copied().unwrap_or(0.0);
        let entropy_rate = self.source.entropy_rate();
        Summary {
            steps: stopped_at.unwrap_or(plan.steps),
            stopped_by_signal: stopped_at.is_some(),
            world: plan.world,
            stage: plan.stage,
            backend: self.comm.backend().to_string(),
            final_loss,
            final_loss_window: tail,
            val_loss: self.val_log.last().map(f64::from),
            best_val_loss: self.val_log.best().map(|(_, l)| f64::from(l)),
            best_val_step: self.val_log.best().map(|(s, _)| s),
            initial_val_loss: self.val_log.initial().map(f64::from),
            entropy_rate,
            loss_over_entropy: entropy_rate.filter(|&h| h > 0.0).map(|h| final_loss / h),
            num_params: self.layout.num_params(),
            median_step_ms: median_ms,
            tokens_per_s: self.tokens_per_step / (median_ms / 1e3),
            peak_rss_mb: self.engine.phases().run_peak() as f64 / MIB,
            phase_peak: self.run_phase_peak,
            // NaN (JSON null) where kiln has no formula for the model.
            predicted_peak_rss_mb: self
                .estimate
                .as_ref()
                .map_or(f64::NAN, |e| e.peak as f64 / MIB),
            memory: self.memory(),
            minor_faults: crate::memory::allocator::minor_page_faults(),
            wall_s: self.started.elapsed().as_secs_f64(),
        }
    }

    pub(super) fn log_end(&self, stopped_at: Option<u64>, summary: &Summary) {
        let (plan, opts) = (self.plan, self.opts);
        if let Some(step) = stopped_at {
            tracing::warn!(
                "stopped by {} after step {step} of {}: {}",
                opts.stop
                    .signal_name()
                    .unwrap_or("a signal to another rank"),
                plan.steps,
                match &self.last_checkpoint {
                    Some(dir) => format!("checkpoint {}; continue with --resume", dir.display()),
                    None => "no checkpoint written (checkpoint.dir is not set)".to_string(),
                }
            );
            return;
        }
        if opts.no_outputs {
            return;
        }
        let final_loss = summary.final_loss;
        tracing::info!(
            "done: {} steps, final loss {:.4}{}{}, {:.0} {}/s, peak RSS {:.0} MiB, {:.1} s",
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
            self.source.throughput_unit(),
            summary.peak_rss_mb,
            summary.wall_s
        );
        let estimated = match self.estimate {
            Some(_) => format!(
                ", {:.0} MiB estimated ({:+.1}%)",
                summary.predicted_peak_rss_mb,
                (summary.predicted_peak_rss_mb / summary.peak_rss_mb - 1.0) * 100.0
            ),
            None => String::new(),
        };
        let phases = if plan.config.train.keep_freed_memory {
            // Nothing is returned to the kernel, so every phase reads the high-water mark.
            "; freed memory kept (train.keep_freed_memory): phases not told apart".to_string()
        } else {
            summary
                .phase_peak
                .largest()
                .map_or(String::new(), |(phase, mb)| {
                    format!("; the largest phase peak is the {phase}'s, {mb:.0} MiB")
                })
        };
        tracing::info!(
            "memory: peak RSS {:.0} MiB measured{estimated}{phases}",
            summary.peak_rss_mb
        );
    }
}

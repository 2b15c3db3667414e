//! `kiln estimate --fit`: the largest model of the GPT family that fits a given memory per
//! process, for each stage and offload tier, by the same [`estimate()`](super::estimate()).
//!
//! The family is the presets' widths and depths continued by the published GPT-2 and GPT-3
//! shapes (Radford et al. 2019, Table 2; Brown et al. 2020, Table 2.1). Vocabulary, sequence
//! length, micro-batch, recompute and the rest come from the configured recipe, so the answer
//! is "how large a model, with my data and batch".

use super::estimate::{bytes, estimate, Process};
use super::variant::{recompute_name, variant};
use crate::error::Result;
use crate::offload::Tier;
use crate::plan::Plan;
use serde::Serialize;

/// (name, d_model, n_layers, n_heads), smallest first.
pub const FAMILY: &[(&str, usize, usize, usize)] = &[
    ("tiny", 256, 4, 4),
    ("small", 512, 8, 8),
    ("gpt2-124m", 768, 12, 12),
    ("gpt2-medium", 1024, 24, 16),
    ("gpt2-large", 1280, 36, 20),
    ("gpt2-xl", 1600, 48, 25),
    ("gpt3-2.7b", 2560, 32, 32),
    ("gpt3-6.7b", 4096, 32, 32),
    ("gpt3-13b", 5120, 40, 40),
];

/// The answer for one stage and tier.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// ZeRO stage.
    pub stage: u8,
    /// Optimizer-state tier.
    pub offload: String,
    /// Parameter tier (`offload.param`; `nvme` only on the extra stage-3 row).
    pub param: String,
    /// The largest member that fits, `None` when not even the smallest does.
    pub model: Option<String>,
    /// Its parameter count.
    pub num_params: Option<usize>,
    /// Its predicted peak resident set per process, bytes.
    pub predicted_peak_rss_bytes: Option<usize>,
}

/// For each stage 0–3 and tier none/cpu/nvme — and stage 3 with the parameters in files
/// (ZeRO-Infinity) — the largest member of [`FAMILY`] whose estimate with `process` is at most
/// `memory` bytes.
pub fn fit(plan: &Plan, process: Process, memory: u64) -> Result<Vec<Fit>> {
    let mut out = Vec::new();
    let rows = (0..=3).map(|s| (s, Tier::None)).chain([(3, Tier::Nvme)]);
    for (stage, param) in rows {
        for tier in [Tier::None, Tier::Cpu, Tier::Nvme] {
            let mut base = variant(plan, stage, tier, plan.config.train.recompute.clone())?;
            base.config.offload.param = param.name().into();
            let mut best = None;
            for &(name, d, layers, heads) in FAMILY {
                // Resolved afresh: the per-unit recompute flags follow the depth.
                let mut config = base.config.clone();
                config.model.d_model = Some(d);
                config.model.n_layers = Some(layers);
                config.model.n_heads = Some(heads);
                let Ok(p) = Plan::resolve(&config, plan.world) else {
                    continue;
                };
                let est = estimate(&p, process);
                if est.peak as u64 <= memory {
                    best = Some((name, p.gpt().num_params(), est.peak));
                }
            }
            out.push(Fit {
                stage,
                offload: tier.name().into(),
                param: param.name().into(),
                model: best.map(|b| b.0.to_string()),
                num_params: best.map(|b| b.1),
                predicted_peak_rss_bytes: best.map(|b| b.2),
            });
        }
    }
    Ok(out)
}

/// The answer as a table: stages down, tiers across.
pub fn render(plan: &Plan, process: Process, memory: u64, fits: &[Fit]) -> String {
    let m = plan.gpt();
    let ranks = process.ranks();
    let mut out = format!(
        "largest GPT that fits {} per process ({} rank{} of world {}), vocab {}, seq {}, micro-batch {}, recompute {}:\n",
        bytes(memory as usize),
        ranks,
        if ranks == 1 { "" } else { "s" },
        plan.world,
        m.vocab,
        m.seq_len,
        plan.micro_batch,
        recompute_name(&plan.config.train.recompute)
    );
    out += &format!(
        "{:>18} {:>28} {:>28} {:>28}\n",
        "stage \\ optimizer", "none", "cpu", "nvme"
    );
    for (stage, param, label) in [
        (0, "none", "0".to_string()),
        (1, "none", "1".into()),
        (2, "none", "2".into()),
        (3, "none", "3".into()),
        (3, "nvme", "3 + params on nvme".into()),
    ] {
        let cells: Vec<String> = fits
            .iter()
            .filter(|f| f.stage == stage && f.param == param)
            .map(
                |f| match (&f.model, f.num_params, f.predicted_peak_rss_bytes) {
                    (Some(n), Some(p), Some(b)) => {
                        format!("{n} ({:.0}M, {})", p as f64 / 1e6, bytes(b))
                    }
                    _ => "nothing fits".into(),
                },
            )
            .collect();
        out += &format!(
            "{label:>18} {:>28} {:>28} {:>28}\n",
            cells[0], cells[1], cells[2]
        );
    }
    out
}

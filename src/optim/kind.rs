//! Which optimizer updates the f32 masters (`train.optimizer`), and what state it keeps. The
//! strategies call [`OptimizerKind::update`] on windows of the flat state and never match on the
//! kind; the stores size and move whatever lanes [`OptimizerKind::format`] names.

use super::{adamw_step, lion_step, quant8, StepScalars};
use crate::offload::{StateChunk, StateFormat};
use std::ops::Range;

/// The optimizers kiln implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// AdamW with PyTorch's semantics (`optim::adamw`): m and v in f32, 8 bytes per parameter.
    AdamW,
    /// AdamW with m and v quantized to 8 bits in blocks (bitsandbytes' `AdamW8bit`,
    /// `optim::quant8`): about 2 bytes per parameter.
    AdamW8bit,
    /// Lion (`optim::lion`): one f32 state, 4 bytes per parameter.
    Lion,
}

impl OptimizerKind {
    /// The `train.optimizer` names.
    pub const NAMES: &'static [&'static str] = &["adamw", "adamw8bit", "lion"];

    /// Parses `train.optimizer`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "adamw" => Some(OptimizerKind::AdamW),
            "adamw8bit" => Some(OptimizerKind::AdamW8bit),
            "lion" => Some(OptimizerKind::Lion),
            _ => None,
        }
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::AdamW8bit => "adamw8bit",
            OptimizerKind::Lion => "lion",
        }
    }

    /// The state it keeps per element.
    pub fn format(self) -> StateFormat {
        match self {
            OptimizerKind::AdamW => StateFormat {
                floats: 2,
                quantized: 0,
            },
            OptimizerKind::AdamW8bit => StateFormat {
                floats: 0,
                quantized: 2,
            },
            OptimizerKind::Lion => StateFormat {
                floats: 1,
                quantized: 0,
            },
        }
    }

    /// The checkpoint's name for each lane of [`Self::format`], in lane order (PyTorch's
    /// `exp_avg` / `exp_avg_sq` for the moments; bitsandbytes keeps the quantized ones as
    /// `state1`/`absmax1`, kiln names them after the moment they hold).
    pub fn lane_names(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::AdamW => &["exp_avg", "exp_avg_sq"],
            OptimizerKind::AdamW8bit => &[
                "exp_avg.q8",
                "exp_avg_sq.q8",
                "exp_avg.absmax",
                "exp_avg_sq.absmax",
            ],
            OptimizerKind::Lion => &["exp_avg"],
        }
    }

    /// One step over a window of the flat state: `p`, `g` and `state`'s lanes cover the same
    /// elements (the window starts on a block boundary), and `pieces` are the parameter ranges
    /// in it with their decay flags; elements in no piece (padding) are left alone.
    pub fn update(
        self,
        p: &mut [f32],
        g: &[f32],
        mut state: StateChunk<'_>,
        pieces: &[(Range<usize>, bool)],
        s: &StepScalars,
    ) {
        match self {
            OptimizerKind::AdamW => {
                let [m, v] = &mut state.floats[..] else {
                    panic!("AdamW state has two f32 lanes")
                };
                for (r, decay) in pieces {
                    let r = r.clone();
                    adamw_step(
                        &mut p[r.clone()],
                        &g[r.clone()],
                        &mut m[r.clone()],
                        &mut v[r],
                        s,
                        *decay,
                    );
                }
            }
            OptimizerKind::Lion => {
                let [m] = &mut state.floats[..] else {
                    panic!("Lion state has one f32 lane")
                };
                for (r, decay) in pieces {
                    let r = r.clone();
                    lion_step(&mut p[r.clone()], &g[r.clone()], &mut m[r], s, *decay);
                }
            }
            OptimizerKind::AdamW8bit => quant8::adamw8bit_step(p, g, state, pieces, s),
        }
    }
}

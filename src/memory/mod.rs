//! Memory: what a rank will hold, what the process may use, and the preflight check between
//! them (issues 13 and 14).
//!
//! - [`model_states`]: the model-state bytes by kind; the strategies' `memory()` reports are
//!   built from the same functions, so the estimate and the report cannot disagree.
//! - [`estimate()`]: a process's estimate by kind and its predicted peak resident set.
//! - [`limit`]: the cgroup limit (v2 or v1) or `MemAvailable`.
//! - [`preflight()`]: refuses, before allocating, a run that cannot fit (`train.preflight`).
//! - [`report`] and [`fit`]: `kiln estimate` (every stage × tier × recompute; `--fit`).
//! - [`phases`]: the peak resident set of each phase of a step.
//! - [`allocator`]: whether freed memory is kept for reuse (`train.keep_freed_memory`).

pub mod allocator;
pub mod estimate;
pub mod fit;
pub mod limit;
pub mod model_states;
pub mod phases;
mod preflight;
pub mod report;
mod variant;

pub use estimate::{estimate, Estimate, Process};
pub use limit::{process_limit, MemoryLimit};
pub use model_states::rank_model_states;
pub use preflight::{
    auto_micro_batch, check, choose_micro_batch, preflight, AutoChoice, Residency, AUTO_MARGIN,
};

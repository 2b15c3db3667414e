//! The byte counts of a strategy's buffers (ZeRO paper §3: parameters, gradients, optimizer
//! states), and which units ZeRO-3 keeps, releases and regathers. The strategies report their
//! memory through these functions, and `memory::model_states` replays them before a run, so the
//! estimate and the report cannot disagree.

use super::{BucketPlan, Reduction, POOL_BUFFERS};
use crate::flat::ModelLayout;
use crate::offload::{StateFormat, Tier};
use crate::plan::Plan;

/// Bytes of one f32 element.
pub const F32: usize = std::mem::size_of::<f32>();

/// Bytes of the whole (padded) buffers of the units `keep` selects.
pub fn unit_param_bytes(layout: &ModelLayout, keep: impl Fn(usize) -> bool) -> usize {
    let elems: usize = (0..layout.units.len())
        .filter(|&u| keep(u))
        .map(|u| layout.units[u].padded_len)
        .sum();
    F32 * elems
}

/// Parameter-shard bytes (resident, in files) of one rank at stage 3 with `offload.param` in
/// `tier`: the same arithmetic as `offload::ParamShards::resident_bytes` and `offloaded_bytes`
/// (a file tier holds at most the largest unit's shard in memory).
pub fn param_shard_bytes(layout: &ModelLayout, tier: Tier) -> (usize, usize) {
    let all = shard_param_bytes(layout);
    match tier {
        Tier::None | Tier::Cpu => (all, 0),
        Tier::Nvme => {
            let largest = layout
                .units
                .iter()
                .map(|u| u.padded_len / layout.world)
                .max();
            (F32 * largest.unwrap_or(0), all)
        }
    }
}

/// Bytes of one rank's shard of every unit.
pub fn shard_param_bytes(layout: &ModelLayout) -> usize {
    F32 * layout
        .units
        .iter()
        .map(|u| u.padded_len / layout.world)
        .sum::<usize>()
}

/// Bytes of the largest unit's padded buffer.
pub fn largest_unit_bytes(layout: &ModelLayout) -> usize {
    F32 * layout.units.iter().map(|u| u.padded_len).max().unwrap_or(0)
}

/// Bytes of gradients kept between backward and the step: every bucket buffer, or, when the
/// buckets are a recycled pool (a reduce-scatter without accumulation), this rank's shard of
/// every unit (`unit_shard_lens`, elements).
pub fn grad_bytes(plan: &BucketPlan, pooled: bool, unit_shard_lens: &[usize]) -> usize {
    F32 * if pooled {
        unit_shard_lens.iter().sum::<usize>()
    } else {
        plan.buckets.iter().map(|b| b.len(plan.world)).sum()
    }
}

/// Bytes of the recycled bucket pool: [`POOL_BUFFERS`] buffers of the largest bucket's size.
pub fn pool_buffer_bytes(plan: &BucketPlan) -> usize {
    let largest = plan
        .buckets
        .iter()
        .map(|b| b.len(plan.world))
        .max()
        .unwrap_or(0);
    F32 * largest * POOL_BUFFERS.min(plan.buckets.len())
}

/// The bucket plan the first step records: unit gradients arrive last unit first (the engine's
/// backward order), each with its padded length.
pub fn expected_bucket_plan(layout: &ModelLayout, bucket_bytes: usize) -> BucketPlan {
    let arrivals: Vec<(usize, usize)> = (0..layout.units.len())
        .rev()
        .map(|u| (u, layout.units[u].padded_len))
        .collect();
    BucketPlan::build(&arrivals, layout.units.len(), bucket_bytes, layout.world)
}

/// Optimizer-state bytes (resident, offloaded) of `len` elements of state in `format` in `tier`:
/// the same arithmetic as `HostStore::resident_bytes` and `NvmeStore` (`create`'s chunk size,
/// `resident_bytes`, `offloaded_bytes`), which live with the stores.
pub fn optimizer_bytes(
    tier: Tier,
    config: &crate::config::OffloadConfig,
    len: usize,
    format: StateFormat,
) -> (usize, usize) {
    match tier {
        Tier::None | Tier::Cpu => (format.bytes(len), 0),
        Tier::Nvme => {
            let chunk = format.chunk_len(config.chunk_mb, len);
            if chunk == 0 {
                return (0, 0);
            }
            let chunks = len.div_ceil(chunk);
            let resident = config.buffer_count.max(1).min(chunks) * format.bytes(chunk);
            (resident, format.bytes(len))
        }
    }
}

/// Which units ZeRO-3 keeps whole on every rank (`parallel.persist_threshold`).
pub fn persistent_units(layout: &ModelLayout, threshold: usize) -> Vec<bool> {
    layout.units.iter().map(|u| u.numel < threshold).collect()
}

/// Which units ZeRO-3 releases after their forward, so that their graphs keep no copy of their
/// parameters (`Strategy::releases_after_forward`): with `parallel.reshard_after_forward` (the
/// default) all but the persistent ones; none without it.
pub fn zero3_released_units(plan: &Plan, persistent: &[bool]) -> Vec<bool> {
    let reshard = plan.config.parallel.reshard_after_forward;
    persistent.iter().map(|&p| reshard && !p).collect()
}

/// Which units ZeRO-3 gathers again for their backward: those it releases after their forward
/// ([`zero3_released_units`]) and those `train.recompute` names.
pub fn zero3_regather_units(plan: &Plan, persistent: &[bool]) -> Vec<bool> {
    zero3_released_units(plan, persistent)
        .into_iter()
        .enumerate()
        .map(|(u, released)| released || plan.recompute.get(u).copied().unwrap_or(false))
        .collect()
}

/// [`zero3_peak_gather_buffers_with`] for the default, `reshard_after_forward = true` without
/// `train.recompute`: every unit but the persistent ones is gathered again.
pub fn zero3_peak_gather_buffers(persistent: &[bool], prefetch: usize) -> usize {
    let regathers: Vec<bool> = persistent.iter().map(|&p| !p).collect();
    zero3_peak_gather_buffers_with(persistent, &regathers, prefetch)
}

/// The most gather buffers ZeRO-3 holds at once (its `peak_gathered` ÷ the largest unit):
/// replays the hook order of one micro-step and of `full_params` with the strategy's rules —
/// a unit is gathered before it runs with the next `prefetch` units in flight, released after,
/// and released buffers are kept for reuse while at most `prefetch + 1` are spare. Persistent
/// units hold no gather buffer. A unit not gathered again (`regathers`, as
/// [`zero3_regather_units`]) counts as held from its forward to its backward (its graph keeps
/// its parameters). One step reaches the peak: later ones repeat it.
pub fn zero3_peak_gather_buffers_with(
    persistent: &[bool],
    regathers: &[bool],
    prefetch: usize,
) -> usize {
    let n = persistent.len();
    // Held: a gather buffer full or in flight (persistent units hold none of their own).
    let mut held: Vec<bool> = persistent.to_vec();
    let mut in_graph = vec![false; n];
    let (mut spare, mut peak) = (0usize, 0usize);
    let note = |held: &[bool], spare: usize, in_graph: &[bool], peak: &mut usize| {
        let buffers = (0..n).filter(|&u| !persistent[u] && held[u]).count();
        let graphs = in_graph.iter().filter(|&&g| g).count();
        *peak = (*peak).max(buffers + spare + graphs);
    };
    let gather = |held: &mut [bool], spare: &mut usize, unit: usize, next: &[usize]| {
        for &u in std::iter::once(&unit).chain(next.iter().take(prefetch)) {
            if !held[u] {
                *spare = spare.saturating_sub(1);
                held[u] = true;
            }
        }
    };
    let release = |held: &mut [bool], spare: &mut usize, unit: usize| {
        if !persistent[unit] && held[unit] {
            held[unit] = false;
            if *spare <= prefetch {
                *spare += 1;
            }
        }
    };
    let gathers_in_backward = |u: usize| regathers[u] || persistent[u];
    for u in 0..n {
        let next: Vec<usize> = (u + 1..n).collect();
        gather(&mut held, &mut spare, u, &next);
        note(&held, spare, &in_graph, &mut peak);
        release(&mut held, &mut spare, u);
        if !gathers_in_backward(u) {
            in_graph[u] = true;
            note(&held, spare, &in_graph, &mut peak);
        }
    }
    for u in (0..n).rev() {
        if gathers_in_backward(u) {
            let next: Vec<usize> = (0..u).rev().filter(|&q| gathers_in_backward(q)).collect();
            gather(&mut held, &mut spare, u, &next);
            note(&held, spare, &in_graph, &mut peak);
        }
        in_graph[u] = false;
        release(&mut held, &mut spare, u);
    }
    // After the step, persistent units are gathered afresh from their updated shards: each
    // takes a spare buffer, if there is one, and keeps it.
    for _ in persistent.iter().filter(|&&p| p) {
        spare = spare.saturating_sub(1);
        note(&held, spare, &in_graph, &mut peak);
    }
    for u in 0..n {
        gather(&mut held, &mut spare, u, &[]);
        note(&held, spare, &in_graph, &mut peak);
        release(&mut held, &mut spare, u);
    }
    peak
}

/// Whether gradient buckets are a recycled pool: a reduce-scatter (ZeRO-2, ZeRO-3) without
/// accumulation (see `strategy::grads`).
pub fn pooled_buckets(reduction: Reduction, grad_accum: usize) -> bool {
    reduction == Reduction::ReduceScatter && grad_accum == 1
}

/// The gradient collective of a stage: DDP and ZeRO-1 all-reduce, ZeRO-2 and 3 reduce-scatter.
pub fn stage_reduction(stage: u8) -> Reduction {
    if stage >= 2 {
        Reduction::ReduceScatter
    } else {
        Reduction::AllReduce
    }
}

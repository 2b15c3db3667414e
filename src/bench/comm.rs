//! `kiln bench comm`: bus bandwidth of kiln's collectives next to the MPI library's own
//! (`MPI_Allreduce`, `MPI_Reduce_scatter_block`, `MPI_Allgather`) on the same buffers, in the same
//! run. Bus bandwidth follows nccl-tests: all-reduce moves 2(N−1)/N of the buffer per rank,
//! reduce-scatter and all-gather (N−1)/N.

use crate::comm::{
    thread_cpu_seconds, Collective, Communicator, ReduceOp, ReferenceKind, INLINE_BYTES,
};
use crate::error::Result;
use serde::Serialize;
use std::time::Instant;

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct CommRow {
    /// Operation.
    pub op: &'static str,
    /// The row's size in bytes; its buffer is this rounded down to a multiple of the world size
    /// ([`row_len`]).
    pub bytes: usize,
    /// kiln's median seconds per call.
    pub kiln_s: f64,
    /// The library's median seconds per call.
    pub reference_s: f64,
    /// kiln's bus bandwidth, GB/s.
    pub kiln_busbw_gbs: f64,
    /// The library's bus bandwidth, GB/s.
    pub reference_busbw_gbs: f64,
    /// kiln ÷ library bandwidth.
    pub ratio: f64,
    /// kiln's median seconds inside its transport (the library call or calls and the
    /// rank-ordered sum, as the flight recorder times them), without the issue, the hand-off and
    /// the return to the caller; `None` where the record is unreadable.
    pub kiln_in_call_s: Option<f64>,
    /// Median seconds per call that the thread making kiln's call spent off a core (wall time
    /// minus the thread's CPU time: descheduled or asleep). Only for calls up to
    /// [`INLINE_BYTES`], which run on the caller's own thread (where the transport allows it:
    /// MPI does at `MPI_THREAD_SERIALIZED`, which OpenMPI gives); a larger one waits for the
    /// communication thread, off the core by design.
    pub kiln_off_cpu_s: Option<f64>,
    /// The same for the library's call, on the thread that made it.
    pub reference_off_cpu_s: f64,
}

/// Sizes from 1 KiB to 64 MiB, ×4 apart.
pub fn sizes() -> Vec<usize> {
    (0..9).map(|i| 1024usize << (2 * i)).collect()
}

/// Elements of a row's buffer: `bytes` of f32, rounded down to a multiple of the world size, so
/// that no buffer is larger than its row says. Rounded up, 256 KiB at N = 3 became 262,152
/// bytes, just past [`INLINE_BYTES`], and that row alone paid the hand-off to the communication
/// thread.
fn row_len(bytes: usize, world: usize) -> usize {
    (bytes / 4) / world * world
}

fn iterations_for(bytes: usize) -> usize {
    ((256usize << 20) / bytes).clamp(5, 200)
}

/// The median, from the flight record `comm` writes now, of how long the recorded calls of `op`
/// on `len` elements spent in the transport. The record keeps the last
/// [`crate::comm::flight::CAPACITY`] collectives: up to twenty-one of each size's calls.
fn in_call_median(comm: &dyn Communicator, op: &str, len: usize) -> Option<f64> {
    let path = comm.dump_flight()?;
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let (prefix, suffix) = (format!("{op}("), format!("len {len})"));
    let mut spans: Vec<f64> = record["collectives"]
        .as_array()?
        .iter()
        .filter(|e| {
            e["op"]
                .as_str()
                .is_some_and(|o| o.starts_with(&prefix) && o.ends_with(&suffix))
        })
        .filter_map(|e| e["transport_s"].as_f64())
        .collect();
    (!spans.is_empty()).then(|| median(&mut spans))
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures every operation and size on `comm` (every rank must call this).
pub fn measure(comm: &dyn Communicator) -> Result<Vec<CommRow>> {
    let world = comm.world();
    // The flight record gives each call's time inside the transport (see `in_call_median`).
    let flight_dir = std::env::temp_dir().join(format!("kiln-bench-comm-{}", std::process::id()));
    comm.set_flight_dir(&flight_dir);
    let mut rows = Vec::new();
    for (op, kind, factor) in [
        ("all_reduce", ReferenceKind::AllReduce, 2.0),
        ("reduce_scatter", ReferenceKind::ReduceScatter, 1.0),
        ("all_gather", ReferenceKind::AllGather, 1.0),
    ] {
        for bytes in sizes() {
            let len = row_len(bytes, world);
            if len == 0 {
                continue; // more ranks than the row has elements
            }
            let iterations = iterations_for(bytes);
            // kiln's call and the library's alternate call by call, so that the machine's drift
            // (this machine is shared) hits both alike.
            let mut buf = vec![1.0f32; len];
            let mut reference = vec![1.0f32; len];
            let mut times = Vec::with_capacity(iterations);
            let mut reference_times = Vec::with_capacity(iterations);
            let (mut off_cpu, mut reference_off_cpu) = (Vec::new(), Vec::new());
            for i in 0..iterations + 2 {
                comm.barrier()?;
                let start_cpu = thread_cpu_seconds();
                let start = Instant::now();
                buf = match kind {
                    ReferenceKind::AllReduce => comm.all_reduce(buf, ReduceOp::Sum),
                    ReferenceKind::ReduceScatter => comm.reduce_scatter(buf, ReduceOp::Sum),
                    ReferenceKind::AllGather => comm.all_gather(buf),
                }
                .wait()?;
                let elapsed = start.elapsed().as_secs_f64();
                let on_cpu = thread_cpu_seconds() - start_cpu;
                reference = comm
                    .start(Collective::Reference {
                        kind,
                        buf: reference,
                    })
                    .wait()?;
                if i >= 2 {
                    times.push(elapsed);
                    // The two clocks are read a few hundred ns apart, so a call that never left
                    // its core can come out slightly negative: that is 0.
                    off_cpu.push((elapsed - on_cpu).max(0.0));
                    reference_times.push(reference[0] as f64);
                    reference_off_cpu.push(((reference[0] - reference[1]) as f64).max(0.0));
                }
                buf.fill(1.0);
            }
            let kiln_s = median(&mut times);
            let reference_s = median(&mut reference_times);
            let kiln_off_cpu_s = (len * 4 <= INLINE_BYTES).then(|| median(&mut off_cpu));
            let reference_off_cpu_s = median(&mut reference_off_cpu);
            let moved = (len * 4) as f64 * factor * (world - 1) as f64 / world as f64;
            let (k, r) = (moved / kiln_s / 1e9, moved / reference_s / 1e9);
            let kiln_in_call_s = in_call_median(comm, op, len);
            rows.push(CommRow {
                op,
                bytes,
                kiln_s,
                reference_s,
                kiln_busbw_gbs: k,
                reference_busbw_gbs: r,
                ratio: k / r,
                kiln_in_call_s,
                kiln_off_cpu_s,
                reference_off_cpu_s,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&flight_dir);
    Ok(rows)
}

/// Formats the table for humans.
pub fn table(rows: &[CommRow], world: usize) -> String {
    let mut out = format!(
        "world {world}: bus bandwidth, GB/s (median per call); `in call`: kiln's ratio counting only \
         its time inside the transport, without the hand-off and the return to the caller; \
         `off core`: median µs per call that the calling thread spent off its core, kiln / MPI \
         (kiln's only where the call runs on the caller's thread)\n\
         {:<15} {:>9} {:>10} {:>10} {:>7} {:>8} {:>12}\n",
        "op", "size", "kiln", "MPI", "ratio", "in call", "off core"
    );
    for r in rows {
        let size = if r.bytes >= 1 << 20 {
            format!("{} MiB", r.bytes >> 20)
        } else {
            format!("{} KiB", r.bytes >> 10)
        };
        let in_call = r
            .kiln_in_call_s
            .map_or("–".to_string(), |t| format!("{:.2}", r.reference_s / t));
        let off_core = format!(
            "{} / {:.0}",
            r.kiln_off_cpu_s
                .map_or("–".to_string(), |t| format!("{:.0}", t * 1e6)),
            r.reference_off_cpu_s * 1e6
        );
        out += &format!(
            "{:<15} {:>9} {:>10.3} {:>10.3} {:>7.2} {:>8} {:>12}\n",
            r.op, size, r.kiln_busbw_gbs, r.reference_busbw_gbs, r.ratio, in_call, off_core
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_row_is_larger_than_it_says_and_the_inline_row_stays_inline() {
        for world in 1..=8 {
            for bytes in sizes() {
                let len = row_len(bytes, world);
                assert_eq!(len % world, 0, "{bytes} B at N = {world}");
                assert!(
                    len * 4 <= bytes && len * 4 + 4 * world > bytes,
                    "{bytes} B, N = {world}"
                );
            }
            assert!(
                row_len(INLINE_BYTES, world) * 4 <= INLINE_BYTES,
                "N = {world}"
            );
        }
    }
}

//! The conformance suite every backend must pass (`kiln check comm`, and the tests): each
//! operation at lengths 0, 1, odd, not divisible by the world size and 64 MiB, on random data,
//! compared with a float64 sequential reference that every rank can compute on its own; two
//! collectives in flight while the caller computes; a small collective behind a queued large one;
//! and all_reduce ≡ reduce_scatter + all_gather bitwise.

use super::{padded_len, Communicator, ReduceOp};
use crate::error::{KilnError, Result};
use crate::rng::Rng;

/// Lengths (in f32 elements) the suite uses for `world` ranks; `large` adds 64 MiB.
pub fn suite_lengths(world: usize, large: bool) -> Vec<usize> {
    let mut lens = vec![0, 1, 7, 5 * world + 1, 4099, 262_147];
    if large {
        lens.push((64 << 20) / 4);
    }
    lens
}

/// Rank `rank`'s contribution to test case `case` of length `len`.
fn contribution(rank: usize, len: usize, case: u64) -> Vec<f32> {
    let mut rng = Rng::derive(0x636f6e66, &[rank as u64, len as u64, case]);
    (0..len)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

fn fail(what: String) -> KilnError {
    KilnError::Comm(format!("conformance: {what}"))
}

/// Checks `got` against the f64 sum of every rank's contribution, with the bound of an f32 sum
/// of `world` terms: |err| ≤ world · 2⁻²³ · Σ|x|.
fn check_reduced(
    op_name: &str,
    got: &[f32],
    range: std::ops::Range<usize>,
    world: usize,
    len: usize,
    case: u64,
    op: ReduceOp,
) -> Result<()> {
    let all: Vec<Vec<f32>> = (0..world).map(|q| contribution(q, len, case)).collect();
    let scale = if op == ReduceOp::Average {
        world as f64
    } else {
        1.0
    };
    for (k, i) in range.enumerate() {
        let exact: f64 = all.iter().map(|c| c[i] as f64).sum::<f64>() / scale;
        let magnitude: f64 = all.iter().map(|c| (c[i] as f64).abs()).sum::<f64>() / scale;
        let bound = world as f64 * f32::EPSILON as f64 * magnitude + f32::MIN_POSITIVE as f64;
        if (got[k] as f64 - exact).abs() > bound {
            return Err(fail(format!(
                "{op_name} len {len}: element {i} is {} but the float64 reference is {exact}",
                got[k]
            )));
        }
    }
    Ok(())
}

/// Runs the suite on `comm`; returns one line per check that passed.
pub fn run_suite(comm: &dyn Communicator, large: bool) -> Result<Vec<String>> {
    let (rank, world) = (comm.rank(), comm.world());
    let mut passed = Vec::new();
    for (case, len) in suite_lengths(world, large).into_iter().enumerate() {
        let case = case as u64;
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            let got = comm.all_reduce(contribution(rank, len, case), op).wait()?;
            if got.len() != len {
                return Err(fail(format!(
                    "all_reduce len {len} returned {} elements",
                    got.len()
                )));
            }
            check_reduced("all_reduce", &got, 0..len, world, len, case, op)?;

            let padded = padded_len(len, world);
            let mut input = contribution(rank, len, case);
            input.resize(padded, 0.0);
            let shard = padded / world;
            let got = comm.reduce_scatter(input, op).wait()?;
            let (lo, hi) = ((rank * shard).min(len), ((rank + 1) * shard).min(len));
            check_reduced("reduce_scatter", &got[lo..hi], lo..hi, world, len, case, op)?;
        }

        // all_gather: shard q of the result must be exactly rank q's shard.
        let padded = padded_len(len, world);
        let shard = padded / world;
        let mut input = vec![f32::NAN; padded];
        let own = contribution(rank, padded, case + 1000);
        input[rank * shard..(rank + 1) * shard]
            .copy_from_slice(&own[rank * shard..(rank + 1) * shard]);
        let got = comm.all_gather(input).wait()?;
        for q in 0..world {
            let theirs = contribution(q, padded, case + 1000);
            if got[q * shard..(q + 1) * shard]
                .iter()
                .zip(&theirs[q * shard..(q + 1) * shard])
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(fail(format!(
                    "all_gather len {padded}: shard {q} differs from rank {q}'s data"
                )));
            }
        }

        // broadcast from the last rank.
        let root = world - 1;
        let input = if rank == root {
            contribution(root, len, case + 2000)
        } else {
            vec![0.0; len]
        };
        let got = comm.broadcast(input, root).wait()?;
        if got
            .iter()
            .zip(&contribution(root, len, case + 2000))
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(fail(format!(
                "broadcast len {len}: result differs from the root's data"
            )));
        }

        // all_reduce must be bitwise reduce_scatter followed by all_gather.
        let ar = comm
            .all_reduce(contribution(rank, len, case), ReduceOp::Sum)
            .wait()?;
        let mut input = contribution(rank, len, case);
        input.resize(padded, 0.0);
        let rs = comm.reduce_scatter(input, ReduceOp::Sum).wait()?;
        let ag = comm.all_gather(rs).wait()?;
        if ar.iter().zip(&ag).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(fail(format!(
                "len {len}: all_reduce differs bitwise from reduce_scatter + all_gather"
            )));
        }
        passed.push(format!("len {len:>9}: all_reduce sum/avg, reduce_scatter sum/avg, all_gather, broadcast, all_reduce ≡ reduce_scatter+all_gather"));
    }

    // Two collectives in flight while this thread computes.
    let len = if large { (64 << 20) / 4 } else { 262_147 };
    let first = comm.all_reduce(contribution(rank, len, 7000), ReduceOp::Sum);
    let second = comm.all_reduce(contribution(rank, len, 7001), ReduceOp::Sum);
    let mut busy = 0.0f64;
    for i in 0..2_000_000u64 {
        busy += (i as f64).sqrt();
    }
    std::hint::black_box(busy);
    check_reduced(
        "overlapped all_reduce",
        &first.wait()?,
        0..len,
        world,
        len,
        7000,
        ReduceOp::Sum,
    )?;
    check_reduced(
        "overlapped all_reduce",
        &second.wait()?,
        0..len,
        world,
        len,
        7001,
        ReduceOp::Sum,
    )?;
    passed.push(format!(
        "len {len:>9}: two all_reduce calls in flight during computation"
    ));

    // A small collective issued behind a queued large one keeps its place: small ones may run
    // on the caller's thread, but never ahead of the queue. Rank 0 issues late, so that its
    // communication thread is asleep and a small call that jumped the queue would win the race
    // to the transport there while the other ranks are already in the large one.
    let (large_len, small_len) = (262_147, 7);
    for round in 0..4u64 {
        if rank == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let case = 7100 + 2 * round;
        let large = comm.all_reduce(contribution(rank, large_len, case), ReduceOp::Sum);
        let small = comm.all_reduce(contribution(rank, small_len, case + 1), ReduceOp::Sum);
        let name = "all_reduce issued behind a queued one";
        let got = small.wait()?;
        check_reduced(
            name,
            &got,
            0..small_len,
            world,
            small_len,
            case + 1,
            ReduceOp::Sum,
        )?;
        let got = large.wait()?;
        check_reduced(
            name,
            &got,
            0..large_len,
            world,
            large_len,
            case,
            ReduceOp::Sum,
        )?;
    }
    passed.push("a small all_reduce issued behind a queued large one keeps its place".into());

    // Byte gathers and barrier.
    let bytes = comm.all_gather_bytes(format!("rank {rank}").as_bytes())?;
    if bytes
        .iter()
        .enumerate()
        .any(|(q, b)| *b != format!("rank {q}").into_bytes())
    {
        return Err(fail("all_gather_bytes returned the wrong strings".into()));
    }
    comm.barrier()?;
    passed.push("all_gather_bytes, barrier".into());
    Ok(passed)
}

/// Issues a deliberately mismatched collective (rank 0 all-reduces 10 elements, the others
/// all-gather 2 × world) on a communicator with `comm.verify` on, and returns the error it gives.
pub fn provoke_mismatch(comm: &dyn Communicator) -> Result<KilnError> {
    let pending = if comm.rank() == 0 {
        comm.all_reduce(vec![1.0; 10], ReduceOp::Sum)
    } else {
        comm.all_gather(vec![1.0; 2 * comm.world()])
    };
    match pending.wait() {
        Err(e) => Ok(e),
        Ok(_) => Err(fail(
            "a mismatched collective completed; is comm.verify on?".into(),
        )),
    }
}

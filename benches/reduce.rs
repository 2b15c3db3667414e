//! The gradient path's own kernels, each next to a reference that does the same memory traffic
//! with nothing else (criterion groups print them side by side, with throughput in bytes read):
//!
//! - `rank_order_sum/N`: `kiln::comm::sum_shard_in_rank_order`, the one summation every backend
//!   uses (DESIGN.md "Determinism"), over N blocks of 1 MiB; reference `memcpy_same_bytes`, a copy
//!   of the same N MiB (the sum cannot read its inputs faster than memory moves them).
//! - `bucket_pack/N`: `Bucket::write` scattering a unit's padded gradients into a bucket's
//!   rank-major layout, copy and accumulate; reference `memcpy_same_bytes`, one copy of the unit.
//! - `local_all_reduce/N`: the `local` backend (`--simulate N`) all-reducing 1 MiB per rank,
//!   ranks as threads; its reference is the row above it, rank_order_sum plus the gather's copy,
//!   i.e. what the collective costs without its hand-off and barriers.
//!
//! The collective with MPI is measured end to end against the library's own calls by
//! `mpirun -np N kiln bench comm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::comm::{simulate_group, sum_shard_in_rank_order, CommOptions, ReduceOp};
use kiln::strategy::{Bucket, BucketSlot};
use std::hint::black_box;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

const SHARD: usize = 1 << 18; // 1 MiB of f32

fn rank_order_sum(c: &mut Criterion) {
    for world in [2usize, 4] {
        let mut group = c.benchmark_group(format!("rank_order_sum/{world}"));
        group.throughput(Throughput::Bytes((world * SHARD * 4) as u64));
        let blocks: Vec<Vec<f32>> = (0..world)
            .map(|q| (0..SHARD).map(|i| (i * (q + 1)) as f32 * 1e-3).collect())
            .collect();
        let mut out = vec![0.0f32; SHARD];
        group.bench_function("kiln", |b| {
            b.iter(|| {
                sum_shard_in_rank_order(world, |q| blocks[q].as_slice(), &mut out, ReduceOp::Sum);
                black_box(&out);
            })
        });
        let flat: Vec<f32> = blocks.concat();
        let mut dst = vec![0.0f32; flat.len()];
        group.bench_function("memcpy_same_bytes", |b| {
            b.iter(|| {
                dst.copy_from_slice(&flat);
                black_box(&dst);
            })
        });
        group.finish();
    }
}

fn bucket_pack(c: &mut Criterion) {
    // A bucket of three units; the middle one (4 MiB padded) is written.
    for world in [2usize, 4] {
        let len = 1usize << 20;
        let shard_len = len / world;
        let bucket = Bucket {
            slots: (0..3)
                .map(|u| BucketSlot {
                    unit: u,
                    offset: u * shard_len,
                    shard_len,
                })
                .collect(),
            shard_len: 3 * shard_len,
        };
        let mut buf = vec![0.0f32; bucket.len(world)];
        let grads: Vec<f32> = (0..len).map(|i| i as f32 * 1e-6).collect();
        let mut group = c.benchmark_group(format!("bucket_pack/{world}"));
        group.throughput(Throughput::Bytes((len * 4) as u64));
        for accumulate in [false, true] {
            let name = if accumulate {
                "kiln_accumulate"
            } else {
                "kiln_copy"
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    bucket.write(&mut buf, &bucket.slots[1], &grads, world, accumulate);
                    black_box(&buf);
                })
            });
        }
        let mut dst = vec![0.0f32; len];
        group.bench_function("memcpy_same_bytes", |b| {
            b.iter(|| {
                dst.copy_from_slice(&grads);
                black_box(&dst);
            })
        });
        group.finish();
    }
}

fn local_all_reduce(c: &mut Criterion) {
    for world in [2usize, 3] {
        let len = SHARD;
        let mut group = c.benchmark_group(format!("local_all_reduce/{world}"));
        group.throughput(Throughput::Bytes((len * 4) as u64));
        group.bench_function(BenchmarkId::new("kiln", "1 MiB"), |b| {
            b.iter_custom(|iters| {
                let comms = simulate_group(world, &CommOptions::new(false));
                // Ranks 1.. run the same number of calls on their own threads; rank 0 is timed.
                let mut others = Vec::new();
                for comm in comms.iter().skip(1).cloned() {
                    let (tx, rx) = channel();
                    others.push(rx);
                    std::thread::spawn(move || {
                        let mut buf = vec![1.0f32; len];
                        for _ in 0..iters {
                            buf = comm.all_reduce(buf, ReduceOp::Sum).wait().expect("reduce");
                        }
                        tx.send(()).expect("done");
                    });
                }
                let mut buf = vec![1.0f32; len];
                let start = Instant::now();
                for _ in 0..iters {
                    buf = comms[0]
                        .all_reduce(buf, ReduceOp::Sum)
                        .wait()
                        .expect("reduce");
                }
                let elapsed = start.elapsed();
                black_box(&buf);
                for rx in others {
                    rx.recv().expect("other ranks finish");
                }
                elapsed
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = rank_order_sum, bucket_pack, local_all_reduce
}
criterion_main!(group);

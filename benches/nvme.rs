//! The nvme tier's streaming (`NvmeStore::stream`, read-ahead and write-behind around the
//! caller) next to its reference, the disk's own sequential O_DIRECT write and read of the same
//! bytes in the same chunk size one transfer at a time (`kiln::bench::offload::disk_bandwidth`,
//! what `dd oflag=direct` measures). Throughput is bytes moved: m and v read, and written back.
//!
//! Files go to `$KILN_BENCH_DIR` (default: the system temporary directory); the directory must
//! take O_DIRECT for the reference (tmpfs does not). The end-to-end figure with AdamW and a
//! training step is `kiln bench offload`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::bench::offload::disk_bandwidth;
use kiln::config::OffloadConfig;
use kiln::offload::{Access, NvmeStore, StateStore};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Elements of m (and of v): 64 MiB of state in the file.
const LEN: usize = 8 << 20;
const CHUNK_MB: f64 = 4.0;

fn dir() -> PathBuf {
    std::env::var_os("KILN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn bench(c: &mut Criterion) {
    let config = OffloadConfig {
        nvme_path: dir().to_string_lossy().into_owned(),
        chunk_mb: CHUNK_MB,
        ..OffloadConfig::default()
    };
    let mut store = NvmeStore::create(&config, 0, LEN).expect("nvme store in $KILN_BENCH_DIR");
    assert!(
        store.is_direct(),
        "{}: needs a filesystem that takes O_DIRECT (set KILN_BENCH_DIR)",
        config.nvme_path
    );
    let moved = 2 * store.offloaded_bytes();
    let mut group = c.benchmark_group("nvme_stream");
    group.throughput(Throughput::Bytes(moved as u64));
    group.bench_function("kiln_read_write", |b| {
        b.iter(|| {
            store
                .stream(Access::ReadWrite, &mut |_, m, v| {
                    // Touch the chunk as the optimizer would, so that it is not optimised out.
                    m[0] += 1.0;
                    black_box((&m[0], &v[0]));
                    Ok(())
                })
                .expect("stream");
        })
    });
    let state_bytes = store.offloaded_bytes();
    let chunk_bytes = (CHUNK_MB * (1 << 20) as f64) as usize;
    group.bench_function("reference_disk_write_then_read", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let (read, write) =
                    disk_bandwidth(&dir(), state_bytes, chunk_bytes).expect("disk bandwidth");
                black_box((read, write));
                // Time of the transfers alone (without creating and removing the scratch file).
                let secs = state_bytes as f64 / 1e9 / read + state_bytes as f64 / 1e9 / write;
                total += Duration::from_secs_f64(secs).min(start.elapsed());
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(group);

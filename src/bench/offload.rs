//! `kiln bench offload`: the nvme tier's optimizer-state throughput next to the disk's own
//! O_DIRECT sequential bandwidth on the same directory, and the training-step cost of the tier.

use super::train::{kiln_train, read_run, run, scratch_dir, BenchShape, Contender};
use crate::config::OffloadConfig;
use crate::error::{KilnError, Result};
use crate::offload::aligned::AlignedBuf;
use crate::offload::{Access, NvmeStore, StateStore};
use crate::optim::{AdamWConfig, OptimizerKind, StepScalars};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

/// GB/s (10⁹ bytes per second).
fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Sequential O_DIRECT write then read of `bytes` in `chunk_bytes` transfers, one at a time
/// (what `dd oflag=direct bs=…` measures), in a scratch file under `dir`. Returns (read, write)
/// GB/s; the write includes the final fdatasync.
pub fn disk_bandwidth(dir: &Path, bytes: usize, chunk_bytes: usize) -> Result<(f64, f64)> {
    let path = dir.join(format!("kiln-bench-{}.disk", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| KilnError::file(&path, format!("cannot create with O_DIRECT: {e}")))?;
    let result = (|| {
        let mut buf = AlignedBuf::zeroed(chunk_bytes / 4);
        for (i, x) in buf.as_mut_slice().iter_mut().enumerate() {
            *x = i as f32;
        }
        let n = bytes.div_ceil(chunk_bytes);
        let io = |e| KilnError::io(&path, e);
        let start = Instant::now();
        for k in 0..n {
            file.write_all_at(buf.bytes(), (k * chunk_bytes) as u64)
                .map_err(io)?;
        }
        file.sync_data().map_err(io)?;
        let write = gbs(n * chunk_bytes, start.elapsed().as_secs_f64());
        let start = Instant::now();
        for k in 0..n {
            file.read_exact_at(buf.bytes_mut(), (k * chunk_bytes) as u64)
                .map_err(io)?;
        }
        let read = gbs(n * chunk_bytes, start.elapsed().as_secs_f64());
        Ok((read, write))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// One optimizer step of `len` parameters through the nvme tier, as training runs it: stream
/// m and v, apply the fused AdamW to each chunk, write back. Returns GB/s of state moved (bytes
/// read + bytes written) per second of step, the median of `repeats` steps after one warm-up.
pub fn tier_throughput(config: &OffloadConfig, len: usize, repeats: usize) -> Result<f64> {
    let kind = OptimizerKind::AdamW;
    let mut store = NvmeStore::create(config, 0, len, kind.format())?;
    let mut params: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 1e-3).collect();
    let grads: Vec<f32> = (0..len).map(|i| (i % 89) as f32 * 1e-4).collect();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut times = Vec::new();
    for t in 0..=repeats {
        let scalars = StepScalars::new(&adamw, t as u64 + 1, 1e-3, 1.0);
        let start = Instant::now();
        store.stream(Access::ReadWrite, &mut |r, lanes| {
            let whole = [(0..r.len(), true)];
            kind.update(&mut params[r.clone()], &grads[r], lanes, &whole, &scalars);
            Ok(())
        })?;
        if t > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let moved = 2 * store.offloaded_bytes();
    Ok(gbs(moved, super::train::median_of(&times)))
}

/// Training steps with the optimizer state on tier `cpu` and on tier `nvme`, alternating runs.
/// Returns the two contenders, cpu first.
pub fn step_times(shape: &BenchShape) -> Result<[Contender; 2]> {
    let dir = scratch_dir()?;
    let mut cpu = Contender::new("tier cpu");
    let mut nvme = Contender::new("tier nvme");
    for r in 0..shape.repeats {
        for (tier, c) in [("cpu", &mut cpu), ("nvme", &mut nvme)] {
            let out = dir.join(format!("{tier}-r{r}"));
            let mut cmd = kiln_train(shape, 1, &out)?;
            cmd.arg("--set").arg(format!("offload.optimizer={tier}"));
            run(&mut cmd, &c.name)?;
            let t = read_run(&out, 2)?;
            c.step_ms.push(t.step);
            c.optimizer_ms.push(t.optimizer);
            eprintln!(
                "  run {}: {:<10} {:8.1} ms/step, AdamW {:6.1} ms",
                r + 1,
                c.name,
                t.step,
                t.optimizer
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok([cpu, nvme])
}

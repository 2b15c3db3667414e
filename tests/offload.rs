//! Offload tiers: `cpu` and `nvme` give the same bits as `none` for every stage; the nvme store
//! streams every element exactly once per step whatever the chunking; bad paths and damaged
//! files are one-line errors naming the path.

mod common;

use common::Scratch;
use kiln::config::OffloadConfig;
use kiln::launch;
use kiln::offload::{Access, HostStore, NvmeStore, StateFormat, StateStore, Tier};
use kiln::optim::OptimizerKind;

#[test]
fn every_tier_is_bitwise_equal_to_none_for_every_stage() {
    let scratch = Scratch::new("tiers");
    // 1024-element chunks (the smallest) and two buffers: chunk boundaries fall inside units
    // and shards, and the pipeline wraps around its buffers many times per step.
    let nvme_path = format!("offload.nvme_path={}", scratch.str());
    for (world, accum) in [(2, 1), (3, 2)] {
        for stage in 0..=3 {
            let none = common::small_run(stage, world, accum, &[]);
            for tier in ["cpu", "nvme"] {
                let tier_set = format!("offload.optimizer={tier}");
                let run = common::small_run(
                    stage,
                    world,
                    accum,
                    &[
                        &tier_set,
                        &nvme_path,
                        "offload.chunk_mb=0.001",
                        "offload.buffer_count=2",
                    ],
                );
                assert_eq!(run.losses, none.losses, "{tier} stage {stage} N={world}");
                for (u, (a, b)) in run.params.iter().zip(&none.params).enumerate() {
                    assert!(
                        common::bitwise_equal(a, b),
                        "{tier} stage {stage} N={world}: unit {u} differs from tier none"
                    );
                }
                let mem = run.summary.memory;
                let none_mem = none.summary.memory;
                if tier == "nvme" {
                    assert_eq!(mem.optimizer_offloaded, none_mem.optimizer);
                    assert!(mem.optimizer <= 2 * 2 * 1024 * 4, "two 1024-element chunks");
                } else {
                    assert_eq!(mem.optimizer, none_mem.optimizer);
                }
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
    assert!(left.is_empty(), "state files left behind: {left:?}");
}

/// `offload.param` at stage 3: `cpu` and `nvme` (alone, and with the nvme optimizer tier:
/// ZeRO-Infinity) give the bits of `none` at N = 2 and 3, with accumulation, recompute, tied
/// embeddings and both `reshard_after_forward` settings; the file tier holds one unit's shard
/// in memory and the rest on disk, and leaves no file behind.
#[test]
fn parameter_offload_is_bitwise_equal_to_none_at_stage_3() {
    let scratch = Scratch::new("param-tiers");
    let nvme_path = format!("offload.nvme_path={}", scratch.str());
    let variants: [&[&str]; 4] = [
        &[],
        &["train.recompute=true"],
        &["model.tie_embeddings=true"],
        &["parallel.reshard_after_forward=false"],
    ];
    for (world, accum) in [(2, 1), (3, 2)] {
        for extra in variants {
            let none = common::small_run(3, world, accum, extra);
            for tiers in [
                &["offload.param=\"cpu\""][..],
                &["offload.param=\"nvme\""],
                &["offload.param=\"nvme\"", "offload.optimizer=\"nvme\""],
            ] {
                let mut sets = vec![nvme_path.as_str()];
                sets.extend(extra);
                sets.extend(tiers);
                let run = common::small_run(3, world, accum, &sets);
                let what = format!("{tiers:?} {extra:?} N={world}");
                assert_eq!(run.losses, none.losses, "{what}: losses");
                for (u, (a, b)) in run.params.iter().zip(&none.params).enumerate() {
                    assert!(common::bitwise_equal(a, b), "{what}: unit {u} differs");
                }
                let (mem, none_mem) = (run.summary.memory, none.summary.memory);
                if tiers[0].contains("nvme") {
                    assert_eq!(mem.params_offloaded, none_mem.param_shards, "{what}");
                    assert!(mem.param_shards < none_mem.param_shards, "{what}");
                } else {
                    assert_eq!(mem.param_shards, none_mem.param_shards, "{what}");
                }
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// Forty steps equal twenty, a checkpoint and twenty more with the parameters in a file; the
/// checkpoint loads at another world size (the same global batch) without the file tier, close
/// to an uninterrupted run there.
#[test]
fn parameter_offload_resumes_exactly_and_reshards() {
    let scratch = Scratch::new("param-resume");
    let ck = format!("checkpoint.dir={}", scratch.path("ck").display());
    let nvme_path = format!("offload.nvme_path={}", scratch.str());
    let sets = [
        "train.steps=40",
        "offload.param=\"nvme\"",
        &nvme_path,
        &ck,
        "checkpoint.every=20",
        "checkpoint.keep=0",
    ];
    let straight = common::small_run(3, 2, 2, &sets);
    let at_20 = scratch.path("ck/step_000020");
    let resumed = common::small_run_resumed(3, 2, 2, &sets, Some(at_20.to_str().unwrap())).unwrap();
    assert_eq!(resumed.losses, straight.losses[20..]);
    for (a, b) in resumed.params.iter().zip(&straight.params) {
        assert!(common::bitwise_equal(a, b), "parameters after resume");
    }
    let plain = ["train.steps=40"];
    let four = common::small_run_resumed(3, 4, 1, &plain, Some(at_20.to_str().unwrap())).unwrap();
    let reference = common::small_run(3, 4, 1, &plain);
    let diff = common::rel_l2(&four.params.concat(), &reference.params.concat());
    assert!(
        diff <= 1e-5,
        "2 ranks with nvme parameters → 4 ranks: {diff:e}"
    );
}

fn nvme_config(dir: &str, chunk_mb: f64, buffer_count: usize) -> OffloadConfig {
    OffloadConfig {
        optimizer: "nvme".into(),
        nvme_path: dir.into(),
        chunk_mb,
        buffer_count,
        ..Default::default()
    }
}

/// Every lane of a store, whole, in lane order: f32 lanes, byte lanes, scale lanes.
#[derive(Debug, PartialEq)]
struct Lanes {
    floats: Vec<Vec<f32>>,
    codes: Vec<Vec<u8>>,
    scales: Vec<Vec<f32>>,
}

/// Reads every lane of `store`.
fn read_all(store: &mut dyn StateStore, format: StateFormat) -> Lanes {
    let mut all = Lanes {
        floats: vec![Vec::new(); format.floats],
        codes: vec![Vec::new(); format.quantized],
        scales: vec![Vec::new(); format.quantized],
    };
    store
        .stream(Access::Read, &mut |_, chunk| {
            let extend = |to: &mut Vec<Vec<f32>>, from: &[&mut [f32]]| {
                to.resize(from.len(), Vec::new());
                to.iter_mut()
                    .zip(from)
                    .for_each(|(t, f)| t.extend_from_slice(f));
            };
            extend(&mut all.floats, &chunk.floats);
            extend(&mut all.scales, &chunk.scales);
            all.codes.resize(chunk.codes.len(), Vec::new());
            all.codes
                .iter_mut()
                .zip(&chunk.codes)
                .for_each(|(t, f)| t.extend_from_slice(f));
            Ok(())
        })
        .unwrap();
    all
}

/// Writes a known pattern into every lane, updates it, reads it back.
fn exercise(store: &mut dyn StateStore, format: StateFormat) -> Lanes {
    let len = store.len();
    let block = StateFormat::BLOCK;
    let mut next = 0;
    store
        .stream(Access::ReadWrite, &mut |r, chunk| {
            assert_eq!(r.start, next, "ranges in order, no gaps");
            assert_eq!(chunk.floats.len(), format.floats);
            assert_eq!(chunk.codes.len(), format.quantized);
            next = r.end;
            for (k, lane) in chunk.floats.into_iter().enumerate() {
                assert_eq!(lane.len(), r.len());
                for (i, x) in r.clone().zip(lane.iter_mut()) {
                    *x = i as f32 + k as f32 * 0.25;
                }
            }
            for (k, lane) in chunk.codes.into_iter().enumerate() {
                assert_eq!(lane.len(), r.len());
                for (i, x) in r.clone().zip(lane.iter_mut()) {
                    *x = (i * 7 + k) as u8;
                }
            }
            for (k, lane) in chunk.scales.into_iter().enumerate() {
                assert_eq!(lane.len(), r.len() / block);
                for (b, x) in lane.iter_mut().enumerate() {
                    *x = (r.start / block + b) as f32 * 0.5 + k as f32;
                }
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(next, len);
    store
        .stream(Access::ReadWrite, &mut |_, chunk| {
            for lane in chunk.floats {
                lane.iter_mut().for_each(|x| *x += 0.5);
            }
            for lane in chunk.codes {
                lane.iter_mut().for_each(|x| *x = x.wrapping_add(1));
            }
            for lane in chunk.scales {
                lane.iter_mut().for_each(|x| *x *= 2.0);
            }
            Ok(())
        })
        .unwrap();
    read_all(store, format)
}

#[test]
fn nvme_store_streams_every_element_once_whatever_the_chunking() {
    let scratch = Scratch::new("store");
    for kind in [
        OptimizerKind::AdamW,
        OptimizerKind::Lion,
        OptimizerKind::AdamW8bit,
    ] {
        let format = kind.format();
        // Quantized lanes come in whole blocks (every StateLayout's length is a multiple).
        let lens: &[usize] = if format.quantized > 0 {
            &[0, 256, 1024, 5120, 300_032]
        } else {
            &[0, 1, 1023, 1024, 1025, 5000, 70_000]
        };
        for &len in lens {
            let mut host = HostStore::new(Tier::Cpu, len, format);
            let expected = exercise(&mut host, format);
            assert_eq!(host.resident_bytes(), format.bytes(len));
            for (chunk_mb, buffers) in [(0.001, 1), (0.001, 2), (0.02, 4), (16.0, 4)] {
                let config = nvme_config(scratch.str(), chunk_mb, buffers);
                let mut nvme = NvmeStore::create(&config, 0, len, format).unwrap();
                let what = format!(
                    "{} len {len} chunk_mb {chunk_mb} buffers {buffers}",
                    kind.name()
                );
                assert_eq!(exercise(&mut nvme, format), expected, "{what}");
                assert!(nvme.resident_bytes() <= buffers * format.bytes(nvme.chunk_len()));
                assert_eq!(nvme.offloaded_bytes(), format.bytes(len), "{what}");
                // A read-only pass does not write back (the callback's changes are scratch).
                nvme.stream(Access::Read, &mut |_, chunk| {
                    chunk.floats.into_iter().for_each(|l| l.fill(f32::NAN));
                    chunk.codes.into_iter().for_each(|l| l.fill(0));
                    Ok(())
                })
                .unwrap();
                assert_eq!(read_all(&mut nvme, format), expected, "{what}");
            }
        }
    }
}

/// Whether `dir`'s filesystem takes an aligned O_DIRECT write (tmpfs, for one, does not).
fn takes_direct_io(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join("probe");
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        return false;
    };
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    let ok = file
        .write_all_at(unsafe { std::slice::from_raw_parts(ptr, 4096) }, 0)
        .is_ok();
    unsafe { std::alloc::dealloc(ptr, layout) };
    let _ = std::fs::remove_file(&path);
    ok
}

#[test]
fn nvme_store_uses_direct_io_where_the_filesystem_allows_and_removes_its_file() {
    let scratch = Scratch::new("direct");
    let format = OptimizerKind::AdamW.format();
    let mut store =
        NvmeStore::create(&nvme_config(scratch.str(), 1.0, 4), 3, 100_000, format).unwrap();
    let path = store.path().to_path_buf();
    assert!(path.exists());
    assert_eq!(
        store.is_direct(),
        takes_direct_io(&scratch.0),
        "{}",
        path.display()
    );
    // Either way the state round-trips (buffered I/O is the fallback, not a failure).
    let lanes = exercise(&mut store, OptimizerKind::AdamW.format());
    assert_eq!(lanes.floats[0][99_999], 99_999.5);
    drop(store);
    assert!(!path.exists(), "the state file is removed at a clean exit");
}

#[test]
fn a_truncated_state_file_is_an_error_naming_it() {
    let scratch = Scratch::new("truncated");
    let format = OptimizerKind::AdamW.format();
    let mut store =
        NvmeStore::create(&nvme_config(scratch.str(), 0.01, 2), 0, 10_000, format).unwrap();
    let path = store.path().to_path_buf();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = store
        .stream(Access::ReadWrite, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn a_missing_or_non_directory_path_is_a_config_error_naming_it() {
    let scratch = Scratch::new("paths");
    let file = scratch.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    for bad in [scratch.path("missing"), file] {
        let config = common::config(&[
            "offload.optimizer=nvme",
            &format!("offload.nvme_path={}", bad.display()),
            "model.preset=tiny",
            "train.steps=1",
        ]);
        let err = launch::simulate(&config, 1, &common::QUIET).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2, "{msg}");
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        assert!(msg.contains("offload.nvme_path"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn an_unwritable_directory_is_an_error_naming_the_file() {
    // sysfs refuses new files even to root, so this holds wherever the tests run.
    let config = nvme_config("/sys", 1.0, 4);
    let msg = NvmeStore::create(&config, 0, 1000, OptimizerKind::AdamW.format())
        .err()
        .expect("/sys is not writable")
        .to_string();
    assert!(msg.starts_with("/sys/kiln-"), "{msg}");
    assert!(
        msg.contains("cannot create the optimizer-state file (offload.nvme_path)"),
        "{msg}"
    );
}

/// Runs the small preset for 3 steps as its own process and returns (peak RSS MiB, optimizer
/// bytes in memory if the tier had been `none`).
fn small_preset_peak_rss(tier: &str, out: &std::path::Path) -> (f64, f64) {
    let memory = small_preset_memory(&[&format!("offload.optimizer={tier}")], out);
    let state =
        memory.0["optimizer"].as_f64().unwrap() + memory.0["optimizer_offloaded"].as_f64().unwrap();
    (memory.1, state / (1 << 20) as f64)
}

/// Three steps of the small preset (micro-batch 1, 64 tokens, one thread) with `sets`: the
/// summary's memory report and the peak RSS, MiB.
fn small_preset_memory(sets: &[&str], out: &std::path::Path) -> (serde_json::Value, f64) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["train", "--quiet", "--config", "configs/small.toml"])
        .args(["--set", "train.steps=3", "--set", "train.micro_batch=1"])
        .args(["--set", "train.global_batch=1", "--set", "model.seq_len=64"])
        .args(["--set", "train.threads=1"]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let status = cmd
        .arg("--set")
        .arg(format!("output.dir={}", out.display()))
        .env("KILN_LOG", "warn")
        .env("MIMALLOC_PURGE_DELAY", "0")
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    (
        summary["memory"].clone(),
        summary["peak_rss_mb"].as_f64().unwrap(),
    )
}

/// The parameter file tier moves the shards out of memory: at stage 3 (one rank, so its shard
/// is the whole model) the peak drops by at least 0.8 × the bytes the report moves to the file.
#[test]
fn nvme_parameters_lower_peak_rss_by_most_of_the_parameter_bytes() {
    let scratch = Scratch::new("param-rss");
    let nvme = format!("offload.nvme_path={}", scratch.str());
    let (none, none_peak) = small_preset_memory(&["parallel.stage=3"], &scratch.path("none"));
    let (file, file_peak) = small_preset_memory(
        &["parallel.stage=3", "offload.param=\"nvme\"", &nvme],
        &scratch.path("nvme"),
    );
    let moved = (none["param_shards"].as_f64().unwrap() - file["param_shards"].as_f64().unwrap())
        / (1 << 20) as f64;
    eprintln!("peak RSS: none {none_peak:.1} MiB, nvme {file_peak:.1} MiB, moved {moved:.1} MiB");
    assert!(
        none_peak - file_peak >= 0.8 * moved,
        "the parameter file saves {:.1} MiB of {moved:.1} MiB moved out",
        none_peak - file_peak
    );
}

/// Each run hands freed pages back to the kernel at once (`MIMALLOC_PURGE_DELAY=0`), so its peak
/// is the live peak. With mimalloc's default one-second delay, whether a step's freed pages are
/// still resident depends on how long the step took, and single runs' savings moved from 145
/// to 194 MiB (a CI run's medians of three: 153); with no delay, four runs each saved 181–184
/// MiB of the 179 the tier should save (195 MiB of state, 16 MiB of it resident as buffers).
#[test]
fn nvme_lowers_peak_rss_by_most_of_the_optimizer_state() {
    let scratch = Scratch::new("rss");
    let (none, state) = small_preset_peak_rss("none", &scratch.path("none"));
    let (nvme, _) = small_preset_peak_rss("nvme", &scratch.path("nvme"));
    eprintln!("peak RSS: none {none:.1} MiB, nvme {nvme:.1} MiB, optimizer state {state:.1} MiB");
    assert!(
        none - nvme >= 0.8 * state,
        "nvme saves {:.1} MiB of {state:.1} MiB optimizer state",
        none - nvme
    );
}

//! Issue 14: memory you can predict. The estimate against measured peaks (VmHWM) of real runs,
//! memory by phase in metrics.jsonl and summary.json, `kiln estimate` (table, JSON, `--fit`),
//! `kiln plot`, and selective recompute (`train.recompute = "every:K"` or unit names), which
//! must stay bitwise equal to no recompute.
//!
//! The full ±10% matrix (tiny and small × stages × tiers × recompute × N) is
//! `scripts/memory_matrix.py`, whose table is in the README; CI runs the subset below.

mod common;

use common::{bitwise_equal, kiln, output_text, small_run, Scratch, TEST_MODEL};
use kiln::config;
use kiln::memory::Process;
use kiln::plan::Plan;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn plan(sets: &[&str], world: usize) -> kiln::error::Result<Plan> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Plan::resolve(&config::load(None, &sets)?, world)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON")
}

#[test]
fn recompute_settings_resolve_to_units() {
    // tiny: embed, blocks.0..3, head.
    let every2 = plan(&["train.recompute=\"every:2\""], 1).unwrap();
    assert_eq!(every2.recompute, [false, true, false, true, false, false]);
    let every3 = plan(&["train.recompute=\"every:3\""], 1).unwrap();
    assert_eq!(every3.recompute, [false, true, false, false, true, false]);
    let all = plan(&["train.recompute=true"], 1).unwrap();
    assert_eq!(all.recompute, [true; 6]);
    let off = plan(&[], 1).unwrap();
    assert_eq!(off.recompute, [false; 6]);
    let named = plan(&["train.recompute=[\"embed\", \"blocks.2\"]"], 1).unwrap();
    assert_eq!(named.recompute, [true, false, false, true, false, false]);

    for (bad, needles) in [
        (
            "train.recompute=\"every:0\"",
            &["train.recompute", "every:0", "every:K"][..],
        ),
        (
            "train.recompute=sometimes",
            &["train.recompute", "sometimes", "every:K"],
        ),
        ("train.recompute=3", &["train.recompute", "every:K"]),
        (
            "train.recompute=[\"blocks.9\"]",
            &["train.recompute", "blocks.9", "head"],
        ),
    ] {
        let e = plan(&[bad], 1).expect_err(bad).to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        for n in needles {
            assert!(e.contains(n), "`{n}` missing from: {e}");
        }
    }
}

/// Stage 3 included: there recomputed units sit beside regathered ones in one step.
#[test]
fn selective_recompute_is_bitwise_equal_to_none() {
    let reference = small_run(0, 2, 1, &[]);
    for setting in [
        "train.recompute=\"every:2\"",
        "train.recompute=true",
        "train.recompute=[\"blocks.1\", \"head\"]",
    ] {
        for stage in [0, 2, 3] {
            let run = small_run(stage, 2, 1, &[setting]);
            assert_eq!(
                run.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                reference
                    .losses
                    .iter()
                    .map(|l| l.to_bits())
                    .collect::<Vec<_>>(),
                "{setting}, stage {stage}: losses"
            );
            for (u, (a, b)) in run.params.iter().zip(&reference.params).enumerate() {
                assert!(bitwise_equal(a, b), "{setting}, stage {stage}: unit {u}");
            }
        }
    }
}

/// `kiln train` of `sets` on top of `config`, `launch` ranks (`--simulate N`, or mpirun -np N);
/// returns the summary.
fn measured(config: &str, sets: &[&str], launch: &str, out: &Path) -> Value {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mpi, n) = launch.split_once(':').expect("kind:N");
    let mut args: Vec<String> = vec![
        "train".into(),
        "--quiet".into(),
        "--config".into(),
        manifest.join(config).display().to_string(),
    ];
    for s in sets {
        args.extend(["--set".into(), s.to_string()]);
    }
    args.extend(["--set".into(), format!("output.dir={}", out.display())]);
    let o = if mpi == "mpirun" {
        Command::new("mpirun")
            .args(["--oversubscribe", "-np", n, env!("CARGO_BIN_EXE_kiln")])
            .args(&args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("KILN_LOG", "warn")
            .output()
            .expect("mpirun")
    } else {
        args.extend(["--simulate".into(), n.into()]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln(&a)
    };
    assert!(o.status.success(), "{launch} {sets:?}: {}", output_text(&o));
    json(&out.join("summary.json"))
}

/// Issue 14's ±10% is held by the full matrix (scripts/memory_matrix.py, whose table is in the
/// README). Identical runs on this machine differ by up to 13% (the estimate module's doc), so
/// this subset, run on whatever machine CI gives, allows 15%: a regression of the estimate
/// still fails it, the machine's noise does not.
const TOLERANCE_PCT: f64 = 15.0;

#[test]
fn predicted_peaks_are_close_to_measured() {
    let scratch = Scratch::new("estimate-matrix");
    let nvme = format!("offload.nvme_path={}", scratch.str());
    let mut cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("configs/tiny.toml", vec![], "simulate:1"),
        (
            "configs/tiny.toml",
            vec!["train.recompute=true"],
            "simulate:2",
        ),
        (
            "configs/tiny.toml",
            vec!["train.recompute=\"every:2\"", "parallel.stage=1"],
            "simulate:4",
        ),
        (
            "configs/tiny.toml",
            vec!["parallel.stage=2", "offload.optimizer=nvme"],
            "simulate:2",
        ),
        ("configs/tiny.toml", vec!["parallel.stage=3"], "simulate:4"),
        (
            "configs/small.toml",
            vec!["train.recompute=\"every:2\""],
            "simulate:1",
        ),
        (
            "configs/small.toml",
            vec!["parallel.stage=3", "offload.optimizer=nvme"],
            "simulate:2",
        ),
    ];
    if common::mpirun_available() {
        cases.push(("configs/tiny.toml", vec!["parallel.stage=2"], "mpirun:2"));
    }
    let mut report = Vec::new();
    for (i, (config, sets, launch)) in cases.iter().enumerate() {
        let mut sets = sets.clone();
        sets.extend(["train.steps=3", nvme.as_str()]);
        let n: usize = launch.split_once(':').unwrap().1.parse().unwrap();
        let global = format!("train.global_batch={}", 4 * n);
        sets.extend(["train.micro_batch=4", global.as_str()]);
        let summary = measured(config, &sets, launch, &scratch.path(&format!("run{i}")));
        let (got, want) = (
            summary["peak_rss_mb"].as_f64().unwrap(),
            summary["predicted_peak_rss_mb"].as_f64().unwrap(),
        );
        // The summary's prediction is `kiln estimate`'s, for the same launch.
        let mut args = vec!["estimate", "--json", "--config", config];
        let world = n.to_string();
        args.extend(["--world", world.as_str()]);
        if launch.starts_with("simulate") {
            args.push("--simulate");
        }
        for s in &sets {
            args.extend(["--set", s]);
        }
        let o = kiln(&args);
        assert!(o.status.success(), "{}", output_text(&o));
        let est: Value = serde_json::from_slice(&o.stdout).unwrap();
        let bytes = est["configured"]["predicted_peak_rss_bytes"]
            .as_f64()
            .unwrap();
        assert!(
            (bytes / (1 << 20) as f64 - want).abs() < 0.01,
            "{bytes} vs {want}"
        );
        report.push(format!(
            "{config} {launch} {sets:?}: measured {got:.0} MiB, predicted {want:.0} MiB ({:+.1}%)",
            (want / got - 1.0) * 100.0
        ));
    }
    let text = report.join("\n");
    eprintln!("{text}");
    for line in &report {
        let pct: f64 = line
            .rsplit('(')
            .next()
            .unwrap()
            .trim_end_matches("%)")
            .parse()
            .unwrap();
        assert!(
            pct.abs() <= TOLERANCE_PCT,
            "outside ±{TOLERANCE_PCT}%:\n{text}"
        );
    }
}

#[test]
fn phase_peaks_are_in_metrics_and_summary() {
    let scratch = Scratch::new("phases");
    let ckpt = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let summary = measured(
        "configs/tiny.toml",
        &["train.steps=3", "checkpoint.every=2", ckpt.as_str()],
        "simulate:1",
        &scratch.path("out"),
    );
    let text = std::fs::read_to_string(scratch.path("out/metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let peak = summary["peak_rss_mb"].as_f64().unwrap();
    let mut largest: f64 = 0.0;
    for (i, line) in lines.iter().enumerate() {
        let p = &line["phase_peak"];
        for phase in ["forward_mb", "backward_mb", "optimizer_mb"] {
            let v = p[phase]
                .as_f64()
                .unwrap_or_else(|| panic!("step {}: {phase}: {p}", i + 1));
            assert!(
                v > 10.0 && v <= peak + 0.01,
                "step {}: {phase} {v} vs run peak {peak}",
                i + 1
            );
            largest = largest.max(v);
        }
        // Checkpoints at steps 2 and 3 (the last), none at step 1.
        assert_eq!(
            p["checkpoint_mb"].is_number(),
            i >= 1,
            "step {}: {p}",
            i + 1
        );
    }
    // The run's peak is some phase's peak (data and metrics add little).
    assert!(
        largest >= 0.97 * peak,
        "largest phase peak {largest} vs run peak {peak}"
    );
    let s = &summary["phase_peak"];
    let max_of = |k: &str| {
        lines
            .iter()
            .filter_map(|l| l["phase_peak"][k].as_f64())
            .fold(0.0, f64::max)
    };
    for k in ["forward_mb", "backward_mb", "optimizer_mb", "checkpoint_mb"] {
        assert_eq!(s[k].as_f64().unwrap(), max_of(k), "summary {k}");
    }

    // Recompute keeps no graph through forward: its forward peak is lower by about the
    // activations the estimate says it saves (measured here: 240 vs 138 MiB at micro-batch 4).
    let on = measured(
        "configs/tiny.toml",
        &["train.steps=2", "train.recompute=true"],
        "simulate:1",
        &scratch.path("on"),
    );
    let forward = |s: &Value| s["phase_peak"]["forward_mb"].as_f64().unwrap();
    let act = |sets: &[&str]| {
        let p = Plan::resolve(
            &config::load(
                Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")),
                &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap(),
            1,
        )
        .unwrap();
        kiln::memory::estimate(&p, Process::Threads(1)).rank_activations as f64 / (1 << 20) as f64
    };
    let saved = act(&[]) - act(&["train.recompute=true"]);
    assert!(
        forward(&on) < forward(&summary) - 0.5 * saved,
        "forward peak {} with recompute vs {} without; the estimate saves {saved:.0} MiB",
        forward(&on),
        forward(&summary)
    );
}

/// `train.keep_freed_memory`: the kernel stops mapping and zeroing pages inside the steps
/// (tiny, one thread, steps 2 and 3: 5323 and 2894 faults with the default, 1 and 0 kept — the
/// allocator's working set is reused), and not one loss changes.
#[test]
fn keeping_freed_memory_ends_page_faults_and_changes_no_bit() {
    let scratch = Scratch::new("keep-freed");
    let run = |keep: bool, dir: &str| {
        let out = scratch.path(dir);
        let keep = format!("train.keep_freed_memory={keep}");
        measured(
            "configs/tiny.toml",
            &["train.steps=3", "train.threads=1", keep.as_str()],
            "simulate:1",
            &out,
        );
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["loss"].as_f64().unwrap() as f32,
                    v["minor_faults"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let default = run(false, "default");
    let kept = run(true, "kept");
    let losses = |r: &[(f32, u64)]| r.iter().map(|&(l, _)| l).collect::<Vec<_>>();
    assert!(bitwise_equal(&losses(&default), &losses(&kept)));
    // Step 1 allocates the working set either way; from step 2 only returned pages fault.
    let faults = |r: &[(f32, u64)]| r[1..].iter().map(|&(_, f)| f).sum::<u64>();
    let (d, k) = (faults(&default), faults(&kept));
    assert!(k * 4 < d, "steps 2-3: {k} faults kept vs {d} by default");
}

#[test]
fn estimate_prints_the_table_json_and_fit() {
    let small = [
        "model.preset=small",
        "train.micro_batch=4",
        "train.global_batch=16",
    ];
    let mut args = vec!["estimate", "--world", "4", "--json"];
    for s in &small {
        args.extend(["--set", s]);
    }
    let o = kiln(&args);
    assert!(o.status.success(), "{}", output_text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = plan(&small, 4).unwrap();
    let want = kiln::memory::estimate(&p, Process::Launched);
    assert_eq!(
        r["configured"]["predicted_peak_rss_bytes"]
            .as_u64()
            .unwrap() as usize,
        want.peak
    );
    let rows = r["matrix"].as_array().unwrap();
    assert_eq!(rows.len(), 4 * 3 * 2);
    let row = |stage: u64, tier: &str, rc: &str| {
        rows.iter()
            .find(|x| x["stage"] == stage && x["offload"] == tier && x["recompute"] == rc)
            .unwrap()
    };
    let b = |v: &Value, k: &str| v[k].as_u64().unwrap();
    // ZeRO-3 at 4 ranks: a quarter of the parameters (no unit is under persist_threshold).
    let (p0, p3) = (
        b(row(0, "none", "false"), "params_bytes"),
        b(row(3, "none", "false"), "params_bytes"),
    );
    assert_eq!(p3 * 4, p0, "stage 3 params {p3} vs stage 0 {p0}");
    // nvme: the optimizer states are on disk, a few chunk buffers in memory.
    let nvme = row(1, "nvme", "false");
    assert_eq!(
        b(nvme, "optimizer_offloaded_bytes"),
        b(row(1, "none", "false"), "optimizer_bytes")
    );
    assert!(b(nvme, "optimizer_bytes") < b(nvme, "optimizer_offloaded_bytes"));
    assert!(
        b(row(0, "none", "true"), "activations_bytes")
            < b(row(0, "none", "false"), "activations_bytes")
    );

    let text = kiln(&["estimate", "--world", "2", "--set", "model.preset=small"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    for needle in [
        "parameters",
        "gradients",
        "optimizer states",
        "activations",
        "process baseline",
        "predicted peak RSS",
    ] {
        assert!(text.contains(needle), "`{needle}` missing:\n{text}");
    }

    // --fit: each answer fits, and the next larger member of the family does not.
    let o = kiln(&[
        "estimate", "--fit", "--world", "8", "--memory", "16", "--json",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let fits: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        fits.len(),
        15,
        "stages 0-3 and stage 3 with parameters on nvme, × 3 tiers"
    );
    let family = kiln::memory::fit::FAMILY;
    for f in &fits {
        let name = f["model"].as_str().unwrap();
        let i = family.iter().position(|m| m.0 == name).unwrap();
        assert!(f["predicted_peak_rss_bytes"].as_u64().unwrap() <= 16 << 30);
        if let Some(&(_, d, l, h)) = family.get(i + 1) {
            let (stage, tier) = (f["stage"].to_string(), f["offload"].as_str().unwrap());
            let param = f["param"].as_str().unwrap();
            let sets = [
                format!("parallel.stage={stage}"),
                format!("offload.optimizer={tier}"),
                format!("offload.param={param}"),
                format!("model.d_model={d}"),
                format!("model.n_layers={l}"),
                format!("model.n_heads={h}"),
                // What `kiln estimate` takes when no batch key is given.
                "train.micro_batch=8".to_string(),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            assert!(
                kiln::memory::estimate(&plan(&sets, 8).unwrap(), Process::Launched).peak > 16 << 30,
                "{f}: {} fits too",
                family[i + 1].0
            );
        }
    }
    let at = |s: u64, t: &str| {
        fits.iter()
            .find(|f| f["stage"] == s && f["offload"] == t && f["param"] == "none")
            .unwrap()["num_params"]
            .as_u64()
            .unwrap()
    };
    assert!(
        at(3, "nvme") > at(0, "none"),
        "ZeRO-3 + nvme fits a larger model than DDP"
    );
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn plot_writes_the_three_pngs_and_bad_input_is_one_line() {
    let scratch = Scratch::new("plot");
    let mut sets: Vec<&str> = TEST_MODEL.to_vec();
    sets.extend(["train.steps=12", "train.warmup_steps=4"]);
    measured(
        "configs/tiny.toml",
        &sets,
        "simulate:2",
        &scratch.path("run"),
    );
    let out = scratch.path("plots");
    let o = kiln(&[
        "plot",
        scratch.path("run").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let mut sizes = Vec::new();
    for name in ["loss.png", "memory.png", "step_time.png"] {
        assert_eq!(png_size(&out.join(name)), (1000, 560), "{name}");
        sizes.push(std::fs::metadata(out.join(name)).unwrap().len());
    }
    // Text, axes and data make the files far larger than a blank canvas (~3 KiB).
    assert!(sizes.iter().all(|&s| s > 15_000), "{sizes:?}");

    let missing = scratch.path("nothing-here");
    let o = kiln(&["plot", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(
        !missing.exists(),
        "a failed plot created {}",
        missing.display()
    );
}

//! Real `mpirun` launches: the conformance suite at 2, 3 and 4 processes, comm.verify catching a
//! mismatch, and DDP over MPI bitwise equal to DDP over the local backend.
//! Without mpirun these tests skip, except under CI=true, where a missing mpirun is a failure.

mod common;

use common::{mpirun_available, output_text as text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mpirun(np: usize, args: &[&str]) -> Output {
    Command::new("mpirun")
        .args([
            "-np",
            &np.to_string(),
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("KILN_LOG", "warn")
        .output()
        .expect("run mpirun")
}

#[test]
fn mpi_backend_passes_the_conformance_suite_at_2_3_and_4_ranks() {
    if !mpirun_available() {
        return;
    }
    for np in [2, 3, 4] {
        let out = mpirun(np, &["check", "comm", "--large"]);
        let t = text(&out);
        assert!(out.status.success(), "np {np}: {t}");
        assert!(
            t.contains(&format!(
                "every check agreed with the float64 reference (world {np}, backend mpi)"
            )),
            "np {np}: {t}"
        );
    }
}

#[test]
fn mpi_verify_turns_a_mismatch_into_an_error() {
    if !mpirun_available() {
        return;
    }
    let out = mpirun(2, &["check", "comm", "--mismatch"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("rank 0: all_reduce(Sum, len 10)") && t.contains("rank 1: all_gather(len 4)"),
        "{t}"
    );
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-mpi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const DDP_SETS: [&str; 8] = [
    "model.seq_len=32",
    "train.steps=30",
    "train.global_batch=8",
    "train.micro_batch=2",
    "train.lr=2e-3",
    "train.warmup_steps=5",
    "train.threads=1",
    "comm.verify=true",
];

fn train_args<'a>(out: &'a Path, export: &'a str) -> Vec<String> {
    let mut args = vec!["train".to_string(), "--quiet".into()];
    for s in DDP_SETS {
        args.push("--set".into());
        args.push(s.into());
    }
    args.push("--set".into());
    args.push(format!("output.dir={}", out.display()));
    args.push("--set".into());
    args.push(format!("output.export={export}"));
    args
}

#[test]
fn ddp_over_mpi_equals_ddp_over_local_threads_bitwise() {
    if !mpirun_available() {
        return;
    }
    let dir = tmp("ddp");
    let mpi_file = dir.join("mpi.safetensors");
    let local_file = dir.join("local.safetensors");
    let args = train_args(&dir, mpi_file.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mpirun(2, &args);
    assert!(out.status.success(), "{}", text(&out));

    let mut local = train_args(&dir, local_file.to_str().unwrap());
    local.extend(["--simulate".into(), "2".into()]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&local)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let a = std::fs::read(&mpi_file).unwrap();
    let b = std::fs::read(&local_file).unwrap();
    assert!(
        a.len() > 13_000_000 && a == b,
        "MPI and local exports differ"
    );
    let summary = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    assert!(summary.contains("\"world\": 2"), "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zero_stages_over_mpi_equal_ddp_over_local_threads_bitwise() {
    if !mpirun_available() {
        return;
    }
    let dir = tmp("zero");
    let reference = dir.join("ddp-local.safetensors");
    let mut local = train_args(&dir, reference.to_str().unwrap());
    local.extend([
        "--simulate".into(),
        "2".into(),
        "--set".into(),
        "train.steps=10".into(),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&local)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let want = std::fs::read(&reference).unwrap();
    // The nvme tier under real processes: one state file per rank in the shared directory.
    // `reshard` is stage 3's parallel.reshard_after_forward (false: graphs keep the units).
    for (stage, tier, reshard) in [
        (1, "none", true),
        (2, "none", true),
        (3, "none", true),
        (1, "nvme", true),
        (3, "nvme", true),
        (3, "none", false),
    ] {
        let file = dir.join(format!("zero{stage}-{tier}-{reshard}-mpi.safetensors"));
        let mut args = train_args(&dir, file.to_str().unwrap());
        args.extend([
            "--set".into(),
            "train.steps=10".into(),
            "--set".into(),
            format!("parallel.stage={stage}"),
            "--set".into(),
            format!("offload.optimizer={tier}"),
            "--set".into(),
            format!("offload.nvme_path={}", dir.display()),
            "--set".into(),
            "offload.chunk_mb=1".into(),
            "--set".into(),
            format!("parallel.reshard_after_forward={reshard}"),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mpirun(2, &args);
        assert!(out.status.success(), "stage {stage} {tier}: {}", text(&out));
        assert!(
            std::fs::read(&file).unwrap() == want,
            "stage {stage} tier {tier} reshard {reshard} over MPI differs from DDP over local threads"
        );
    }
    let optim_files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("optim".as_ref()))
        .count();
    assert_eq!(optim_files, 0, "nvme state files are removed at exit");

    // Checkpoints under real processes: stage 3 on nvme saves at step 5; stage 1 resumes from
    // it and ends where the uninterrupted run ends, bitwise (same world size, same arithmetic).
    let ckpt = dir.join("ckpt");
    let file = dir.join("resumed-mpi.safetensors");
    for (stage, tier, resume) in [(3, "nvme", None), (1, "none", Some("step_000005"))] {
        let mut args = train_args(&dir, file.to_str().unwrap());
        for set in [
            "train.steps=10".to_string(),
            format!("parallel.stage={stage}"),
            format!("offload.optimizer={tier}"),
            format!("offload.nvme_path={}", dir.display()),
            format!("checkpoint.dir={}", ckpt.display()),
            "checkpoint.every=5".into(),
        ] {
            args.extend(["--set".to_string(), set]);
        }
        if let Some(step) = resume {
            args.extend([
                "--resume".to_string(),
                ckpt.join(step).display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mpirun(2, &args);
        assert!(
            out.status.success(),
            "stage {stage} {resume:?}: {}",
            text(&out)
        );
    }
    assert!(
        std::fs::read(&file).unwrap() == want,
        "stage 3 (nvme) → checkpoint → stage 1 over MPI differs from the uninterrupted run"
    );

    // A corrupted shard under real processes: the rank that checks it says so, once.
    let shard = ckpt.join("step_000005/rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let mut args = train_args(&dir, file.to_str().unwrap());
    args.extend([
        "--resume".to_string(),
        ckpt.join("step_000005").display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mpirun(2, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kiln: error"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("rank-00001.safetensors") && lines[0].contains("corrupted"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

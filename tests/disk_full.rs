//! A full filesystem, for real: small filesystems mounted for each test (tmpfs, and an ext2 loop
//! image, a filesystem without fallocate). The nvme tier on one too small for the optimizer state
//! fails at start with one line naming its file; filling the filesystem after start changes
//! nothing (the state file's blocks were reserved at start); a checkpoint that does not fit is
//! one line, leaves the previous checkpoint and `latest` as they were, and resuming from them
//! gives the uninterrupted run's parameters.
//!
//! Mounting needs root. Where `mount -t tmpfs` is refused these tests skip, saying so, except
//! under CI=true, where a refused mount is a failure. The ext2 image also needs a loop device,
//! which containers often lack: without one (or without mkfs.ext2) its legs skip, saying so.

mod common;

use common::{mpirun_available, output_text, snapshot, Scratch, TEST_MODEL};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A filesystem mounted for one test; unmounted, and its mount point and image removed, when
/// dropped — a failing test included.
struct Mounted {
    dir: PathBuf,
    image: Option<PathBuf>,
}

impl Mounted {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Names in the filesystem's root, but ext2's `lost+found`.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        names.sort();
        names
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Busy (a kiln process of a failed assertion still running): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fs {
    /// tmpfs of this many KiB (fallocate supported).
    Tmpfs(u64),
    /// ext2 loop image of this many KiB: no fallocate, so glibc reserves blocks by writing.
    Ext2(u64),
}

/// Mounts `fs` on a mount point unique to this test process and `name`; None (after saying
/// why) where that is refused.
fn mount(fs: Fs, name: &str) -> Option<Mounted> {
    let dir = std::env::temp_dir().join(format!("kiln-mnt-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |cmd: &mut Command| {
        cmd.output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stderr).trim().to_string();
                (o.status.success(), text)
            })
            .unwrap_or_else(|e| (false, e.to_string()))
    };
    let refused = |what: String, ci_fails: bool| {
        let _ = std::fs::remove_dir(&dir);
        if ci_fails && std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what}; CI=true needs these tests to run (as root)");
        }
        eprintln!("skipping: {what}");
        None
    };
    match fs {
        Fs::Tmpfs(kib) => {
            let (ok, why) = run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
                .arg(&dir));
            if !ok {
                return refused(format!("`mount -t tmpfs` was refused: {why}"), true);
            }
            Some(Mounted { dir, image: None })
        }
        Fs::Ext2(kib) => {
            let image = dir.with_extension("img");
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(kib << 10))
                .unwrap();
            let (ok, why) = run(Command::new("mkfs.ext2")
                .args(["-q", "-F", "-m", "0", "-b", "1024", "-N", "16"])
                .arg(&image));
            let (ok, why) = match ok {
                true => run(Command::new("mount")
                    .arg("-o")
                    .arg("loop")
                    .arg(&image)
                    .arg(&dir)),
                false => (false, format!("mkfs.ext2: {why}")),
            };
            if !ok {
                let _ = std::fs::remove_file(&image);
                return refused(format!("cannot mount an ext2 loop image: {why}"), false);
            }
            Some(Mounted {
                dir,
                image: Some(image),
            })
        }
    }
}

/// `kiln train --simulate 2 --quiet` on the test model with `sets`, default logging.
fn train(sets: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["train", "--quiet", "--simulate", "2"]);
    cmd.env_remove("KILN_LOG");
    for s in common_sets().iter().chain(sets) {
        cmd.args(["--set", s]);
    }
    cmd
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn common_sets() -> Vec<String> {
    let mut sets: Vec<String> = TEST_MODEL.iter().map(|s| s.to_string()).collect();
    sets.extend(
        [
            "train.global_batch=4",
            "train.micro_batch=2",
            "train.threads=1",
            "train.lr=1e-2",
            "train.warmup_steps=3",
        ]
        .map(String::from),
    );
    sets
}

/// The one line a failed run printed, after checking that it is a user error without a panic.
fn one_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", output_text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{}", output_text(out));
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {}", output_text(out));
    lines[0].to_string()
}

/// On a tmpfs and an ext2 image too small for it, a run with `sets` (plus `offload.nvme_path`
/// there) fails at start with one line naming its file (`kiln-…` with `suffix`) and `wants`,
/// leaving nothing on the filesystem and no output directory.
fn refused_at_start_without_room(tag: &str, sets: &[&str], suffix: &str, wants: &[&str]) {
    for (fs, kind) in [(Fs::Tmpfs(64), "tmpfs"), (Fs::Ext2(96), "ext2")] {
        let name = format!("small-{kind}-{tag}");
        let Some(mnt) = mount(fs, &name) else {
            continue;
        };
        let scratch = Scratch::new(&name);
        let mut all = strings(sets);
        all.extend([
            format!("offload.nvme_path={}", mnt.dir.display()),
            format!("output.dir={}", scratch.path("out").display()),
        ]);
        let line = one_line(&train(&all).output().unwrap());
        let file = format!("{}/kiln-", mnt.dir.display());
        for want in [file.as_str(), suffix, "no space left"].iter().chain(wants) {
            assert!(line.contains(want), "{fs:?}: `{want}` not in: {line}");
        }
        assert!(mnt.entries().is_empty(), "{fs:?} left {:?}", mnt.entries());
        assert!(!scratch.path("out").exists(), "{fs:?}: output.dir created");
    }
}

#[test]
fn nvme_tier_without_room_fails_at_start_with_one_line_naming_its_file() {
    // Stage 0 keeps 120 KiB of state per rank: neither rank's file fits.
    refused_at_start_without_room(
        "optim",
        &[
            "train.steps=3",
            "parallel.stage=0",
            "offload.optimizer=nvme",
        ],
        ".optim",
        &["offload.nvme_path"],
    );
}

#[test]
fn parameter_file_without_room_fails_at_start_with_one_line_naming_it() {
    // d_model 96: about 450 KiB of parameter shards per rank at stage 3, and 64 or 96 KiB free.
    refused_at_start_without_room(
        "params",
        &[
            "train.steps=3",
            "model.d_model=96",
            "parallel.stage=3",
            "offload.param=nvme",
        ],
        ".params",
        &["parameters (offload.nvme_path)"],
    );
}

#[test]
fn nvme_state_survives_the_filesystem_filling_up_after_start() {
    let scratch = Scratch::new("fill");
    // 100 micro-batches per step: the filesystem is full long before the first optimizer step
    // writes the state, so a state file whose blocks were not reserved at start would fail.
    let run = |out: &str, extra: &[String]| {
        let mut sets = strings(&[
            "train.steps=10",
            "parallel.stage=2",
            "train.global_batch=400",
        ]);
        sets.push(format!("output.dir={}", scratch.path(out).display()));
        sets.extend_from_slice(extra);
        train(&sets)
    };
    let reference = scratch.path("reference.safetensors");
    let out = run("ref", &[format!("output.export={}", reference.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let want = std::fs::read(&reference).unwrap();

    // 2 × 64 KiB of state on 1 MiB: room at start; then another file takes the rest.
    for (fs, name) in [
        (Fs::Tmpfs(1024), "fill-tmpfs"),
        (Fs::Ext2(1024), "fill-ext2"),
    ] {
        let Some(mnt) = mount(fs, name) else { continue };
        let export = scratch.path(&format!("{name}.safetensors"));
        let mut child = run(
            name,
            &[
                "offload.optimizer=nvme".into(),
                format!("offload.nvme_path={}", mnt.dir.display()),
                format!("output.export={}", export.display()),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // kiln logs the model line once start-up (the state files included) is done.
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        while !log.contains(" parameters), world 2") {
            assert!(
                stderr.read_line(&mut log).unwrap() > 0,
                "{fs:?}: no start-up line: {log}"
            );
        }
        let mut filler = std::fs::File::create(mnt.path("filler")).unwrap();
        let block = vec![0xa5u8; 4096];
        let full = loop {
            if let Err(e) = filler.write_all(&block) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{fs:?}: {full}");
        let optim = mnt
            .entries()
            .iter()
            .filter(|n| n.ends_with(".optim"))
            .count();
        let ended = child.try_wait().unwrap();
        if ended.is_some() || optim != 2 {
            let _ = child.kill();
            panic!("{fs:?}: the run ended ({ended:?}, {optim} state files) before the filesystem was full");
        }
        let status = child.wait().unwrap();
        std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
        assert!(status.success(), "{fs:?}: {status}\n{log}");
        assert!(
            std::fs::read(&export).unwrap() == want,
            "{fs:?}: parameters differ from the run without offload"
        );
        assert_eq!(mnt.entries(), ["filler"], "{fs:?}: state files left");
    }
}

#[test]
fn a_checkpoint_without_room_is_one_line_and_the_previous_one_stays() {
    // A checkpoint of the test model at world 2 is 47 pages; 64 pages hold one, not two.
    let Some(mnt) = mount(Fs::Tmpfs(256), "ckpt") else {
        return;
    };
    let scratch = Scratch::new("ckpt-full");
    let ck = mnt.path("ck");
    let sets = |steps: u64, out: &str, extra: &[String]| {
        let mut s = vec![
            format!("train.steps={steps}"),
            "parallel.stage=1".into(),
            "checkpoint.every=2".into(),
            format!("output.dir={}", scratch.path(out).display()),
        ];
        s.extend_from_slice(extra);
        s
    };
    let in_ck = [format!("checkpoint.dir={}", ck.display())];
    let out = train(&sets(2, "a", &in_ck)).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let before = snapshot(&ck);
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "step_000002\n"
    );

    // Resumed to step 4, the save of step 4 does not fit — local ranks, then real processes.
    // The run has started, so its start-up lines are due: warnings and errors only.
    let mut args: Vec<String> = ["--resume", "latest"].map(String::from).to_vec();
    for s in sets(4, "b", &in_ck) {
        args.extend(["--set".into(), s]);
    }
    let mut runs = vec![(
        "--simulate 2",
        train(&[])
            .args(&args)
            .env("KILN_LOG", "warn")
            .output()
            .unwrap(),
    )];
    if mpirun_available() {
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "--quiet"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("KILN_LOG", "warn");
        for s in common_sets() {
            cmd.args(["--set", &s]);
        }
        runs.push(("mpirun -np 2", cmd.args(&args).output().unwrap()));
    }
    for (how, out) in runs {
        let line = if how.starts_with("mpirun") {
            // mpirun adds its own lines about a process that exited non-zero; kiln says one.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("kiln: error"))
                .collect();
            assert_eq!(lines.len(), 1, "{how}: {}", output_text(&out));
            assert_eq!(out.status.code(), Some(2), "{how}: {}", output_text(&out));
            assert!(!stderr.contains("panicked"), "{how}: {stderr}");
            lines[0].to_string()
        } else {
            one_line(&out)
        };
        for want in [
            "checkpoint of step 4 not saved",
            &format!("{}/", ck.display()),
            "No space left on device",
            "`latest` still names step_000002",
        ] {
            assert!(line.contains(want), "{how}: `{want}` not in: {line}");
        }
        assert!(
            snapshot(&ck) == before,
            "{how}: the checkpoint directory changed"
        );
    }

    // The kept checkpoint resumes to the uninterrupted run's parameters, bitwise.
    let (resumed, reference) = (scratch.path("c.safetensors"), scratch.path("d.safetensors"));
    let export = |p: &Path| [format!("output.export={}", p.display())];
    let out = train(&sets(4, "c", &export(&resumed)))
        .args(["--resume", ck.join("step_000002").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let out = train(&sets(4, "d", &export(&reference))).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        std::fs::read(&resumed).unwrap() == std::fs::read(&reference).unwrap(),
        "resumed from the kept checkpoint, the parameters differ from the uninterrupted run"
    );
}

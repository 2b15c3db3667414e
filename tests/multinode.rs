//! Two hosts on one machine: two network namespaces joined by a veth pair, each with its own
//! address in 10.213.16.0/24. mpirun runs in the first and starts 2 ranks on each host over TCP;
//! the rsh agent `tests/netns-rsh` plays ssh by running a host's commands in its namespace. The
//! 4 ranks across 2 hosts must train bitwise like `kiln train --simulate 4` (final parameters
//! and every step's loss) at stage 0 and stage 3, and each rank must learn its node-local rank
//! and threads from the launcher.
//!
//! Needs root and `ip` (iproute2) to create namespaces, and mpirun; it skips without them,
//! except under CI=true, where that is a failure.

mod common;

use common::{output_text as text, Scratch, TEST_MODEL};
use std::path::{Path, PathBuf};
use std::process::Command;

const SUBNET: &str = "10.213.16.0/24";
const ADDRS: [&str; 2] = ["10.213.16.1", "10.213.16.2"];
const STEPS: usize = 12;

/// Two network namespaces, deleted when dropped (also when an assertion fails), which also
/// destroys the veth pair between them.
struct Hosts {
    ns: [String; 2],
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` could not be run ({e}); install iproute2"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn try_make_hosts() -> Result<Hosts, String> {
    let pid = std::process::id();
    // Names per test process, so that concurrent test runs on one machine do not collide.
    let hosts = Hosts {
        ns: [format!("kiln-{pid}-a"), format!("kiln-{pid}-b")],
    };
    let [a, b] = [hosts.ns[0].as_str(), hosts.ns[1].as_str()];
    ip(&["netns", "add", a])?;
    ip(&["netns", "add", b])?;
    // Both ends are created inside their namespaces, so the fixed device names never meet
    // another test run's in the root namespace.
    ip(&[
        "link", "add", "kiln0", "netns", a, "type", "veth", "peer", "name", "kiln0", "netns", b,
    ])?;
    for (ns, addr) in [(a, ADDRS[0]), (b, ADDRS[1])] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "kiln0",
        ])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "kiln0", "up"])?;
    }
    Ok(hosts)
}

/// Two namespace hosts, or `None` (after saying why) where this machine cannot make them.
fn hosts() -> Option<Hosts> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !mpirun {
        assert!(
            !ci,
            "mpirun is required when CI=true (apt-get install openmpi-bin libopenmpi-dev)"
        );
        eprintln!("skipping: mpirun not found");
        return None;
    }
    match try_make_hosts() {
        Ok(h) => Some(h),
        Err(why) if ci => {
            panic!("two namespace hosts are required when CI=true (run as root): {why}")
        }
        Err(why) => {
            eprintln!(
                "skipping: cannot create network namespaces (needs root and iproute2): {why}"
            );
            None
        }
    }
}

/// `small_run`'s model and batch (tests/common), as `kiln train` arguments writing into `dir`.
fn train_args(stage: u8, dir: &Path, extra: &[String]) -> Vec<String> {
    let mut sets: Vec<String> = TEST_MODEL.iter().map(|s| s.to_string()).collect();
    sets.extend([
        format!("train.steps={STEPS}"),
        "train.lr=1e-2".into(),
        "train.warmup_steps=3".into(),
        "train.micro_batch=2".into(),
        "train.global_batch=8".into(),
        "parallel.bucket_mb=0.01".into(),
        format!("parallel.stage={stage}"),
        format!("output.dir={}", dir.display()),
        format!("output.export={}", dir.join("final.safetensors").display()),
    ]);
    let mut args = vec!["train".to_string(), "--quiet".into()];
    for s in sets.iter().chain(extra) {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args
}

/// Bytes this namespace has sent over its veth device so far.
fn tx_bytes(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/kiln0/statistics/tx_bytes",
        ])
        .output()
        .expect("run ip netns exec");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("tx_bytes of {ns}: {}", text(&out)))
}

/// Every step's loss from `metrics.jsonl`, as bits.
fn losses(dir: &Path) -> Vec<u64> {
    let path = dir.join("metrics.jsonl");
    let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    body.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            v["loss"].as_f64().expect("a loss").to_bits()
        })
        .collect()
}

/// 4 ranks on the 2 hosts, then `--simulate 4`; both must agree bit for bit.
fn two_hosts_equal_simulate(hosts: &Hosts, scratch: &Scratch, stage: u8) {
    let agent = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/netns-rsh");
    let agent_log = scratch.path(&format!("agent-{stage}.log"));
    let mpi_dir = scratch.path(&format!("mpi-{stage}"));
    let local_dir = scratch.path(&format!("local-{stage}"));
    let host_list = format!("{}:2,{}:2", ADDRS[0], ADDRS[1]);

    // No train.threads and no KILN_THREADS: each rank takes cores ÷ ranks on its node, and the
    // ranks on its node are what the launcher says (2, not the world of 4).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / 2).max(1);

    let sent_before = tx_bytes(&hosts.ns[0]);
    let started = std::time::Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &hosts.ns[0], "mpirun"])
        .args([
            "--host",
            &host_list,
            "-np",
            "4",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["--mca", "plm_rsh_agent"])
        .arg(&agent)
        .args(["--mca", "btl", "tcp,self"])
        .args(["--mca", "btl_tcp_if_include", SUBNET])
        .args(["--mca", "oob_tcp_if_include", SUBNET])
        .args(["-x", "KILN_LOG"])
        // A hang (say, a firewall on the veth pair) becomes a failure, and the namespaces go.
        .args(["--timeout", "45"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(train_args(stage, &mpi_dir, &[]))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("KILN_LOG", "info")
        .env_remove("KILN_THREADS")
        .env("KILN_NETNS", hosts.ns.join(" "))
        .env("KILN_NETNS_LOG", &agent_log)
        .output()
        .expect("run mpirun in the first namespace");
    let t = text(&out);
    assert!(out.status.success(), "stage {stage}: {t}");
    eprintln!(
        "stage {stage}: 2 hosts × 2 ranks took {:.1?}",
        started.elapsed()
    );
    assert!(
        t.contains(&format!("world 4 (mpi backend), stage {stage}")),
        "stage {stage}: {t}"
    );
    for rank in 0..4 {
        let line = format!(
            "rank {rank} of 4 on 2 nodes: local rank {} of 2 on this node, {threads} compute threads",
            rank % 2
        );
        assert!(t.contains(&line), "stage {stage}: no `{line}` in\n{t}");
    }
    // The second host's daemon went through the agent into the second namespace, and the ranks
    // talked over the veth pair: more bytes crossed it than one copy of the parameters.
    let agent_said = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert_eq!(
        agent_said.trim(),
        format!("{} {}", ADDRS[1], hosts.ns[1]),
        "stage {stage}: the rsh agent's log"
    );
    let sent = tx_bytes(&hosts.ns[0]) - sent_before;
    let mpi_export = std::fs::read(mpi_dir.join("final.safetensors")).expect("the MPI export");
    assert!(
        sent > mpi_export.len() as u64,
        "stage {stage}: only {sent} bytes crossed the veth pair"
    );

    let mut local = train_args(stage, &local_dir, &[format!("train.threads={threads}")]);
    local.extend(["--simulate".into(), "4".into()]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&local)
        .env("KILN_LOG", "warn")
        .output()
        .expect("run kiln --simulate 4");
    assert!(out.status.success(), "stage {stage}: {}", text(&out));

    let local_export =
        std::fs::read(local_dir.join("final.safetensors")).expect("the local export");
    assert!(
        mpi_export == local_export,
        "stage {stage}: final parameters differ between 2 hosts × 2 ranks and --simulate 4"
    );
    let (mpi_losses, local_losses) = (losses(&mpi_dir), losses(&local_dir));
    assert_eq!(
        mpi_losses.len(),
        STEPS,
        "stage {stage}: steps in metrics.jsonl"
    );
    assert_eq!(
        mpi_losses, local_losses,
        "stage {stage}: per-step losses (as f64 bits) differ"
    );
}

#[test]
fn four_ranks_on_two_namespace_hosts_equal_simulate_4_bitwise_at_stages_0_and_3() {
    let Some(hosts) = hosts() else { return };
    let scratch = Scratch::new("multinode");
    // One pair of hosts for both stages: runs on 2 cores are faster one after another.
    for stage in [0, 3] {
        two_hosts_equal_simulate(&hosts, &scratch, stage);
    }
}

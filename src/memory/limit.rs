//! The memory this process may use: the memory limit of its cgroup (v2 `memory.max`, v1
//! `memory.limit_in_bytes`, the smallest along the path up to the hierarchy's root, as the
//! kernel enforces every ancestor's), and the machine's `MemAvailable`, whichever is smaller.
//!
//! The parsers are pure functions of the files' text, so that they are tested on samples of
//! every layout (host, container, hybrid v1 + v2 hierarchies) without those machines.

use std::path::{Path, PathBuf};

/// A memory limit and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    /// Bytes.
    pub bytes: u64,
    /// The file it was read from, for the user (e.g. `cgroup v2 memory.max /sys/fs/cgroup/x`).
    pub source: String,
}

/// v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 on 4 KiB
/// pages): anything from 2^62 up means unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// `memory.max` (v2): a byte count, or `max` for no limit.
pub fn parse_v2_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `memory.limit_in_bytes` (v1): a byte count; huge values mean no limit.
pub fn parse_v1_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&b| b < V1_UNLIMITED)
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// The hierarchy a cgroup path or mount belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified (v2) hierarchy.
    V2,
    /// The v1 hierarchy with the memory controller.
    V1Memory,
}

/// This process's cgroup path in `hierarchy`, from `/proc/self/cgroup`
/// (`0::/path` for v2, `N:memory[,…]:/path` for v1).
pub fn parse_proc_cgroup(text: &str, hierarchy: Hierarchy) -> Option<String> {
    text.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match hierarchy {
            Hierarchy::V2 => id == "0" && controllers.is_empty(),
            Hierarchy::V1Memory => controllers.split(',').any(|c| c == "memory"),
        };
        hit.then(|| path.to_string())
    })
}

/// Where `hierarchy` is mounted, from `/proc/self/mountinfo`: (root of the hierarchy the mount
/// shows, mount point). Fields: `id parent dev root mountpoint options [optional…] - fstype
/// source superoptions`.
pub fn parse_mountinfo(text: &str, hierarchy: Hierarchy) -> Option<(String, PathBuf)> {
    text.lines().find_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        let head: Vec<&str> = head.split(' ').collect();
        let tail: Vec<&str> = tail.split(' ').collect();
        let (root, mount) = (*head.get(3)?, *head.get(4)?);
        let (fstype, superopts) = (*tail.first()?, tail.get(2).copied().unwrap_or(""));
        let hit = match hierarchy {
            Hierarchy::V2 => fstype == "cgroup2",
            Hierarchy::V1Memory => {
                fstype == "cgroup" && superopts.split(',').any(|o| o == "memory")
            }
        };
        hit.then(|| (unescape_octal(root), PathBuf::from(unescape_octal(mount))))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The directories whose limit applies to a process in `cgroup` (a path inside the hierarchy),
/// with the hierarchy's `root` mounted at `mount`: its own directory, then each ancestor up to
/// the mount point. A cgroup outside the mounted root (another namespace's view) gives the
/// mount point alone.
pub fn cgroup_dirs(cgroup: &str, root: &str, mount: &Path) -> Vec<PathBuf> {
    let relative = Path::new(cgroup)
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut dirs = Vec::new();
    let mut rel = Some(relative.as_path());
    while let Some(r) = rel {
        dirs.push(mount.join(r));
        rel = r.parent();
    }
    if dirs.is_empty() {
        dirs.push(mount.to_path_buf());
    }
    dirs
}

/// The smallest cgroup limit that applies to this process, if any.
fn cgroup_limit(proc_cgroup: &str, mountinfo: &str) -> Option<MemoryLimit> {
    let mut best: Option<MemoryLimit> = None;
    for (hierarchy, file, parse, name) in [
        (
            Hierarchy::V2,
            "memory.max",
            parse_v2_max as fn(&str) -> Option<u64>,
            "cgroup v2",
        ),
        (
            Hierarchy::V1Memory,
            "memory.limit_in_bytes",
            parse_v1_limit,
            "cgroup v1",
        ),
    ] {
        let (Some(cgroup), Some((root, mount))) = (
            parse_proc_cgroup(proc_cgroup, hierarchy),
            parse_mountinfo(mountinfo, hierarchy),
        ) else {
            continue;
        };
        for dir in cgroup_dirs(&cgroup, &root, &mount) {
            let path = dir.join(file);
            let Some(bytes) = std::fs::read_to_string(&path).ok().and_then(|t| parse(&t)) else {
                continue;
            };
            if best.as_ref().is_none_or(|b| bytes < b.bytes) {
                best = Some(MemoryLimit {
                    bytes,
                    source: format!("{name} {}", path.display()),
                });
            }
        }
    }
    best
}

/// The memory this process may use: the smaller of its cgroup limit and `MemAvailable`; `None`
/// when neither can be read (not Linux).
pub fn process_limit() -> Option<MemoryLimit> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cgroup = cgroup_limit(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo"));
    let available = parse_meminfo_available(&read("/proc/meminfo")).map(|bytes| MemoryLimit {
        bytes,
        source: "MemAvailable in /proc/meminfo".into(),
    });
    match (cgroup, available) {
        (Some(c), Some(a)) => Some(if c.bytes <= a.bytes { c } else { a }),
        (c, a) => c.or(a),
    }
}

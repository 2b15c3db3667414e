//! Tier `nvme`: the rank's m and v in one preallocated file, streamed through a few page-aligned
//! buffers at every step (ZeRO-Infinity's optimizer offload; DeepSpeed's `offload_optimizer`
//! with `device: nvme`).
//!
//! The file is a sequence of chunks, chunk k holding every lane of state elements
//! `[k·chunk, (k+1)·chunk)` one after the other (AdamW's m then v; 8-bit AdamW's codes then
//! their block scales: the quantized blocks as they are), so each chunk is one sequential
//! transfer each way. `stream` runs a
//! reader thread and a writer thread around the caller: while the caller updates chunk k, the
//! reader fills chunk k+1 (and beyond, while buffers are free) and the writer drains chunk k−1.
//! Only `buffer_count` chunks are ever in memory. Transfers use O_DIRECT where the filesystem
//! takes it, so the state does not pass through (or evict) the page cache.

use super::aligned::{AlignedBuf, ALIGN};
use super::{Access, ChunkFn, StateFormat, StateStore, Tier};
use crate::config::OffloadConfig;
use crate::error::{KilnError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

/// Optimizer state in a file.
pub struct NvmeStore {
    path: PathBuf,
    file: File,
    len: usize,
    format: StateFormat,
    /// Elements per chunk.
    chunk: usize,
    /// 4-byte words of one chunk, every lane.
    chunk_words: usize,
    buffer_count: usize,
    /// Buffers kept between steps (each holds one chunk).
    idle: Vec<AlignedBuf>,
    direct: bool,
}

impl NvmeStore {
    /// Creates rank `rank`'s zeroed file of `len` elements of state in `format` under
    /// `offload.nvme_path`.
    pub fn create(
        config: &OffloadConfig,
        rank: usize,
        len: usize,
        format: StateFormat,
    ) -> Result<Self> {
        let dir = Path::new(&config.nvme_path);
        if !dir.is_dir() {
            return Err(KilnError::file(
                dir,
                "offload.nvme_path must be an existing directory",
            ));
        }
        let path = dir.join(format!("kiln-{}-rank{rank}.optim", std::process::id()));
        let chunk = format.chunk_len(config.chunk_mb, len);
        let chunk_words = format.lane_words(chunk).sum::<usize>();
        let bytes = (len.div_ceil(chunk.max(1)) * chunk_words * 4) as u64;
        let (file, direct_at_open) = open_new(&path)?;
        let mut store = NvmeStore {
            path,
            file,
            len,
            format,
            chunk,
            chunk_words,
            buffer_count: config.buffer_count.max(1),
            idle: Vec::new(),
            direct: direct_at_open,
        };
        store.preallocate(bytes)?;
        let refused = store.direct && bytes > 0 && !store.direct_io_works();
        if refused {
            store.file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&store.path)
                .map_err(|e| cannot(&store.path, e))?;
            store.direct = false;
        }
        // Said once the store exists, and by one rank: a run that cannot start says only why.
        if !store.direct && rank == 0 {
            tracing::warn!(
                "{}: the filesystem {} O_DIRECT; using buffered I/O",
                dir.display(),
                if refused {
                    "refused transfers with"
                } else {
                    "does not support"
                }
            );
        }
        Ok(store)
    }

    /// Whether transfers bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Elements of state per chunk.
    pub fn chunk_len(&self) -> usize {
        self.chunk
    }

    fn chunks(&self) -> usize {
        if self.chunk == 0 {
            return 0;
        }
        self.len.div_ceil(self.chunk)
    }

    /// Reserves the blocks now (`offload::reserve`), through a buffered descriptor when the
    /// store's own is O_DIRECT.
    fn preallocate(&self, bytes: u64) -> Result<()> {
        let what = "optimizer state";
        if !self.direct {
            return super::reserve(&self.file, &self.path, bytes, what);
        }
        let buffered = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| cannot(&self.path, e))?;
        super::reserve(&buffered, &self.path, bytes, what)
    }

    /// Some filesystems accept O_DIRECT at open and refuse the transfers.
    fn direct_io_works(&self) -> bool {
        let mut probe = AlignedBuf::zeroed(ALIGN / 4);
        self.file.write_all_at(probe.bytes(), 0).is_ok()
            && self.file.read_exact_at(probe.bytes_mut(), 0).is_ok()
    }
}

/// Creates `path` with O_DIRECT if the filesystem takes it at open.
fn open_new(path: &Path) -> Result<(File, bool)> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((open(0).map_err(|e| cannot(path, e))?, false))
        }
        Err(e) => Err(cannot(path, e)),
    }
}

fn cannot(path: &Path, e: std::io::Error) -> KilnError {
    KilnError::file(
        path,
        format!("cannot create the optimizer-state file (offload.nvme_path): {e}"),
    )
}

fn io_error(path: &Path, what: &str, k: usize, e: std::io::Error) -> KilnError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        KilnError::file(
            path,
            format!("optimizer-state file is shorter than expected at chunk {k} (truncated?)"),
        )
    } else {
        KilnError::file(
            path,
            format!("{what} of optimizer-state chunk {k} failed: {e}"),
        )
    }
}

impl StateStore for NvmeStore {
    fn tier(&self) -> Tier {
        Tier::Nvme
    }

    fn len(&self) -> usize {
        self.len
    }

    fn stream(&mut self, access: Access, f: &mut ChunkFn<'_>) -> Result<()> {
        let n = self.chunks();
        if n == 0 {
            return Ok(());
        }
        let count = self.buffer_count.min(n);
        while self.idle.len() < count {
            self.idle.push(AlignedBuf::zeroed(self.chunk_words));
        }
        let (free_tx, free_rx) = sync_channel::<AlignedBuf>(count);
        for b in self.idle.drain(..) {
            free_tx.send(b).expect("capacity for every buffer");
        }
        let (full_tx, full_rx) = sync_channel::<(usize, AlignedBuf)>(count);
        let (done_tx, done_rx) = sync_channel::<(usize, AlignedBuf)>(count);
        let (file, path, chunk, len) = (&self.file, self.path.as_path(), self.chunk, self.len);
        let (format, chunk_words) = (self.format, self.chunk_words);
        let bytes_at = |k: usize| (k * chunk_words * 4) as u64;

        let (updated, read, written) = std::thread::scope(|s| {
            let reader = s.spawn(move || -> (Result<()>, Receiver<AlignedBuf>) {
                for k in 0..n {
                    // No buffer will come back once the writer has stopped.
                    let Ok(mut b) = free_rx.recv() else { break };
                    if let Err(e) = file.read_exact_at(b.bytes_mut(), bytes_at(k)) {
                        return (Err(io_error(path, "read", k, e)), free_rx);
                    }
                    if full_tx.send((k, b)).is_err() {
                        break;
                    }
                }
                (Ok(()), free_rx)
            });
            let writer = s.spawn(move || -> Result<()> {
                for (k, b) in done_rx {
                    if access == Access::ReadWrite {
                        file.write_all_at(b.bytes(), bytes_at(k))
                            .map_err(|e| io_error(path, "write", k, e))?;
                    }
                    // The channel holds every buffer, so this never blocks; it fails only if
                    // the reader stopped early, and then the buffer is simply dropped.
                    let _ = free_tx.send(b);
                }
                Ok(())
            });
            let mut updated = Ok(());
            for _ in 0..n {
                // A closed channel means the reader stopped; its error is reported below.
                let Ok((k, mut b)) = full_rx.recv() else {
                    break;
                };
                let lo = k * chunk;
                let hi = (lo + chunk).min(len);
                let mut rest = b.as_mut_slice();
                let mut lanes = Vec::new();
                for words in format.lane_words(chunk) {
                    let (lane, tail) = rest.split_at_mut(words);
                    lanes.push(lane);
                    rest = tail;
                }
                if let Err(e) = f(lo..hi, format.chunk(lanes, hi - lo)) {
                    updated = Err(e);
                    break;
                }
                if done_tx.send((k, b)).is_err() {
                    break;
                }
            }
            drop(done_tx);
            drop(full_rx);
            let written = writer.join().expect("offload writer thread");
            let (read, free_rx) = reader.join().expect("offload reader thread");
            self.idle.extend(free_rx.try_iter());
            (updated, read, written)
        });
        updated.and(read).and(written)
    }

    fn resident_bytes(&self) -> usize {
        self.buffer_count.min(self.chunks()) * self.chunk_words * 4
    }

    fn offloaded_bytes(&self) -> usize {
        self.format.bytes(self.len)
    }
}

impl Drop for NvmeStore {
    fn drop(&mut self) {
        // The state is scratch space: checkpoints copy it into their own files.
        let _ = std::fs::remove_file(&self.path);
    }
}

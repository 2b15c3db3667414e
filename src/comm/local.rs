//! The `local` backend: N ranks as threads of one process, with real shared-memory collectives.
//! Each rank publishes a pointer to its buffer, the ranks meet at a barrier, each one reads the
//! parts it needs straight from the others' buffers, and a second barrier keeps every buffer
//! alive and untouched until all readers are done.
//!
//! Every operation starts with the ranks meeting at the barrier with the operation they are in
//! (sequence number, kind, length): in shared memory that check is nearly free, so ranks that
//! call different collectives get an error naming both instead of mixing unrelated buffers.

use super::flight::Entry;
use super::watchdog::LocalPeers;
use super::worker::{Transport, WorkerComm};
use super::{sum_shard_in_rank_order, CommOptions, Communicator, ReduceOp};
use crate::error::{KilnError, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// State shared by the ranks of one simulated group.
pub struct LocalGroup {
    world: usize,
    barrier: AbortableBarrier,
    /// Address of each rank's published buffer.
    ptrs: Vec<AtomicUsize>,
    bytes: Mutex<Vec<Vec<u8>>>,
}

/// A reusable barrier that can be broken, so that one failing rank does not leave the others
/// waiting forever: they return an error naming the reason instead.
struct AbortableBarrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
    world: usize,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
    /// What each rank brought to a meeting, by generation parity: a rank that has passed a
    /// meeting can reach the next one (the other slot) but not the one after, so the slot of
    /// the generation just passed stays intact until every rank has read it.
    brought: [Vec<(String, String)>; 2],
}

impl AbortableBarrier {
    fn wait(&self) -> Result<()> {
        self.arrive(None).map(|_| ())
    }

    /// Waits at the barrier with `(key, label)`; every rank's pair, in rank order, when all came.
    fn meet(&self, rank: usize, key: &str, label: &str) -> Result<Vec<(String, String)>> {
        self.arrive(Some((rank, key, label)))
    }

    fn arrive(&self, bring: Option<(usize, &str, &str)>) -> Result<Vec<(String, String)>> {
        let mut s = self.state.lock().expect("barrier lock");
        if let Some(why) = &s.aborted {
            return Err(KilnError::Comm(format!("another rank failed: {why}")));
        }
        let generation = s.generation;
        let slot = (generation % 2) as usize;
        if let Some((rank, key, label)) = bring {
            let world = self.world;
            let brought = &mut s.brought[slot];
            brought.resize(world, (String::new(), String::new()));
            brought[rank] = (key.to_string(), label.to_string());
        }
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
        } else {
            // A meeting that completed stands even if a rank aborts right after it, before
            // this thread wakes: that rank has returned an error of its own, and this one
            // must not see a collective failure that did not happen.
            while s.generation == generation {
                if let Some(why) = &s.aborted {
                    return Err(KilnError::Comm(format!("another rank failed: {why}")));
                }
                s = self.cv.wait(s).expect("barrier lock");
            }
        }
        Ok(match bring {
            Some(_) => s.brought[slot].clone(),
            None => Vec::new(),
        })
    }

    fn abort(&self, why: &str) {
        let mut s = self.state.lock().expect("barrier lock");
        s.aborted.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }
}

impl LocalGroup {
    fn new(world: usize) -> Self {
        LocalGroup {
            world,
            barrier: AbortableBarrier {
                state: Mutex::new(BarrierState {
                    arrived: 0,
                    generation: 0,
                    aborted: None,
                    brought: [Vec::new(), Vec::new()],
                }),
                cv: Condvar::new(),
                world,
            },
            ptrs: (0..world).map(|_| AtomicUsize::new(0)).collect(),
            bytes: Mutex::new(vec![Vec::new(); world]),
        }
    }
}

/// Creates `world` communicators, one per rank, sharing one group. Rank r is element r.
pub fn simulate_group(world: usize, options: &CommOptions) -> Vec<Arc<dyn Communicator>> {
    let group = Arc::new(LocalGroup::new(world));
    let comms: Vec<WorkerComm> = (0..world)
        .map(|rank| {
            let g = group.clone();
            let hook_group = group.clone();
            let hook: Arc<dyn Fn(&str) + Send + Sync> =
                Arc::new(move |why: &str| hook_group.barrier.abort(&format!("rank {rank}: {why}")));
            WorkerComm::spawn(
                "local",
                options,
                move || {
                    Ok(LocalTransport {
                        rank,
                        group: g,
                        scratch: Vec::new(),
                        key: String::new(),
                        label: String::new(),
                    })
                },
                hook,
            )
            .expect("spawning a thread for the local backend")
        })
        .collect();
    // The watchdog of a simulated rank reads the others' recorders directly.
    let peers = Arc::new(LocalPeers(comms.iter().map(|c| c.recorder()).collect()));
    comms
        .into_iter()
        .map(|c| {
            c.set_peers(peers.clone());
            Arc::new(c) as Arc<dyn Communicator>
        })
        .collect()
}

struct LocalTransport {
    rank: usize,
    group: Arc<LocalGroup>,
    /// Reused accumulator for reduce-scatter, so that no step allocates.
    scratch: Vec<f32>,
    /// The operation in progress: what must agree across ranks, and what it serves.
    key: String,
    label: String,
}

impl LocalTransport {
    /// The first barrier of every operation: every rank must be at the same one.
    fn meet(&self) -> Result<()> {
        let all = self.group.barrier.meet(self.rank, &self.key, &self.label)?;
        if all.iter().all(|(key, _)| *key == self.key) {
            return Ok(());
        }
        // Every rank sees the same table and fails here, before any buffer is read.
        let detail: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(r, (key, label))| format!("rank {r}: {key}{label}"))
            .collect();
        Err(KilnError::Comm(format!(
            "ranks called different collectives (desync): {}",
            detail.join("; ")
        )))
    }

    /// Publishes this rank's buffer. From here to the collective's last barrier the buffer is
    /// only accessed through `own`, the pointer the other ranks read through too. The meeting
    /// compares the operations' keys, which include their lengths, so agreeing ranks have
    /// published buffers of equal length.
    fn publish(&self, own: *mut f32) -> Result<()> {
        self.group.ptrs[self.rank].store(own as usize, Ordering::Release);
        self.meet()
    }

    /// Shard `q` of rank `owner`'s published buffer.
    ///
    /// # Safety
    /// Only between the two barriers of a collective, and only for a region that no rank writes
    /// during that collective.
    unsafe fn region(&self, owner: usize, start: usize, len: usize) -> &[f32] {
        let base = self.group.ptrs[owner].load(Ordering::Acquire) as *const f32;
        // SAFETY: the caller guarantees the owner's buffer is published, alive (its owner waits
        // at the second barrier) and not written in [start, start + len).
        unsafe { std::slice::from_raw_parts(base.add(start), len) }
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn begin(&mut self, entry: &Entry) {
        self.key = format!("{} #{}", entry.op, entry.seq);
        self.label = match (entry.step, entry.serves.as_str()) {
            (None, "") => String::new(),
            (None, what) => format!(" serving {what}"),
            (Some(step), "") => format!(" at step {step}"),
            (Some(step), what) => format!(" at step {step} serving {what}"),
        };
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let world = self.group.world;
        let shard = buf.len() / world;
        let start = self.rank * shard;
        let own = buf.as_mut_ptr();
        self.publish(own)?;
        // Each rank reads shard `rank` of every buffer (its own included) into an accumulator and
        // writes it back into its own buffer only after the second barrier, when nobody reads.
        let mut out = std::mem::take(&mut self.scratch);
        out.resize(shard, 0.0);
        {
            // SAFETY: shard `rank` of every buffer is only read during this collective, and every
            // buffer stays alive until its owner passes the barrier below.
            let block = |q: usize| unsafe { self.region(q, start, shard) };
            sum_shard_in_rank_order(world, block, &mut out, op);
        }
        let done = self.group.barrier.wait();
        // SAFETY: after the barrier nobody reads this buffer any more; `own` points into `buf`.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), own.add(start), shard) };
        self.scratch = out;
        done
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let world = self.group.world;
        let shard = buf.len() / world;
        let own = buf.as_mut_ptr();
        self.publish(own)?;
        for q in (0..world).filter(|&q| q != self.rank) {
            // SAFETY: shard q of rank q's buffer is only read during this collective; shard q of
            // this rank's buffer is written by this rank alone and read by nobody.
            unsafe {
                let src = self.region(q, q * shard, shard);
                std::ptr::copy_nonoverlapping(src.as_ptr(), own.add(q * shard), shard);
            }
        }
        self.group.barrier.wait()
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let len = buf.len();
        let own = buf.as_mut_ptr();
        self.publish(own)?;
        if self.rank != root {
            // SAFETY: the root's buffer is only read during this collective; this rank's buffer
            // is written only by this rank and read by nobody.
            unsafe {
                let src = self.region(root, 0, len);
                std::ptr::copy_nonoverlapping(src.as_ptr(), own, len);
            }
        }
        self.group.barrier.wait()
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.group.bytes.lock().expect("bytes lock")[self.rank] = mine.to_vec();
        self.meet()?;
        let all = self.group.bytes.lock().expect("bytes lock").clone();
        self.group.barrier.wait()?;
        Ok(all)
    }

    fn barrier(&mut self) -> Result<()> {
        self.meet()
    }
}

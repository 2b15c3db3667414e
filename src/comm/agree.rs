//! Agreeing on the outcome of a phase: every rank brings its result to one small all-gather and
//! learns whether every rank succeeded. A failure is then reported once, by the rank that hit it
//! (the lowest, when several did), every rank returns the same way, and none is left waiting in
//! a collective or broken out of one by an abort. Used where ranks can fail differently: the
//! start-up checks (a data file or an nvme directory missing on one node), each phase of a
//! checkpoint save (a full disk), the checks of a checkpoint to resume from.

use super::Communicator;
use crate::error::{KilnError, Result};

/// Every rank's payload when every rank succeeded; otherwise the lowest failing rank's error on
/// that rank, and [`KilnError::ReportedByAnotherRank`] with its exit code on the others.
pub fn agree(comm: &dyn Communicator, mine: Result<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
    // First byte: 0, or the exit code of this rank's error.
    let message = match &mine {
        Ok(payload) => [&[0u8][..], payload].concat(),
        Err(e) => vec![e.exit_code().clamp(1, 255) as u8],
    };
    let all = match comm.all_gather_bytes(&message) {
        Ok(all) => all,
        // Another rank gave up first; this rank's own finding is the better message.
        Err(e) => return Err(mine.err().unwrap_or(e)),
    };
    match all.iter().position(|m| m[0] != 0) {
        None => Ok(all.into_iter().map(|m| m[1..].to_vec()).collect()),
        Some(first) if first == comm.rank() => Err(mine.expect_err("this rank failed")),
        Some(first) => Err(KilnError::ReportedByAnotherRank(all[first][0] as i32)),
    }
}

/// [`agree`] on a value that stays on this rank.
pub fn agree_on<T>(comm: &dyn Communicator, mine: Result<T>) -> Result<T> {
    let (value, verdict) = match mine {
        Ok(v) => (Some(v), Ok(Vec::new())),
        Err(e) => (None, Err(e)),
    };
    agree(comm, verdict)?;
    Ok(value.expect("every rank succeeded, this one included"))
}

/// The ranks whose `value` differs from rank 0's (a description, a shape, a hash): one small
/// all-gather of a hash of it, the same length on every rank. Every rank learns the same list.
pub fn ranks_differing_from_first(comm: &dyn Communicator, value: &str) -> Result<Vec<usize>> {
    let all = comm.all_gather_bytes(&crate::rng::hash_str(value).to_le_bytes())?;
    Ok((0..all.len()).filter(|&r| all[r] != all[0]).collect())
}

/// The ranks as a list for a message: `1, 3`.
pub fn rank_list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

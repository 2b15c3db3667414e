//! Faults injected on purpose, to test what kiln does when a rank hangs or desynchronises
//! (the watchdog's tests; PyTorch's equivalents are debug environment variables too).
//! `KILN_FAULT=stall:R:S` stops rank R at the start of step S for good, as SIGSTOP would;
//! `KILN_FAULT=desync:R:S` makes rank R issue a barrier there that the other ranks do not.

use crate::comm::Communicator;
use crate::error::{KilnError, Result};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    kind: Kind,
    rank: usize,
    step: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stall,
    Desync,
}

impl Fault {
    /// The fault `KILN_FAULT` asks for, if any.
    pub fn from_env() -> Result<Option<Fault>> {
        match std::env::var("KILN_FAULT") {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    fn parse(v: &str) -> Result<Fault> {
        let bad = || {
            KilnError::config(format!(
                "KILN_FAULT=`{v}`: expected stall:RANK:STEP or desync:RANK:STEP"
            ))
        };
        let mut parts = v.split(':');
        let kind = match parts.next() {
            Some("stall") => Kind::Stall,
            Some("desync") => Kind::Desync,
            _ => return Err(bad()),
        };
        let rank = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
        let step = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Fault { kind, rank, step })
    }

    /// Injects the fault if this is its rank and step.
    pub fn at_step(&self, comm: &dyn Communicator, step: u64) -> Result<()> {
        if comm.rank() != self.rank || step != self.step {
            return Ok(());
        }
        match self.kind {
            Kind::Stall => {
                tracing::warn!("KILN_FAULT: rank {} stalls at step {step}", self.rank);
                loop {
                    std::thread::park();
                }
            }
            Kind::Desync => {
                tracing::warn!(
                    "KILN_FAULT: rank {} desynchronises at step {step}",
                    self.rank
                );
                comm.set_serves("the injected desync (KILN_FAULT)");
                comm.barrier()
            }
        }
    }
}

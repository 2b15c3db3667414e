//! Faults injected on purpose, to test what kiln does when a rank hangs or desynchronises
//! (the watchdog's tests; PyTorch's equivalents are debug environment variables too).
//! `KILN_FAULT=stall:R:S` stops rank R at the start of step S for good, as SIGSTOP would;
//! `KILN_FAULT=desync:R:S` makes rank R issue a barrier there that the other ranks do not;
//! `KILN_FAULT=overflow:R:S` makes rank R's gradients of step S overflow (its loss scale is
//! infinite for that step), as an fp16 backward that overflows does.

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
    Overflow,
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
                "KILN_FAULT=`{v}`: expected stall:RANK:STEP, desync:RANK:STEP or overflow:RANK:STEP"
            ))
        };
        let mut parts = v.split(':');
        let kind = match parts.next() {
            Some("stall") => Kind::Stall,
            Some("desync") => Kind::Desync,
            Some("overflow") => Kind::Overflow,
            _ => return Err(bad()),
        };
        let rank = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
        let step = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Fault { kind, rank, step })
    }

    /// Whether this fault overflows the gradients of `rank` at `step`.
    pub fn overflows(&self, rank: usize, step: u64) -> bool {
        self.kind == Kind::Overflow && rank == self.rank && step == self.step
    }

    /// Whether this is an overflow, which only an fp16 run (with a loss scale) can inject.
    pub fn needs_loss_scaling(&self) -> bool {
        self.kind == Kind::Overflow
    }

    /// Injects a stall or a desync if this is its rank and step (an overflow is injected by
    /// the train loop, through the loss scale).
    pub fn at_step(&self, comm: &dyn Communicator, step: u64) -> Result<()> {
        if comm.rank() != self.rank || step != self.step {
            return Ok(());
        }
        match self.kind {
            Kind::Overflow => Ok(()),
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

//! `kiln bench …`: benchmarks that print ratios against the strongest reference available on
//! this machine, measured in the same run.

use crate::error::Result;
use clap::Subcommand;

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {}

/// Runs a benchmark.
pub fn run(what: BenchCommand) -> Result<()> {
    match what {}
}

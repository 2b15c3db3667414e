//! `kiln bench …`: benchmarks that print ratios against the strongest reference available on
//! this machine, measured in the same run.

pub mod comm;

use crate::error::{KilnError, Result};
use clap::Subcommand;

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Collective bus bandwidth, kiln vs the MPI library on the same buffers (run under mpirun).
    Comm {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a benchmark.
pub fn run(what: BenchCommand) -> Result<()> {
    match what {
        BenchCommand::Comm { json } => {
            let comm = crate::comm::open("auto", false)?;
            if comm.world() < 2 {
                return Err(KilnError::config("bench comm needs at least 2 ranks: run it under mpirun -np N"));
            }
            let rows = comm::measure(comm.as_ref())?;
            if comm.rank() == 0 {
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialise"));
                } else {
                    print!("{}", comm::table(&rows, comm.world()));
                }
            }
            Ok(())
        }
    }
}

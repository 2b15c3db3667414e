//! What both examples share: a few command-line flags and a stateless row sampler.
#![allow(dead_code)]

use kiln::api::{KilnError, Result, Trainer};

/// `--simulate N` (ranks as threads; otherwise one rank per process under mpirun/srun) and
/// `--set section.key=value` overrides after the example's own defaults.
pub fn trainer(defaults: &[&str]) -> Result<Trainer> {
    let mut sets: Vec<String> = defaults.iter().map(|s| s.to_string()).collect();
    let mut simulate = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| KilnError::config(format!("{flag} needs a value")))
        };
        match arg.as_str() {
            "--set" => sets.push(value("--set")?),
            "--simulate" => {
                let n = value("--simulate")?;
                simulate = Some(n.parse().map_err(|_| {
                    KilnError::config(format!("--simulate: `{n}` is not a number of ranks"))
                })?);
            }
            other => {
                return Err(KilnError::config(format!(
                    "unknown argument `{other}` (expected --simulate N, --set KEY=VALUE)"
                )))
            }
        }
    }
    let trainer = Trainer::from_sets(&sets)?;
    Ok(match simulate {
        Some(n) => trainer.simulate(n),
        None => trainer,
    })
}

/// A well-mixed 64-bit hash (splitmix64's finaliser): row i of step t is drawn from
/// `mix(seed ^ mix(t ^ mix(i)))`, so every rank computes its rows alone and every world size
/// sees the same global batch.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Prints a user error as one line and exits 2, as `kiln` does.
pub fn exit_on_error<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code())
    })
}

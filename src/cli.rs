//! The `kiln` command line.

use crate::config;
use crate::error::KilnError;
use crate::launch;
use crate::train::RunOptions;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "ZeRO/DDP data-parallel training on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (one rank per process under mpirun/srun, or N threads with --simulate N).
    ///
    /// SIGTERM, SIGINT or SIGUSR1 makes every rank finish the step in progress, write a
    /// checkpoint (when checkpoint.dir is set) and exit with code 75; --resume then continues as
    /// if never stopped. A second signal ends the process at once, killed by it (status 128 + N:
    /// 143 for SIGTERM, 130 for SIGINT). Under mpirun send SIGUSR1 to mpirun (it forwards it to
    /// every rank; SIGTERM to mpirun kills the ranks 2 s later) or SIGTERM to the ranks.
    ///
    /// Exit codes: 0 finished; 2 a user error (one line naming the key or file); 75 stopped by a
    /// signal at a step boundary; 1 anything else.
    Train {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Run N ranks as threads of this process (local backend).
        #[arg(long, value_name = "N")]
        simulate: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Continue from a checkpoint: its directory, a checkpoint.dir (its `latest`), or
        /// `latest` (checkpoint.dir's newest). Any world size and stage can load any checkpoint.
        #[arg(long, value_name = "PATH|latest", num_args = 0..=1, default_missing_value = "latest")]
        resume: Option<String>,
    },
    /// Write the full parameters of a checkpoint to one safetensors file (module-path names,
    /// model shapes), one unit at a time.
    Consolidate {
        /// Checkpoint directory (a step directory, or a checkpoint.dir to take its latest).
        checkpoint: PathBuf,
        /// Output safetensors file.
        out: PathBuf,
    },
    /// Write a checkpoint's parameters for other tools: `--format hf` a directory that
    /// transformers' `from_pretrained` loads (model.safetensors + config.json), `--format
    /// peft` the LoRA adapters as a directory `PeftModel.from_pretrained` loads onto the base
    /// model, `--format kiln` one safetensors file with kiln's names (as `kiln consolidate`).
    Export {
        /// `hf`, `peft` or `kiln`.
        #[arg(long, default_value = "hf")]
        format: String,
        /// With `--format hf`, a LoRA run's adapters added into their weights.
        #[arg(long)]
        merge: bool,
        /// With `--format hf`, the weights' precision: `f32`, `bf16` or `f16` (rounded to
        /// nearest even); config.json says it.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Checkpoint directory (a step directory, or a checkpoint.dir to take its latest).
        checkpoint: PathBuf,
        /// Output: a directory for `hf`, a .safetensors file for `kiln`.
        out: PathBuf,
    },
    /// Continue a prompt with a kiln checkpoint or a Hugging Face GPT-2, printing the text.
    Sample(crate::sample::SampleArgs),
    /// Tokenize text files into nanoGPT-style DIR/train.bin and DIR/val.bin (little-endian
    /// uint16 tokens, uint32 beyond 65,536 ids, for `data.path` / `data.val_path` with
    /// data.source = "tokens"), DIR/meta.json, and for instruction data (--format jsonl) the
    /// label masks train.mask.bin and val.mask.bin. val.bin is the tail --val-fraction of the
    /// token stream (of the records, for jsonl).
    PrepareData(crate::data::prepare::PrepareArgs),
    /// Write the training rows of a recipe to a flat token file (step-major, then row, each row
    /// seq_len + 1 tokens; uint16, or uint32 beyond 65,536 ids), and instruction data's label
    /// masks to OUT with the extension `.mask` (one byte per token), e.g. to train a reference
    /// implementation on the same data.
    DumpData {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the resolved config as a kiln TOML recipe, e.g. to migrate a DeepSpeed config:
    /// `kiln config --deepspeed ds_config.json > recipe.toml`.
    Config {
        #[command(flatten)]
        recipe: RecipeArgs,
    },
    /// Check that this machine's collectives are correct (run under mpirun for MPI).
    Check {
        #[command(subcommand)]
        what: CheckCommand,
    },
    /// Predict the peak memory of one process of a run, by kind, for the configured run and for
    /// every stage × offload tier × recompute setting (or, with --fit, the largest GPT that fits).
    Estimate {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Ranks of the launch.
        #[arg(long, value_name = "N", default_value_t = 1)]
        world: usize,
        /// All ranks in this process (`kiln train --simulate N`) instead of one per process.
        #[arg(long)]
        simulate: bool,
        /// Print one JSON object (the configured run carries `predicted_peak_rss_bytes`).
        #[arg(long)]
        json: bool,
        /// The largest model of the GPT family that fits, per stage and offload tier.
        #[arg(long)]
        fit: bool,
        /// With --fit: memory per process, GiB (default: what this process may use).
        #[arg(long, value_name = "GIB")]
        memory: Option<f64>,
    },
    /// Draw a run's metrics.jsonl as PNG files: loss and learning rate, memory by kind, step time.
    Plot {
        /// The run's output.dir (holding metrics.jsonl).
        run_dir: PathBuf,
        /// Where to write the PNGs (default: RUN_DIR/plots).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Benchmarks that print ratios against the strongest reference on this machine.
    Bench {
        #[command(subcommand)]
        what: crate::bench::BenchCommand,
    },
}

/// Where a run's config comes from, in order of precedence (later wins).
#[derive(clap::Args, Debug)]
struct RecipeArgs {
    /// TOML recipe (see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// DeepSpeed config (ds_config.json), read as kiln keys on top of --config.
    #[arg(long, value_name = "FILE")]
    deepspeed: Option<PathBuf>,
    /// Override a key: --set section.key=value (repeatable; the value is read as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

impl RecipeArgs {
    /// The config, after rank 0 of the launch has logged what the DeepSpeed file left out.
    fn load(&self) -> Result<config::Config, KilnError> {
        let (config, translation) = crate::plan::load_layers(
            self.config.as_deref(),
            self.deepspeed.as_deref(),
            &self.sets,
        )?;
        if launch::launcher_rank() == 0 {
            for line in &translation.notes {
                tracing::info!("{line}");
            }
            for line in &translation.warnings {
                tracing::warn!("{line}");
            }
        }
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
enum CheckCommand {
    /// Runs the collective conformance suite against a float64 reference.
    Comm {
        /// Run N ranks as threads (local backend) instead of this process's launch.
        #[arg(long, value_name = "N")]
        simulate: Option<usize>,
        /// Include 64 MiB messages.
        #[arg(long)]
        large: bool,
        /// Instead, issue a mismatched collective with comm.verify on and show the error it gives.
        #[arg(long)]
        mismatch: bool,
    },
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and the help a bare `kiln` or `kiln check` prints: clap's own.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("kiln: error: {}", usage_error(&e));
            return 2;
        }
    };
    crate::api::init_logging();
    let result = match cli.command {
        Command::Train {
            recipe,
            simulate,
            quiet,
            resume,
        } => recipe
            .load()
            .and_then(|cfg| train(&cfg, simulate, quiet, resume)),
        Command::Consolidate { checkpoint, out } => consolidate(&checkpoint, &out),
        Command::Export {
            format,
            merge,
            dtype,
            checkpoint,
            out,
        } => crate::checkpoint::export_command(&format, merge, &dtype, &checkpoint, &out),
        Command::Sample(args) => crate::sample::run_command(&args),
        Command::PrepareData(args) => crate::data::prepare::run(&args),
        Command::DumpData { recipe, out } => recipe.load().and_then(|cfg| dump_data(&cfg, &out)),
        Command::Config { recipe } => recipe.load().and_then(|cfg| print_config(&recipe, &cfg)),
        Command::Check {
            what:
                CheckCommand::Comm {
                    simulate,
                    large,
                    mismatch,
                },
        } => check_comm(simulate, large, mismatch),
        Command::Estimate {
            recipe,
            world,
            simulate,
            json,
            fit,
            memory,
        } => recipe
            .load()
            .and_then(|cfg| crate::memory::report::run(&cfg, world, simulate, json, fit, memory)),
        Command::Plot { run_dir, out } => crate::plot::run(&run_dir, out.as_deref()),
        Command::Bench { what } => crate::bench::run(what),
    };
    match result {
        Ok(()) => 0,
        // Already said: by the rank that owns the message (a stop: rank 0's log line).
        Err(e @ (KilnError::ReportedByAnotherRank(_) | KilnError::Stopped { .. })) => e.exit_code(),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("kiln: error: {e}");
            code
        }
    }
}

/// A command-line usage error as one line, like every other user error. clap renders the
/// message, a tip, the usage and a hint on separate lines; kiln keeps the message and the tip
/// and points to the subcommand's --help.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut line = String::new();
    let mut command = "kiln".to_string();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(usage) = l.strip_prefix("Usage: ") {
            command = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
        } else if !l.starts_with("For more information") {
            let l = l.strip_prefix("error: ").unwrap_or(l);
            let sep = match line.is_empty() {
                true => "",
                false if line.ends_with(':') => " ",
                false => "; ",
            };
            line = format!("{line}{sep}{l}");
        }
    }
    format!("{line} (see `{command} --help`)")
}

fn train(
    cfg: &config::Config,
    simulate: Option<usize>,
    quiet: bool,
    resume: Option<String>,
) -> Result<(), KilnError> {
    let opts = RunOptions {
        quiet,
        no_outputs: false,
        // Only the export reads the final parameters.
        no_final_params: cfg.output.export.is_empty(),
        resume,
        // Before the ranks start (and before MPI_Init): from here on a signal stops the run at
        // a step boundary rather than killing it.
        stop: crate::signals::install(),
    };
    let outcome = match simulate {
        // A Llama-family checkpoint trains through the library API, as a user's model does.
        _ if crate::llama::selected(&cfg.model) => crate::llama::train(cfg, simulate, opts)?,
        Some(n) => launch::simulate(cfg, n, &opts)?.swap_remove(0),
        None => launch::run_process(cfg, &opts)?,
    };
    match outcome.stopped_at {
        Some(step) => Err(KilnError::Stopped { step }),
        None => Ok(()),
    }
}

fn consolidate(checkpoint: &std::path::Path, out: &std::path::Path) -> Result<(), KilnError> {
    let dir = crate::checkpoint::locate(
        &checkpoint.display().to_string(),
        &config::CheckpointConfig::default(),
    )?;
    crate::checkpoint::consolidate(&dir, out)?;
    eprintln!("kiln: wrote {} from {}", out.display(), dir.display());
    Ok(())
}

fn check_comm(simulate: Option<usize>, large: bool, mismatch: bool) -> Result<(), KilnError> {
    use crate::comm::{conformance, Communicator};
    use std::sync::Arc;
    let options = crate::comm::CommOptions::new(mismatch);
    let comms: Vec<Arc<dyn Communicator>> = match simulate {
        Some(0) => {
            return Err(KilnError::config(
                "--simulate: the number of ranks must be at least 1",
            ))
        }
        Some(n) => crate::comm::simulate_group(n, &options),
        None => vec![crate::comm::open("auto", &options)?],
    };
    let results: Vec<Result<Vec<String>, KilnError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    if mismatch {
                        conformance::provoke_mismatch(c.as_ref())
                            .map(|e| vec![format!("comm.verify caught it: {e}")])
                    } else {
                        let r = conformance::run_suite(c.as_ref(), large);
                        if let Err(e) = &r {
                            c.abort(&e.to_string());
                        }
                        r
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(KilnError::Comm("a rank thread panicked".into())))
            })
            .collect()
    });
    let (rank, world, backend) = (comms[0].rank(), comms[0].world(), comms[0].backend());
    drop(comms);
    let lines = launch::collect(results)?.swap_remove(0);
    if rank == 0 {
        for l in lines {
            println!("ok  {l}");
        }
        if !mismatch {
            println!("comm conformance: every check agreed with the float64 reference (world {world}, backend {backend})");
        }
    }
    Ok(())
}

/// Prints the config as TOML, with a header saying where it came from.
fn print_config(recipe: &RecipeArgs, cfg: &config::Config) -> Result<(), KilnError> {
    let text = toml::to_string_pretty(cfg)
        .map_err(|e| KilnError::config(format!("cannot write the config as TOML: {e}")))?;
    let from: Vec<String> = [&recipe.config, &recipe.deepspeed]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .chain(recipe.sets.iter().map(|s| format!("--set {s}")))
        .collect();
    println!(
        "# kiln recipe resolved by `kiln config` from: {}",
        if from.is_empty() {
            "the defaults".to_string()
        } else {
            from.join(", ")
        }
    );
    println!("# Train with: kiln train --config THIS_FILE (world-size-dependent keys are resolved per run).");
    print!("{text}");
    Ok(())
}

fn dump_data(cfg: &config::Config, out: &std::path::Path) -> Result<(), KilnError> {
    use std::io::Write;
    let plan = crate::plan::Plan::resolve(cfg, 1)?;
    let source = crate::data::open(&cfg.data, plan.gpt().vocab, plan.gpt().seq_len)?;
    let file = std::fs::File::create(out)
        .map_err(|e| KilnError::file(out, format!("cannot create: {e}")))?;
    let mut w = std::io::BufWriter::new(file);
    let mut row = vec![0u32; plan.gpt().seq_len + 1];
    let width = crate::data::TokenWidth::for_vocab(plan.gpt().vocab);
    // Instruction data's label masks go beside, one byte per token: `<out>.mask`.
    let mask_path = out.with_extension("mask");
    let mut mask = vec![0u8; row.len()];
    let mut masks = Vec::new();
    for step in 0..plan.steps {
        for r in 0..plan.global_batch as u64 {
            source.fill_row(step, r, &mut row);
            if source.fill_mask(step, r, &mut mask) {
                masks.extend_from_slice(&mask);
            }
            for &t in &row {
                let written = match width {
                    crate::data::TokenWidth::U16 => w.write_all(&(t as u16).to_le_bytes()),
                    crate::data::TokenWidth::U32 => w.write_all(&t.to_le_bytes()),
                };
                written.map_err(|e| KilnError::io(out, e))?;
            }
        }
    }
    w.flush().map_err(|e| KilnError::io(out, e))?;
    if !masks.is_empty() {
        std::fs::write(&mask_path, &masks).map_err(|e| KilnError::io(&mask_path, e))?;
        eprintln!(
            "{}: the label masks, one byte per token",
            mask_path.display()
        );
    }
    eprintln!(
        "{}: {} steps × {} rows × {} {} tokens; {}",
        out.display(),
        plan.steps,
        plan.global_batch,
        plan.gpt().seq_len + 1,
        width.dtype(),
        source.describe()
    );
    Ok(())
}

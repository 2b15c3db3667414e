//! Train your own burn model with kiln: DDP and ZeRO 1–3, offload, accumulation, clipping,
//! schedules, recompute, checkpoints, `--simulate N` and `mpirun` — the same engine the
//! built-in GPT runs on.
//!
//! A model is an ordinary `#[derive(Module)]` struct. It says how it splits into [`Unit`]s
//! (kiln's granularity for gradient buckets, ZeRO-3 gathers and recompute: FSDP2's wrap
//! policy) and how each unit runs; the data is any [`BatchSource`] whose micro-batch the
//! model reads. Parameters are found by module path; the ones burn marks as not requiring
//! gradients (`Module::no_grad`, `Param::set_require_grad(false)`) are frozen: no gradient,
//! no bucket slot, no optimizer state, sharded and gathered at ZeRO-3 all the same.
//!
//! ```ignore
//! #[derive(Module, Debug)]
//! struct Mlp { hidden: Linear, out: Linear }
//!
//! impl TrainModule for Mlp {
//!     type Batch = Digits;               // your batch type
//!     type Activation = Tensor<2>;       // what flows between units
//!     fn units(&self) -> Vec<Unit> {
//!         vec![Unit::new("hidden"), Unit::new("out")]
//!     }
//!     fn forward_unit(&self, unit: usize, x: Option<Tensor<2>>, b: &Digits) -> Tensor<2> {
//!         match unit {
//!             0 => relu(self.hidden.forward(b.images.clone())),
//!             _ => cross_entropy(self.out.forward(x.unwrap()), &b.labels), // the loss, [1, 1]
//!         }
//!     }
//! }
//!
//! let outcome = Trainer::new(config).simulate(2).fit(|_rank| {
//!     Ok(Fit::new(Mlp::new(&Device::flex()), DigitsSource::train()?))
//! })?;
//! ```

mod adapter;
mod eval;
mod frozen;
mod lora;
mod memory;
mod nf4;
mod units;

pub use crate::config::Config;
pub use crate::error::{KilnError, Result};
pub use crate::model::{Activation, Metrics};
pub use crate::train::{BatchSource, RunOptions, RunOutcome};
pub use units::Unit;

use crate::comm::Communicator;
use crate::halves::Half;
use crate::model::UnitModel;
use crate::plan::Plan;
use crate::train::Job;
use adapter::ModuleModel;
use burn::module::Module;
use std::sync::Arc;

/// A burn module kiln can train: how it splits into units, and how each unit runs.
pub trait TrainModule: Module + Sync + 'static {
    /// One micro-batch, as the model's units read it.
    type Batch: 'static;
    /// What one unit hands the next (a burn float tensor of any rank); the last unit returns
    /// the micro-batch's mean loss as a one-element tensor.
    type Activation: Activation;

    /// The units in the order they run. Each parameter must be in exactly one unit; a unit
    /// may borrow parameters of earlier units (tied weights).
    fn units(&self) -> Vec<Unit>;

    /// Runs unit `unit`: `input` is the previous unit's output (`None` for the first unit).
    /// Only the parameters the unit holds or borrows hold their values here.
    fn forward_unit(
        &self,
        unit: usize,
        input: Option<Self::Activation>,
        batch: &Self::Batch,
    ) -> Self::Activation;

    /// In evaluation, what the last unit reports instead of its loss: named values, each a
    /// mean over the micro-batch (kiln averages them over the evaluation set, weighting each
    /// micro-batch by its rows). By default the loss alone, as `loss`.
    fn eval_metrics(
        &self,
        unit: usize,
        input: Option<Self::Activation>,
        batch: &Self::Batch,
    ) -> Metrics {
        let loss = self.forward_unit(unit, input, batch).scalar();
        vec![("loss".into(), loss.unwrap_or(f32::NAN))]
    }

    /// Whether AdamW's decoupled weight decay applies to the parameter at `path`; by default
    /// to matrices and larger, not to biases and norm gains (PyTorch and Hugging Face recipes).
    fn decays(&self, _path: &str, shape: &[usize]) -> bool {
        shape.len() >= 2
    }

    /// What the log and `summary.json` call the model; by default its type's name.
    fn name(&self) -> String {
        std::any::type_name::<Self>()
            .rsplit("::")
            .next()
            .unwrap_or("model")
            .to_string()
    }

    /// The model's own description (its config), stored in checkpoints and compared on resume.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// What one rank trains: the model, its training data and, optionally, evaluation data.
pub struct Fit<M: TrainModule> {
    model: M,
    train: Box<dyn BatchSource<Batch = M::Batch>>,
    eval: Option<Box<dyn BatchSource<Batch = M::Batch>>>,
}

impl<M: TrainModule> Fit<M> {
    /// Trains `model` on `train`. The model's initial values must be the same on every rank
    /// (seed them identically); kiln checks it by hash.
    pub fn new(model: M, train: impl BatchSource<Batch = M::Batch> + 'static) -> Self {
        Fit {
            model,
            train: Box::new(train),
            eval: None,
        }
    }

    /// Evaluates on `eval` (a finite source: `BatchSource::num_rows`) before the first step,
    /// every `train.eval_every` steps and after the last.
    pub fn with_eval(mut self, eval: impl BatchSource<Batch = M::Batch> + 'static) -> Self {
        self.eval = Some(Box::new(eval));
        self
    }
}

/// Information about the rank a [`Fit`] is built for.
#[derive(Debug, Clone, Copy)]
pub struct RankInfo {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

/// Logs to stderr as `kiln` does: `KILN_LOG` filters (default `info`), every line of a rank's
/// training tagged with its rank, colour only at a terminal. Call once, first.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and pipes get plain text (no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

static BUILD_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Errors unless every rank has the same `value` (a description, a hash); the message names
/// `what` and the ranks that differ from rank 0.
fn agree_everywhere(comm: &dyn Communicator, what: &str, value: &str) -> Result<()> {
    comm.set_serves(&format!("the check that the {what} agree"));
    let differing = crate::comm::ranks_differing_from_first(comm, value)?;
    if differing.is_empty() {
        return Ok(());
    }
    Err(KilnError::config(format!(
        "model: the {what} of rank(s) {} differ from rank 0's; build the same model on every \
         rank (seed burn's initialisers identically)",
        crate::comm::rank_list(&differing)
    )))
}

/// The 16-bit format `train.precision` computes in (`None`: f32), if `device` computes it:
/// burn's wgpu backend accepts bf16 tensors and computes garbage from them, so ask first.
fn compute_dtype(config: &Config, device: &burn::tensor::Device) -> Result<Option<Half>> {
    let half = Half::of_precision(&config.train.precision);
    if let Some(h) = half.filter(|h| !device.supports_dtype(h.float_dtype())) {
        return Err(KilnError::config(format!(
            "key `train.precision` = {}: this rank's device ({device:?}) does not compute {h:?}",
            config.train.precision
        )));
    }
    Ok(half)
}

/// PEFT's `print_trainable_parameters()` line for a model description.
fn trainable_line(desc: &serde_json::Value) -> String {
    let (mut trainable, mut all) = (0usize, 0usize);
    for p in desc["params"].as_array().into_iter().flatten() {
        let numel: usize = p["shape"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64())
            .product::<u64>() as usize;
        all += numel;
        if p["trainable"].as_bool() == Some(true) {
            trainable += numel;
        }
    }
    let pct = 100.0 * trainable as f64 / all.max(1) as f64;
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        thousands(trainable),
        thousands(all)
    )
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Trains a [`TrainModule`] with a kiln [`Config`] (the `[train]`, `[parallel]`, `[offload]`,
/// `[checkpoint]`, `[output]` and `[comm]` sections; `[model]` and `[data]` are the user's).
#[derive(Debug, Clone)]
pub struct Trainer {
    config: Config,
    simulate: Option<usize>,
    options: RunOptions,
}

impl Trainer {
    /// A trainer for `config`.
    pub fn new(config: Config) -> Self {
        Trainer {
            config,
            simulate: None,
            options: RunOptions::default(),
        }
    }

    /// A trainer for the TOML config at `path` with `--set`-style overrides
    /// (`"parallel.stage=3"`); errors name the file or key.
    pub fn from_file(path: impl AsRef<std::path::Path>, sets: &[String]) -> Result<Self> {
        Ok(Trainer::new(crate::config::load(
            Some(path.as_ref()),
            sets,
        )?))
    }

    /// A trainer for kiln's defaults with `--set`-style overrides (`"train.steps=100"`); errors
    /// name the key.
    pub fn from_sets<S: AsRef<str>>(sets: &[S]) -> Result<Self> {
        let sets: Vec<String> = sets.iter().map(|s| s.as_ref().to_string()).collect();
        Ok(Trainer::new(crate::config::load(None, &sets)?))
    }

    /// Runs `world` ranks as threads of this process (`kiln train --simulate N`) instead of
    /// one rank per process under `mpirun`/`srun`.
    pub fn simulate(mut self, world: usize) -> Self {
        self.simulate = Some(world);
        self
    }

    /// Sets the invocation's options: quiet, `--resume`, outputs.
    pub fn with_options(mut self, options: RunOptions) -> Self {
        self.options = options;
        self
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Trains, building each rank's model and data with `build`; returns rank 0's outcome
    /// (under `mpirun`, this process's rank's). Every rank gets the same global batch, so the
    /// result equals one process's on the same config.
    pub fn fit<M: TrainModule>(
        &self,
        build: impl Fn(RankInfo) -> Result<Fit<M>> + Sync,
    ) -> Result<RunOutcome> {
        let rank = |comm: Arc<dyn Communicator>| self.run_rank(comm, &build);
        match self.simulate {
            Some(n) => Ok(crate::launch::simulate_ranks(&self.config, n, &rank)?.swap_remove(0)),
            None => crate::launch::process_rank(&self.config, &rank),
        }
    }

    fn run_rank<M: TrainModule>(
        &self,
        comm: Arc<dyn Communicator>,
        build: &(impl Fn(RankInfo) -> Result<Fit<M>> + Sync),
    ) -> Result<RunOutcome> {
        let (rank, world) = (comm.rank(), comm.world());
        // Ranks that are threads build one at a time, up to reading the parameters: burn's
        // initialisers draw from one process-wide RNG (lazily, when a value is first read), so
        // seeded builds on two threads at once would interleave their draws.
        let prepared = {
            let _one_at_a_time = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            build(RankInfo { rank, world }).and_then(|fit| {
                // Units are known once the model is: the plan is resolved against their names.
                let names: Vec<String> = fit
                    .model
                    .units()
                    .iter()
                    .map(|u| u.name().to_string())
                    .collect();
                let plan = Plan::resolve_training(&self.config, world, &names)?;
                if plan.micro_batch_auto {
                    return Err(KilnError::config(
                        "key `train.micro_batch`: \"auto\" chooses from the memory estimate's activations, which kiln has for the built-in GPT only; give a number",
                    ));
                }
                let device = crate::device::for_rank(plan.device, rank, world)?.burn_device();
                let Fit { model, train, eval } = fit;
                let name = model.name();
                let adapted = lora::adapted(model, &self.config)?;
                let compute = compute_dtype(&self.config, &device)?;
                let mut model = ModuleModel::new(
                    adapted.module,
                    comm.clone(),
                    plan.stage == 3,
                    device.autodiff(),
                    compute,
                    &adapted.nf4,
                )?;
                model.desc["lora"] = adapted.desc;
                Ok((model, train, eval, plan, name))
            })
        };
        // Every rank must agree that this worked, or none starts.
        comm.set_serves("the start-up checks");
        let (model, train, eval, mut plan, name) = crate::comm::agree_on(comm.as_ref(), prepared)?;
        // Every rank must have built the same model: the same parameters (paths, shapes,
        // frozen or not) and the same initial values.
        let layout = serde_json::json!([model.desc["units"], model.desc["params"]]);
        agree_everywhere(comm.as_ref(), "parameter layout", &layout.to_string())?;
        agree_everywhere(
            comm.as_ref(),
            "initial parameters",
            &model.init_hash.to_string(),
        )?;
        plan.model_desc = model.desc.clone();
        if rank == 0 && !self.options.quiet {
            tracing::info!("{}", trainable_line(&model.desc));
        }
        // Ranks sharing this machine's memory: threads of this process, or a launch's local
        // processes.
        let ranks_here = match comm.backend() {
            "local" => world,
            _ => crate::comm::placement(rank, world).local_ranks,
        };
        let layout = crate::flat::ModelLayout::new(&model, world);
        let states = memory::model_states(&plan, &layout, model.frozen_bytes());
        // Machines may differ: every rank checks its own, and they agree on the outcome.
        let fits = memory::check(&plan, &states, ranks_here, rank == 0);
        crate::comm::agree_on(comm.as_ref(), fits)?;
        let eval = eval
            .map(|source| eval::SourceEval::new(source, &plan))
            .transpose();
        let eval = crate::comm::agree_on(comm.as_ref(), eval)?;
        let job = Job {
            model: Box::new(model),
            source: train,
            eval: eval
                .map(|e| Box::new(e) as Box<dyn crate::train::Evaluator<M::Batch, M::Activation>>),
            name,
            estimate: None,
        };
        crate::train::run_with(&plan, comm, &self.options, move |_| Ok(job))
    }
}

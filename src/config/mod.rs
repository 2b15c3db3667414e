//! Config as typed: the TOML recipe, a DeepSpeed `ds_config.json` read as kiln keys, and
//! `--set` overrides, checked for unknown keys and types.
//! Range checks and cross-key rules live in [`crate::plan`], which resolves this once.

mod deepspeed;
mod finetune;
mod load;
mod micro_batch;
mod recompute;

pub use deepspeed::Translation;
pub use finetune::{Fp16Config, LoraConfig};
pub use load::{load, load_layers, parse_set};
pub use micro_batch::MicroBatch;
pub use recompute::{Recompute, RECOMPUTE_FORMS};

/// The values of `data.source`.
pub const DATA_SOURCES: &[&str] = &["markov", "text", "tokens"];
/// The values of `train.precision`.
pub const PRECISIONS: &[&str] = &["f32", "bf16", "fp16"];
/// The values of `comm.backend`.
pub const COMM_BACKENDS: &[&str] = &["auto", "local", "mpi", "nccl"];

/// Errors unless `value` is one of `allowed`: one line naming `key` and the choices. The one
/// check of such a key, whoever reads it first (the plan, or a library caller opening a data
/// source or a communicator directly).
pub fn check_choice(key: &str, value: &str, allowed: &[&str]) -> crate::error::Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(crate::error::KilnError::config(format!(
        "key `{key}`: `{value}` is not one of {}",
        allowed.join(", ")
    )))
}

use serde::{Deserialize, Serialize};

/// The whole config file. Every section is optional; missing keys take their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model shape.
    pub model: ModelConfig,
    /// Training data.
    pub data: DataConfig,
    /// Optimisation and batch sizes.
    pub train: TrainConfig,
    /// Data-parallel strategy (DDP / ZeRO stage).
    pub parallel: ParallelConfig,
    /// Optimizer-state offload tier.
    pub offload: OffloadConfig,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
    /// Metrics, summary and parameter export.
    pub output: OutputConfig,
    /// Collective backend.
    pub comm: CommConfig,
    /// LoRA adapters on a frozen base (Hugging Face PEFT's `LoraConfig`).
    pub lora: LoraConfig,
    /// Loss scaling for `train.precision = "fp16"` (DeepSpeed's `fp16` section).
    pub fp16: Fp16Config,
}

/// `[model]`: a preset, optionally with individual fields overridden.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `tiny` (d 256, 4 layers), `small` (d 512, 8 layers) or `gpt2-124m`.
    pub preset: String,
    /// Overrides the preset's width.
    pub d_model: Option<usize>,
    /// Overrides the preset's depth.
    pub n_layers: Option<usize>,
    /// Overrides the preset's number of attention heads.
    pub n_heads: Option<usize>,
    /// Overrides the preset's maximum sequence length (number of learned positions).
    pub max_seq_len: Option<usize>,
    /// Overrides the preset's vocabulary size.
    pub vocab: Option<usize>,
    /// Sequence length used for training; defaults to the model's maximum.
    pub seq_len: Option<usize>,
    /// Which attention projections have a bias: `"qv"` (default; the key bias is dropped, see
    /// the block's comment in src/model/gpt.rs) or `"qkv"` (GPT-2's, needed for its weights).
    pub qkv_bias: QkvBias,
    /// The LM head reads the token embedding `wte` (transposed) instead of a matrix of its own,
    /// as GPT-2 does (Press & Wolf 2017). Default: false for a preset; with `init_from`, the
    /// file's `tie_word_embeddings` (`false` unties a tied GPT-2: its head starts as `wte`).
    pub tie_embeddings: Option<bool>,
    /// Start from a Hugging Face GPT-2 checkpoint: a `save_pretrained` directory
    /// (`config.json` + `model.safetensors`, possibly sharded) or a `.safetensors` file. Its
    /// `config.json` gives the shape (the preset is ignored; other shape keys may only repeat
    /// it; `seq_len` may be shorter than `n_positions`). Only the initial weights: `--resume`
    /// wins. Default empty (initialise from `train.seed`).
    pub init_from: String,
}

/// `model.qkv_bias`: the attention input projection's biases.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QkvBias {
    /// Query and value biases only.
    #[default]
    Qv,
    /// Query, key and value biases (GPT-2).
    Qkv,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            preset: "tiny".into(),
            d_model: None,
            n_layers: None,
            n_heads: None,
            max_seq_len: None,
            vocab: None,
            seq_len: None,
            qkv_bias: QkvBias::Qv,
            tie_embeddings: None,
            init_from: String::new(),
        }
    }
}

/// `[data]`: where training tokens come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `markov` (synthetic, known entropy floor), `text` (bytes of a UTF-8 file) or `tokens`
    /// (flat uint16 token file, nanoGPT / llm.c style).
    pub source: String,
    /// File for `text` and `tokens`.
    pub path: String,
    /// Validation tokens: a uint16 token file like `tokens` reads (e.g. `kiln prepare-data`'s
    /// val.bin); empty means no validation. Its loss is computed every `train.eval_every` steps.
    pub val_path: String,
    /// Seed of the data stream; the rows of step t depend only on (seed, t).
    pub seed: u64,
    /// markov: number of symbols the chain uses (≤ model vocab).
    pub markov_symbols: usize,
    /// markov: scale of the transition logits; higher means more predictable (lower entropy).
    pub markov_sharpness: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: "markov".into(),
            path: String::new(),
            val_path: String::new(),
            seed: 1234,
            markov_symbols: 64,
            markov_sharpness: 2.0,
        }
    }
}

/// `[train]`: batch sizes, schedule and optimizer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per optimizer step over all ranks (= micro_batch × grad_accum × world). Any two
    /// of global_batch, micro_batch and grad_accum determine the third (DeepSpeed's rule); with
    /// fewer, micro_batch defaults to 8 and then grad_accum to 1, or global_batch to 8 when
    /// none is given.
    pub global_batch: Option<usize>,
    /// Sequences per forward/backward on one rank, or `"auto"`: the largest that divides each
    /// rank's share of the global batch and whose memory estimate fits what the process may use
    /// (with a 15% margin), gradient accumulation making up the rest (the built-in GPT, whose
    /// activations kiln can estimate).
    pub micro_batch: Option<MicroBatch>,
    /// Micro-batches per optimizer step on each rank.
    pub grad_accum: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    /// `cosine` (linear warmup, cosine decay to `lr × min_lr_ratio`; nanoGPT's), `constant`
    /// (linear warmup, then `lr`), or DeepSpeed's `warmup` (WarmupLR), `warmup_decay`
    /// (WarmupDecayLR), `warmup_cosine` (WarmupCosineLR) with their exact formulas.
    pub schedule: String,
    /// Final learning rate of `cosine` and `warmup_cosine`, as a fraction of `lr` (DeepSpeed's
    /// cos_min_ratio).
    pub min_lr_ratio: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// The step at which the decay of `cosine`, `warmup_decay` and `warmup_cosine` ends
    /// (nanoGPT's lr_decay_iters, DeepSpeed's total_num_steps); default `train.steps`.
    pub decay_steps: Option<u64>,
    /// DeepSpeed schedules: `log` (their default) or `linear` rise during warmup.
    pub warmup_type: Option<String>,
    /// `warmup`, `warmup_decay`: learning rate at the start of warmup (default 0);
    /// `warmup_decay` also decays back to it (DeepSpeed's warmup_min_lr).
    pub warmup_min_lr: Option<f64>,
    /// `warmup_cosine`: learning rate at the start of warmup as a fraction of `lr` (default 0;
    /// DeepSpeed's warmup_min_ratio).
    pub warmup_min_ratio: Option<f64>,
    /// The optimizer: `adamw` (PyTorch's AdamW; 8 bytes of state per parameter), `adamw8bit`
    /// (bitsandbytes' AdamW8bit: m and v quantized to 8 bits in blocks of 256; about 2 bytes
    /// per parameter) or `lion` (Lion: one moment, sign updates; 4 bytes per parameter — use
    /// a learning rate 3–10× smaller than AdamW's, and beta2 = 0.99).
    pub optimizer: String,
    /// Decoupled weight decay (not applied to biases and LayerNorm gains).
    pub weight_decay: f64,
    /// beta1: the decay of the first moment (Lion: the interpolation of the update).
    pub beta1: f64,
    /// beta2: the decay of the second moment (Lion: of its one moment).
    pub beta2: f64,
    /// AdamW epsilon (unused by Lion).
    pub eps: f64,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// Compute the validation loss on `data.val_path` before the first step, every this many
    /// steps and after the last; 0 turns validation off.
    pub eval_every: u64,
    /// Validation rows, in global batches: the first `eval_batches × global_batch` windows of
    /// seq_len + 1 tokens of `data.val_path` (stride seq_len), the same rows at every
    /// evaluation and every world size.
    pub eval_batches: usize,
    /// Which units recompute their forward in backward instead of keeping activations:
    /// `false` (default), `true`, `"every:K"` or a list of unit names; see [`Recompute`].
    pub recompute: Recompute,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    pub clip_grad: f64,
    /// Compute threads per rank; 0 means cores ÷ ranks on this node. At most the cores this
    /// process may use.
    pub threads: usize,
    /// Before allocating, estimate each rank's memory and refuse a run that cannot fit the
    /// memory this process may use (its cgroup limit, else MemAvailable), naming a setting that
    /// would. `false` skips the check, for when you know better than the estimate.
    pub preflight: bool,
    /// Where each rank computes: `auto` (a CUDA GPU when kiln is built with the `cuda` feature
    /// and one is visible, else the CPU), `cpu`, or `cuda` (an error without a GPU). Each rank
    /// takes GPU `local rank % visible GPUs`. Parameters, gradients, collectives and AdamW stay
    /// in host memory; each unit's parameters are uploaded before it runs.
    pub device: String,
    /// Keep memory that tensors free for the next step's tensors instead of handing it back
    /// to the kernel (like PyTorch's CUDA caching allocator): no page faults and page zeroing
    /// inside a step, but the resident set stays at its high-water mark, so every phase's peak
    /// in metrics.jsonl reads as that mark. See `memory::allocator`.
    pub keep_freed_memory: bool,
    /// Parameters not to train (partial fine-tuning): unit names (`embed`, `blocks.0`, `head`)
    /// or module paths (`model.layers.0.mlp`). Frozen parameters get no gradient, bucket slot
    /// or optimizer state; ZeRO-3 still shards them. Models trained through the library API
    /// (Llama-family checkpoints, your own burn model).
    pub freeze: Vec<String>,
    /// The dtype the forward and backward compute in: `f32`, or `bf16` / `fp16` with f32 master
    /// weights, gradients, optimizer state and step (FSDP2's `MixedPrecisionPolicy(param_dtype
    /// = bfloat16)`); fp16 with loss scaling (`[fp16]`). Library-API models (Llama family,
    /// your own burn model).
    pub precision: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            global_batch: None,
            micro_batch: None,
            grad_accum: None,
            lr: 1e-3,
            schedule: "cosine".into(),
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            decay_steps: None,
            warmup_type: None,
            warmup_min_lr: None,
            warmup_min_ratio: None,
            optimizer: "adamw".into(),
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            eval_every: 0,
            eval_batches: 8,
            recompute: Recompute::Off,
            clip_grad: 1.0,
            threads: 0,
            preflight: true,
            device: "auto".into(),
            keep_freed_memory: false,
            freeze: Vec::new(),
            precision: "f32".into(),
        }
    }
}

/// `[parallel]`: how the ranks share the work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// 0 = DDP, 1 = optimizer states sharded, 2 = + gradients, 3 = + parameters.
    pub stage: u8,
    /// Gradient bucket size in MiB (the first bucket is capped at 1 MiB).
    pub bucket_mb: f64,
    /// Record the bucket plan on the first step and reuse it (PyTorch's static_graph).
    pub static_graph: bool,
    /// Stage 3: units gathered ahead of the one running.
    pub prefetch: usize,
    /// Stage 3: units with fewer parameters than this stay whole on every rank.
    pub persist_threshold: usize,
    /// Stage 3 (FSDP2's knob of the same name): `true` (default) releases a unit's gathered
    /// parameters after its forward and gathers it again for its backward (its graph keeps the
    /// activations and the small LayerNorm parameters, not the weight matrices; the embedding,
    /// whose lookup keeps its table, is recomputed); `false` keeps the unit's parameters in its
    /// forward graph until its backward (no second gather; within a step every parameter is held
    /// whole at the peak, as in ZeRO-2; parameters are still sharded between steps).
    pub reshard_after_forward: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            stage: 0,
            bucket_mb: 25.0,
            static_graph: true,
            prefetch: 1,
            persist_threshold: 0,
            reshard_after_forward: true,
        }
    }
}

/// `[offload]`: where optimizer states and (stage 3) parameters live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// Optimizer states: `none`, `cpu` or `nvme`.
    pub optimizer: String,
    /// ZeRO-3's parameter shards (the f32 masters): `none`, `cpu` (on this CPU backend the same
    /// memory as `none`) or `nvme` (a file per rank, read for each gather, one unit at a time
    /// in the optimizer step). With `optimizer = "nvme"` this is ZeRO-Infinity.
    pub param: String,
    /// Directory for the nvme tiers' files.
    pub nvme_path: String,
    /// nvme: chunk size streamed per I/O, MiB.
    pub chunk_mb: f64,
    /// nvme: number of chunk buffers in flight.
    pub buffer_count: usize,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            optimizer: "none".into(),
            param: "none".into(),
            nvme_path: "/tmp".into(),
            chunk_mb: 4.0,
            buffer_count: 4,
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory holding one sub-directory per saved step; empty disables checkpoints.
    pub dir: String,
    /// Save every this many steps; 0 saves only at the end.
    pub every: u64,
    /// Keep the last K checkpoints.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: String::new(),
            every: 0,
            keep: 3,
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Directory for metrics.jsonl and summary.json (rank 0 writes them).
    pub dir: String,
    /// Write the final parameters to this safetensors file; empty disables it.
    pub export: String,
    /// Rank 0 logs a line (loss, lr, grad norm, step time split) every this many steps; 0 = never.
    /// Useful where there is no terminal for the progress bar (batch jobs, `--quiet`).
    pub log_every: u64,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: "runs/latest".into(),
            export: String::new(),
            log_every: 0,
        }
    }
}

/// `[comm]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CommConfig {
    /// `auto` (mpi under mpirun/srun, local otherwise), `local`, `mpi` or `nccl`.
    pub backend: String,
    /// Check before every collective that all ranks call the same operation with the same
    /// length (PyTorch's TORCH_DISTRIBUTED_DEBUG=DETAIL). Costs one small exchange per call.
    pub verify: bool,
    /// Seconds one collective may take before the watchdog reports where every rank is and ends
    /// the job (NCCL's default, 600; twice that during start-up and the first step).
    pub timeout_s: f64,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            backend: "auto".into(),
            verify: false,
            timeout_s: 600.0,
        }
    }
}

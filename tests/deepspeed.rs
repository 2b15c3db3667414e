//! DeepSpeed configs as its documentation writes them, read by `--deepspeed`: each trains
//! bitwise the same as the kiln recipe that says the same thing; keys kiln cannot honour are
//! one-line errors naming them; DeepSpeed's learning-rate schedules give DeepSpeed's numbers.

mod common;

use common::{bitwise_equal, Scratch, QUIET, TEST_MODEL};
use kiln::config::{self, Config};
use kiln::launch;
use kiln::plan::Plan;
use std::path::Path;
use std::process::Command;

/// `common::TEST_MODEL` (units not multiples of the world size), 12 steps.
fn model_keys() -> Vec<String> {
    let mut keys = strings(TEST_MODEL);
    keys.extend(strings(&["train.steps=12", "train.threads=1"]));
    keys
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn assert_warned(warnings: &[String], keys: &[&str]) {
    for key in keys {
        assert!(
            warnings.iter().any(|w| w.contains(&format!("`{key}`"))),
            "no warning for {key}: {warnings:?}"
        );
    }
}

fn write(dir: &Scratch, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, text).expect("write test file");
    p
}

/// The config from a DeepSpeed file on top of the test model, and what it warned about.
fn from_deepspeed(ds: &Path) -> (Config, Vec<String>) {
    let (c, t) =
        kiln::plan::load_layers(None, Some(ds), &model_keys()).expect("valid DeepSpeed config");
    (c, t.warnings)
}

fn from_recipe(keys: &[&str]) -> Config {
    let mut sets = model_keys();
    sets.extend(strings(keys));
    config::load(None, &sets).expect("valid recipe")
}

/// Trains both configs with 2 local ranks and demands the same bits: every loss and every
/// final parameter.
fn assert_trains_the_same(ds: &Config, recipe: &Config) {
    assert_eq!(
        ds, recipe,
        "the DeepSpeed file and the recipe resolve differently"
    );
    let a = launch::simulate(ds, 2, &QUIET)
        .expect("DeepSpeed run")
        .swap_remove(0);
    let b = launch::simulate(recipe, 2, &QUIET)
        .expect("recipe run")
        .swap_remove(0);
    assert_eq!(a.losses.len(), 12);
    assert!(
        bitwise_equal(&a.losses, &b.losses),
        "{:?} vs {:?}",
        a.losses,
        b.losses
    );
    for (u, (x, y)) in a.params.iter().zip(&b.params).enumerate() {
        assert!(bitwise_equal(x, y), "unit {u} differs");
    }
}

#[test]
fn stage_2_with_cpu_offload_equals_its_recipe() {
    let dir = Scratch::new("ds-stage2");
    // Shaped like DeepSpeed's ZeRO-Offload tutorial config.
    let ds = write(
        &dir,
        "ds.json",
        r#"{
  "train_batch_size": 8,
  "train_micro_batch_size_per_gpu": 2,
  "gradient_accumulation_steps": 2,
  "gradient_clipping": 0.5,
  "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
  "scheduler": {"type": "WarmupDecayLR",
                "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 4, "total_num_steps": 10, "warmup_type": "linear"}},
  "zero_optimization": {
    "stage": 2,
    "allgather_partitions": true,
    "allgather_bucket_size": 2e8,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 2048,
    "contiguous_gradients": true,
    "offload_optimizer": {"device": "cpu", "pin_memory": true}
  },
  "bf16": {"enabled": false},
  "fp16": {"enabled": false, "loss_scale": 0},
  "steps_per_print": 5,
  "wall_clock_breakdown": false
}"#,
    );
    let (ds, warnings) = from_deepspeed(&ds);
    let recipe = from_recipe(&[
        "train.global_batch=8",
        "train.micro_batch=2",
        "train.grad_accum=2",
        "train.clip_grad=0.5",
        "train.lr=0.01",
        "train.beta1=0.9",
        "train.beta2=0.95",
        "train.eps=1e-8",
        "train.weight_decay=0.1",
        "train.schedule=\"warmup_decay\"",
        "train.warmup_min_lr=0.001",
        "train.warmup_steps=4",
        "train.decay_steps=10",
        "train.warmup_type=\"linear\"",
        "parallel.stage=2",
        "parallel.bucket_mb=0.0078125", // 2048 elements × 4 bytes
        "offload.optimizer=\"cpu\"",
        "output.log_every=5",
    ]);
    assert_trains_the_same(&ds, &recipe);
    assert_warned(
        &warnings,
        &[
            "zero_optimization.allgather_partitions",
            "zero_optimization.allgather_bucket_size",
            "zero_optimization.offload_optimizer.pin_memory",
        ],
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

#[test]
fn stage_3_with_nvme_offload_equals_its_recipe() {
    let dir = Scratch::new("ds-stage3");
    let nvme = dir.path("nvme");
    std::fs::create_dir_all(&nvme).unwrap();
    // Shaped like DeepSpeed's ZeRO-Infinity config (optimizer states on NVMe).
    let text = r#"{
  "train_micro_batch_size_per_gpu": 2,
  "gradient_accumulation_steps": 1,
  "optimizer": {"type": "Adam", "params": {"lr": 0.02, "weight_decay": 0.01}},
  "scheduler": {"type": "WarmupCosineLR",
                "params": {"total_num_steps": 12, "warmup_num_steps": 3, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.05}},
  "zero_optimization": {
    "stage": 3,
    "contiguous_gradients": true,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_prefetch_bucket_size": 2000,
    "stage3_param_persistence_threshold": 100,
    "sub_group_size": 1e9,
    "offload_optimizer": {"device": "nvme", "nvme_path": "NVME", "pin_memory": false, "buffer_count": 3},
    "offload_param": {"device": "none"}
  },
  "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": false, "overlap_events": true}
}"#
    .replace("NVME", nvme.to_str().unwrap());
    let ds = write(&dir, "ds.json", &text);
    let (ds, warnings) = from_deepspeed(&ds);
    // One block of the test model has 12·d² + 12·d = 5544 parameters (d = 21): 2000 elements
    // are less than one unit, and kiln prefetches whole units, at least one.
    let nvme_set = format!("offload.nvme_path=\"{}\"", nvme.display());
    let recipe = from_recipe(&[
        "train.micro_batch=2",
        "train.grad_accum=1",
        "train.lr=0.02",
        "train.weight_decay=0.01",
        "train.schedule=\"warmup_cosine\"",
        "train.warmup_steps=3",
        "train.decay_steps=12",
        "train.warmup_min_ratio=0.1",
        "train.min_lr_ratio=0.05",
        "train.warmup_type=\"log\"", // DeepSpeed's default
        "parallel.stage=3",
        "parallel.prefetch=1",
        "parallel.persist_threshold=100",
        "offload.optimizer=\"nvme\"",
        &nvme_set,
        "offload.buffer_count=3",
    ]);
    assert_trains_the_same(&ds, &recipe);
    assert_eq!(
        Plan::resolve(&ds, 2).unwrap().global_batch,
        4,
        "micro 2 × accum 1 × world 2"
    );
    assert_warned(
        &warnings,
        &[
            "zero_optimization.stage3_max_live_parameters",
            "zero_optimization.stage3_max_reuse_distance",
            "zero_optimization.sub_group_size",
            "aio",
        ],
    );
}

/// LLaMA-Factory's `examples/deepspeed/ds_z3_offload_config.json`, as users bring it (ZeRO-3,
/// optimizer and parameters offloaded to the CPU, "auto" everywhere the Hugging Face Trainer
/// fills in), runs as is and equals its recipe bit for bit.
#[test]
fn llama_factorys_zero3_offload_config_runs_as_is() {
    let dir = Scratch::new("ds-llama-factory");
    let text = r#"{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "zero_allow_untested_optimizer": true,
  "fp16": {
    "enabled": "auto",
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1
  },
  "bf16": {
    "enabled": "auto"
  },
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": {
      "device": "cpu",
      "pin_memory": true
    },
    "offload_param": {
      "device": "cpu",
      "pin_memory": true
    },
    "overlap_comm": false,
    "contiguous_gradients": true,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": true
  },
  "comms_config": {
    "verbose": false
  },
  "monitor_config": {
    "enabled": true,
    "tag": "DeepSpeedMonitor",
    "csv_monitor": {
      "enabled": false
    }
  }
}"#;
    let ds = write(&dir, "ds_z3_offload_config.json", text);
    let mut sets = model_keys();
    sets.extend(strings(&["train.micro_batch=2"]));
    let (ds, _) = kiln::plan::load_layers(None, Some(&ds), &sets).expect("runs as is");
    let recipe = from_recipe(&[
        "train.micro_batch=2",
        "train.schedule=\"constant\"", // no scheduler section: DeepSpeed's constant rate
        "train.warmup_steps=0",
        "parallel.stage=3",
        "offload.optimizer=\"cpu\"",
        "offload.param=\"cpu\"",
    ]);
    assert_trains_the_same(&ds, &recipe);
}

#[test]
fn auto_values_take_kilns_own() {
    let dir = Scratch::new("ds-auto");
    // What the Hugging Face Trainer's DeepSpeed integration documents: "auto" everywhere it
    // would fill a value in from its TrainingArguments.
    let ds = write(
        &dir,
        "ds.json",
        r#"{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
  "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
  "zero_optimization": {
    "stage": 1,
    "overlap_comm": "auto",
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto"
  },
  "bf16": {"enabled": "auto"},
  "fp16": {"enabled": "auto"}
}"#,
    );
    let kiln_values = [
        "train.global_batch=8",
        "train.micro_batch=2",
        "train.clip_grad=0.7",
        "train.lr=0.015",
        "train.beta2=0.98",
        "train.warmup_steps=5",
    ];
    let mut sets = model_keys();
    sets.extend(strings(&kiln_values));
    let (ds, t) = kiln::plan::load_layers(None, Some(&ds), &sets).expect("valid");
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let mut recipe_keys = kiln_values.to_vec();
    recipe_keys.extend([
        "train.schedule=\"warmup\"",
        "train.warmup_type=\"log\"",
        "parallel.stage=1",
    ]);
    assert_trains_the_same(&ds, &from_recipe(&recipe_keys));
}

/// `bf16.enabled` / `fp16.enabled` true set `train.precision`; `"auto"` leaves kiln's
/// setting (fp16's scaling keys are still read, for when kiln's precision is fp16).
#[test]
fn the_bf16_and_fp16_sections_set_the_precision() {
    let dir = Scratch::new("ds-bf16");
    for (json, want) in [
        (r#"{"bf16": {"enabled": true}}"#, "bf16"),
        (r#"{"bf16": {"enabled": "auto"}}"#, "f32"),
        (r#"{"bf16": {"enabled": false}}"#, "f32"),
    ] {
        let ds = write(&dir, "ds.json", json);
        let (config, _) = kiln::plan::load_layers(None, Some(&ds), &[]).expect("valid");
        assert_eq!(config.train.precision, want, "{json}");
    }
    // transformers' tests/deepspeed/ds_config_zero3.json fp16 section, switched on.
    let ds = write(
        &dir,
        "ds.json",
        r#"{"fp16": {"enabled": true, "loss_scale": 0, "loss_scale_window": 1000,
                     "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1}}"#,
    );
    let (config, _) = kiln::plan::load_layers(None, Some(&ds), &[]).expect("valid");
    assert_eq!(config.train.precision, "fp16");
    assert_eq!(config.fp16, kiln::config::Fp16Config::default());
    let ds = write(
        &dir,
        "ds.json",
        r#"{"fp16": {"enabled": "auto", "initial_scale_power": 12}}"#,
    );
    let (config, _) = kiln::plan::load_layers(None, Some(&ds), &[]).expect("valid");
    assert_eq!(
        (
            config.train.precision.as_str(),
            config.fp16.initial_scale_power
        ),
        ("f32", 12)
    );
}

#[test]
fn precedence_is_recipe_then_deepspeed_then_set() {
    let dir = Scratch::new("ds-precedence");
    let recipe = write(
        &dir,
        "base.toml",
        "[train]\nlr = 0.5\nclip_grad = 0.25\n[parallel]\nstage = 1\n",
    );
    let ds = write(
        &dir,
        "ds.json",
        r#"{"optimizer": {"type": "AdamW", "params": {"lr": 0.004}}, "zero_optimization": {"stage": 2}}"#,
    );
    let (c, _) =
        kiln::plan::load_layers(Some(&recipe), Some(&ds), &strings(&["parallel.stage=3"])).unwrap();
    assert_eq!(c.train.lr, 0.004, "the DeepSpeed file overrides the recipe");
    assert_eq!(c.train.clip_grad, 0.25, "what DeepSpeed does not say stays");
    assert_eq!(c.parallel.stage, 3, "--set overrides the DeepSpeed file");
    assert_eq!(
        c.train.schedule, "constant",
        "no scheduler: DeepSpeed's constant rate"
    );
    assert_eq!(c.train.warmup_steps, 0);
}

/// One case per key kiln refuses: (JSON, text the error line must contain).
const REFUSED: &[(&str, &str)] = &[
    (
        r#"{"zero_optimization": {"offload_param": {"device": "disk"}}}"#,
        "`zero_optimization.offload_param.device`: `disk`",
    ),
    (
        r#"{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}, "offload_param": {"device": "nvme", "nvme_path": "/var/tmp"}}}"#,
        "one offload.nvme_path",
    ),
    (
        r#"{"fp16": {"enabled": true, "fp16_master_weights_and_grads": true}}"#,
        "`fp16.fp16_master_weights_and_grads`",
    ),
    (
        r#"{"bf16": {"enabled": true, "bf16_master_weights_and_grads": true}}"#,
        "`bf16.bf16_master_weights_and_grads`",
    ),
    (
        r#"{"optimizer": {"type": "Lamb", "params": {"lr": 0.001}}}"#,
        "`optimizer.type`: `Lamb`",
    ),
    (
        r#"{"optimizer": {"type": "Adam", "params": {"adam_w_mode": false, "weight_decay": 0.01}}}"#,
        "`optimizer.params.adam_w_mode`",
    ),
    (
        r#"{"optimizer": {"type": "AdamW", "params": {"bias_correction": false}}}"#,
        "`optimizer.params.bias_correction`",
    ),
    (
        r#"{"scheduler": {"type": "OneCycle", "params": {}}}"#,
        "`scheduler.type`: `OneCycle`",
    ),
    (
        r#"{"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}}"#,
        "`scheduler.params.total_num_steps`",
    ),
    (
        r#"{"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}}"#,
        "`scheduler.params.warmup_type`",
    ),
    (
        r#"{"activation_checkpointing": {"cpu_checkpointing": true}}"#,
        "`activation_checkpointing.cpu_checkpointing`",
    ),
    (
        r#"{"zero_optimization": {"stage": 4}}"#,
        "`zero_optimization.stage`",
    ),
    (
        r#"{"zero_optimization": {"zero_quantized_weights": true}}"#,
        "`zero_optimization.zero_quantized_weights`",
    ),
    (
        r#"{"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.3}}}"#,
        "`zero_optimization.offload_optimizer.ratio`",
    ),
    (
        r#"{"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}"#,
        "`zero_optimization.offload_optimizer.device`",
    ),
    (
        r#"{"communication_data_type": "fp16"}"#,
        "`communication_data_type`",
    ),
    (
        r#"{"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}"#,
        "`train.global_batch` = 64, `train.micro_batch` = 8 and `train.grad_accum` = 2 disagree",
    ),
    (
        r#"{"train_batch_size": 12.5}"#,
        "`train_batch_size`: expected a whole number",
    ),
    (
        r#"{"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}}"#,
        "`optimizer.params.betas`",
    ),
    (r#"[1, 2]"#, "expected a JSON object"),
    (r#"{"train_batch_size": 8,}"#, "not valid JSON"),
];

#[test]
fn keys_kiln_cannot_honour_are_one_line_errors() {
    let dir = Scratch::new("ds-refused");
    for (i, (json, expected)) in REFUSED.iter().enumerate() {
        let ds = write(&dir, &format!("ds{i}.json"), json);
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "--deepspeed"])
            .arg(&ds)
            .arg("--set")
            .arg(format!(
                "output.dir={}",
                dir.path(&format!("out{i}")).display()
            ))
            .env("KILN_LOG", "warn")
            .output()
            .expect("run kiln");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{json}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{json}: {stderr}");
        assert!(stderr.contains(expected), "{json}: {stderr}");
        assert!(
            !dir.path(&format!("out{i}")).exists(),
            "{json}: wrote outputs"
        );
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "--deepspeed", "/nonexistent/ds.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr.contains("/nonexistent/ds.json") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn kiln_config_prints_a_recipe_that_resolves_the_same() {
    let dir = Scratch::new("ds-print");
    let ds = write(
        &dir,
        "ds.json",
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.8, 0.99]}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 50, "warmup_num_steps": 5}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e5, "round_robin_gradients": true},
            "activation_checkpointing": {"partition_activations": false, "number_checkpoints": 4}}"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "--config", "configs/tiny.toml", "--deepspeed"])
        .arg(&ds)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for key in [
        "zero_optimization.round_robin_gradients",
        "activation_checkpointing.number_checkpoints",
    ] {
        assert!(
            stderr.contains(&format!("`{key}`")),
            "no warning for {key}: {stderr}"
        );
    }
    let printed = write(&dir, "printed.toml", &String::from_utf8_lossy(&out.stdout));
    let reread = config::load(Some(&printed), &[]).expect("the printed recipe loads");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let (direct, _) = kiln::plan::load_layers(Some(&tiny), Some(&ds), &[]).unwrap();
    assert_eq!(reread, direct);
    assert!(
        direct.train.recompute == config::Recompute::All,
        "activation_checkpointing switches recompute on"
    );
    assert_eq!(direct.parallel.bucket_mb, 5e5 * 4.0 / (1 << 20) as f64);
}

/// Learning rates of optimizer steps, printed by DeepSpeed's own `deepspeed/runtime/lr_schedules.py`
/// (deepspeedai/DeepSpeed, 2026-08) driven as its engine drives it: the rate in the optimizer at
/// step t, then `scheduler.step()`. kiln must give the same f64 bits.
#[test]
fn deepspeed_schedules_give_deepspeeds_numbers() {
    let schedule = |keys: &[&str], steps: u64| {
        let mut sets = model_keys();
        sets.extend(strings(keys));
        sets.push(format!("train.steps={steps}"));
        Plan::resolve(&config::load(None, &sets).unwrap(), 1)
            .unwrap()
            .schedule
    };
    let check = |name: &str, s: kiln::optim::LrSchedule, expected: &[(u64, f64)]| {
        for &(t, lr) in expected {
            assert_eq!(
                s.at(t).to_bits(),
                lr.to_bits(),
                "{name} step {t}: {} vs {lr}",
                s.at(t)
            );
        }
    };
    // WarmupLR(warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=10)
    check(
        "WarmupLR log",
        schedule(
            &[
                "train.schedule=\"warmup\"",
                "train.warmup_min_lr=0.001",
                "train.lr=0.01",
                "train.warmup_steps=10",
                "train.warmup_type=\"log\"",
            ],
            30,
        ),
        &[
            (0, 0.001),
            (1, 0.001),
            (2, 0.0037092699609758304),
            (5, 0.007290730039024168),
            (10, 0.009999999999999998),
            (11, 0.010000000000000002),
            (29, 0.010000000000000002),
        ],
    );
    // WarmupLR(warmup_min_lr=0, warmup_num_steps=10, warmup_type='linear') on lr 0.02
    check(
        "WarmupLR linear",
        schedule(
            &[
                "train.schedule=\"warmup\"",
                "train.lr=0.02",
                "train.warmup_steps=10",
                "train.warmup_type=\"linear\"",
            ],
            30,
        ),
        &[
            (0, 0.0),
            (1, 0.0),
            (2, 0.002),
            (5, 0.008),
            (10, 0.018000000000000002),
            (11, 0.02),
            (29, 0.02),
        ],
    );
    // WarmupDecayLR(total_num_steps=100, warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=10, 'linear')
    check(
        "WarmupDecayLR",
        schedule(
            &[
                "train.schedule=\"warmup_decay\"",
                "train.warmup_min_lr=0.001",
                "train.lr=0.01",
                "train.warmup_steps=10",
                "train.decay_steps=100",
                "train.warmup_type=\"linear\"",
            ],
            120,
        ),
        &[
            (0, 0.001),
            (1, 0.001),
            (10, 0.0091),
            (11, 0.010000000000000002),
            (12, 0.009900000000000003),
            (51, 0.006000000000000001),
            (100, 0.0011),
            (101, 0.001),
            (110, 0.001),
        ],
    );
    // WarmupCosineLR(total_num_steps=110, warmup_min_ratio=0.1, warmup_num_steps=10, cos_min_ratio=0.01) on lr 0.003
    check(
        "WarmupCosineLR",
        schedule(
            &[
                "train.schedule=\"warmup_cosine\"",
                "train.lr=0.003",
                "train.warmup_steps=10",
                "train.decay_steps=110",
                "train.warmup_min_ratio=0.1",
                "train.min_lr_ratio=0.01",
            ],
            130,
        ),
        &[
            (0, 0.0),
            (1, 0.00030000000000000003),
            (2, 0.0011127809882927491),
            (5, 0.0021872190117072504),
            (10, 0.0029999999999999996),
            (11, 0.0029992672421431115),
            (12, 0.0029970696917159833),
            (61, 0.0014683550227689796),
            (110, 3e-05),
            (129, 3e-05),
        ],
    );
}

#[test]
fn schedule_keys_that_would_do_nothing_are_errors() {
    for (sets, expected) in [
        (&["train.warmup_type=\"linear\""][..], "`train.warmup_type`: applies to train.schedule = warmup | warmup_decay | warmup_cosine, not `cosine`"),
        (&["train.schedule=\"warmup\"", "train.decay_steps=50"][..], "`train.decay_steps`"),
        (&["train.schedule=\"warmup_cosine\"", "train.warmup_min_lr=0.1"][..], "`train.warmup_min_lr`"),
        (&["train.schedule=\"step\""][..], "`train.schedule`: `step` is not one of"),
    ] {
        let e = Plan::resolve(&from_recipe(sets), 1).unwrap_err().to_string();
        assert!(e.contains(expected), "{sets:?}: {e}");
    }
}

#[test]
fn any_two_batch_keys_determine_the_third() {
    let batch = |keys: &[&str], world| {
        Plan::resolve(&from_recipe(keys), world)
            .map(|p| (p.global_batch, p.micro_batch, p.grad_accum))
    };
    assert_eq!(
        batch(&["train.global_batch=24", "train.micro_batch=4"], 3).unwrap(),
        (24, 4, 2)
    );
    assert_eq!(
        batch(&["train.global_batch=24", "train.grad_accum=2"], 3).unwrap(),
        (24, 4, 2)
    );
    assert_eq!(
        batch(&["train.micro_batch=4", "train.grad_accum=2"], 3).unwrap(),
        (24, 4, 2)
    );
    assert_eq!(
        batch(
            &[
                "train.global_batch=24",
                "train.micro_batch=4",
                "train.grad_accum=2"
            ],
            3
        )
        .unwrap(),
        (24, 4, 2)
    );
    assert_eq!(
        batch(&["train.micro_batch=4"], 3).unwrap(),
        (12, 4, 1),
        "one key: accumulation 1"
    );
    assert_eq!(batch(&[], 1).unwrap(), (8, 8, 1), "kiln's defaults");
    let e = batch(&["train.global_batch=24", "train.grad_accum=5"], 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`train.global_batch`: 24 is not a positive multiple of train.grad_accum (5) × world size (3)"), "{e}");
}

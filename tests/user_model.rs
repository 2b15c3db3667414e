//! A model written only against kiln's public API (`kiln::api`) — not a GPT: a frozen
//! submodule, a parameter shared by two units, 2-D activations and its own batch type. It is
//! held to the same contract as the built-in GPT: one process ≈ N ranks (1e-5, the tolerance of
//! tests/ddp_equivalence.rs), every ZeRO stage and offload tier bitwise equal to DDP at the same
//! N, checkpoints that reshard, frozen parameters untouched and without gradient or optimizer
//! bytes, and one-line errors for a wrong unit split.

mod common;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::api::{BatchSource, Fit, RankInfo, RunOptions, RunOutcome, TrainModule, Trainer, Unit};
use std::ops::Range;

const IN: usize = 7;
const H1: usize = 10;
const H2: usize = 13;

/// `embed` = proj (trainable) + mix (frozen); `body` = dense + norm; `head` = out, whose
/// logits are read through `proj.weight` transposed (a tied weight the head borrows).
#[derive(Module, Debug)]
struct Net {
    proj: Linear,
    mix: Linear,
    dense: Linear,
    norm: LayerNorm,
    out: Linear,
    /// How the model splits; the error tests change it.
    #[module(skip)]
    split: Split,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Split {
    #[default]
    Good,
    Orphan,
    Twice,
    BorrowLater,
    Undeclared,
    NotScalar,
    /// The frozen `mix` as a unit of its own: a unit with no trainable parameter.
    FrozenUnit,
    /// The whole model as one unit.
    Whole,
}

impl Net {
    /// Values from (seed, path, index) alone: burn's initialisers draw from one process-wide
    /// RNG, which the other tests of this binary share.
    fn new(seed: u64, split: Split) -> Self {
        let device = Device::flex();
        let net = Net {
            proj: LinearConfig::new(IN, H1).init(&device),
            mix: LinearConfig::new(H1, H1).init(&device).no_grad(),
            dense: LinearConfig::new(H1, H2).init(&device),
            norm: LayerNormConfig::new(H2).init(&device),
            out: LinearConfig::new(H2, H1).init(&device),
            split,
        };
        net.map(&mut Seeded {
            seed,
            path: Vec::new(),
        })
    }
}

struct Seeded {
    seed: u64,
    path: Vec<String>,
}

impl ModuleMapper for Seeded {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let key = path.bytes().fold(self.seed, |h, b| mix64(h ^ b as u64));
        // Norm gains start at 1 as LayerNorm's do; everything else uniform in ±0.3.
        let gain = path == "norm.gamma";
        p.map(|t| {
            let (shape, device) = (t.shape(), t.device());
            let values: Vec<f32> = (0..shape.num_elements() as u64)
                .map(|i| match gain {
                    true => 1.0,
                    false => ((mix64(key ^ i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6,
                })
                .collect();
            Tensor::from_data(TensorData::new(values, shape), &device)
        })
    }
}

struct Batch {
    x: Tensor<2>,
    y: Tensor<1, Int>,
}

impl TrainModule for Net {
    type Batch = Batch;
    type Activation = Tensor<2>;

    fn units(&self) -> Vec<Unit> {
        let head = match self.split {
            Split::Undeclared => Unit::new("out"),
            _ => Unit::new("out").borrowing("proj.weight"),
        };
        let embed = match self.split {
            Split::Twice => Unit::with_paths("embed", ["proj", "mix", "dense.bias"]),
            _ => Unit::with_paths("embed", ["proj", "mix"]),
        };
        let body = match self.split {
            Split::Orphan => Unit::with_paths("body", ["dense"]),
            _ => Unit::with_paths("body", ["dense", "norm"]),
        };
        match self.split {
            Split::BorrowLater => vec![embed.borrowing("out.weight"), body, head],
            Split::FrozenUnit => vec![Unit::new("proj"), Unit::new("mix"), body, head],
            Split::Whole => vec![Unit::whole_model("model")],
            _ => vec![embed, body, head],
        }
    }

    fn forward_unit(&self, unit: usize, input: Option<Tensor<2>>, b: &Batch) -> Tensor<2> {
        if self.split == Split::Whole {
            let mut split = self.clone();
            split.split = Split::Good;
            let h = split.forward_unit(0, None, b);
            let h = split.forward_unit(1, Some(h), b);
            return split.forward_unit(2, Some(h), b);
        }
        // The same function whether `mix` is part of the first unit or a unit of its own.
        let (unit, input) = match (self.split, unit) {
            (Split::FrozenUnit, 0) => return self.proj.forward(b.x.clone()).tanh(),
            (Split::FrozenUnit, 1) => {
                let h = input.unwrap();
                return h.clone() + self.mix.forward(h) * 0.5;
            }
            (Split::FrozenUnit, u) => (u - 1, input),
            (_, u) => (u, input),
        };
        match unit {
            0 => {
                let h = self.proj.forward(b.x.clone()).tanh();
                h.clone() + self.mix.forward(h) * 0.5
            }
            1 => self.norm.forward(self.dense.forward(input.unwrap())).tanh(),
            _ => {
                let h = self.out.forward(input.unwrap());
                // [batch, H1] · proj.weightᵀ [H1, IN]: the tied read.
                let logits = h.matmul(self.proj.weight.val().transpose());
                if self.split == Split::NotScalar {
                    return logits;
                }
                let [n, _] = logits.dims();
                let nll = log_softmax(logits, 1)
                    .gather(1, b.y.clone().reshape([n, 1]))
                    .neg();
                nll.mean().reshape([1, 1])
            }
        }
    }
}

/// Row i of step t: features from (seed, t, i) alone; the label is the argmax of a fixed
/// linear map of them, so the task is learnable.
struct Rows {
    seed: u64,
    /// Features per row: the model reads IN; a wrong source gives another number.
    features: usize,
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl BatchSource for Rows {
    type Batch = Batch;

    fn batch(&self, step: u64, rows: Range<u64>, device: &Device) -> kiln::error::Result<Batch> {
        let n = (rows.end - rows.start) as usize;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for row in rows {
            let x: Vec<f32> = (0..self.features as u64)
                .map(|j| {
                    let h = mix64(self.seed ^ mix64(step ^ mix64(row ^ mix64(j))));
                    (h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect();
            let score = |c: usize| {
                (0..IN)
                    .map(|j| x[j] * (((c * 7 + j * 3) % 5) as f32 - 2.0))
                    .sum::<f32>()
            };
            let label = (0..IN)
                .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                .unwrap();
            xs.extend(x);
            ys.push(label as i64);
        }
        Ok(Batch {
            x: Tensor::from_data(TensorData::new(xs, [n, self.features]), device),
            y: Tensor::from_data(TensorData::new(ys, [n]), device),
        })
    }

    fn describe(&self) -> String {
        format!("test rows (seed {})", self.seed)
    }

    fn shape(&self, batch: &Batch) -> Vec<usize> {
        batch.x.dims().to_vec()
    }
}

fn sets(stage: u8, world: usize, accum: usize, extra: &[&str]) -> Vec<String> {
    let micro = 3;
    let mut s = vec![
        "train.steps=12".to_string(),
        "train.lr=2e-2".into(),
        "train.warmup_steps=2".into(),
        "train.threads=1".into(),
        "train.clip_grad=1.0".into(),
        "parallel.bucket_mb=0.0002".into(),
        format!("parallel.stage={stage}"),
        format!("train.micro_batch={micro}"),
        format!("train.global_batch={}", micro * accum * world),
    ];
    s.extend(extra.iter().map(|e| e.to_string()));
    s
}

fn quiet(resume: Option<String>) -> RunOptions {
    RunOptions {
        quiet: true,
        no_outputs: true,
        resume,
        ..RunOptions::default()
    }
}

fn train_split(
    stage: u8,
    world: usize,
    accum: usize,
    extra: &[&str],
    split: Split,
    resume: Option<String>,
) -> kiln::error::Result<RunOutcome> {
    Trainer::from_sets(&sets(stage, world, accum, extra))?
        .simulate(world)
        .with_options(quiet(resume))
        .fit(|_: RankInfo| {
            Ok(Fit::new(
                Net::new(7, split),
                Rows {
                    seed: 3,
                    features: IN,
                },
            ))
        })
}

fn train(stage: u8, world: usize, accum: usize, extra: &[&str]) -> RunOutcome {
    train_split(stage, world, accum, extra, Split::Good, None).expect("training")
}

fn assert_bitwise(a: &RunOutcome, b: &RunOutcome, what: &str) {
    assert_eq!(a.losses, b.losses, "{what}: losses differ");
    for (u, (x, y)) in a.params.iter().zip(&b.params).enumerate() {
        assert!(common::bitwise_equal(x, y), "{what}: unit {u} differs");
    }
}

#[test]
fn every_stage_and_tier_equals_ddp_bitwise_and_one_process_closely() {
    let nvme = common::Scratch::new("user-model-nvme");
    let nvme_path = format!("offload.nvme_path={}", nvme.0.display());
    for world in [2, 3] {
        for accum in [1, 2] {
            let ddp = train(0, world, accum, &[]);
            let single = train(0, 1, accum * world, &[]);
            let diff = common::rel_l2(&ddp.params.concat(), &single.params.concat());
            assert!(
                diff <= 1e-5,
                "N={world} accum={accum}: DDP vs one process {diff:e}"
            );
            assert!(
                ddp.losses.last() < ddp.losses.first(),
                "the model learns: {:?}",
                ddp.losses
            );
            for stage in [1, 2, 3] {
                let zero = train(stage, world, accum, &[]);
                assert_bitwise(
                    &zero,
                    &ddp,
                    &format!("stage {stage} N={world} accum={accum}"),
                );
            }
        }
        for (stage, tier) in [(1, "cpu"), (3, "cpu"), (2, "nvme"), (3, "nvme")] {
            let offload = format!("offload.optimizer={tier}");
            let run = train(stage, world, 2, &[&offload, &nvme_path]);
            let ddp = train(0, world, 2, &[]);
            assert_bitwise(&run, &ddp, &format!("stage {stage} N={world} {tier}"));
        }
        // ZeRO-3 without resharding after forward, and with recompute, change no bit either.
        for extra in [
            "parallel.reshard_after_forward=false",
            "train.recompute=true",
        ] {
            let run = train(3, world, 1, &[extra]);
            assert_bitwise(&run, &train(0, world, 1, &[]), extra);
        }
    }
}

#[test]
fn frozen_parameters_are_untouched_and_hold_no_gradient_or_optimizer_bytes() {
    let initial = Net::new(7, Split::Good);
    let mix_weight: Vec<f32> = initial.mix.weight.val().into_data().try_to_vec().unwrap();
    for stage in [0, 2, 3] {
        let run = train(stage, 2, 1, &[]);
        // The layout holds the trainable parameters only.
        let paths: Vec<&str> = run
            .layout
            .units
            .iter()
            .flat_map(|u| u.params.iter().map(|p| p.path.as_str()))
            .collect();
        assert!(paths.iter().all(|p| !p.starts_with("mix.")), "{paths:?}");
        assert!(
            paths.contains(&"proj.weight") && paths.contains(&"norm.gamma"),
            "{paths:?}"
        );
        let frozen: Vec<&str> = run.frozen.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(frozen, ["mix.bias", "mix.weight"]);
        let weight = &run.frozen[1];
        assert_eq!(weight.1, [H1, H1]);
        assert!(
            common::bitwise_equal(&weight.2, &mix_weight),
            "stage {stage}: mix.weight changed"
        );
        // Gradients and AdamW state cover the trainable padded buffers, nothing more.
        let padded: usize = run.layout.units.iter().map(|u| u.padded_len).sum();
        let m = run.summary.memory;
        let frozen_len = H1 * H1 + H1; // 110, padded to 110 at N = 2
        match stage {
            0 => {
                assert_eq!(m.grads, 4 * padded);
                assert_eq!(m.optimizer, 8 * padded);
                assert_eq!(m.frozen_params, 4 * frozen_len);
            }
            2 => {
                assert_eq!(m.optimizer, 8 * padded / 2);
                assert_eq!(m.frozen_params, 4 * frozen_len);
            }
            _ => {
                assert_eq!(m.optimizer, 8 * padded / 2);
                assert_eq!(
                    m.frozen_params,
                    4 * frozen_len / 2,
                    "ZeRO-3 shards frozen ones too"
                );
            }
        }
    }
}

#[test]
fn a_checkpoint_reshards_from_two_ranks_zero2_to_three_ranks_zero3() {
    let scratch = common::Scratch::new("user-model-reshard");
    let dir = format!("checkpoint.dir={}", scratch.0.display());
    // The global batch (6) is the same at both world sizes: micro 3 × 2 ranks, micro 2 × 3.
    // The schedule decays over 12 steps in every run, so 6 steps are the first half of 12.
    let decay = "train.decay_steps=12";
    let first = train(2, 2, 1, &[&dir, "checkpoint.every=6", decay]);
    let at_6 = scratch.path("step_000006").display().to_string();
    let three = ["train.micro_batch=2", "train.global_batch=6", decay];
    let resume = |stage: u8, steps: &str| {
        let mut extra = three.to_vec();
        extra.push(steps);
        train_split(stage, 3, 1, &extra, Split::Good, Some(at_6.clone())).unwrap()
    };
    // At the same world size another stage loads it exactly: the continuation is the
    // uninterrupted run, bit for bit.
    let same_n = train_split(3, 2, 1, &[decay], Split::Good, Some(at_6.clone())).unwrap();
    assert_eq!(same_n.losses, first.losses[6..]);
    for (u, (a, b)) in same_n.params.iter().zip(&first.params).enumerate() {
        assert!(
            common::bitwise_equal(a, b),
            "unit {u}: 2 × ZeRO-2 → 2 × ZeRO-3 changed it"
        );
    }
    let z3 = resume(3, "train.steps=12");
    let ddp = resume(0, "train.steps=12");
    assert_eq!(z3.losses.len(), 6);
    assert_bitwise(&z3, &ddp, "resumed 3 × ZeRO-3 vs 3 × DDP");
    let diff = common::rel_l2(&z3.params.concat(), &first.params.concat());
    assert!(
        diff <= 1e-5,
        "resumed at N = 3: {diff:e} from the uninterrupted run"
    );
}

#[test]
fn a_wrong_split_is_an_error_naming_the_unit_or_parameter() {
    let cases = [
        (Split::Orphan, "parameter `norm.beta` is in no unit"),
        (
            Split::Twice,
            "parameter `dense.bias` is in two units, `embed` and `body`",
        ),
        (
            Split::BorrowLater,
            "unit `embed` borrows `out.weight` from unit `out`, which does not run before it",
        ),
        (
            Split::Undeclared,
            "unit `out` reads parameter `proj.weight`, which unit `embed` holds",
        ),
        (
            Split::NotScalar,
            "must return the loss, one element; it returned a tensor of shape [3, 7]",
        ),
    ];
    for (split, expected) in cases {
        for world in [1, 2] {
            let err = train_split(3, world, 1, &[], split, None).expect_err("a wrong split trains");
            let msg = err.to_string();
            assert!(msg.contains(expected), "{split:?} N={world}: {msg}");
            assert_eq!(err.exit_code(), 2, "{split:?}: {msg}");
        }
    }
}

#[test]
fn ranks_whose_models_differ_are_refused() {
    let err = Trainer::from_sets(&sets(1, 2, 1, &[]))
        .unwrap()
        .simulate(2)
        .with_options(quiet(None))
        .fit(|r: RankInfo| {
            Ok(Fit::new(
                Net::new(7 + r.rank as u64, Split::Good),
                Rows {
                    seed: 3,
                    features: IN,
                },
            ))
        })
        .expect_err("ranks with different initial values trained");
    assert!(
        err.to_string()
            .contains("the initial parameters of rank(s) 1 differ"),
        "{err}"
    );
}

#[test]
fn ranks_whose_data_sources_disagree_on_a_batch_shape_are_refused() {
    let err = Trainer::from_sets(&sets(2, 2, 1, &[]))
        .unwrap()
        .simulate(2)
        .with_options(quiet(None))
        .fit(|r: RankInfo| {
            let features = if r.rank == 1 { IN + 1 } else { IN };
            Ok(Fit::new(
                Net::new(7, Split::Good),
                Rows { seed: 3, features },
            ))
        })
        .expect_err("ranks with differently shaped batches trained");
    let msg = err.to_string();
    assert!(
        msg.contains("the micro-batches of rank(s) 1 differ in shape from rank 0's"),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 2, "{msg}");
}

/// A unit that holds only frozen parameters has an empty flat buffer: no gradient, no bucket
/// slot, no optimizer state. It trains as the same model split the other way, and its stages
/// stay bitwise equal to DDP.
#[test]
fn a_unit_of_frozen_parameters_only_trains_like_any_other() {
    for world in [2, 3] {
        let split =
            |stage| train_split(stage, world, 2, &[], Split::FrozenUnit, None).expect("training");
        let ddp = split(0);
        assert_eq!(ddp.layout.units.len(), 4);
        assert_eq!(
            ddp.layout.units[1].numel, 0,
            "the frozen unit has no trainable value"
        );
        // Same function, same values: the same losses as the usual split, to rounding.
        let usual = train(0, world, 2, &[]);
        for (a, b) in ddp.losses.iter().zip(&usual.losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "N={world}: loss {a} vs {b}"
            );
        }
        for stage in [1, 2, 3] {
            assert_bitwise(
                &split(stage),
                &ddp,
                &format!("frozen unit, stage {stage} N={world}"),
            );
        }
    }
}

/// A checkpoint holds no frozen values (they never change); resuming checks them by checksum,
/// so a model whose frozen part differs is refused rather than silently mixed.
#[test]
fn resuming_with_other_frozen_values_is_refused() {
    let scratch = common::Scratch::new("user-model-frozen-resume");
    let dir = format!("checkpoint.dir={}", scratch.0.display());
    train(1, 2, 1, &[&dir, "checkpoint.every=6"]);
    let at_6 = scratch.path("step_000006").display().to_string();
    let err = Trainer::from_sets(&sets(1, 2, 1, &[]))
        .unwrap()
        .simulate(2)
        .with_options(quiet(Some(at_6)))
        .fit(|_: RankInfo| {
            Ok(Fit::new(
                Net::new(8, Split::Good),
                Rows {
                    seed: 3,
                    features: IN,
                },
            ))
        })
        .expect_err("resumed with other frozen values");
    let msg = err.to_string();
    assert!(
        msg.contains("written for another model: model.frozen_crc32"),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 2, "{msg}");
}

/// The whole model as one unit (`Unit::whole_model`): the same training, at every stage.
#[test]
fn the_whole_model_as_one_unit_trains_the_same() {
    let usual = train(0, 2, 1, &[]);
    for stage in [0, 2, 3] {
        let whole = train_split(stage, 2, 1, &[], Split::Whole, None).expect("training");
        assert_eq!(whole.layout.units.len(), 1);
        let diff = common::rel_l2(&whole.losses, &usual.losses);
        assert!(
            diff <= 1e-6,
            "stage {stage}: losses {diff:e} from the three-unit split"
        );
    }
}

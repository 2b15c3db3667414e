//! Handwritten digits (scikit-learn's 8×8 set, 1,797 real images) with a burn MLP, trained by
//! kiln with ZeRO-2 — an outside crate's view: only `kiln::api` and burn.
//!
//!     cargo build --release --example digits
//!     mpirun -np 2 target/release/examples/digits          # two processes, MPI
//!     target/release/examples/digits --simulate 2           # two ranks as threads
//!
//! Every fifth image (360) is held out for the test, the other 1,437 train; the test accuracy
//! is printed at the end.
//! `--set train.steps=100` and any other kiln key override the defaults below.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::api::{BatchSource, Fit, KilnError, Metrics, Result, TrainModule, Unit};
use std::ops::Range;
use std::sync::Arc;

const PIXELS: usize = 64;
const CLASSES: usize = 10;
const IMAGES: usize = 1797;

/// A three-layer perceptron; each layer is a unit (kiln's bucket and ZeRO-3 gather granularity).
#[derive(Module, Debug)]
struct Mlp {
    hidden1: Linear,
    hidden2: Linear,
    head: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        // Every rank must start from the same values: burn's initialisers draw from a seeded
        // process-wide RNG (kiln builds thread ranks one at a time for this reason).
        device.seed(42);
        Mlp {
            hidden1: LinearConfig::new(PIXELS, 128).init(device),
            hidden2: LinearConfig::new(128, 128).init(device),
            head: LinearConfig::new(128, CLASSES).init(device),
        }
    }

    fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.head.forward(x)
    }
}

/// A micro-batch: images scaled to [0, 1] and their labels.
struct Digits {
    images: Tensor<2>,
    labels: Tensor<1, Int>,
}

/// The mean cross-entropy of `logits` against `labels`, as a [1, 1] tensor.
fn cross_entropy(logits: Tensor<2>, labels: &Tensor<1, Int>) -> Tensor<2> {
    let [n, _] = logits.dims();
    let picked = log_softmax(logits, 1).gather(1, labels.clone().reshape([n, 1]));
    picked.neg().mean().reshape([1, 1])
}

impl TrainModule for Mlp {
    type Batch = Digits;
    type Activation = Tensor<2>;

    fn units(&self) -> Vec<Unit> {
        vec![
            Unit::new("hidden1"),
            Unit::new("hidden2"),
            Unit::new("head"),
        ]
    }

    fn forward_unit(&self, unit: usize, x: Option<Tensor<2>>, b: &Digits) -> Tensor<2> {
        match unit {
            0 => relu(self.hidden1.forward(b.images.clone())),
            1 => relu(self.hidden2.forward(x.expect("unit 1 follows unit 0"))),
            _ => cross_entropy(self.logits(x.expect("the head follows unit 1")), &b.labels),
        }
    }

    fn eval_metrics(&self, _unit: usize, x: Option<Tensor<2>>, b: &Digits) -> Metrics {
        let logits = self.logits(x.expect("the head follows unit 1"));
        let loss = cross_entropy(logits.clone(), &b.labels);
        let [n, _] = logits.dims();
        let correct = logits.argmax(1).reshape([n]).equal(b.labels.clone());
        let accuracy = correct.int().float().mean();
        let value = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap_or_default()[0];
        vec![
            ("loss".into(), value(loss.reshape([1]))),
            ("accuracy".into(), value(accuracy)),
        ]
    }
}

/// Some of the images of digits.bin (records of 64 pixels and a label).
struct Images {
    bytes: Arc<Vec<u8>>,
    /// Which images of the file, in order.
    images: Vec<usize>,
    /// Training draws rows at random (with replacement) from (seed, step, row); evaluation
    /// reads them in order.
    sample_seed: Option<u64>,
}

impl Images {
    fn load(path: &str) -> Result<Arc<Vec<u8>>> {
        let bytes = std::fs::read(path).map_err(|e| {
            KilnError::file(
                path,
                format!("cannot read ({e}); run python3 scripts/export_digits.py"),
            )
        })?;
        if bytes.len() != IMAGES * 65 {
            return Err(KilnError::file(
                path,
                format!("holds {} bytes, expected {IMAGES} × 65", bytes.len()),
            ));
        }
        Ok(Arc::new(bytes))
    }
}

impl BatchSource for Images {
    type Batch = Digits;

    fn batch(&self, step: u64, rows: Range<u64>, device: &Device) -> Result<Digits> {
        let n = (rows.end - rows.start) as usize;
        let (mut pixels, mut labels) = (Vec::with_capacity(n * PIXELS), Vec::with_capacity(n));
        for row in rows {
            let index = match self.sample_seed {
                Some(seed) => {
                    let h = common::mix(seed ^ common::mix(step ^ common::mix(row)));
                    (h % self.images.len() as u64) as usize
                }
                None => row as usize,
            };
            let image = self.images[index];
            let record = &self.bytes[image * 65..(image + 1) * 65];
            pixels.extend(record[..PIXELS].iter().map(|&p| p as f32 / 16.0));
            labels.push(record[PIXELS] as i64);
        }
        Ok(Digits {
            images: Tensor::from_data(TensorData::new(pixels, [n, PIXELS]), device),
            labels: Tensor::from_data(TensorData::new(labels, [n]), device),
        })
    }

    fn describe(&self) -> String {
        format!("{} digits images", self.images.len())
    }

    fn num_rows(&self) -> Option<u64> {
        self.sample_seed
            .is_none()
            .then_some(self.images.len() as u64)
    }
}

fn main() {
    kiln::api::init_logging();
    let trainer = common::exit_on_error(common::trainer(&[
        "parallel.stage=2",
        "train.steps=300",
        "train.global_batch=64",
        "train.micro_batch=32",
        "train.lr=1e-2",
        "train.warmup_steps=20",
        "train.weight_decay=0.01",
        "train.eval_every=100",
        "output.dir=runs/digits",
    ]));
    let path = std::env::var("KILN_DIGITS").unwrap_or_else(|_| "examples/data/digits.bin".into());
    let outcome = common::exit_on_error(trainer.fit(|_rank| {
        let bytes = Images::load(&path)?;
        let (test, train): (Vec<usize>, Vec<usize>) = (0..IMAGES).partition(|i| i % 5 == 0);
        let train = Images {
            bytes: bytes.clone(),
            images: train,
            sample_seed: Some(7),
        };
        let test = Images {
            bytes,
            images: test,
            sample_seed: None,
        };
        Ok(Fit::new(Mlp::new(&Device::flex()), train).with_eval(test))
    }));
    if outcome.rank == 0 {
        let (_, last) = outcome
            .val_metrics
            .last()
            .expect("evaluated after the last step");
        let get = |name: &str| {
            last.iter()
                .find(|(n, _)| n == name)
                .map_or(f32::NAN, |m| m.1)
        };
        println!(
            "test accuracy {:.4} ({} images), test loss {:.4}, after {} steps on {} ranks",
            get("accuracy"),
            IMAGES.div_ceil(5),
            get("loss"),
            outcome.summary.steps,
            outcome.summary.world
        );
    }
}

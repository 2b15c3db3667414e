//! A transformer of your own design — pre-RMSNorm blocks with burn's multi-head attention and a
//! SwiGLU MLP, learned positions, an LM head tied to the token embedding — trained by kiln with
//! ZeRO-3 and the optimizer state on disk (the nvme tier), on the bytes of a real text.
//! Only `kiln::api` and burn: this is not kiln's built-in GPT.
//!
//!     cargo build --release --example transformer
//!     mpirun -np 2 target/release/examples/transformer
//!     target/release/examples/transformer --simulate 2 --set train.steps=50
//!
//! It prints the loss in nats per byte before and after (uniform guessing is ln 256 ≈ 5.55).

mod common;

use burn::module::Module;
use burn::nn::attention::{
    generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig, SwiGlu,
    SwiGluConfig,
};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::api::{BatchSource, Fit, KilnError, Result, TrainModule, Unit};
use std::ops::Range;
use std::sync::Arc;

const VOCAB: usize = 256;
const SEQ: usize = 64;
const D: usize = 64;
const HEADS: usize = 4;
const LAYERS: usize = 2;
const SMALL: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

#[derive(Module, Debug)]
struct Block {
    norm1: RmsNorm,
    attn: MultiHeadAttention,
    norm2: RmsNorm,
    mlp: SwiGlu,
    down: Linear,
}

impl Block {
    fn new(device: &Device) -> Self {
        Block {
            norm1: RmsNormConfig::new(D).init(device),
            // No dropout: every rank must compute the same function of the same batch.
            attn: MultiHeadAttentionConfig::new(D, HEADS)
                .with_dropout(0.0)
                .init(device),
            norm2: RmsNormConfig::new(D).init(device),
            mlp: SwiGluConfig::new(D, 4 * D).init(device),
            down: LinearConfig::new(4 * D, D).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let mask = generate_autoregressive_mask(batch, seq, &x.device());
        let h = self.norm1.forward(x.clone());
        let x = x + self
            .attn
            .forward(MhaInput::self_attn(h).mask_attn(mask))
            .context;
        let h = self.norm2.forward(x.clone());
        x.clone() + self.down.forward(self.mlp.forward(h))
    }
}

#[derive(Module, Debug)]
struct ByteLm {
    embed: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
}

impl ByteLm {
    fn new(device: &Device) -> Self {
        device.seed(7);
        ByteLm {
            // GPT-2's N(0, 0.02): the tied head reads this table too, and burn's default
            // N(0, 1) would start the logits far from uniform.
            embed: EmbeddingConfig::new(VOCAB, D)
                .with_initializer(SMALL)
                .init(device),
            pos: EmbeddingConfig::new(SEQ, D)
                .with_initializer(SMALL)
                .init(device),
            blocks: (0..LAYERS).map(|_| Block::new(device)).collect(),
            norm: RmsNormConfig::new(D).init(device),
        }
    }
}

/// Inputs and next-byte targets, `[batch, SEQ]` each.
struct Bytes {
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
}

impl TrainModule for ByteLm {
    type Batch = Bytes;
    type Activation = Tensor<3>;

    /// Embeddings, one unit per block (burn names Vec elements by index), then the head,
    /// which reads the token embedding transposed: a tied weight it borrows.
    fn units(&self) -> Vec<Unit> {
        let mut units = vec![Unit::with_paths("embed", ["embed", "pos"])];
        units.extend((0..LAYERS).map(|i| Unit::new(format!("blocks.{i}"))));
        units.push(Unit::new("norm").borrowing("embed.weight"));
        units
    }

    fn forward_unit(&self, unit: usize, x: Option<Tensor<3>>, b: &Bytes) -> Tensor<3> {
        match unit {
            0 => {
                let [batch, seq] = b.inputs.dims();
                let positions = Tensor::<1, Int>::arange(0..seq as i64, &b.inputs.device())
                    .reshape([1, seq])
                    .expand([batch, seq]);
                self.embed.forward(b.inputs.clone()) + self.pos.forward(positions)
            }
            u if u <= LAYERS => self.blocks[u - 1].forward(x.expect("a block follows a unit")),
            _ => {
                let h = self.norm.forward(x.expect("the head follows the blocks"));
                let [batch, seq, _] = h.dims();
                let table = self.embed.weight.val(); // [VOCAB, D]
                let logits = h.reshape([batch * seq, D]).matmul(table.transpose());
                let targets = b.targets.clone().reshape([batch * seq, 1]);
                let nll = log_softmax(logits, 1).gather(1, targets).neg();
                nll.mean().reshape([1, 1, 1])
            }
        }
    }
}

/// Windows of SEQ + 1 bytes of a text at offsets drawn from (seed, step, row); held-out rows
/// come from the last tenth of the text, in order.
struct Windows {
    text: Arc<Vec<u8>>,
    range: Range<usize>,
    seed: Option<u64>,
}

impl BatchSource for Windows {
    type Batch = Bytes;

    fn batch(&self, step: u64, rows: Range<u64>, device: &Device) -> Result<Bytes> {
        let n = (rows.end - rows.start) as usize;
        let span = self.range.len() - SEQ - 1;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for row in rows {
            let start = self.range.start
                + match self.seed {
                    Some(seed) => {
                        (common::mix(seed ^ common::mix(step ^ common::mix(row))) % span as u64)
                            as usize
                    }
                    None => row as usize * SEQ,
                };
            let w = &self.text[start..start + SEQ + 1];
            inputs.extend(w[..SEQ].iter().map(|&c| c as i64));
            targets.extend(w[1..].iter().map(|&c| c as i64));
        }
        let tensor = |v| Tensor::<2, Int>::from_data(TensorData::new(v, [n, SEQ]), device);
        Ok(Bytes {
            inputs: tensor(inputs),
            targets: tensor(targets),
        })
    }

    fn describe(&self) -> String {
        format!("bytes {}..{} of the text", self.range.start, self.range.end)
    }

    fn tokens_per_row(&self) -> usize {
        SEQ
    }

    fn num_rows(&self) -> Option<u64> {
        self.seed
            .is_none()
            .then_some(((self.range.len() - 1) / SEQ) as u64)
    }
}

fn main() {
    kiln::api::init_logging();
    let trainer = common::exit_on_error(common::trainer(&[
        "parallel.stage=3",
        "offload.optimizer=nvme",
        "offload.nvme_path=runs/transformer/nvme",
        "train.steps=200",
        "train.global_batch=16",
        "train.micro_batch=8",
        "train.lr=3e-3",
        "train.warmup_steps=20",
        "train.clip_grad=1.0",
        "output.dir=runs/transformer",
    ]));
    // The nvme tier writes one file per rank under this directory, which must exist.
    let nvme = &trainer.config().offload.nvme_path;
    if let Err(e) = std::fs::create_dir_all(nvme) {
        common::exit_on_error::<()>(Err(KilnError::file(nvme, format!("cannot create: {e}"))));
    }
    let path = std::env::var("KILN_TEXT")
        .unwrap_or_else(|_| "tests/fixtures/shakespeare/hamlet.txt".into());
    let outcome = common::exit_on_error(trainer.fit(|_rank| {
        let text = std::fs::read(&path).map_err(|e| KilnError::file(&path, e.to_string()))?;
        if text.len() < 20 * SEQ {
            return Err(KilnError::file(
                &path,
                format!("holds {} bytes; at least {} needed", text.len(), 20 * SEQ),
            ));
        }
        let split = text.len() * 9 / 10;
        let text = Arc::new(text);
        let train = Windows {
            text: text.clone(),
            range: 0..split,
            seed: Some(11),
        };
        let held_out = Windows {
            range: split..text.len(),
            text,
            seed: None,
        };
        Ok(Fit::new(ByteLm::new(&Device::flex()), train).with_eval(held_out))
    }));
    if outcome.rank == 0 {
        let first = outcome.val_losses.first().map_or(f32::NAN, |v| v.1);
        let last = outcome.val_losses.last().map_or(f32::NAN, |v| v.1);
        println!(
            "held-out loss {first:.4} → {last:.4} nats per byte (ln 256 = 5.5452) after {} steps \
             on {} ranks, ZeRO-3, optimizer state on disk",
            outcome.summary.steps, outcome.summary.world
        );
    }
}

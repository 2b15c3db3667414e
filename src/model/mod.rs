//! Models as an ordered list of units (DESIGN.md "UnitModel"): the granularity of bucketing,
//! sharding, gathering and recompute — what FSDP calls a wrapped module.

pub mod fused;
mod gpt;
mod param;

pub use gpt::{Gpt, GptConfig};
pub(crate) use param::release;
pub use param::{Param, ReleasedWeight, WeightSlot};

use burn::tensor::{Int, Tensor};

/// How a parameter is initialised. Values depend only on the seed and the parameter's path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std).
    Normal(f32),
    /// All zeros (biases).
    Zeros,
    /// All ones (LayerNorm gains).
    Ones,
}

/// One parameter of a unit, in module-path order.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Module path, e.g. `blocks.0.attn.qkv.weight`; also the export name.
    pub path: String,
    /// Shape as the model uses it (linear weights are `[d_in, d_out]`, burn's convention).
    pub shape: Vec<usize>,
    /// Initialisation rule.
    pub init: Init,
    /// Whether AdamW's decoupled weight decay applies (not to biases or LayerNorm gains).
    pub decay: bool,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter one unit reads from another unit (tied weights): the `index`-th entry of
/// `unit_params(unit)`. It exists once, in its owner's flat buffer; its gradient is the sum of
/// every use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamRef {
    /// The owning unit; it runs before the borrowing unit, so its backward comes after.
    pub unit: usize,
    /// Position in the owner's `unit_params`.
    pub index: usize,
}

/// The token ids of one micro-batch on the compute device.
pub struct MicroBatch {
    /// Inputs, `[batch, seq]`.
    pub inputs: Tensor<2, Int>,
    /// Next-token targets, `[batch, seq]`.
    pub targets: Tensor<2, Int>,
}

/// A model split into units run one after another. Unit 0 reads the token ids from the batch;
/// every later unit reads the previous unit's output `[batch, seq, d]`; the last unit returns
/// the mean token loss of the micro-batch as a `[1, 1, 1]` tensor, so that the engine can drive
/// every unit's backward the same way (`(y * dy).sum().backward()`).
pub trait UnitModel: Send + Sync {
    /// Number of units.
    fn num_units(&self) -> usize;
    /// Human-readable unit name (`embed`, `blocks.3`, `head`).
    fn unit_name(&self, unit: usize) -> String;
    /// The unit's parameters in module-path order: this fixes the flat layout.
    fn unit_params(&self, unit: usize) -> Vec<ParamSpec>;
    /// Parameters `unit` reads from earlier units (tied weights); none by default.
    fn borrowed_params(&self, _unit: usize) -> Vec<ParamRef> {
        Vec::new()
    }
    /// Which of `unit`'s parameters (`forward_unit`'s list: own, then borrowed) it reads only
    /// as a matmul's weight, through exactly one [`Param::matmul`] per forward (that matmul's
    /// backward takes the weight out of a slot every copy of the `Param` shares): those can be
    /// released after the forward and handed back for the backward (ZeRO-3's regather). `None`
    /// if the unit reads a large parameter any other way (an embedding lookup): a strategy that
    /// releases it then has the engine recompute its forward instead. The default: `None`.
    fn matmul_weights(&self, _unit: usize) -> Option<Vec<bool>> {
        None
    }
    /// Runs one unit. `params` follow `unit_params(unit)` and then `borrowed_params(unit)`,
    /// each flat; a parameter flagged by `matmul_weights` may come released.
    fn forward_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<Tensor<3>>,
        batch: &MicroBatch,
    ) -> Tensor<3>;
    /// Sequence length the model is trained with.
    fn seq_len(&self) -> usize;
    /// Vocabulary size.
    fn vocab(&self) -> usize;
}

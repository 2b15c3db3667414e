//! Models as an ordered list of units (docs/ARCHITECTURE.md, "Models"): the granularity of
//! bucketing, sharding, gathering and recompute — what FSDP calls a wrapped module.

pub mod fused;
mod gpt;
mod param;

pub use gpt::{Gpt, GptConfig};
pub(crate) use param::release;
pub use param::{Param, ReleasedWeight, WeightSlot};

use crate::error::Result;
use burn::tensor::{Gradients, Int, Tensor};

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
    /// Each target's weight in the loss, `[batch, seq]`, when the data masks targets
    /// (instruction data: 0 on prompts; see `data::micro_batch`); `None`: every target counts
    /// once.
    pub weights: Option<Tensor<2>>,
}

impl MicroBatch {
    /// The micro-batch's loss, `[1, 1, 1]`, from each target's negative log-likelihood
    /// (`[batch · seq, 1]`): their mean, each weighted when the data masks targets.
    pub fn loss(&self, nll: Tensor<2>) -> Tensor<3> {
        let loss = match &self.weights {
            Some(w) => {
                let [n, _] = nll.dims();
                (nll * w.clone().reshape([n, 1])).mean()
            }
            None => nll.mean(),
        };
        loss.reshape([1, 1, 1])
    }
}

/// What flows between units: the previous unit's output, and the last unit's loss. The engine
/// drives each unit's backward from its output's upstream gradient (`(y · dy).sum().backward()`),
/// so all it needs of an activation is detaching, tracking and that product. Implemented for
/// burn's float tensors of any rank.
pub trait Activation: Clone + Send + 'static {
    /// The same values, cut from the graph.
    fn detach(self) -> Self;
    /// A graph leaf whose gradient the backward reports (a unit's input).
    fn require_grad(self) -> Self;
    /// This tensor's gradient in `grads` (on the inner device: the next upstream gradient).
    fn grad(&self, grads: &Gradients) -> Option<Self>;
    /// Backward of `(self · upstream).sum()`; `None` stands for ones (the loss itself).
    fn backward_from(self, upstream: Option<Self>) -> Gradients;
    /// `self · factor`, in the graph (fp16's scaled loss).
    fn scaled(self, factor: f32) -> Self;
    /// The shape, for error messages.
    fn dims_vec(&self) -> Vec<usize>;
    /// The only element, when there is exactly one (a loss).
    fn scalar(self) -> Option<f32>;
}

impl<const D: usize> Activation for Tensor<D> {
    fn detach(self) -> Self {
        Tensor::detach(self)
    }
    fn require_grad(self) -> Self {
        Tensor::require_grad(self)
    }
    fn grad(&self, grads: &Gradients) -> Option<Self> {
        Tensor::grad(self, grads)
    }
    fn backward_from(self, upstream: Option<Self>) -> Gradients {
        let upstream = match upstream {
            Some(dy) => Tensor::from_inner(dy),
            // Ones in the output's dtype (a loss computed in bf16 seeds a bf16 backward).
            None => Tensor::from_inner(self.clone().inner().ones_like()),
        };
        (self * upstream).sum().backward()
    }
    fn scaled(self, factor: f32) -> Self {
        self.mul_scalar(factor)
    }
    fn dims_vec(&self) -> Vec<usize> {
        self.dims().to_vec()
    }
    fn scalar(self) -> Option<f32> {
        if self.shape().num_elements() != 1 {
            return None;
        }
        let data = self.into_data().convert::<f32>();
        data.as_slice::<f32>().ok().map(|s| s[0])
    }
}

/// How a model splits into units and which parameters each unit holds: everything the flat
/// layout, the initial values and the strategies need, without running the model (no batch or
/// activation type, so one object-safe trait serves every model).
pub trait ModelUnits: Send + Sync {
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
    /// The unit's initial values, unpadded in `unit_params` order, when the model brings its
    /// own (a user's burn module); `None` draws them from `train.seed` by each `ParamSpec::init`
    /// (or reads `model.init_from`).
    fn initial_unit(&self, _unit: usize) -> Option<Vec<f32>> {
        None
    }
}

/// Named values of one evaluation, averaged over the evaluation set; the one named `loss`
/// (else the first) is the run's validation loss.
pub type Metrics = Vec<(String, f32)>;

/// A parameter outside the strategy's buffers: (module path, shape, values).
pub type FrozenParam = (String, Vec<usize>, Vec<f32>);

/// A model split into units run one after another, over micro-batches of type `B` with
/// activations of type `A`. For the built-in GPT (the defaults) unit 0 reads the token ids from
/// the batch; every later unit reads the previous unit's output `[batch, seq, d]`. The last
/// unit returns the micro-batch's mean loss as a one-element tensor, so that the engine can
/// drive every unit's backward the same way (`(y * dy).sum().backward()`).
pub trait UnitModel<B = MicroBatch, A: Activation = Tensor<3>>: ModelUnits {
    /// Runs one unit. `params` follow `unit_params(unit)` and then `borrowed_params(unit)`,
    /// each flat; a parameter flagged by `matmul_weights` may come released. An error is a
    /// user's (a model that reads a parameter its unit does not hold, a failed gather of
    /// values the model keeps itself); every rank calls this for the same units in the same
    /// order, so a model may run collectives here.
    fn forward_unit(&self, unit: usize, params: &[Param], input: Option<A>, batch: &B)
        -> Result<A>;
    /// The metrics of the last unit in evaluation, forward only; by default its output as
    /// `loss`.
    fn eval_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<A>,
        batch: &B,
    ) -> Result<Metrics> {
        let y = self.forward_unit(unit, params, input, batch)?;
        Ok(vec![("loss".into(), y.scalar().unwrap_or(f32::NAN))])
    }
    /// Bytes of parameters the model keeps outside the strategy's buffers (frozen ones), on
    /// this rank.
    fn frozen_bytes(&self) -> usize {
        0
    }
    /// The parameters the model keeps outside the strategy's buffers (frozen ones), whole, as
    /// (path, shape, values). A collective where they are sharded: every rank calls it.
    fn frozen_values(&self) -> Result<Vec<FrozenParam>> {
        Ok(Vec::new())
    }
}

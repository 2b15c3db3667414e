//! A unit's parameter as [`super::UnitModel::forward_unit`] sees it: a tensor of the graph, or a
//! weight released after the forward and handed back for the backward.
//!
//! ZeRO-3 with `parallel.reshard_after_forward` frees a unit's gathered parameters after its
//! forward and gathers them again for its backward (FSDP2's and DeepSpeed's regather). burn's
//! graph keeps every tracked tensor its backward will read, so a weight that a matmul consumes
//! the usual way stays alive until the backward, whatever the strategy frees. A released weight
//! goes in as an untracked value the matmul reads once; its backward reads the weight again from
//! a [`WeightSlot`] the engine refills from the regathered buffer, and reports the weight's
//! gradient under a one-element tracked leaf that stands in for it in the graph (the *sink*).
//! The arithmetic is burn's matmul forward and backward, call for call, so results are bitwise
//! those of the graph path (tests/zero_equivalence.rs).

use super::fused::weight_matmul;
use burn::tensor::{Device, Tensor, TensorData};
use std::sync::{Arc, Mutex};

/// A unit's parameter, flat (`ParamSpec::shape` gives its shape).
#[derive(Clone, Debug)]
pub enum Param {
    /// A tensor the graph keeps as long as its backward needs it (tracked or not).
    Tensor(Tensor<1>),
    /// A weight whose value the graph does not keep: only [`Param::matmul`] may read it.
    Released(ReleasedWeight),
}

/// The parts of [`Param::Released`] (made by the engine).
#[derive(Clone, Debug)]
pub struct ReleasedWeight {
    /// The value, untracked, for the forward's matmul.
    pub(crate) value: Tensor<1>,
    /// The one-element tracked leaf the weight's gradient is registered under.
    pub(crate) sink: Tensor<1>,
    /// Where the backward finds the weight again.
    pub(crate) slot: WeightSlot,
}

impl From<Tensor<1>> for Param {
    fn from(t: Tensor<1>) -> Self {
        Param::Tensor(t)
    }
}

impl Param {
    /// The parameter as a tensor of the graph.
    ///
    /// # Panics
    /// On a released weight: a model that reads one other than through [`Param::matmul`] has
    /// declared it wrongly in `UnitModel::matmul_weights` (its gradient would be lost).
    pub fn tensor(&self) -> Tensor<1> {
        match self {
            Param::Tensor(t) => t.clone(),
            Param::Released(_) => panic!(
                "a released weight read other than by Param::matmul \
                 (UnitModel::matmul_weights is wrong)"
            ),
        }
    }

    /// `x · W` for `x` of `[rows, d_in]`, with this parameter as `W` of `shape` `[d_in, d_out]`
    /// — or, `transposed`, stored as `[d_out, d_in]` and used transposed (a tied LM head).
    pub fn matmul(&self, x: Tensor<2>, shape: [usize; 2], transposed: bool) -> Tensor<2> {
        match self {
            Param::Tensor(t) => {
                let w = t.clone().reshape(shape);
                x.matmul(if transposed { w.transpose() } else { w })
            }
            Param::Released(r) => weight_matmul(
                x,
                r.value.clone().reshape(shape),
                r.sink.clone(),
                r.slot.clone(),
                transposed,
            ),
        }
    }
}

/// Where a released weight's backward finds the weight: empty from the end of the forward
/// until the engine refills it from the regathered parameters; the backward takes it out.
#[derive(Clone, Debug, Default)]
pub struct WeightSlot(Arc<Mutex<Option<TensorData>>>);

impl WeightSlot {
    /// Puts the weight's flat values back for the backward.
    pub fn fill(&self, values: Vec<f32>) {
        let len = values.len();
        *self.lock() = Some(TensorData::new(values, [len]));
    }

    /// Takes the weight out (the backward reads it once).
    ///
    /// # Panics
    /// If the slot is empty: the engine did not refill it before the backward, or a model read
    /// the weight through more than one matmul (`UnitModel::matmul_weights` allows one).
    pub fn take(&self) -> TensorData {
        self.lock().take().expect(
            "a released weight's slot is empty at its backward: not refilled, or read by more \
             than one matmul (UnitModel::matmul_weights)",
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TensorData>> {
        // A panic elsewhere while the lock was held leaves the data valid.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A released weight on `device` (the autodiff device): its value, a fresh sink and an empty
/// slot.
pub(crate) fn release(value: Tensor<1>, device: &Device) -> ReleasedWeight {
    ReleasedWeight {
        value,
        sink: Tensor::<1>::zeros([1], device).require_grad(),
        slot: WeightSlot::default(),
    }
}

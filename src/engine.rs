//! The unit-wise engine (docs/ARCHITECTURE.md, "Models"): forward unit by unit, backward unit
//! by unit in reverse, with the strategy's hooks around each unit. Each unit's input is a detached leaf
//! that requires grad, so a unit's backward — driven by its output's upstream gradient,
//! `(y · dy).sum().backward()` — yields its parameter gradients and its input gradient, which is
//! the next upstream gradient. burn has no per-parameter hooks; this is where kiln's come from.
//!
//! A unit that recomputes (`train.recompute`, per unit) runs its forward on untracked tensors
//! (nothing requires grad, so no graph is kept) and keeps only its input; its backward recomputes
//! it with tracked tensors first (activation checkpointing per unit). Both forwards go through
//! the autodiff device: burn dispatches some ops differently without it (flex's native attention
//! instead of the decomposed one autodiff uses), which would change the recomputed inputs in the
//! last bit.
//!
//! A unit whose parameters the strategy releases after its forward (ZeRO-3 with
//! `parallel.reshard_after_forward`) keeps its graph, but its matrices go in as released weights
//! ([`crate::model::Param`]): the graph keeps no copy of them, and before the unit's backward the
//! engine refills their slots from the regathered parameters. A unit the model cannot run that
//! way (`UnitModel::matmul_weights` is `None`: the embedding) recomputes instead.

mod eval;

use crate::error::{KilnError, Result};
use crate::flat::ModelLayout;
use crate::memory::phases::Phase;
use crate::model::{release, Activation, MicroBatch, Param, UnitModel, WeightSlot};
use crate::strategy::{MicroStep, Strategy};
use burn::tensor::{Device, Tensor, TensorData};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Runs micro-steps of a [`UnitModel`] on one device, over micro-batches of type `B` with
/// activations of type `A` (the built-in GPT's by default).
pub struct Engine<B: 'static = MicroBatch, A: Activation = Tensor<3>> {
    model: Box<dyn UnitModel<B, A>>,
    layout: ModelLayout,
    /// Device without autodiff (data and upstream gradients).
    device: Device,
    /// The same device with autodiff.
    autodiff: Device,
    /// Per unit: keep only its input in forward and recompute it in backward
    /// (`train.recompute` resolved; see [`Engine::with_recompute_units`]).
    recompute: Vec<bool>,
    /// Reused gradient buffer of one unit (padded length of the largest unit).
    grad_scratch: Vec<f32>,
    /// Per unit, the gradient its borrowers (tied weights) computed for its parameters in this
    /// micro-step's backward, added to its own when its turn comes; empty for units nobody
    /// borrows from.
    borrowed_grads: Vec<Vec<f32>>,
    /// Per unit, the ranges of its flat buffer that other units borrow.
    lent_ranges: Vec<Vec<std::ops::Range<usize>>>,
    /// Host time spent uploading parameters and downloading gradients since the last
    /// [`Engine::take_transfer_ms`] (a `Cell`: uploads happen where only `&self` is at hand).
    transfer: Cell<Duration>,
    /// Peak memory by phase (issue 14): forward and backward are marked here, the rest of the
    /// step by the train loop through [`Engine::phases`]. Disabled unless the loop enables it.
    phases: crate::memory::phases::PhaseMeter,
    /// fp16's loss scale: the loss is multiplied by it before the backward (1: no scaling).
    loss_scale: f32,
}

/// What a unit kept from the forward pass for its backward.
enum Saved<A> {
    /// Graph kept: per parameter the tracked tensor its gradient is registered under (the leaf,
    /// or a released weight's sink), the released weights' slots by parameter index, the input
    /// leaf and the output.
    Graph {
        grad_leaves: Vec<Tensor<1>>,
        slots: Vec<(usize, WeightSlot)>,
        input: Option<A>,
        output: A,
    },
    /// Recompute: only the input (untracked).
    Input(Option<A>),
}

/// How [`Engine::params`] hands a unit's parameters to its forward.
pub(crate) enum ParamMode<'a> {
    /// Untracked tensors: no graph (recompute's first forward, evaluation).
    Untracked,
    /// Tracked leaves: the graph keeps them until the backward.
    Tracked,
    /// The flagged ones released (`UnitModel::matmul_weights`), the others tracked leaves.
    Released(&'a [bool]),
}

impl<B: 'static, A: Activation> Engine<B, A> {
    /// An engine for `model` laid out as `layout` on `device`.
    pub fn new(
        model: Box<dyn UnitModel<B, A>>,
        layout: ModelLayout,
        device: Device,
        recompute: bool,
    ) -> Self {
        let largest = layout.units.iter().map(|u| u.padded_len).max().unwrap_or(0);
        let autodiff = device.clone().autodiff();
        let mut borrowed_grads = vec![Vec::new(); layout.units.len()];
        let mut lent_ranges = vec![Vec::new(); layout.units.len()];
        for unit in 0..model.num_units() {
            for r in model.borrowed_params(unit) {
                assert!(
                    r.unit < unit,
                    "unit {unit} borrows from unit {}, which does not run before it",
                    r.unit
                );
                borrowed_grads[r.unit] = vec![0.0; layout.units[r.unit].padded_len];
                lent_ranges[r.unit].push(layout.units[r.unit].params[r.index].range());
            }
        }
        Engine {
            model,
            layout,
            device,
            autodiff,
            recompute: vec![recompute; lent_ranges.len()],
            grad_scratch: vec![0.0; largest],
            borrowed_grads,
            lent_ranges,
            transfer: Cell::new(Duration::ZERO),
            phases: Default::default(),
            loss_scale: 1.0,
        }
    }

    /// Multiplies the loss by `scale` before each backward (fp16 loss scaling): the gradients
    /// come out scaled, and the strategy divides them by it.
    pub fn set_loss_scale(&mut self, scale: f32) {
        self.loss_scale = scale;
    }

    /// Recompute exactly the units flagged (one flag per unit, as `Plan::recompute`) instead
    /// of all or none.
    pub fn with_recompute_units(mut self, units: Vec<bool>) -> Self {
        assert_eq!(
            units.len(),
            self.recompute.len(),
            "one recompute flag per unit"
        );
        self.recompute = units;
        self
    }

    /// The memory-by-phase meter; [`crate::memory::phases::PhaseMeter::new`] to enable it.
    pub fn phases(&mut self) -> &mut crate::memory::phases::PhaseMeter {
        &mut self.phases
    }

    /// The device data should be placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model.
    pub fn model(&self) -> &dyn UnitModel<B, A> {
        self.model.as_ref()
    }

    /// Milliseconds of parameter uploads and gradient downloads since the last call (the
    /// ZeRO-Offload data path's cost; on the CPU, flex's copies). Host wall time: a download
    /// is timed after the device has finished the work queued before it, so compute is not
    /// counted; an upload that the device copies asynchronously counts only its host part.
    pub fn take_transfer_ms(&mut self) -> f64 {
        self.transfer.replace(Duration::ZERO).as_secs_f64() * 1e3
    }

    /// The values of `unit`'s parameters in `forward_unit`'s order — its own, then those it
    /// borrows (tied weights) — in the strategy's buffers.
    fn param_values<'s>(&self, unit: usize, strategy: &'s dyn Strategy) -> Vec<&'s [f32]> {
        let own = strategy.unit_params(unit);
        let entries = self.layout.units[unit]
            .params
            .iter()
            .map(|p| &own[p.range()]);
        let lent = self.model.borrowed_params(unit).into_iter().map(|r| {
            let p = &self.layout.units[r.unit].params[r.index];
            &strategy.unit_params(r.unit)[p.range()]
        });
        entries.chain(lent).collect()
    }

    /// The parameters `forward_unit` takes for `unit`, on the autodiff device, as `mode` says.
    pub(crate) fn params(
        &self,
        unit: usize,
        strategy: &dyn Strategy,
        mode: ParamMode,
    ) -> Vec<Param> {
        let start = Instant::now();
        let params = self
            .param_values(unit, strategy)
            .into_iter()
            .enumerate()
            .map(|(i, values)| {
                let t = Tensor::<1>::from_data(
                    TensorData::new(values.to_vec(), [values.len()]),
                    &self.autodiff,
                );
                match mode {
                    ParamMode::Untracked => Param::Tensor(t),
                    ParamMode::Released(flags) if flags[i] => {
                        Param::Released(release(t, &self.autodiff))
                    }
                    ParamMode::Tracked | ParamMode::Released(_) => Param::Tensor(t.require_grad()),
                }
            })
            .collect();
        self.transfer.set(self.transfer.get() + start.elapsed());
        params
    }

    /// Puts the released weights of `unit` back into their slots, from the strategy's
    /// (regathered) buffers, for its backward.
    fn refill(&self, unit: usize, strategy: &dyn Strategy, slots: &[(usize, WeightSlot)]) {
        if slots.is_empty() {
            return;
        }
        let start = Instant::now();
        let values = self.param_values(unit, strategy);
        for (i, slot) in slots {
            slot.fill(values[*i].to_vec());
        }
        self.transfer.set(self.transfer.get() + start.elapsed());
    }

    /// Splits a forward's parameters into what the graph path keeps: the tensors gradients are
    /// registered under, and the released weights' slots (their values are dropped here).
    fn keep_for_backward(params: Vec<Param>) -> (Vec<Tensor<1>>, Vec<(usize, WeightSlot)>) {
        let mut slots = Vec::new();
        let leaves = params
            .into_iter()
            .enumerate()
            .map(|(i, p)| match p {
                Param::Tensor(t) => t,
                Param::Released(r) => {
                    slots.push((i, r.slot));
                    r.sink
                }
            })
            .collect();
        (leaves, slots)
    }

    /// The last unit's output as the loss: one element, or an error naming the unit.
    pub(crate) fn loss_value(&self, y: A) -> Result<f32> {
        let dims = y.dims_vec();
        y.scalar().ok_or_else(|| {
            let last = self.model.num_units() - 1;
            KilnError::config(format!(
                "unit {last} (`{}`) is the last unit and must return the loss, one element; it \
                 returned a tensor of shape {dims:?}",
                self.model.unit_name(last)
            ))
        })
    }

    /// One forward + backward of `batch`. Gradients are handed to `strategy.on_grads_ready` unit
    /// by unit (last unit first). Returns the micro-batch's mean token loss.
    pub fn micro_step(
        &mut self,
        strategy: &mut dyn Strategy,
        batch: &B,
        micro: MicroStep,
    ) -> Result<f32> {
        let num_units = self.model.num_units();
        self.phases.enter(Phase::Forward);
        let mut saved = Vec::with_capacity(num_units);
        let mut x: Option<A> = None;
        for unit in 0..num_units {
            strategy.before_forward(unit)?;
            let weights = strategy
                .releases_after_forward(unit)
                .then(|| self.model.matmul_weights(unit));
            if self.recompute[unit] || matches!(weights, Some(None)) {
                let params = self.params(unit, strategy, ParamMode::Untracked);
                // Detached: after a unit that kept its graph the input is tracked, and this
                // unit's forward would build the graph recompute is meant to avoid.
                let input = x.take().map(|t| t.detach());
                let y = self
                    .model
                    .forward_unit(unit, &params, input.clone(), batch)?;
                saved.push(Saved::Input(input));
                x = Some(y);
            } else {
                let mode = match &weights {
                    Some(Some(flags)) => ParamMode::Released(flags),
                    _ => ParamMode::Tracked,
                };
                let params = self.params(unit, strategy, mode);
                let input = x.take().map(|t| t.detach().require_grad());
                let output = self
                    .model
                    .forward_unit(unit, &params, input.clone(), batch)?;
                x = Some(output.clone());
                let (grad_leaves, slots) = Self::keep_for_backward(params);
                saved.push(Saved::Graph {
                    grad_leaves,
                    slots,
                    input,
                    output,
                });
            }
            strategy.after_forward(unit)?;
        }
        let loss = self.loss_value(x.expect("a model has at least one unit"))?;

        self.phases.enter(Phase::Backward);
        let mut upstream: Option<A> = None;
        for unit in (0..num_units).rev() {
            strategy.before_backward(unit)?;
            let (params, input, output) = match saved.pop().expect("one saved entry per unit") {
                Saved::Graph {
                    grad_leaves,
                    slots,
                    input,
                    output,
                } => {
                    self.refill(unit, strategy, &slots);
                    (grad_leaves, input, output)
                }
                Saved::Input(input) => {
                    let params = self.params(unit, strategy, ParamMode::Tracked);
                    let input = input.map(|t| t.detach().require_grad());
                    let output = self
                        .model
                        .forward_unit(unit, &params, input.clone(), batch)?;
                    (Self::keep_for_backward(params).0, input, output)
                }
            };
            // A unit with nothing to train and no input to pass a gradient to (a frozen
            // embedding under LoRA) has no backward: its output is not part of any graph.
            if params.is_empty() && input.is_none() {
                let layout = &self.layout.units[unit];
                let scratch = &mut self.grad_scratch[..layout.padded_len];
                scratch.fill(0.0);
                strategy.on_grads_ready(unit, scratch, micro)?;
                continue;
            }
            let output = match (unit + 1 == num_units, self.loss_scale) {
                (true, s) if s != 1.0 => output.scaled(s),
                _ => output,
            };
            let grads = output.backward_from(upstream.take());
            let layout = &self.layout.units[unit];
            let scratch = &mut self.grad_scratch[..layout.padded_len];
            // The first download would wait for the unit's backward kernels; wait here instead,
            // so that the transfer time is the copies alone (a no-op on the CPU).
            self.device
                .sync()
                .unwrap_or_else(|e| panic!("the device failed in backward: {e:?}"));
            let start = Instant::now();
            let (own, lent) = params.split_at(layout.params.len());
            for (p, entry) in own.iter().zip(&layout.params) {
                let dst = &mut scratch[entry.range()];
                match p.grad(&grads) {
                    Some(g) => {
                        dst.copy_from_slice(g.into_data().as_slice::<f32>().expect("f32 gradient"))
                    }
                    None => dst.fill(0.0),
                }
            }
            // A borrowed parameter's gradient waits for its owner's backward, which comes later
            // (the owner runs earlier): the tied weight's gradient is the sum of both uses,
            // added in the same order on every rank and at every stage.
            for (p, r) in lent.iter().zip(self.model.borrowed_params(unit)) {
                let range = self.layout.units[r.unit].params[r.index].range();
                if let Some(g) = p.grad(&grads) {
                    let g = g.into_data();
                    let g = g.as_slice::<f32>().expect("f32 gradient");
                    let dst = &mut self.borrowed_grads[r.unit][range];
                    dst.iter_mut().zip(g).for_each(|(d, g)| *d += g);
                }
            }
            for range in &self.lent_ranges[unit] {
                let lent = &mut self.borrowed_grads[unit][range.clone()];
                for (g, b) in scratch[range.clone()].iter_mut().zip(lent.iter_mut()) {
                    *g += *b;
                    *b = 0.0;
                }
            }
            self.transfer.set(self.transfer.get() + start.elapsed());
            scratch[layout.numel..].fill(0.0);
            if let Some(input) = input {
                upstream = Some(input.grad(&grads).expect("a unit's input requires grad"));
            }
            strategy.on_grads_ready(unit, scratch, micro)?;
        }
        Ok(loss)
    }
}

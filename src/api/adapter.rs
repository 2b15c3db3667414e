//! A user's burn module as kiln's [`UnitModel`]: the flat layout is derived from the module's
//! parameters (by path, never by burn's random `ParamId`), and each unit's forward runs the
//! user's code on a copy of the module whose parameters are the strategy's current values as
//! graph leaves — so a `#[derive(Module)]` model trains under every stage without a line of
//! kiln in its layers.
//!
//! The module kept here holds no values: every parameter is a zero-cost placeholder (one
//! element, expanded) so a rank does not keep a whole copy beside its ZeRO shards. The first
//! forward of each unit checks that the unit reads no placeholder — a parameter it neither
//! holds nor borrows — and names it if it does.

use super::frozen::{Frozen, Storage};
use super::units::{find_params, split, Found};
use super::TrainModule;
use crate::comm::Communicator;
use crate::error::{KilnError, Result};
use crate::halves::Half;
use crate::model::{
    Activation, FrozenParam, Init, Metrics, ModelUnits, Param, ParamRef, ParamSpec, UnitModel,
};
use burn::module::{ModuleMapper, Param as BurnParam};
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One unit of the user's module.
struct UnitPlan {
    name: String,
    /// Trainable parameters it holds, in path order (the flat layout).
    train: Vec<ParamSpec>,
    /// Trainable parameters it borrows: where they live, and their paths.
    borrowed: Vec<(ParamRef, String)>,
    /// Frozen parameters it borrows: (owner unit, path).
    frozen_borrowed: Vec<(usize, String)>,
}

/// The user's module, unit by unit.
pub(crate) struct ModuleModel<M: TrainModule> {
    module: M,
    units: Vec<UnitPlan>,
    shapes: BTreeMap<String, Vec<usize>>,
    /// The module's trainable values per unit, handed to the strategy once (`initial_unit`).
    initial: Mutex<Vec<Option<Vec<f32>>>>,
    frozen: Frozen,
    /// The device the unit's parameters are made on (the engine's autodiff device).
    device: Device,
    /// The 16-bit format units compute in (`train.precision`; `None`: f32); the strategy's
    /// values stay f32.
    compute: Option<Half>,
    /// Per unit: whether its first forward has been checked for reads of other units' values.
    checked: Vec<AtomicBool>,
    /// The model's description for checkpoint manifests.
    pub desc: serde_json::Value,
    /// A hash of every initial value, trainable and frozen, to check ranks agree.
    pub init_hash: u64,
}

impl<M: TrainModule> ModuleModel<M> {
    /// Takes `module` apart for `comm`'s rank; frozen parameters are sharded when `sharded`.
    pub fn new(
        module: M,
        comm: Arc<dyn Communicator>,
        sharded: bool,
        device: Device,
        compute: Option<Half>,
        nf4: &BTreeMap<String, [usize; 2]>,
    ) -> Result<Self> {
        // `train()` applies burn's configured gradient settings (no_grad, freeze_group) on an
        // autodiff device, so that `is_require_grad` says which parameters are trainable.
        let module = module.train();
        let mut found = find_params(&module)?;
        let split = split(&module.units(), &found)?;
        let shapes: BTreeMap<String, Vec<usize>> = found
            .iter()
            .map(|(p, f)| (p.clone(), f.shape.clone()))
            .collect();
        // Index of each trainable parameter in its owner's layout, for borrowers.
        let mut train_index = HashMap::new();
        let mut units = Vec::new();
        let mut initial = Vec::new();
        let mut frozen_values = Vec::new();
        for (u, own) in split.own.iter().enumerate() {
            let (mut train, mut values, mut frozen) = (Vec::new(), Vec::new(), Vec::new());
            for path in own {
                let Found {
                    shape,
                    trainable,
                    values: v,
                } = found.remove(path).expect("split holds found paths");
                if trainable {
                    train_index.insert(path.clone(), (u, train.len()));
                    values.extend_from_slice(&v);
                    train.push(ParamSpec {
                        path: path.clone(),
                        decay: module.decays(path, &shape),
                        shape,
                        init: Init::Zeros,
                    });
                } else {
                    frozen.push((path.clone(), v));
                }
            }
            initial.push(Some(values));
            frozen_values.push(frozen);
            units.push(UnitPlan {
                name: split.names[u].clone(),
                train,
                borrowed: Vec::new(),
                frozen_borrowed: Vec::new(),
            });
        }
        for (u, borrowed) in split.borrowed.iter().enumerate() {
            for (owner, path) in borrowed {
                match train_index.get(path) {
                    Some(&(unit, index)) => units[u]
                        .borrowed
                        .push((ParamRef { unit, index }, path.clone())),
                    None => units[u].frozen_borrowed.push((*owner, path.clone())),
                }
            }
        }
        let frozen_crc = Frozen::checksum(&frozen_values);
        let init_hash = {
            let mut h = crc32fast::Hasher::new();
            for v in initial.iter().flatten().flatten() {
                h.update(&v.to_le_bytes());
            }
            (u64::from(h.finalize()) << 32) | u64::from(frozen_crc)
        };
        let desc = serde_json::json!({
            "kind": "burn module",
            "model": module.describe(),
            "units": split.names,
            "params": shapes.iter().map(|(p, s)| serde_json::json!({
                "path": p,
                "shape": s,
                "trainable": train_index.contains_key(p),
            })).collect::<Vec<_>>(),
            "frozen_crc32": format!("{frozen_crc:08x}"),
        });
        let module = module.map(&mut Placeholders {
            device: device.clone(),
        });
        let checked = units.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(ModuleModel {
            module,
            units,
            shapes,
            initial: Mutex::new(initial),
            frozen: Frozen::new(comm, sharded, frozen_values, |path| {
                match (nf4.get(path), compute) {
                    (Some(&dims), _) => Storage::Nf4(dims),
                    (None, Some(h)) => Storage::Half(h),
                    (None, None) => Storage::F32,
                }
            }),
            device,
            compute,
            checked,
            desc,
            init_hash,
        })
    }

    /// The unit's parameters by path as flat tensors in the compute dtype: the trainable ones
    /// as the engine hands them (`params`: own, then borrowed) — in a lower precision, cast
    /// inside the graph, so their gradients arrive in f32 at the f32 leaves (mixed precision's
    /// master weights) — and the frozen ones untracked from the frozen store.
    fn unit_tensors(&self, unit: usize, params: &[Param]) -> Result<HashMap<String, Tensor<1>>> {
        let plan = &self.units[unit];
        let mut tensors = HashMap::new();
        let paths = plan
            .train
            .iter()
            .map(|s| &s.path)
            .chain(plan.borrowed.iter().map(|(_, p)| p));
        let compute = |t: Tensor<1>| match self.compute {
            Some(h) => t.cast(h.float_dtype()),
            None => t,
        };
        for (path, p) in paths.zip(params) {
            tensors.insert(path.clone(), compute(p.tensor()));
        }
        let mut add_frozen = |owner: usize, only: Option<&str>| -> Result<()> {
            let entries = &self.frozen.units[owner].entries;
            if entries.is_empty() {
                return Ok(());
            }
            let values = self.frozen.values(owner)?;
            for entry in entries {
                if only.is_none_or(|o| o == entry.path) {
                    let v = entry.values(&values);
                    let n = v.len();
                    let data = TensorData::new(v, [n]);
                    let t = Tensor::from_data(data, &self.device);
                    tensors.insert(entry.path.clone(), compute(t));
                }
            }
            Ok(())
        };
        add_frozen(unit, None)?;
        for (owner, path) in &plan.frozen_borrowed {
            add_frozen(*owner, Some(path))?;
        }
        Ok(tensors)
    }

    /// The module with `tensors` in place of their placeholders (the others stay placeholders,
    /// tracked when `watch` holds one-element leaves to watch them with).
    fn filled(
        &self,
        tensors: &HashMap<String, Tensor<1>>,
        watch: Option<&BTreeMap<String, Tensor<1>>>,
    ) -> M {
        self.module.clone().map(&mut Filler {
            path: Vec::new(),
            tensors,
            shapes: &self.shapes,
            watch,
        })
    }

    /// Runs `unit` once on its own values with every other parameter a watched placeholder,
    /// and errors if its output depends on one: the unit reads a parameter it neither holds
    /// nor borrows (whose values it would not have under ZeRO-3).
    fn check_reads(
        &self,
        unit: usize,
        tensors: &HashMap<String, Tensor<1>>,
        input: Option<&M::Activation>,
        batch: &M::Batch,
    ) -> Result<()> {
        // Sorted, so that the parameter an error names is the same on every rank and run.
        let watch: BTreeMap<String, Tensor<1>> = self
            .shapes
            .keys()
            .filter(|p| !tensors.contains_key(*p))
            .map(|p| {
                (
                    p.clone(),
                    Tensor::<1>::zeros([1], &self.device).require_grad(),
                )
            })
            .collect();
        if watch.is_empty() {
            return Ok(());
        }
        // The unit's own values and its input are tracked too, so that the output is part of a
        // graph whenever the unit reads anything at all.
        let own: HashMap<String, Tensor<1>> = tensors
            .iter()
            .map(|(p, t)| (p.clone(), t.clone().detach().require_grad()))
            .collect();
        let module = self.filled(&own, Some(&watch));
        let input = input.map(|x| x.clone().detach().require_grad());
        let y = module.forward_unit(unit, input, batch);
        let grads = y.backward_from(None);
        if let Some(path) = watch
            .iter()
            .find(|(_, t)| t.grad(&grads).is_some())
            .map(|(p, _)| p)
        {
            let owner = self
                .units
                .iter()
                .position(|u| u.train.iter().any(|s| &s.path == path))
                .or_else(|| {
                    self.frozen
                        .units
                        .iter()
                        .position(|u| u.entries.iter().any(|e| &e.path == path))
                })
                .map_or(String::new(), |o| {
                    format!(", which unit `{}` holds", self.units[o].name)
                });
            return Err(KilnError::config(format!(
                "model units: unit `{}` reads parameter `{path}`{owner}; list it with \
                 Unit::borrowing(\"{path}\") (a tied weight) or move it into the unit",
                self.units[unit].name
            )));
        }
        Ok(())
    }

    fn run(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<M::Activation>,
        batch: &M::Batch,
    ) -> Result<M> {
        let tensors = self.unit_tensors(unit, params)?;
        if !self.checked[unit].swap(true, Ordering::Relaxed) {
            self.check_reads(unit, &tensors, input.as_ref(), batch)?;
        }
        Ok(self.filled(&tensors, None))
    }
}

impl<M: TrainModule> ModelUnits for ModuleModel<M> {
    fn num_units(&self) -> usize {
        self.units.len()
    }
    fn unit_name(&self, unit: usize) -> String {
        self.units[unit].name.clone()
    }
    fn unit_params(&self, unit: usize) -> Vec<ParamSpec> {
        self.units[unit].train.clone()
    }
    fn borrowed_params(&self, unit: usize) -> Vec<ParamRef> {
        self.units[unit].borrowed.iter().map(|(r, _)| *r).collect()
    }
    fn initial_unit(&self, unit: usize) -> Option<Vec<f32>> {
        let mut initial = self.initial.lock().unwrap_or_else(|e| e.into_inner());
        initial[unit].take()
    }
}

impl<M: TrainModule> UnitModel<M::Batch, M::Activation> for ModuleModel<M> {
    fn forward_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<M::Activation>,
        batch: &M::Batch,
    ) -> Result<M::Activation> {
        let module = self.run(unit, params, input.clone(), batch)?;
        Ok(module.forward_unit(unit, input, batch))
    }

    fn eval_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<M::Activation>,
        batch: &M::Batch,
    ) -> Result<Metrics> {
        let module = self.run(unit, params, input.clone(), batch)?;
        Ok(module.eval_metrics(unit, input, batch))
    }

    fn frozen_bytes(&self) -> usize {
        self.frozen.bytes()
    }

    fn frozen_values(&self) -> Result<Vec<FrozenParam>> {
        let mut all = Vec::new();
        for unit in 0..self.frozen.units.len() {
            let entries = &self.frozen.units[unit].entries;
            if entries.is_empty() {
                continue;
            }
            let values = self.frozen.values(unit)?;
            for entry in entries {
                let shape = self.shapes[&entry.path].clone();
                all.push((entry.path.clone(), shape, entry.values(&values)));
            }
        }
        Ok(all)
    }
}

/// `[usize; D]` of a shape whose rank burn fixed at compile time.
fn dims<const D: usize>(shape: &[usize]) -> [usize; D] {
    shape.try_into().expect("a parameter keeps its rank")
}

/// A one-element zero seen as `shape` (an expanded view: no memory of the parameter's size).
fn placeholder<const D: usize>(one: Tensor<1>, shape: [usize; D]) -> Tensor<D> {
    one.reshape([1; D]).expand(shape)
}

/// Replaces every float parameter with a placeholder.
struct Placeholders {
    device: Device,
}

impl ModuleMapper for Placeholders {
    fn map_float<const D: usize>(&mut self, param: BurnParam<Tensor<D>>) -> BurnParam<Tensor<D>> {
        let device = self.device.clone();
        param.map(|t| placeholder(Tensor::<1>::zeros([1], &device), t.dims()))
    }
}

/// Puts each unit's tensors into the module by path.
struct Filler<'a> {
    path: Vec<String>,
    tensors: &'a HashMap<String, Tensor<1>>,
    shapes: &'a BTreeMap<String, Vec<usize>>,
    watch: Option<&'a BTreeMap<String, Tensor<1>>>,
}

impl ModuleMapper for Filler<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: BurnParam<Tensor<D>>) -> BurnParam<Tensor<D>> {
        let path = self.path.join(".");
        let shape = dims::<D>(&self.shapes[&path]);
        if let Some(t) = self.tensors.get(&path) {
            let t = t.clone().reshape(shape);
            return param.map(|_| t);
        }
        match self.watch.and_then(|w| w.get(&path)) {
            Some(leaf) => {
                let t = placeholder(leaf.clone(), shape);
                param.map(|_| t)
            }
            None => param,
        }
    }
}

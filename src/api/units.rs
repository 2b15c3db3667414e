//! The user's split of a burn module into units, checked against the module's parameters:
//! every float parameter is found by its module path (burn's `ModuleVisitor`), belongs to
//! exactly one unit, and is trainable or frozen as burn says (`Module::no_grad`,
//! `Param::set_require_grad(false)`).

use crate::error::{KilnError, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use std::collections::BTreeMap;

/// One unit of a model: kiln's granularity for gradient buckets, ZeRO-3's gathers and
/// recompute (what FSDP2 calls a module passed to `fully_shard`). It holds the parameters
/// under its module-path prefixes, and may read parameters of an earlier unit (tied weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    name: String,
    prefixes: Vec<String>,
    borrows: Vec<String>,
}

impl Unit {
    /// A unit named `name` holding the parameters under the module path `name`
    /// (`Unit::new("blocks.0")` holds `blocks.0.attn.query.weight`, …).
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Unit {
            prefixes: vec![name.clone()],
            name,
            borrows: Vec::new(),
        }
    }

    /// A unit named `name` holding the parameters under each of `prefixes` (a path names a
    /// submodule or one parameter: `"norm"`, `"head.weight"`).
    pub fn with_paths<S: Into<String>>(
        name: impl Into<String>,
        prefixes: impl IntoIterator<Item = S>,
    ) -> Self {
        Unit {
            name: name.into(),
            prefixes: prefixes.into_iter().map(Into::into).collect(),
            borrows: Vec::new(),
        }
    }

    /// A unit named `name` holding every parameter of the model: the whole model as one unit
    /// (FSDP2's `fully_shard` on the root alone). DDP and ZeRO-1/2 lose nothing by it; ZeRO-3
    /// then gathers the whole model at once, and gradients are reduced only when the whole
    /// backward is done.
    pub fn whole_model(name: impl Into<String>) -> Self {
        Unit::with_paths(name, [String::new()])
    }

    /// Also reads the parameter at `path`, which an earlier unit holds (a tied weight: one
    /// value, whose gradient is the sum of both uses).
    pub fn borrowing(mut self, path: impl Into<String>) -> Self {
        self.borrows.push(path.into());
        self
    }

    /// The unit's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn holds(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| under(path, p))
    }
}

/// Whether the parameter at `path` is the module path `prefix` or inside it (`blocks.1` holds
/// `blocks.1.norm.gamma`, not `blocks.10.norm.gamma`).
/// The empty prefix holds every parameter ([`Unit::whole_model`]).
pub(crate) fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path[prefix.len()..].starts_with('.'))
}

/// A float parameter of the module.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub shape: Vec<usize>,
    pub trainable: bool,
    pub values: Vec<f32>,
}

/// Every float parameter of `module` by module path (sorted), with its values and whether it
/// is trainable. A parameter burn visits twice under one path is an error.
pub(crate) fn find_params<M: Module>(module: &M) -> Result<BTreeMap<String, Found>> {
    struct Finder {
        path: Vec<String>,
        found: BTreeMap<String, Found>,
        repeated: Option<String>,
    }
    impl ModuleVisitor for Finder {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            let tensor = param.val();
            let values = tensor
                .clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            let found = Found {
                shape: tensor.dims().to_vec(),
                trainable: tensor.is_require_grad(),
                values,
            };
            if self.found.insert(path.clone(), found).is_some() {
                self.repeated.get_or_insert(path);
            }
        }
    }
    let mut finder = Finder {
        path: Vec::new(),
        found: BTreeMap::new(),
        repeated: None,
    };
    module.visit(&mut finder);
    if let Some(path) = finder.repeated {
        return Err(KilnError::config(format!(
            "model: two parameters share the module path `{path}`"
        )));
    }
    if finder.found.is_empty() {
        return Err(KilnError::config(
            "model: the module has no float parameters",
        ));
    }
    Ok(finder.found)
}

/// The module path of every float parameter of `module`, without reading values.
pub(crate) fn find_paths<M: Module>(module: &M) -> Vec<String> {
    struct Paths {
        path: Vec<String>,
        found: Vec<String>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.found.push(self.path.join("."));
        }
    }
    let mut paths = Paths {
        path: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut paths);
    paths.found
}

/// Where each parameter goes: per unit, its own parameters (sorted by path) and the paths it
/// borrows, each known to belong to an earlier unit.
pub(crate) struct Split {
    pub names: Vec<String>,
    /// Per unit, the paths it holds, sorted.
    pub own: Vec<Vec<String>>,
    /// Per unit, (owner unit, path) of each borrowed parameter, in the order given.
    pub borrowed: Vec<Vec<(usize, String)>>,
}

/// Checks `units` against the module's parameters: each parameter in exactly one unit, each
/// borrow naming a parameter of an earlier unit. Errors name the unit or the parameter.
pub(crate) fn split(units: &[Unit], params: &BTreeMap<String, Found>) -> Result<Split> {
    let bad = |msg: String| KilnError::config(format!("model units: {msg}"));
    if units.is_empty() {
        return Err(bad("the model lists no units".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for u in units {
        if !seen.insert(u.name.as_str()) {
            return Err(bad(format!("two units are named `{}`", u.name)));
        }
    }
    let mut own = vec![Vec::new(); units.len()];
    let mut owner_of = BTreeMap::new();
    for path in params.keys() {
        let holders: Vec<usize> = (0..units.len()).filter(|&u| units[u].holds(path)).collect();
        match holders.as_slice() {
            [] => {
                return Err(bad(format!(
                    "parameter `{path}` is in no unit (units: {})",
                    units
                        .iter()
                        .map(|u| u.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            [u] => {
                own[*u].push(path.clone());
                owner_of.insert(path.clone(), *u);
            }
            [a, b, ..] => {
                return Err(bad(format!(
                    "parameter `{path}` is in two units, `{}` and `{}`",
                    units[*a].name, units[*b].name
                )))
            }
        }
    }
    for (u, unit) in units.iter().enumerate() {
        for prefix in &unit.prefixes {
            if !params.keys().any(|p| under(p, prefix)) {
                return Err(bad(format!(
                    "unit `{}`: no parameter is under the path `{prefix}`",
                    unit.name
                )));
            }
        }
        if own[u].is_empty() {
            return Err(bad(format!("unit `{}` holds no parameter", unit.name)));
        }
    }
    let mut borrowed = vec![Vec::new(); units.len()];
    for (u, unit) in units.iter().enumerate() {
        for path in &unit.borrows {
            match owner_of.get(path) {
                None => {
                    return Err(bad(format!(
                        "unit `{}` borrows `{path}`, which is not a parameter of the model",
                        unit.name
                    )))
                }
                Some(&o) if o >= u => {
                    return Err(bad(format!(
                        "unit `{}` borrows `{path}` from unit `{}`, which does not run before it",
                        unit.name, units[o].name
                    )))
                }
                Some(&o) => borrowed[u].push((o, path.clone())),
            }
        }
    }
    Ok(Split {
        names: units.iter().map(|u| u.name.clone()).collect(),
        own,
        borrowed,
    })
}

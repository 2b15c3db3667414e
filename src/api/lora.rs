//! `[lora]` and `train.freeze` on any burn module, before kiln takes it apart.
//!
//! LoRA is burn's own reparameterisation (`burn::module::LoraAdapter`): a targeted linear
//! weight `W` stays the module's parameter, frozen, and its value becomes
//! `W + alpha/r · A·B` with `A`, `B` trainable parameters under `….weight.lora.a` / `.b`. kiln
//! finds those by module path like any other parameter, so the adapters get gradient buckets
//! and optimizer state and the frozen base gets none — at every ZeRO stage, with ZeRO-3
//! sharding and gathering the base per unit — without a line of LoRA in the engine.
//!
//! burn's own `Lora` reparameterizer is not used as is: it draws `A` from burn's process-wide
//! RNG (ranks must agree, and a run must not depend on which thread built first) and matches
//! parameters by burn's `ParamGroup`, not by PEFT's module names. kiln attaches the same
//! `LoraAdapter` with `A` drawn as PEFT draws it (Kaiming-uniform, bound `1/sqrt(d_in)`) from
//! kiln's seeded streams, `B = 0`, or with the factors of a PEFT adapter (`lora.init_from`).
//!
//! The price of the reparameterisation: the update is added into the weight before the
//! matmul, so the backward forms a weight-shaped gradient per adapted matrix (full
//! fine-tuning forms it too), and PEFT's dropout on the adapter's input has no place.

use super::units::Unit;
use crate::config::Config;
use crate::error::{KilnError, Result};
use crate::hf::peft::{AdapterShape, Factors, PeftAdapter};
use crate::rng::{hash_str, Rng};
use burn::module::{LoraAdapter, Module, ModuleMapper, ModuleVisitor, Param, Reparameterizer};
use burn::tensor::{Tensor, TensorData};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A 2-D `weight` parameter of the module: its module path and what holds it.
#[derive(Debug, Clone)]
struct Matrix {
    /// The burn type holding the weight (`Linear`, `Embedding`, …).
    holder: String,
    /// `[d_in, d_out]` as burn stores it.
    dims: [usize; 2],
}

/// Every 2-D `weight` of `module` by module path (`model.layers.0.self_attn.q_proj`).
fn matrices<M: Module>(module: &M) -> BTreeMap<String, Matrix> {
    struct Finder {
        path: Vec<String>,
        holders: Vec<String>,
        found: BTreeMap<String, Matrix>,
    }
    impl ModuleVisitor for Finder {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.push(name.to_string());
            self.holders.push(container.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
            self.holders.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims: [usize; D] = param.shape().dims();
            if D != 2 || self.path.last().map(String::as_str) != Some("weight") {
                return;
            }
            let module = self.path[..self.path.len() - 1].join(".");
            // The container of the `weight` field is the module that holds it: "Struct:Linear".
            let holder = self
                .holders
                .last()
                .map_or("", |h| h.trim_start_matches("Struct:"));
            self.found.insert(
                module,
                Matrix {
                    holder: holder.to_string(),
                    dims: [dims[0], dims[1]],
                },
            );
        }
    }
    let mut finder = Finder {
        path: Vec::new(),
        holders: Vec::new(),
        found: BTreeMap::new(),
    };
    module.visit(&mut finder);
    finder.found
}

/// Whether PEFT's `target_modules` entry `target` names the module at `path`: the path itself
/// or its last components (`q_proj` names `model.layers.0.self_attn.q_proj`).
fn names(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// The linear modules `targets` adapt; errors for a target that names nothing or a module
/// that is not a `Linear`.
fn targeted(targets: &[String], all: &BTreeMap<String, Matrix>) -> Result<Vec<String>> {
    if targets.iter().any(|t| t == "all-linear") {
        // PEFT's "all-linear" leaves out the output layer of a causal LM.
        return Ok(all
            .iter()
            .filter(|(p, m)| m.holder == "Linear" && !names("lm_head", p))
            .map(|(p, _)| p.clone())
            .collect());
    }
    let mut chosen = Vec::new();
    for target in targets {
        let hits: Vec<&String> = all.keys().filter(|p| names(target, p)).collect();
        if hits.is_empty() {
            let linear: Vec<&str> = all
                .iter()
                .filter(|(_, m)| m.holder == "Linear")
                .map(|(p, _)| p.rsplit('.').next().unwrap_or(p))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            return Err(KilnError::config(format!(
                "key `lora.targets`: `{target}` names no module of the model (its linear modules: {})",
                linear.join(", ")
            )));
        }
        for path in hits {
            let holder = &all[path].holder;
            if holder != "Linear" {
                return Err(KilnError::config(format!(
                    "key `lora.targets`: `{target}` names `{path}` ({holder}); kiln adapts Linear modules"
                )));
            }
            if !chosen.contains(path) {
                chosen.push(path.clone());
            }
        }
    }
    Ok(chosen)
}

/// The adapter settings `[lora]` asks for, and the PEFT adapter to start from if any.
fn shape_from(config: &Config) -> Result<(AdapterShape, Option<PeftAdapter>)> {
    let l = &config.lora;
    if l.dropout != 0.0 {
        return Err(KilnError::config(format!(
            "key `lora.dropout` = {}: expected 0; kiln adds the update into the weight (burn's \
             reparameterisation), where dropout on the adapter's input has no place",
            l.dropout
        )));
    }
    if !l.init_from.is_empty() {
        for (key, set) in [
            ("r", l.r.is_some()),
            ("alpha", l.alpha.is_some()),
            ("targets", !l.targets.is_empty()),
        ] {
            if set {
                return Err(KilnError::config(format!(
                    "key `lora.{key}`: the adapter lora.init_from = {} has its own in \
                     adapter_config.json; leave it out",
                    l.init_from
                )));
            }
        }
        let adapter = PeftAdapter::open(std::path::Path::new(&l.init_from))?;
        return Ok((adapter.shape.clone(), Some(adapter)));
    }
    let r = l.r.unwrap_or(0);
    if r == 0 {
        return Err(KilnError::config(
            "key `lora.r`: expected a rank of at least 1",
        ));
    }
    let alpha = l.alpha.unwrap_or(8.0);
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(KilnError::config(format!(
            "key `lora.alpha` = {alpha}: expected a positive number"
        )));
    }
    if l.targets.is_empty() {
        return Err(KilnError::config(
            "key `lora.targets`: expected the linear modules to adapt, e.g. [\"q_proj\", \"v_proj\"] or [\"all-linear\"]",
        ));
    }
    Ok((
        AdapterShape {
            r,
            alpha,
            targets: l.targets.clone(),
        },
        None,
    ))
}

/// PEFT's default factors: `A` Kaiming-uniform with bound `1/sqrt(d_in)` (PyTorch's
/// `kaiming_uniform_(a=sqrt(5))` on `[r, d_in]`), `B` zero — the adapted model starts as the
/// base. Drawn from kiln's stream keyed by the seed and the module path.
fn fresh_factors(seed: u64, module: &str, r: usize, [d_in, d_out]: [usize; 2]) -> Factors {
    let mut rng = Rng::derive(seed, &[hash_str("lora.a"), hash_str(module)]);
    let bound = 1.0 / (d_in as f64).sqrt();
    let a = (0..d_in * r)
        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
        .collect();
    Factors {
        a,
        b: vec![0.0; r * d_out],
    }
}

/// Attaches the given factors to their weights and freezes every other parameter.
struct Attach {
    scale: f64,
    r: usize,
    factors: BTreeMap<String, Factors>,
}

impl Reparameterizer for Attach {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let base = param.set_require_grad(false);
        let module = path.strip_suffix(".weight").unwrap_or("");
        let Some(f) = self.factors.remove(module).filter(|_| D == 2) else {
            return (base, None);
        };
        let dims: [usize; D] = base.shape().dims();
        let device = base.lazy_device();
        let a = Tensor::<2>::from_data(TensorData::new(f.a, [dims[0], self.r]), &device);
        let b = Tensor::<2>::from_data(TensorData::new(f.b, [self.r, dims[1]]), &device);
        let adapter = LoraAdapter {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: self.scale,
        };
        (base, Some(adapter))
    }
}

/// QLoRA's 4-bit weights (`lora.quantize = "nf4"`): every linear weight but `lm_head`'s, as
/// bitsandbytes' `load_in_4bit` quantizes, by parameter path with burn's `[d_in, d_out]`.
fn quantized(
    config: &Config,
    all: &BTreeMap<String, Matrix>,
) -> Result<BTreeMap<String, [usize; 2]>> {
    match config.lora.quantize.as_str() {
        "none" => return Ok(BTreeMap::new()),
        "nf4" => {}
        other => {
            return Err(KilnError::config(format!(
                "key `lora.quantize`: `{other}` is not one of none, nf4"
            )))
        }
    }
    let mut out = BTreeMap::new();
    for (module, m) in all
        .iter()
        .filter(|(p, m)| m.holder == "Linear" && !names("lm_head", p))
    {
        let numel = m.dims[0] * m.dims[1];
        if numel % super::nf4::BLOCK != 0 {
            return Err(KilnError::config(format!(
                "key `lora.quantize` = nf4: `{module}.weight` has {numel} elements, not a \
                 multiple of the {}-element blocks",
                super::nf4::BLOCK
            )));
        }
        out.insert(format!("{module}.weight"), m.dims);
    }
    Ok(out)
}

/// `module` with `[lora]` applied (every base parameter frozen, adapters on the targeted
/// linear weights), the adapter's description for the checkpoint manifest, and the weights
/// QLoRA stores in 4 bits.
fn with_lora<M: Module>(module: M, config: &Config) -> Result<Adapted<M>> {
    let (shape, adapter) = shape_from(config)?;
    let all = matrices(&module);
    let nf4 = quantized(config, &all)?;
    let modules = targeted(&shape.targets, &all)?;
    let mut factors = BTreeMap::new();
    for m in &modules {
        let dims = all[m].dims;
        let f = match &adapter {
            Some(adapter) => adapter.factors(m, dims[0], dims[1])?,
            None => fresh_factors(config.train.seed, m, shape.r, dims),
        };
        factors.insert(m.clone(), f);
    }
    if let Some(adapter) = &adapter {
        adapter.check_covers(&modules)?;
    }
    let module = module.apply_reparameterization(Attach {
        scale: shape.alpha / shape.r as f64,
        r: shape.r,
        factors,
    });
    let desc = json!({
        "r": shape.r,
        "alpha": shape.alpha,
        "targets": shape.targets,
        "modules": modules,
        "quantize": config.lora.quantize,
    });
    Ok(Adapted { module, desc, nf4 })
}

/// Freezes the parameters `train.freeze` names: a unit's name holds what the unit holds, any
/// other entry is a module path prefix. An entry that names nothing is an error.
fn with_frozen<M: Module>(module: M, freeze: &[String], units: &[Unit]) -> Result<M> {
    struct Freezer<'a> {
        path: Vec<String>,
        frozen: &'a dyn Fn(&str) -> bool,
    }
    impl ModuleMapper for Freezer<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            match (self.frozen)(&self.path.join(".")) {
                true => param.set_require_grad(false),
                false => param,
            }
        }
    }
    let params = super::units::find_paths(&module);
    let names = |entry: &str, path: &str| match units.iter().find(|u| u.name() == entry) {
        Some(unit) => unit.holds(path),
        None => super::units::under(path, entry),
    };
    for entry in freeze {
        if !params.iter().any(|p| names(entry, p)) {
            let units: Vec<&str> = units.iter().map(Unit::name).collect();
            return Err(KilnError::config(format!(
                "key `train.freeze`: `{entry}` names no unit ({}) and no module path of the model",
                units.join(", ")
            )));
        }
    }
    let frozen = |path: &str| freeze.iter().any(|e| names(e, path));
    Ok(module.map(&mut Freezer {
        path: Vec::new(),
        frozen: &frozen,
    }))
}

/// A module as `[lora]` and `train.freeze` leave it.
pub(crate) struct Adapted<M> {
    pub module: M,
    /// LoRA's description for the manifest (`null` without LoRA).
    pub desc: Value,
    /// QLoRA: the frozen weights kept in NF4, by path, with burn's `[d_in, d_out]`.
    pub nf4: BTreeMap<String, [usize; 2]>,
}

/// `module` as `[lora]` and `train.freeze` ask (LoRA first, so that freezing a unit freezes
/// its adapters too).
pub(crate) fn adapted<M: super::TrainModule>(module: M, config: &Config) -> Result<Adapted<M>> {
    let mut adapted = match config.lora.enabled() {
        true => with_lora(module, config)?,
        false if config.lora.quantize != "none" => {
            return Err(KilnError::config(format!(
                "key `lora.quantize` = {}: QLoRA quantizes the base of LoRA adapters; set \
                 lora.r and lora.targets (or lora.init_from) too",
                config.lora.quantize
            )))
        }
        false => Adapted {
            module,
            desc: Value::Null,
            nf4: BTreeMap::new(),
        },
    };
    if !config.train.freeze.is_empty() {
        let units = adapted.module.units();
        adapted.module = with_frozen(adapted.module, &config.train.freeze, &units)?;
    }
    Ok(adapted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(dims: [usize; 2]) -> Matrix {
        Matrix {
            holder: "Linear".into(),
            dims,
        }
    }

    #[test]
    fn targets_match_as_peft_matches_and_name_what_they_miss() {
        let mut all = BTreeMap::new();
        for l in 0..2 {
            for p in ["q_proj", "k_proj", "v_proj"] {
                all.insert(format!("model.layers.{l}.self_attn.{p}"), linear([4, 4]));
            }
        }
        all.insert("lm_head".into(), linear([4, 9]));
        all.insert(
            "model.embed_tokens".into(),
            Matrix {
                holder: "Embedding".into(),
                dims: [9, 4],
            },
        );
        let t = |v: &[&str]| targeted(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &all);
        assert_eq!(t(&["q_proj"]).unwrap().len(), 2);
        assert_eq!(t(&["model.layers.1.self_attn.v_proj"]).unwrap().len(), 1);
        // `proj` is not a whole path component of `q_proj`.
        let e = t(&["proj"]).unwrap_err().to_string();
        assert!(
            e.contains("lora.targets") && e.contains("k_proj, lm_head"),
            "{e}"
        );
        let e = t(&["embed_tokens"]).unwrap_err().to_string();
        assert!(e.contains("Embedding"), "{e}");
        assert_eq!(t(&["all-linear"]).unwrap().len(), 6);
    }

    #[test]
    fn qlora_quantizes_linear_weights_but_lm_head_in_whole_blocks() {
        let mut config = Config::default();
        config.lora.quantize = "nf4".into();
        let mut all = BTreeMap::new();
        all.insert("m.layers.0.q_proj".to_string(), linear([64, 64]));
        all.insert("lm_head".to_string(), linear([64, 9]));
        let q = quantized(&config, &all).unwrap();
        assert_eq!(q.keys().collect::<Vec<_>>(), ["m.layers.0.q_proj.weight"]);
        all.insert("m.layers.0.odd".to_string(), linear([10, 10]));
        let e = quantized(&config, &all).unwrap_err().to_string();
        assert!(
            e.contains("lora.quantize") && e.contains("m.layers.0.odd.weight"),
            "{e}"
        );
        config.lora.quantize = "int3".into();
        assert!(quantized(&config, &all)
            .unwrap_err()
            .to_string()
            .contains("none, nf4"));
    }

    #[test]
    fn fresh_factors_start_at_the_base_and_follow_the_seed() {
        let f = fresh_factors(3, "m.q_proj", 2, [16, 4]);
        assert!(f.b.iter().all(|&x| x == 0.0));
        assert!(f.a.iter().all(|&x| x.abs() <= 0.25) && f.a.iter().any(|&x| x != 0.0));
        assert_eq!(f, fresh_factors(3, "m.q_proj", 2, [16, 4]));
        assert_ne!(f.a, fresh_factors(3, "m.k_proj", 2, [16, 4]).a);
    }
}

//! Unit-wise backward (the engine's hook points) gives the same parameter gradients as one
//! backward through the whole model, with and without per-unit recompute, and with the units'
//! weights released after forward.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use kiln::engine::Engine;
use kiln::error::Result;
use kiln::flat::{init_unit, ModelLayout};
use kiln::model::{Gpt, GptConfig, ModelUnits, Param, UnitModel};
use kiln::offload::{HostStore, StateLayout, Tier};
use kiln::optim::OptimizerKind;
use kiln::strategy::{MemoryReport, MicroStep, ParamsHeld, StateView, StepStats, Strategy};

/// A strategy that only records the gradients it is handed.
struct Recorder {
    /// Whether units are released after forward (as ZeRO-3 with reshard_after_forward).
    release: bool,
    /// Doubles this unit's parameters just before its backward: a backward that reads the
    /// regathered parameters then sees other values than its forward did.
    change_before_backward: Option<usize>,
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    order: Vec<usize>,
    /// No optimizer state: the recorder never steps.
    layout: ModelLayout,
    state: StateLayout,
    store: HostStore,
}

impl Recorder {
    fn new(
        params: &[Vec<f32>],
        layout: &ModelLayout,
        release: bool,
        change_before_backward: Option<usize>,
    ) -> Self {
        Recorder {
            release,
            change_before_backward,
            params: params.to_vec(),
            grads: vec![Vec::new(); layout.units.len()],
            order: Vec::new(),
            layout: layout.clone(),
            state: StateLayout::new(layout, 0..0),
            store: HostStore::new(Tier::None, 0, OptimizerKind::AdamW.format()),
        }
    }
}

impl Strategy for Recorder {
    fn releases_after_forward(&self, _: usize) -> bool {
        self.release
    }
    fn before_forward(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn unit_params(&self, unit: usize) -> &[f32] {
        &self.params[unit]
    }
    fn after_forward(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn before_backward(&mut self, unit: usize) -> Result<()> {
        if self.change_before_backward == Some(unit) {
            self.params[unit].iter_mut().for_each(|p| *p *= 2.0);
        }
        Ok(())
    }
    fn on_grads_ready(&mut self, unit: usize, grads: &[f32], _: MicroStep) -> Result<()> {
        self.grads[unit] = grads.to_vec();
        self.order.push(unit);
        Ok(())
    }
    fn step(&mut self, _: u64, _: f64, _: Option<f64>) -> Result<StepStats> {
        Ok(StepStats::default())
    }
    fn full_params(&mut self) -> Result<Vec<Vec<f32>>> {
        Ok(self.params.clone())
    }
    fn memory(&self) -> MemoryReport {
        MemoryReport::default()
    }
    fn state_view(&mut self) -> StateView<'_> {
        StateView {
            layout: &self.layout,
            params: &mut self.params,
            held: ParamsHeld::FullUnits,
            state: &self.state,
            optimizer: OptimizerKind::AdamW,
            store: &mut self.store,
        }
    }
}

fn small_gpt() -> GptConfig {
    GptConfig {
        vocab: 64,
        d_model: 64,
        n_layers: 3,
        n_heads: 4,
        max_seq_len: 32,
        seq_len: 24,
        key_bias: false,
        tie_embeddings: false,
    }
}

/// GPT-2's variant: key bias and the LM head tied to the token embedding.
fn gpt2_style() -> GptConfig {
    GptConfig {
        key_bias: true,
        tie_embeddings: true,
        ..small_gpt()
    }
}

fn whole_model_grads(
    model: &Gpt,
    layout: &ModelLayout,
    params: &[Vec<f32>],
    batch: &kiln::model::MicroBatch,
) -> Vec<Vec<f32>> {
    let device = Device::flex().autodiff();
    let leaves: Vec<Vec<Tensor<1>>> = layout
        .units
        .iter()
        .zip(params)
        .map(|(u, flat)| {
            u.params
                .iter()
                .map(|p| {
                    Tensor::<1>::from_data(
                        TensorData::new(flat[p.range()].to_vec(), [p.len]),
                        &device,
                    )
                    .require_grad()
                })
                .collect()
        })
        .collect();
    let mut x = None;
    for unit in 0..model.num_units() {
        // A tied weight is the same leaf in both units: autodiff sums its two uses.
        let mut params = leaves[unit].clone();
        for r in model.borrowed_params(unit) {
            params.push(leaves[r.unit][r.index].clone());
        }
        let params: Vec<Param> = params.into_iter().map(Param::from).collect();
        x = Some(model.forward_unit(unit, &params, x, batch).unwrap());
    }
    let grads = x.unwrap().sum().backward();
    layout
        .units
        .iter()
        .zip(&leaves)
        .map(|(u, ls)| {
            let mut flat = vec![0.0f32; u.padded_len];
            for (p, leaf) in u.params.iter().zip(ls) {
                flat[p.range()].copy_from_slice(
                    leaf.grad(&grads)
                        .unwrap()
                        .into_data()
                        .as_slice::<f32>()
                        .unwrap(),
                );
            }
            flat
        })
        .collect()
}

#[test]
fn unit_wise_gradients_equal_whole_model_gradients() {
    unit_wise_equals_whole_model(small_gpt());
}

/// The tied weight's gradient (embedding use + head use, summed by the engine across units)
/// equals autodiff's through one graph where both uses are the same leaf.
#[test]
fn tied_embeddings_and_key_bias_gradients_equal_whole_model_gradients() {
    let cfg = gpt2_style();
    let model = Gpt::new(cfg);
    assert!(
        model
            .unit_params(model.num_units() - 1)
            .iter()
            .all(|p| p.path != "lm_head.weight"),
        "a tied head has no matrix of its own"
    );
    assert!(model
        .unit_params(1)
        .iter()
        .any(|p| p.path == "blocks.0.attn.qkv.bias" && p.shape == [3 * cfg.d_model]));
    unit_wise_equals_whole_model(cfg);
}

/// Every unit's parameters, initialised from `seed`.
fn seeded_params(model: &Gpt, layout: &ModelLayout, seed: u64) -> Vec<Vec<f32>> {
    (0..model.num_units())
        .map(|u| init_unit(&model.unit_params(u), &layout.units[u], seed))
        .collect()
}

fn unit_wise_equals_whole_model(cfg: GptConfig) {
    let model = Gpt::new(cfg);
    let layout = ModelLayout::new(&model, 1);
    let params = seeded_params(&model, &layout, 7);
    let source = kiln::data::MarkovSource::new(3, 64, 1.0);
    let device = Device::flex();
    let batch = kiln::data::micro_batch(&source, 0, 0, 3, cfg.seq_len, &device, 0..3);
    let reference = whole_model_grads(&model, &layout, &params, &batch);

    for recompute in [false, true] {
        let mut rec = Recorder::new(&params, &layout, false, None);
        let mut engine = Engine::new(
            Box::new(model.clone()),
            layout.clone(),
            device.clone(),
            recompute,
        );
        let loss = engine
            .micro_step(&mut rec, &batch, MicroStep { index: 0, count: 1 })
            .unwrap();
        assert!(
            loss.is_finite() && loss > 3.0,
            "loss {loss} should be near ln(64) for a fresh model"
        );
        assert_eq!(
            rec.order,
            (0..model.num_units()).rev().collect::<Vec<_>>(),
            "backward visits units last to first"
        );
        for (u, (got, want)) in rec.grads.iter().zip(&reference).enumerate() {
            let d = common::rel_diff(got, want);
            assert!(
                d <= 1e-5,
                "recompute={recompute}: unit {} gradients differ by {d:e}",
                layout.units[u].name
            );
            assert!(
                want.iter().any(|g| *g != 0.0),
                "unit {u} has all-zero reference gradients"
            );
        }
    }
}

#[test]
fn recompute_gives_bitwise_the_same_gradients() {
    recompute_is_bitwise(small_gpt());
    recompute_is_bitwise(gpt2_style());
}

fn recompute_is_bitwise(cfg: GptConfig) {
    let model = Gpt::new(cfg);
    let layout = ModelLayout::new(&model, 1);
    let params = seeded_params(&model, &layout, 9);
    let source = kiln::data::MarkovSource::new(5, 64, 1.0);
    let device = Device::flex();
    let batch = kiln::data::micro_batch(&source, 2, 0, 2, cfg.seq_len, &device, 0..2);
    let run = |recompute: bool| {
        let mut rec = Recorder::new(&params, &layout, false, None);
        let mut engine = Engine::new(
            Box::new(model.clone()),
            layout.clone(),
            device.clone(),
            recompute,
        );
        engine
            .micro_step(&mut rec, &batch, MicroStep { index: 0, count: 1 })
            .unwrap();
        rec.grads
    };
    let (kept, recomputed) = (run(false), run(true));
    for (a, b) in kept.iter().zip(&recomputed) {
        assert!(
            common::bitwise_equal(a, b),
            "recompute changed the gradients"
        );
    }
}

/// A model that counts the forwards of each unit.
struct Counting {
    inner: Gpt,
    forwards: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl ModelUnits for Counting {
    fn num_units(&self) -> usize {
        self.inner.num_units()
    }
    fn unit_name(&self, unit: usize) -> String {
        self.inner.unit_name(unit)
    }
    fn unit_params(&self, unit: usize) -> Vec<kiln::model::ParamSpec> {
        self.inner.unit_params(unit)
    }
    fn borrowed_params(&self, unit: usize) -> Vec<kiln::model::ParamRef> {
        self.inner.borrowed_params(unit)
    }
    fn matmul_weights(&self, unit: usize) -> Option<Vec<bool>> {
        self.inner.matmul_weights(unit)
    }
}

impl UnitModel for Counting {
    fn forward_unit(
        &self,
        unit: usize,
        params: &[Param],
        input: Option<Tensor<3>>,
        batch: &kiln::model::MicroBatch,
    ) -> kiln::error::Result<Tensor<3>> {
        self.forwards.lock().unwrap()[unit] += 1;
        self.inner.forward_unit(unit, params, input, batch)
    }
}

/// Released units (ZeRO-3's regather): blocks and the head run their forward once and their
/// backward from weights refilled from the strategy's buffer before it, bitwise as when the
/// graph keeps them; the embedding, which cannot release its table, is recomputed. The tied
/// head (GPT-2 style) takes the transposed path.
#[test]
fn released_weights_give_bitwise_the_same_gradients_without_recompute() {
    for cfg in [small_gpt(), gpt2_style()] {
        let model = Gpt::new(cfg);
        let layout = ModelLayout::new(&model, 1);
        let params = seeded_params(&model, &layout, 11);
        let source = kiln::data::MarkovSource::new(5, 64, 1.0);
        let device = Device::flex();
        let batch = kiln::data::micro_batch(&source, 1, 0, 2, cfg.seq_len, &device, 0..2);
        let run = |release: bool, change_before_backward: Option<usize>| {
            let mut rec = Recorder::new(&params, &layout, release, change_before_backward);
            let forwards = std::sync::Arc::new(std::sync::Mutex::new(vec![0; model.num_units()]));
            let counting = Counting {
                inner: model.clone(),
                forwards: forwards.clone(),
            };
            let mut engine = Engine::new(Box::new(counting), layout.clone(), device.clone(), false);
            engine
                .micro_step(&mut rec, &batch, MicroStep { index: 0, count: 1 })
                .unwrap();
            let forwards = forwards.lock().unwrap().clone();
            (rec.grads, forwards)
        };
        let ((kept, kept_forwards), (released, released_forwards)) =
            (run(false, None), run(true, None));
        assert_eq!(kept_forwards, vec![1; model.num_units()]);
        let mut want = vec![1; model.num_units()];
        want[0] = 2;
        assert_eq!(
            released_forwards, want,
            "released: only the embedding recomputes"
        );
        for (u, (a, b)) in kept.iter().zip(&released).enumerate() {
            assert!(
                common::bitwise_equal(a, b),
                "unit {u}: released weights changed the gradients"
            );
        }
        // The backward of a released block reads its weights from the strategy's buffer at
        // backward time, not from a copy the graph kept since the forward. One block's weights
        // change at a time: within a block, a later matmul's weight enters an earlier one's
        // gradient (the MLP's projection into the first layer's), so the block's own gradients
        // change only if its backward read the buffer — whatever the units after it did.
        for u in 1..model.num_units() - 1 {
            let (changed, _) = run(true, Some(u));
            assert!(
                !common::bitwise_equal(&changed[u], &released[u]),
                "unit {u}: a released unit's backward did not read the regathered weights"
            );
            let (unchanged, _) = run(false, Some(u));
            assert!(
                unchanged
                    .iter()
                    .zip(&kept)
                    .all(|(a, b)| common::bitwise_equal(a, b)),
                "unit {u}: a kept graph read the strategy's buffer in backward"
            );
        }
    }
}

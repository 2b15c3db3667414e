//! DDP's static graph: the bucket plan is built once and its buffers are never reallocated; a
//! step that deviates from the plan, or ranks that build different plans, are errors that name
//! the unit or the ranks.

mod common;

use burn::tensor::Device;
use kiln::comm::{simulate_group, CommOptions, Communicator};
use kiln::data;
use kiln::engine::Engine;
use kiln::flat::ModelLayout;
use kiln::model::{Gpt, ModelUnits};
use kiln::plan::Plan;
use kiln::strategy::{MicroStep, Replicated, ReplicatedStage, Strategy};
use std::sync::Arc;

fn plan(world: usize, sets: &[&str]) -> Plan {
    let mut all = vec![
        "model.seq_len=16",
        "train.global_batch=4",
        "train.micro_batch=1",
        "train.steps=4",
    ];
    all.extend_from_slice(sets);
    Plan::resolve(&common::config(&all), world).unwrap()
}

/// Runs `steps` DDP steps on one rank and returns the strategy.
fn train_rank(
    plan: &Plan,
    comm: Arc<dyn Communicator>,
    steps: u64,
) -> kiln::error::Result<Replicated> {
    let model = Gpt::new(*plan.gpt());
    let layout = ModelLayout::new(&model, comm.world());
    let mut ddp = Replicated::new(plan, comm.clone(), &layout, &model, ReplicatedStage::Ddp)?;
    let mut engine = Engine::new(Box::new(model), layout, Device::flex(), false);
    let source = data::MarkovSource::new(1, 64, 2.0);
    for step in 0..steps {
        for index in 0..plan.grad_accum {
            let row = (comm.rank() * plan.grad_accum + index) as u64;
            let rows = 0..plan.global_batch as u64;
            let seq = plan.gpt().seq_len;
            let batch = data::micro_batch(&source, step, row, 1, seq, engine.device(), rows);
            engine.micro_step(
                &mut ddp,
                &batch,
                MicroStep {
                    index,
                    count: plan.grad_accum,
                },
            )?;
        }
        ddp.step(step, 1e-3, None)?;
    }
    Ok(ddp)
}

fn on_ranks<T: Send>(
    world: usize,
    plans: &[Plan],
    f: impl Fn(&Plan, Arc<dyn Communicator>) -> T + Sync,
) -> Vec<T> {
    let comms = simulate_group(world, &CommOptions::new(false));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                let p = &plans[r];
                s.spawn(move || f(p, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn static_graph_allocates_bucket_buffers_once() {
    let p = plan(2, &[]);
    let allocations = on_ranks(2, &[p.clone(), p], |p, c| {
        train_rank(p, c, 4).unwrap().buffer_allocations()
    });
    assert_eq!(allocations, vec![1, 1]);
}

#[test]
fn dynamic_graph_rebuilds_the_plan_every_step() {
    let p = plan(2, &["parallel.static_graph=false"]);
    let allocations = on_ranks(2, &[p.clone(), p], |p, c| {
        train_rank(p, c, 3).unwrap().buffer_allocations()
    });
    assert_eq!(allocations, vec![3, 3]);
}

#[test]
fn buckets_follow_arrival_order_with_a_small_first_bucket() {
    // 0.5 MiB buckets: the tiny preset's blocks (≈3 MiB each) get one bucket apiece, the head
    // (≈0.26 MiB) arrives first and fills the first, 1 MiB-capped, bucket.
    let p = plan(1, &["parallel.bucket_mb=0.5"]);
    let comm = simulate_group(1, &CommOptions::new(false)).pop().unwrap();
    let ddp = train_rank(&p, comm, 1).unwrap();
    let plan = ddp.bucket_plan().unwrap();
    let num_units = Gpt::new(*p.gpt()).num_units();
    assert_eq!(plan.order, (0..num_units).rev().collect::<Vec<_>>());
    assert_eq!(
        plan.buckets[0].slots[0].unit,
        num_units - 1,
        "the head's gradients arrive first"
    );
    assert!(
        plan.buckets.iter().skip(1).all(|b| b.slots.len() == 1),
        "0.5 MiB buckets hold one block each"
    );
}

#[test]
fn a_unit_out_of_order_is_an_error_naming_it() {
    let p = plan(1, &[]);
    let comm = simulate_group(1, &CommOptions::new(false)).pop().unwrap();
    let mut ddp = train_rank(&p, comm, 1).unwrap();
    let grads = vec![0.0f32; 1_000_000];
    let layout = ModelLayout::new(&Gpt::new(*p.gpt()), 1);
    let embed = &grads[..layout.units[0].padded_len];
    let err = ddp
        .on_grads_ready(0, embed, MicroStep { index: 0, count: 1 })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unit `embed`") && err.contains("expects `head`"),
        "{err}"
    );
}

#[test]
fn a_missing_unit_is_an_error_naming_it() {
    let p = plan(1, &[]);
    let comm = simulate_group(1, &CommOptions::new(false)).pop().unwrap();
    let mut ddp = train_rank(&p, comm, 1).unwrap();
    let layout = ModelLayout::new(&Gpt::new(*p.gpt()), 1);
    let head = layout.units.len() - 1;
    let grads = vec![0.0f32; layout.units[head].padded_len];
    ddp.on_grads_ready(head, &grads, MicroStep { index: 0, count: 1 })
        .unwrap();
    let err = ddp.step(1, 1e-3, None).unwrap_err().to_string();
    assert!(
        err.contains("unit `blocks.3` delivered no gradients"),
        "{err}"
    );
}

#[test]
fn ranks_with_different_plans_are_named() {
    let same = plan(2, &[]);
    let other = plan(2, &["parallel.bucket_mb=0.5"]);
    let errors = on_ranks(2, &[same, other], |p, c| {
        train_rank(p, c, 1).err().map(|e| e.to_string())
    });
    let msg = errors[0].clone().expect("rank 0 fails");
    assert!(
        msg.contains("bucket plan of rank(s) 1 differs from rank 0's"),
        "{msg}"
    );
}

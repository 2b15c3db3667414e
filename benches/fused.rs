//! kiln's fused GELU and causal attention (`kiln::model::fused`) next to what they replace:
//! the GELU composed from burn's elementwise ops (the GPT's form before the fused op) and burn's
//! own attention op (its decomposed fallback under autodiff). Forward and backward together, on
//! the tiny preset's shapes at micro-batch 8 (activations [8, 128, 1024]; attention 4 heads of
//! 64 over 128 positions), one thread. `cargo bench --bench fused` prints each pair side by side;
//! tests/fused_ops.rs checks that the two compute the same values.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion};
use kiln::model::fused::{causal_attention, gelu_tanh};
use std::hint::black_box;
use std::time::Duration;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5 - 1.0) * 3.0)
        .collect()
}

/// GPT-2's GELU from burn's elementwise ops (x · σ(2u) through exp and recip).
fn composed_gelu(x: Tensor<3>) -> Tensor<3> {
    const K: f64 = 1.595_769_121_605_730_7;
    let z = (x.clone() * x.clone() * x.clone() * 0.044715 + x.clone()) * K;
    x * (z.clamp(-30.0, 30.0).neg().exp() + 1.0).recip()
}

fn burn_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    attention(q, k, v, None, None, options)
}

fn gelu(c: &mut Criterion, pool: &rayon::ThreadPool) {
    let device = Device::flex().autodiff();
    let shape = [8, 128, 1024];
    let x = Tensor::<3>::from_data(TensorData::new(values(8 * 128 * 1024), shape), &device);
    let mut group = c.benchmark_group("gelu_fwd_bwd/8x128x1024");
    for (name, f) in [
        ("kiln_fused", gelu_tanh::<3> as fn(Tensor<3>) -> Tensor<3>),
        ("burn_composed", composed_gelu),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                pool.install(|| {
                    let x = x.clone().require_grad();
                    let grads = f(x.clone()).sum().backward();
                    black_box(x.grad(&grads));
                })
            })
        });
    }
    group.finish();
}

fn attention_bench(c: &mut Criterion, pool: &rayon::ThreadPool) {
    let device = Device::flex().autodiff();
    let shape = [8, 4, 128, 64];
    let n = 8 * 4 * 128 * 64;
    let t = |shift: usize| {
        let mut v = values(n);
        v.rotate_left(shift);
        Tensor::<4>::from_data(TensorData::new(v, shape), &device)
    };
    let (q, k, v) = (t(0), t(1), t(2));
    let mut group = c.benchmark_group("causal_attention_fwd_bwd/8x4x128x64");
    for (name, f) in [
        (
            "kiln_fused",
            causal_attention as fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
        ),
        ("burn_attention", burn_attention),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                pool.install(|| {
                    let (q, k, v) = (
                        q.clone().require_grad(),
                        k.clone().require_grad(),
                        v.clone().require_grad(),
                    );
                    let grads = f(q.clone(), k.clone(), v.clone()).sum().backward();
                    black_box((q.grad(&grads), k.grad(&grads), v.grad(&grads)));
                })
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    // One thread, as one rank of `kiln bench step` computes.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("rayon pool");
    gelu(c, &pool);
    attention_bench(c, &pool);
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(group);

//! Fused flat AdamW (`kiln::optim::adamw_step`) next to its reference: a plain scalar loop with
//! the same arithmetic on one thread, the kernel without the run-time AVX-512/AVX2 dispatch or
//! rayon. Both appear in one criterion group, `adamw/<n>`, with throughput in parameters per
//! second, so `cargo bench --bench adamw` prints them side by side. PyTorch's fused CPU AdamW is
//! the end-to-end comparison: `kiln bench adamw --torch-python PYTHON`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::optim::{adamw_step, AdamWConfig, StepScalars};
use std::hint::black_box;
use std::time::Duration;

const CFG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
};
const LR: f64 = 1e-3;

/// The reference: the update of `kiln::optim` written as the textbook loop over one slice, with
/// the per-step scalars derived the same way (f64, rounded to f32).
fn scalar_loop(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], t: u64) {
    let bc1 = 1.0 - CFG.beta1.powi(t as i32);
    let bc2 = 1.0 - CFG.beta2.powi(t as i32);
    let (b1, b2) = (CFG.beta1 as f32, CFG.beta2 as f32);
    let (c1, c2) = ((1.0 - CFG.beta1) as f32, (1.0 - CFG.beta2) as f32);
    let (step_size, bc2_sqrt) = ((LR / bc1) as f32, bc2.sqrt() as f32);
    let decay = (1.0 - LR * CFG.weight_decay) as f32;
    for i in 0..p.len() {
        m[i] = b1 * m[i] + c1 * g[i];
        v[i] = b2 * v[i] + c2 * (g[i] * g[i]);
        let denom = v[i].sqrt() / bc2_sqrt + CFG.eps as f32;
        p[i] = p[i] * decay - step_size * (m[i] / denom);
    }
}

fn bench(c: &mut Criterion) {
    // 256 Ki parameters fit in L2 (4 MiB of p, g, m, v); 4 Mi are memory-bound (64 MiB, 28
    // bytes moved per parameter), the regime of a real shard.
    for n in [1usize << 18, 1 << 22] {
        let mut group = c.benchmark_group(format!("adamw/{n}"));
        group.throughput(Throughput::Elements(n as u64));
        let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("rayon pool");
            let (mut p, mut m, mut v) = (vec![0.1f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            let s = StepScalars::new(&CFG, 10, LR, 1.0);
            group.bench_function(BenchmarkId::new("kiln_fused", format!("{threads}t")), |b| {
                b.iter(|| {
                    pool.install(|| adamw_step(&mut p, &g, &mut m, &mut v, &s, true));
                    black_box(&p);
                })
            });
        }
        let (mut p, mut m, mut v) = (vec![0.1f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        group.bench_function(BenchmarkId::new("reference_scalar_loop", "1t"), |b| {
            b.iter(|| {
                scalar_loop(&mut p, &g, &mut m, &mut v, 10);
                black_box(&p);
            })
        });
        group.finish();
    }
}

/// Whether the reference computes what the fused kernel does, bit for bit, so that the two rows
/// compare the same work. Checked before timing: a mismatch stops the bench.
fn check_reference() {
    let n = 1000;
    let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
    let (mut p1, mut m1, mut v1) = (vec![0.1f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
    for t in 1..=3 {
        adamw_step(
            &mut p1,
            &g,
            &mut m1,
            &mut v1,
            &StepScalars::new(&CFG, t, LR, 1.0),
            true,
        );
        scalar_loop(&mut p2, &g, &mut m2, &mut v2, t);
    }
    assert!(
        p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the scalar reference does not compute kiln's AdamW"
    );
}

fn benches(c: &mut Criterion) {
    check_reference();
    bench(c);
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);

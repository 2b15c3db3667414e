//! The fused flat AdamW equals a float64 evaluation of PyTorch's AdamW formula.

use kiln::optim::{adamw_step, AdamWConfig, StepScalars};
use kiln::rng::Rng;

/// torch.optim.AdamW's update, in f64.
fn reference_step(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    cfg: &AdamWConfig,
    t: u64,
    lr: f64,
    decay: bool,
) {
    let bc1 = 1.0 - cfg.beta1.powi(t as i32);
    let bc2 = 1.0 - cfg.beta2.powi(t as i32);
    for i in 0..p.len() {
        if decay {
            p[i] *= 1.0 - lr * cfg.weight_decay;
        }
        m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
        v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
        let denom = v[i].sqrt() / bc2.sqrt() + cfg.eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

#[test]
fn flat_adamw_matches_float64_pytorch_formula_over_ten_steps() {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    // Long enough for the rayon path (several chunks) plus an odd tail.
    let len = 100_003;
    let mut rng = Rng::derive(1, &[]);
    for decay in [true, false] {
        let p0: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
        let mut pr: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut mr, mut vr) = (vec![0.0f64; len], vec![0.0f64; len]);
        for t in 1..=10u64 {
            let lr = 1e-3 * t as f64;
            let g: Vec<f32> = (0..len).map(|_| (rng.normal() * 0.1) as f32).collect();
            let gr: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            adamw_step(
                &mut p,
                &g,
                &mut m,
                &mut v,
                &StepScalars::new(&cfg, t, lr, 1.0),
                decay,
            );
            reference_step(&mut pr, &gr, &mut mr, &mut vr, &cfg, t, lr, decay);
        }
        // Relative to the tensor's scale: an element that passes through zero has no meaningful
        // elementwise relative error, but its absolute error must stay at f32 rounding level.
        let scale = pr.iter().map(|b| b.abs()).fold(0.0, f64::max);
        let worst = p
            .iter()
            .zip(&pr)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
            / scale;
        assert!(
            worst <= 1e-6,
            "decay={decay}: worst relative difference {worst:e}"
        );
        assert!(
            p.iter().zip(&p0).any(|(a, b)| a != b),
            "parameters did not move"
        );
    }
}

#[test]
fn chunked_and_unchunked_updates_are_bitwise_equal() {
    // Shards move elements between the vectorised body and the scalar tail; every element must
    // still get the same arithmetic, or ZeRO stages would drift from DDP.
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let len = 70_001;
    let mut rng = Rng::derive(2, &[]);
    let p0: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    let g: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    let s = StepScalars::new(&cfg, 3, 1e-3, 0.7);
    let (mut whole, mut mw, mut vw) = (p0.clone(), vec![0.1f32; len], vec![0.2f32; len]);
    adamw_step(&mut whole, &g, &mut mw, &mut vw, &s, true);
    let (mut parts, mut mp, mut vp) = (p0.clone(), vec![0.1f32; len], vec![0.2f32; len]);
    for (a, b) in [(0, 13), (13, 40_000), (40_000, 40_007), (40_007, len)] {
        adamw_step(
            &mut parts[a..b],
            &g[a..b],
            &mut mp[a..b],
            &mut vp[a..b],
            &s,
            true,
        );
    }
    assert!(whole
        .iter()
        .zip(&parts)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(mw.iter().zip(&mp).all(|(a, b)| a.to_bits() == b.to_bits()));
}

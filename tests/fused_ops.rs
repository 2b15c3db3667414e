//! kiln's fused GELU and causal attention (src/model/fused) against independent references:
//! the GELU against its formula evaluated in f64, the attention against burn's own attention op
//! (its decomposed fallback), forward values and the gradients of all inputs, with and without
//! autodiff. Shapes are chosen to cross the kernels' task boundaries (more elements than one
//! task's 16 Ki chunk, rows that do not divide it).

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData};
use kiln::model::fused::{causal_attention, gelu_tanh};

/// f32 kernels against f64 or differently ordered f32 references: a few ulp of the values
/// involved, with an absolute floor for results near zero.
const REL: f64 = 2e-5;
const ABS: f64 = 2e-6;

/// Deterministic values in [−1, 1) (xorshift), scaled.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= ABS + REL * w.abs(),
            "{what}[{i}]: got {g}, want {w} (error {err:e})"
        );
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().as_slice::<f32>().unwrap().to_vec()
}

fn gelu_f64(x: f64) -> (f64, f64) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let u = k * (x + 0.044715 * x * x * x);
    let th = u.tanh();
    let y = 0.5 * x * (1.0 + th);
    let dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x);
    (y, dy)
}

#[test]
fn gelu_matches_its_formula_forward_and_backward() {
    // 3 × 7 × 2000 = 42 000 elements (three tasks), values up to ±12, plus the far tails where
    // the clamp and the exp's range limits act.
    let mut xs = values(3 * 7 * 2000, 1, 12.0);
    xs[..6].copy_from_slice(&[-200.0, -40.0, -15.5, 15.5, 40.0, 200.0]);
    let weights = values(xs.len(), 2, 1.0);
    let want: Vec<(f64, f64)> = xs.iter().map(|&x| gelu_f64(x as f64)).collect();

    let plain = gelu_tanh(Tensor::<3>::from_data(
        TensorData::new(xs.clone(), [3, 7, 2000]),
        &Device::flex(),
    ));
    let want_y: Vec<f64> = want.iter().map(|w| w.0).collect();
    assert_close("gelu (no autodiff)", &to_vec(plain), &want_y);

    let device = Device::flex().autodiff();
    let x =
        Tensor::<3>::from_data(TensorData::new(xs.clone(), [3, 7, 2000]), &device).require_grad();
    let w = Tensor::<3>::from_data(TensorData::new(weights.clone(), [3, 7, 2000]), &device);
    let y = gelu_tanh(x.clone());
    assert_close("gelu", &to_vec(y.clone()), &want_y);
    let grads = (y * w).sum().backward();
    let want_dx: Vec<f64> = want
        .iter()
        .zip(&weights)
        .map(|(w, &g)| w.1 * g as f64)
        .collect();
    assert_close("gelu grad", &to_vec(x.grad(&grads).unwrap()), &want_dx);
}

/// Forward output and the gradients of q, k, v of `sum(attention(q, k, v) ⊙ w)`.
fn attention_run(fused: bool, shape: [usize; 4], seeds: [u64; 4]) -> (Vec<f32>, [Vec<f32>; 3]) {
    let device = Device::flex().autodiff();
    let leaf = |seed: u64| {
        let n = shape.iter().product();
        Tensor::<4>::from_data(TensorData::new(values(n, seed, 2.0), shape), &device).require_grad()
    };
    let (q, k, v) = (leaf(seeds[0]), leaf(seeds[1]), leaf(seeds[2]));
    let out = if fused {
        causal_attention(q.clone(), k.clone(), v.clone())
    } else {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q.clone(), k.clone(), v.clone(), None, None, options)
    };
    let n = shape.iter().product();
    let w = Tensor::<4>::from_data(TensorData::new(values(n, seeds[3], 1.0), shape), &device);
    let grads = (out.clone() * w).sum().backward();
    let grad = |t: &Tensor<4>| to_vec(t.grad(&grads).unwrap());
    (to_vec(out), [grad(&q), grad(&k), grad(&v)])
}

#[test]
fn causal_attention_matches_burns_attention_forward_and_backward() {
    // t = 131: rows do not divide a task's chunk, so tasks start mid-matrix; 2 × 3 heads.
    for shape in [[2, 3, 131, 16], [1, 1, 1, 4], [1, 2, 5, 3]] {
        let seeds = [11, 12, 13, 14];
        let (out, grads) = attention_run(true, shape, seeds);
        let (want_out, want_grads) = attention_run(false, shape, seeds);
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&format!("attention {shape:?}"), &out, &widen(&want_out));
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_grads)) {
            assert_close(&format!("attention {name} {shape:?}"), g, &widen(w));
        }
    }
}

#[test]
fn causal_attention_without_autodiff_matches_with() {
    let shape = [2, 2, 9, 8];
    let device = Device::flex();
    let t = |seed: u64| {
        Tensor::<4>::from_data(
            TensorData::new(values(2 * 2 * 9 * 8, seed, 2.0), shape),
            &device,
        )
    };
    let plain = to_vec(causal_attention(t(11), t(12), t(13)));
    let (tracked, _) = attention_run(true, shape, [11, 12, 13, 14]);
    assert_eq!(plain, tracked, "the same kernels with and without autodiff");
}

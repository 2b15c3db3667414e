//! A synthetic order-2 Markov source with a known entropy rate. The next symbol c after the
//! context (a, b) is drawn from `softmax_c(s · (U[b, c] + V[a, c]))` with seeded Gaussian tables
//! U and V: each of the two previous symbols shifts the logits on its own, so a model gains from
//! the previous symbol (a bigram) first and then from the one before it (through attention),
//! instead of facing an all-or-nothing lookup table that gradient descent learns only after a
//! long plateau. The entropy rate H (nats per token) is the loss an ideal model reaches, so
//! training quality is checkable: a loss near H means the model has learned the chain.

use super::TokenSource;
use crate::rng::Rng;

/// The order-2 chain.
pub struct MarkovSource {
    seed: u64,
    symbols: usize,
    /// Cumulative next-symbol distribution of context `a * symbols + b`, `symbols` entries each.
    cumulative: Vec<f64>,
    /// Cumulative stationary distribution over contexts, to start rows in equilibrium.
    start_cumulative: Vec<f64>,
    entropy_rate: f64,
}

impl MarkovSource {
    /// The chain for `seed` over `symbols` symbols; `sharpness` scales the logits (higher means
    /// more predictable, lower entropy).
    pub fn new(seed: u64, symbols: usize, sharpness: f64) -> Self {
        let n = symbols;
        let mut rng = Rng::derive(seed, &[0x6d61726b6f76]);
        let u: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
        let v: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
        let mut probs = vec![0.0f64; n * n * n];
        for a in 0..n {
            for b in 0..n {
                let row = &mut probs[(a * n + b) * n..(a * n + b + 1) * n];
                for c in 0..n {
                    row[c] = sharpness * (u[b * n + c] + v[a * n + c]);
                }
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                row.iter_mut().for_each(|x| *x = (*x - max).exp());
                let total: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= total);
            }
        }
        let stationary = stationary(n, &probs);
        let entropy_rate = (0..n * n)
            .map(|ctx| {
                let h: f64 = probs[ctx * n..(ctx + 1) * n]
                    .iter()
                    .filter(|&&p| p > 0.0)
                    .map(|&p| -p * p.ln())
                    .sum();
                stationary[ctx] * h
            })
            .sum();
        MarkovSource {
            seed,
            symbols,
            cumulative: running_sums(&probs, n),
            start_cumulative: running_sums(&stationary, n * n),
            entropy_rate,
        }
    }

    fn pick(cumulative: &[f64], u: f64) -> usize {
        cumulative
            .partition_point(|&c| c <= u)
            .min(cumulative.len() - 1)
    }
}

/// Running sums restarted every `block` entries.
fn running_sums(p: &[f64], block: usize) -> Vec<f64> {
    p.chunks(block)
        .flat_map(|chunk| {
            let mut acc = 0.0;
            chunk.iter().map(move |x| {
                acc += x;
                acc
            })
        })
        .collect()
}

/// Stationary distribution over contexts (a, b), by power iteration on the lazy chain
/// (½I + ½P), which has the same stationary distribution and always converges.
fn stationary(n: usize, probs: &[f64]) -> Vec<f64> {
    let contexts = n * n;
    let mut pi = vec![1.0 / contexts as f64; contexts];
    let mut next = vec![0.0; contexts];
    for _ in 0..100_000 {
        next.iter_mut().zip(&pi).for_each(|(x, p)| *x = 0.5 * p);
        for ctx in 0..contexts {
            let b = ctx % n;
            let weight = 0.5 * pi[ctx];
            let row = &probs[ctx * n..(ctx + 1) * n];
            let dst = &mut next[b * n..(b + 1) * n];
            dst.iter_mut().zip(row).for_each(|(d, p)| *d += weight * p);
        }
        let change: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
        std::mem::swap(&mut pi, &mut next);
        if change < 1e-13 {
            break;
        }
    }
    pi
}

impl TokenSource for MarkovSource {
    fn fill_row(&self, step: u64, row: u64, out: &mut [u32]) {
        let n = self.symbols;
        let mut rng = Rng::derive(self.seed, &[step, row]);
        let ctx = Self::pick(&self.start_cumulative, rng.next_f64());
        let (mut a, mut b) = (ctx / n, ctx % n);
        for (i, slot) in out.iter_mut().enumerate() {
            let token = match i {
                0 => a,
                1 => b,
                _ => {
                    let c = a * n + b;
                    let s = Self::pick(&self.cumulative[c * n..(c + 1) * n], rng.next_f64());
                    (a, b) = (b, s);
                    s
                }
            };
            *slot = token as u32;
        }
    }

    fn describe(&self) -> String {
        format!(
            "markov order-2 source: {} symbols, entropy rate H = {:.4} nats/token",
            self.symbols, self.entropy_rate
        )
    }

    fn entropy_rate(&self) -> Option<f64> {
        Some(self.entropy_rate)
    }
}

//! A synthetic order-2 Markov source with a known entropy rate: each two-symbol context has
//! `branching` possible successors with seeded random probabilities. Its entropy rate H (nats per
//! token) is the loss an ideal model reaches, so training quality is checkable: a loss near H
//! means the model has learned the chain.

use super::TokenSource;
use crate::rng::Rng;

/// The order-2 Markov chain.
pub struct MarkovSource {
    seed: u64,
    symbols: usize,
    /// For context `a * symbols + b`: successors and their cumulative probabilities.
    successors: Vec<u32>,
    cumulative: Vec<f64>,
    branching: usize,
    /// Cumulative stationary distribution over contexts, to start rows in equilibrium.
    start_cumulative: Vec<f64>,
    entropy_rate: f64,
}

impl MarkovSource {
    /// The chain for `seed`, over `symbols` symbols with `branching` successors per context.
    pub fn new(seed: u64, symbols: usize, branching: usize) -> Self {
        let contexts = symbols * symbols;
        let mut rng = Rng::derive(seed, &[0x6d61726b6f76]);
        let mut successors = Vec::with_capacity(contexts * branching);
        let mut probs = Vec::with_capacity(contexts * branching);
        for _ in 0..contexts {
            // Distinct successors (partial Fisher-Yates) with Dirichlet(1) probabilities.
            let mut pool: Vec<u32> = (0..symbols as u32).collect();
            let mut weights = Vec::with_capacity(branching);
            for k in 0..branching {
                let j = k + rng.below((symbols - k) as u64) as usize;
                pool.swap(k, j);
                successors.push(pool[k]);
                weights.push(-(1.0 - rng.next_f64()).ln());
            }
            let total: f64 = weights.iter().sum();
            probs.extend(weights.iter().map(|w| w / total));
        }
        let stationary = stationary(symbols, branching, &successors, &probs);
        let entropy_rate = (0..contexts)
            .map(|c| {
                let h: f64 = probs[c * branching..(c + 1) * branching].iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
                stationary[c] * h
            })
            .sum();
        let cumulative = probs
            .chunks(branching)
            .flat_map(|ps| {
                let mut acc = 0.0;
                ps.iter().map(move |p| {
                    acc += p;
                    acc
                })
            })
            .collect();
        let mut acc = 0.0;
        let start_cumulative = stationary.iter().map(|p| {
            acc += p;
            acc
        });
        MarkovSource { seed, symbols, successors, cumulative, branching, start_cumulative: start_cumulative.collect(), entropy_rate }
    }

    fn pick(cumulative: &[f64], u: f64) -> usize {
        cumulative.partition_point(|&c| c <= u).min(cumulative.len() - 1)
    }
}

/// Stationary distribution over contexts, by power iteration on the lazy chain (½I + ½P), which
/// has the same stationary distribution and always converges.
fn stationary(symbols: usize, branching: usize, successors: &[u32], probs: &[f64]) -> Vec<f64> {
    let contexts = symbols * symbols;
    let mut pi = vec![1.0 / contexts as f64; contexts];
    let mut next = vec![0.0; contexts];
    for _ in 0..100_000 {
        next.iter_mut().zip(&pi).for_each(|(n, p)| *n = 0.5 * p);
        for c in 0..contexts {
            let b = c % symbols;
            for k in 0..branching {
                let s = successors[c * branching + k] as usize;
                next[b * symbols + s] += 0.5 * pi[c] * probs[c * branching + k];
            }
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
        let mut rng = Rng::derive(self.seed, &[step, row]);
        let ctx = Self::pick(&self.start_cumulative, rng.next_f64());
        let (mut a, mut b) = (ctx / self.symbols, ctx % self.symbols);
        for (i, slot) in out.iter_mut().enumerate() {
            let token = match i {
                0 => a,
                1 => b,
                _ => {
                    let c = a * self.symbols + b;
                    let range = c * self.branching..(c + 1) * self.branching;
                    let k = Self::pick(&self.cumulative[range.clone()], rng.next_f64());
                    let s = self.successors[range.start + k] as usize;
                    (a, b) = (b, s);
                    s
                }
            };
            *slot = token as u32;
        }
    }

    fn describe(&self) -> String {
        format!(
            "markov order-2 source: {} symbols, {} successors per context, entropy rate H = {:.4} nats/token",
            self.symbols, self.branching, self.entropy_rate
        )
    }

    fn entropy_rate(&self) -> Option<f64> {
        Some(self.entropy_rate)
    }
}

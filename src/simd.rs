//! Running a loop compiled for the widest vector unit the CPU has, chosen at run time: the
//! crate is built for baseline x86-64 (SSE2), which would leave AVX2 and AVX-512 unused.
//!
//! Every path does the same IEEE operations per element — add, mul, div, sqrt are correctly
//! rounded at any width, and Rust never contracts `a * b + c` into an FMA — so the results are
//! bitwise the same whichever path runs. Callers rely on this: ZeRO stages must equal DDP bit for
//! bit, and shard boundaries move elements between vector bodies and scalar tails.

/// A loop to compile once per vector width. `run` must be `#[inline(always)]` (with every
/// function it calls in its hot loop): that is what puts a copy of the loop into each variant —
/// a closure would be compiled once, at the baseline, and called from all of them.
pub trait Kernel {
    /// What the loop returns.
    type Output;
    /// The loop.
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for AVX-512F where the CPU has it, else AVX2, else the baseline.
#[inline(always)]
pub fn widest<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { avx512(kernel) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run()
}

/// Accumulators of [`max`]: one AVX-512 register of f32, two of AVX2, four of SSE2.
const LANES: usize = 16;

/// `max x` (−∞ for an empty slice) over [`LANES`] interleaved partial maxima, so that it
/// vectorises; a maximum is exact, so the grouping cannot change the result. (Sums are another
/// matter: regrouping one changes its rounding, so kernels keep those in sequence.)
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

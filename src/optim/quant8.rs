//! 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"), as
//! bitsandbytes' `AdamW8bit` does it: m and v kept as one byte per element in blocks of
//! [`BLOCK`] elements, each block with its absolute maximum as an f32 scale, on bitsandbytes'
//! dynamic (non-linear) code — a signed one for m, an unsigned one for v, both spanning seven
//! decades below the block's maximum. A step dequantizes a block, runs AdamW's own f32 kernel on
//! it, and quantizes the new m and v to the nearest code under the new block maximum (the order
//! of bitsandbytes' CPU kernel). State: 2 bytes per element plus 8 per block, 0.254× AdamW's.
//!
//! Blocks are `flat::SHARD_GRAIN` elements of a unit's flat buffer, starting at its offset 0, so
//! a block never straddles a shard and is the same block at every world size and stage: the
//! stages stay bitwise equal to DDP, and a checkpoint (which stores the codes and scales as
//! they are) reshards without requantizing. One difference from bitsandbytes, which keeps
//! tensors under 4,096 elements in f32 state (`min_8bit_size`): kiln quantizes every element,
//! since its blocks are cut from the flat buffer, not per tensor.

use super::{adamw_step, StepScalars};
use crate::offload::StateChunk;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Elements per quantization block (bitsandbytes' optimizer block size).
pub const BLOCK: usize = crate::offload::StateFormat::BLOCK;

/// Blocks one task dequantizes, updates and quantizes at a time: the f32 scratch stays small
/// (2 × 64 KiB) whatever the shard's size.
const SPAN: usize = 64 * BLOCK;

/// A 256-entry code, sorted, with the midpoints between neighbours for nearest-code search.
pub struct Codebook {
    /// Code values, ascending.
    pub values: [f32; 256],
    /// `(values[i] + values[i + 1]) / 2`.
    bounds: [f32; 255],
}

impl Codebook {
    fn new(values: [f32; 256]) -> Self {
        let bounds = std::array::from_fn(|i| (values[i] + values[i + 1]) / 2.0);
        Codebook { values, bounds }
    }

    /// bitsandbytes' dynamic code for m (`create_dynamic_map(signed=True)`).
    pub fn signed() -> &'static Codebook {
        static BOOK: OnceLock<Codebook> = OnceLock::new();
        BOOK.get_or_init(|| Codebook::new(dynamic_map(true)))
    }

    /// bitsandbytes' dynamic code for v (`create_dynamic_map(signed=False)`).
    pub fn unsigned() -> &'static Codebook {
        static BOOK: OnceLock<Codebook> = OnceLock::new();
        BOOK.get_or_init(|| Codebook::new(dynamic_map(false)))
    }

    /// The code nearest `x` (in [-1, 1]); a value on a midpoint takes the lower code, as
    /// `torch.bucketize` over the midpoints does.
    #[inline]
    fn nearest(&self, x: f32) -> u8 {
        self.bounds.partition_point(|&b| b < x) as u8
    }
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for each
/// decade 10^(i−6), i = 0..6, the midpoints of an f32 `linspace(0.1, 1, n_i)` scaled by it
/// (n_i doubling with i; unsigned codes get twice as many), plus 0 and 1, padded with zeros to
/// 256 entries and sorted. The f32 rounding follows torch's, so the values are bitsandbytes'
/// bit for bit (held to its table by tests/optimizers.rs).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const EXP_BITS: i32 = 7;
    const NON_SIGN: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXP_BITS {
        let items = if signed {
            (1 << (i + NON_SIGN - EXP_BITS)) + 1
        } else {
            (1 << (i + NON_SIGN - EXP_BITS + 1)) + 1
        };
        let b = linspace_f32(0.1, 1.0, items);
        // Python's 10 ** (i − 6), which torch rounds to f32 to multiply an f32 tensor.
        let scale = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i as usize] as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    // total_cmp puts -0 before +0; the code has no -0 (torch's -(s·m) of a positive mean).
    data.try_into().expect("256 entries")
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the step in f32, the first
/// half counted up from `start`, the second down from `end`, each value one fused multiply-add
/// (matched against torch's output for every size the codes use).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// Quantizes `x` block by block into `codes` and one scale (absmax) per block in `scales`.
pub fn quantize(x: &[f32], codes: &mut [u8], scales: &mut [f32], book: &Codebook) {
    for ((x, q), s) in x
        .chunks(BLOCK)
        .zip(codes.chunks_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let absmax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        *s = absmax;
        let inv = 1.0 / absmax.max(1e-38);
        for (q, &v) in q.iter_mut().zip(x) {
            *q = book.nearest((v * inv).clamp(-1.0, 1.0));
        }
    }
}

/// The values of `codes` under their blocks' `scales`, into `out`.
pub fn dequantize(codes: &[u8], scales: &[f32], out: &mut [f32], book: &Codebook) {
    for ((q, &s), o) in codes.chunks(BLOCK).zip(scales).zip(out.chunks_mut(BLOCK)) {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = book.values[q as usize] * s;
        }
    }
}

/// One 8-bit AdamW step over a window of the flat state that starts on a block boundary: `p`
/// and `g` are the window's parameters and gradients, `state` its lanes (codes of m and v, then
/// their scales), `pieces` the parameter ranges inside it, in order, with their decay flags
/// (padding is in none, and its state stays zero).
pub fn adamw8bit_step(
    p: &mut [f32],
    g: &[f32],
    mut state: StateChunk<'_>,
    pieces: &[(Range<usize>, bool)],
    s: &StepScalars,
) {
    let [qm, qv] = &mut state.codes[..] else {
        panic!("8-bit AdamW state has two byte lanes")
    };
    let [sm, sv] = &mut state.scales[..] else {
        panic!("8-bit AdamW state has two scale lanes")
    };
    let per_span = SPAN / BLOCK;
    p.par_chunks_mut(SPAN)
        .zip(qm.par_chunks_mut(SPAN))
        .zip(qv.par_chunks_mut(SPAN))
        .zip(sm.par_chunks_mut(per_span))
        .zip(sv.par_chunks_mut(per_span))
        .enumerate()
        .with_max_len(1)
        .for_each(|(k, ((((p, qm), qv), sm), sv))| {
            let span = Span {
                lo: k * SPAN,
                p,
                qm,
                qv,
                sm,
                sv,
            };
            span.step(g, pieces, s)
        });
}

/// [`SPAN`] elements of a window: their parameters, codes and block scales.
struct Span<'a> {
    /// Offset of the first element in the window.
    lo: usize,
    p: &'a mut [f32],
    qm: &'a mut [u8],
    qv: &'a mut [u8],
    sm: &'a mut [f32],
    sv: &'a mut [f32],
}

impl Span<'_> {
    /// Dequantizes m and v, runs AdamW on the pieces' elements, quantizes them back.
    fn step(self, g: &[f32], pieces: &[(Range<usize>, bool)], s: &StepScalars) {
        let Span {
            lo,
            p,
            qm,
            qv,
            sm,
            sv,
        } = self;
        let n = p.len();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        dequantize(qm, sm, &mut m, Codebook::signed());
        dequantize(qv, sv, &mut v, Codebook::unsigned());
        // Elements in no piece are padding, whose state is zero by definition: zeroed here
        // rather than trusted, so that a padding code read back from a checkpoint (the reader
        // fills padding with code 0, which is not the code of zero) cannot move the block's
        // maximum.
        let mut covered = 0;
        for (r, decay) in pieces {
            let (a, b) = (r.start.max(lo), r.end.min(lo + n));
            if a < b {
                let (a, b) = (a - lo, b - lo);
                m[covered..a].fill(0.0);
                v[covered..a].fill(0.0);
                covered = b;
                let (p, g) = (&mut p[a..b], &g[lo + a..lo + b]);
                adamw_step(p, g, &mut m[a..b], &mut v[a..b], s, *decay);
            }
        }
        m[covered..].fill(0.0);
        v[covered..].fill(0.0);
        quantize(&m, qm, sm, Codebook::signed());
        quantize(&v, qv, sv, Codebook::unsigned());
    }
}

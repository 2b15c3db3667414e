//! QLoRA's frozen base in 4 bits: NF4 (Dettmers et al. 2023, bitsandbytes'
//! `bnb_4bit_quant_type = "nf4"`). A weight is cut into blocks of 64 consecutive elements in
//! the order of a torch `Linear`'s `[out, in]` weight (burn's `[in, out]`, transposed: the
//! blocks bitsandbytes makes of the same weight); each block keeps its absolute maximum as an
//! f32 and each element the nearest of the 16 NF4 levels of `x / absmax`, two to a byte, the
//! first in the high nibble. 0.5 + 4/64 = 0.5625 bytes per parameter, 0.28 × bf16's 2. The
//! absmax values are not quantized again (bitsandbytes' `bnb_4bit_use_double_quant`, which
//! would shrink their 0.0625 bytes per parameter to about 0.016).
//!
//! Stored in kiln's frozen buffers as f32 words (the absmax values, then the packed codes
//! bit-cast), so that the stage-3 sharding and gathering of frozen parameters carries them
//! unchanged: a gather copies bits.

/// Elements per block.
pub const BLOCK: usize = 64;

/// bitsandbytes' NF4 levels: the quantiles of a standard normal, normalised to [-1, 1], with
/// an exact zero.
const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The index of the level nearest `x` (x in [-1, 1]).
fn nearest(x: f32) -> u8 {
    let mut best = 0;
    for (i, &l) in LEVELS.iter().enumerate() {
        if (x - l).abs() < (x - LEVELS[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// f32 words a weight of `numel` elements takes (a multiple of [`BLOCK`]).
pub fn stored_len(numel: usize) -> usize {
    numel / BLOCK + numel / 8
}

/// `w` (burn's `[d_in, d_out]`, row-major; `d_in · d_out` a multiple of [`BLOCK`]) in NF4.
pub fn encode(w: &[f32], [d_in, d_out]: [usize; 2]) -> Vec<f32> {
    // torch's order: row o holds input i at o · d_in + i.
    let torch: Vec<f32> = (0..d_out)
        .flat_map(|o| (0..d_in).map(move |i| w[i * d_out + o]))
        .collect();
    let blocks = torch.len() / BLOCK;
    let mut out = Vec::with_capacity(stored_len(torch.len()));
    let mut codes = Vec::with_capacity(torch.len() / 2);
    for block in torch.chunks(BLOCK) {
        let absmax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        out.push(absmax);
        let scale = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
        for pair in block.chunks(2) {
            codes.push((nearest(pair[0] * scale) << 4) | nearest(pair[1] * scale));
        }
    }
    debug_assert_eq!(out.len(), blocks);
    out.extend(
        codes
            .chunks(4)
            .map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
    );
    out
}

/// The weight `stored` holds, back in burn's `[d_in, d_out]` order.
pub fn decode(stored: &[f32], [d_in, d_out]: [usize; 2]) -> Vec<f32> {
    let numel = d_in * d_out;
    let (absmax, packed) = stored.split_at(numel / BLOCK);
    let mut w = vec![0.0f32; numel];
    let mut t = 0;
    for word in packed {
        for byte in word.to_bits().to_le_bytes() {
            for code in [byte >> 4, byte & 0x0f] {
                let (o, i) = (t / d_in, t % d_in);
                w[i * d_out + o] = LEVELS[code as usize] * absmax[t / BLOCK];
                t += 1;
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_the_nearest_level_of_each_block() {
        // 4 × 32 = 128 elements: two blocks of torch's [32, 4] order.
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let stored = encode(&w, [4, 32]);
        assert_eq!(stored.len(), stored_len(128));
        let back = decode(&stored, [4, 32]);
        for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
            // The levels are at most 0.3 apart (between -1 and -0.696), so the error is at most
            // 0.16 of the block's absmax (50/7).
            assert!((a - b).abs() <= 0.16 * 50.0 / 7.0, "{i}: {a} vs {b}");
        }
        // A level itself survives exactly, and the block maximum is exact.
        let exact: Vec<f32> = (0..64).map(|i| LEVELS[i % 16] * 3.0).collect();
        assert_eq!(decode(&encode(&exact, [64, 1]), [64, 1]), exact);
    }

    /// bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64)` of a torch weight
    /// (`scripts/make_nf4_fixture.py`): the same levels, absmax values and packed bytes, and
    /// `dequantize_4bit`'s values exactly.
    #[test]
    fn equals_bitsandbytes_byte_for_byte() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4/bnb.json");
        let bnb: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let f32s = |key: &str| -> Vec<f32> {
            bnb[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        assert_eq!(f32s("levels"), LEVELS);
        let (d_out, d_in) = (32, 64);
        let torch = f32s("weight");
        // burn's [in, out] layout of torch's [out, in] weight.
        let burn: Vec<f32> = (0..d_in)
            .flat_map(|i| (0..d_out).map(move |o| (i, o)))
            .map(|(i, o)| torch[o * d_in + i])
            .collect();
        let stored = encode(&burn, [d_in, d_out]);
        let blocks = d_in * d_out / BLOCK;
        assert_eq!(stored[..blocks], f32s("absmax")[..]);
        let bytes: Vec<u8> = stored[blocks..]
            .iter()
            .flat_map(|w| w.to_bits().to_le_bytes())
            .collect();
        let packed: Vec<u8> = bnb["packed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, packed);
        let back = decode(&stored, [d_in, d_out]);
        let want = f32s("dequantized");
        for i in 0..d_in {
            for o in 0..d_out {
                assert_eq!(back[i * d_out + o], want[o * d_in + i], "[{o}, {i}]");
            }
        }
    }

    #[test]
    fn codes_pack_high_nibble_first() {
        let mut w = vec![0.0f32; 64];
        w[0] = -1.0; // level 0
        w[1] = 1.0; // level 15
        let stored = encode(&w, [64, 1]);
        let first = stored[1].to_bits().to_le_bytes()[0];
        assert_eq!(first, 0x0f);
    }
}

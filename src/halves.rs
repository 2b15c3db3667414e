//! bf16 and f16 values two to an f32 word: how a low-precision value travels through kiln's
//! f32 buffers and collectives (ZeRO-3's gathers under `train.precision = "bf16"`/`"fp16"`,
//! frozen parameters stored in the compute dtype). A word's low 16 bits hold the first value.
//! Rounding is to nearest even, as burn's casts round, so a value rounded here and then cast
//! by burn is the value burn's cast of the f32 would have given.

/// A 16-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// bfloat16: f32's exponent, 8 bits of significand.
    Bf16,
    /// IEEE half: 5 bits of exponent, 11 of significand.
    F16,
}

impl Half {
    /// The format `train.precision` computes in, if it is one.
    pub fn of_precision(precision: &str) -> Option<Half> {
        match precision {
            "bf16" => Some(Half::Bf16),
            "fp16" => Some(Half::F16),
            _ => None,
        }
    }

    /// The burn dtype of this format.
    pub fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            Half::Bf16 => burn::tensor::FloatDType::BF16,
            Half::F16 => burn::tensor::FloatDType::F16,
        }
    }

    /// `x` rounded to nearest even, as bits.
    pub fn narrow(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
            Half::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The value of bits `b`, exactly.
    pub fn widen(self, b: u16) -> f32 {
        match self {
            Half::Bf16 => half::bf16::from_bits(b).to_f32(),
            Half::F16 => half::f16::from_bits(b).to_f32(),
        }
    }

    /// `values` rounded to this format, two to a word (`values.len().div_ceil(2)` words).
    pub fn pack(self, values: &[f32]) -> Vec<f32> {
        values
            .chunks(2)
            .map(|p| {
                let hi = p.get(1).map_or(0, |&x| self.narrow(x));
                f32::from_bits(u32::from(self.narrow(p[0])) | (u32::from(hi) << 16))
            })
            .collect()
    }

    /// The first `out.len()` values `words` holds, widened to f32 (exactly).
    pub fn unpack_into(self, words: &[f32], out: &mut [f32]) {
        for (pair, w) in out.chunks_mut(2).zip(words) {
            let b = w.to_bits();
            pair[0] = self.widen(b as u16);
            if let Some(second) = pair.get_mut(1) {
                *second = self.widen((b >> 16) as u16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_round_to_nearest_even() {
        let values = [1.0f32, -2.5, 3.140625, 1.0 + 1.0 / 512.0, 65504.0];
        for h in [Half::Bf16, Half::F16] {
            let words = h.pack(&values);
            assert_eq!(words.len(), 3);
            let mut back = [0.0f32; 5];
            h.unpack_into(&words, &mut back);
            for (x, y) in values.iter().zip(back) {
                let want = match h {
                    Half::Bf16 => half::bf16::from_f32(*x).to_f32(),
                    Half::F16 => half::f16::from_f32(*x).to_f32(),
                };
                assert_eq!(y, want, "{h:?} {x}");
            }
        }
        // 1 + 2^-9 is halfway between two bf16 values: even wins (1.0).
        let mut one = [0.0f32];
        Half::Bf16.unpack_into(&Half::Bf16.pack(&[1.0 + 1.0 / 256.0 / 2.0]), &mut one);
        assert_eq!(one[0], 1.0);
    }
}

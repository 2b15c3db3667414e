//! `train.micro_batch`: sequences per forward/backward on one rank — a number, or `"auto"`,
//! which leaves the choice to the memory estimate (`memory::auto_micro_batch`): the largest
//! micro-batch that divides each rank's share of the global batch and whose estimate fits what
//! the process may use, the rest made up by gradient accumulation.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `train.micro_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatch {
    /// This many sequences.
    Size(usize),
    /// The largest that fits (`"auto"`).
    Auto,
}

impl MicroBatch {
    /// The size, unless it is `"auto"`.
    pub fn size(self) -> Option<usize> {
        match self {
            MicroBatch::Size(n) => Some(n),
            MicroBatch::Auto => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Size(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = |what: &str| {
            serde::de::Error::custom(format!("{what}; expected a positive integer or \"auto\""))
        };
        // An untagged enum's own error says only "did not match any variant".
        match Raw::deserialize(d).map_err(|_| bad("not an integer or a string"))? {
            Raw::Size(n) if n >= 1 => Ok(MicroBatch::Size(n as usize)),
            Raw::Size(n) => Err(bad(&format!("{n}"))),
            Raw::Text(t) if t == "auto" => Ok(MicroBatch::Auto),
            Raw::Text(t) => Err(bad(&format!("`{t}`"))),
        }
    }
}

impl Serialize for MicroBatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Size(n) => s.serialize_u64(*n as u64),
            MicroBatch::Auto => s.serialize_str("auto"),
        }
    }
}

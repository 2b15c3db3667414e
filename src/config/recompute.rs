//! `train.recompute`: which units recompute their forward in backward (activation
//! checkpointing per unit), as typed in a recipe. [`Recompute::resolve`] turns it into one flag
//! per unit once, in the [`crate::plan::Plan`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The forms a recipe may use, for error messages.
pub const RECOMPUTE_FORMS: &str =
    "false, true, \"every:K\" (K ≥ 1) or a list of unit names such as [\"blocks.0\", \"blocks.2\"]";

/// `train.recompute`. Default `false`.
///
/// - `false`: every unit keeps its autodiff graph from forward to backward.
/// - `true`: every unit (embedding, blocks, head) keeps only its input and recomputes its
///   forward in backward.
/// - `"every:K"`: the blocks `blocks.i` with `i % K == 0` recompute (`"every:2"`: blocks 0, 2,
///   4, …, the seeds' "checkpoint every other layer"); the embedding and the head keep their
///   graphs. The head gains nothing from recompute (it is the last unit of forward and the
///   first of backward, so its graph is rebuilt at once, at the same peak), and the
///   embedding's graph is one `[b, t, d]` sum.
/// - a list of unit names (`"embed"`, `"blocks.N"`, `"head"`): exactly those units.
///
/// ZeRO-3 follows it too: a unit it releases after forward is gathered again for its backward,
/// and recomputed there only if named here (the embedding, whose lookup would keep its table,
/// is recomputed whenever it is released).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Recompute {
    /// No unit recomputes.
    #[default]
    Off,
    /// Every unit recomputes.
    All,
    /// Blocks `i` with `i % K == 0` recompute.
    Every(usize),
    /// The named units recompute.
    Units(Vec<String>),
}

impl Recompute {
    /// Whether any unit recomputes.
    pub fn any(&self) -> bool {
        match self {
            Recompute::Off => false,
            Recompute::Units(names) => !names.is_empty(),
            Recompute::All | Recompute::Every(_) => true,
        }
    }

    /// One flag per unit of a model whose units are named `names` (`embed`, `blocks.N`,
    /// `head`); an unknown name is an error naming it and the model's units.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<bool>, String> {
        let block_index = |name: &str| name.strip_prefix("blocks.")?.parse::<usize>().ok();
        match self {
            Recompute::Off => Ok(vec![false; names.len()]),
            Recompute::All => Ok(vec![true; names.len()]),
            Recompute::Every(k) => Ok(names
                .iter()
                .map(|n| block_index(n).is_some_and(|i| i % k == 0))
                .collect()),
            Recompute::Units(wanted) => {
                if let Some(bad) = wanted.iter().find(|w| !names.contains(w)) {
                    return Err(format!(
                        "`{bad}` is not a unit of this model (its units: {}, {} … {})",
                        names[0],
                        names.get(1).map_or("", String::as_str),
                        names[names.len() - 1]
                    ));
                }
                Ok(names.iter().map(|n| wanted.contains(n)).collect())
            }
        }
    }
}

/// The TOML shapes `train.recompute` takes.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Raw {
    Flag(bool),
    Text(String),
    Names(Vec<String>),
}

impl Serialize for Recompute {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Recompute::Off => Raw::Flag(false),
            Recompute::All => Raw::Flag(true),
            Recompute::Every(k) => Raw::Text(format!("every:{k}")),
            Recompute::Units(n) => Raw::Names(n.clone()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Recompute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad =
            |what: &str| serde::de::Error::custom(format!("{what}; expected {RECOMPUTE_FORMS}"));
        // An untagged enum's own error says only "did not match any variant".
        let raw =
            Raw::deserialize(d).map_err(|_| bad("not a boolean, string or list of strings"))?;
        match raw {
            Raw::Flag(false) => Ok(Recompute::Off),
            Raw::Flag(true) => Ok(Recompute::All),
            Raw::Text(t) => match t.strip_prefix("every:").map(|k| k.trim().parse::<usize>()) {
                Some(Ok(k)) if k >= 1 => Ok(Recompute::Every(k)),
                _ => Err(bad(&format!("`{t}` is not a recompute setting"))),
            },
            Raw::Names(n) => Ok(Recompute::Units(n)),
        }
    }
}

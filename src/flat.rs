//! Flat parameter layout (docs/ARCHITECTURE.md, "Contracts"): each unit's parameters live in one
//! contiguous f32 buffer in module-path order, padded to a multiple of `world ×` [`SHARD_GRAIN`]
//! so that it splits into equal shards whose boundaries fall on the same grid at every world
//! size. Index spaces are named so that an offset's meaning is never guessed.

use crate::model::{Init, ModelUnits, ParamSpec};
use crate::rng::{hash_str, Rng};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Every shard's length is a multiple of this many elements, so shard boundaries sit at unit
/// offsets that are multiples of it whatever the world size. 8-bit optimizer state is quantized
/// in blocks of this size (`optim::quant8::BLOCK`): the blocks are then the same at every world
/// size and at every stage, which is what makes a quantized checkpoint reshard exactly. The
/// padding costs at most `world × 256` elements per unit.
pub const SHARD_GRAIN: usize = 256;

/// An element offset inside one unit's flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitOffset(pub usize);

/// The elements of a unit's flat buffer owned by one rank: `[start, end)` in unit offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    /// First owned element.
    pub start: UnitOffset,
    /// One past the last owned element.
    pub end: UnitOffset,
}

impl ShardRange {
    /// Number of elements (padding included).
    pub fn len(&self) -> usize {
        self.end.0 - self.start.0
    }

    /// Whether the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As a slice range into the unit's flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.start.0..self.end.0
    }
}

/// Where one parameter sits in its unit's flat buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamEntry {
    /// Module path (export name).
    pub path: String,
    /// Model shape.
    pub shape: Vec<usize>,
    /// First element in the unit buffer.
    pub offset: UnitOffset,
    /// Number of elements.
    pub len: usize,
    /// Whether weight decay applies.
    pub decay: bool,
}

impl ParamEntry {
    /// The parameter's elements as a range of the unit buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset.0..self.offset.0 + self.len
    }
}

/// The layout table of one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitLayout {
    /// Unit name (`embed`, `blocks.0`, `head`).
    pub name: String,
    /// Parameters in module-path order.
    pub params: Vec<ParamEntry>,
    /// Elements actually used by parameters.
    pub numel: usize,
    /// Buffer length: `numel` rounded up to a multiple of `world ×` [`SHARD_GRAIN`].
    pub padded_len: usize,
}

impl UnitLayout {
    /// Lays out `specs` contiguously and pads for `world` ranks.
    pub fn new(name: String, specs: &[ParamSpec], world: usize) -> Self {
        let mut offset = 0;
        let params = specs
            .iter()
            .map(|s| {
                let e = ParamEntry {
                    path: s.path.clone(),
                    shape: s.shape.clone(),
                    offset: UnitOffset(offset),
                    len: s.numel(),
                    decay: s.decay,
                };
                offset += e.len;
                e
            })
            .collect();
        UnitLayout {
            name,
            params,
            numel: offset,
            padded_len: offset.div_ceil(world * SHARD_GRAIN) * world * SHARD_GRAIN,
        }
    }

    /// The shard that rank `rank` of `world` owns.
    pub fn shard(&self, rank: usize, world: usize) -> ShardRange {
        let len = self.padded_len / world;
        ShardRange {
            start: UnitOffset(rank * len),
            end: UnitOffset((rank + 1) * len),
        }
    }

    /// Pieces of the parameters that fall inside `shard`, each with its decay flag, in order.
    /// Padding is not covered by any piece.
    pub fn pieces_in(&self, shard: ShardRange) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
        self.params.iter().filter_map(move |p| {
            let start = p.offset.0.max(shard.start.0);
            let end = (p.offset.0 + p.len).min(shard.end.0);
            (start < end).then_some((start..end, p.decay))
        })
    }
}

/// Layout of the whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelLayout {
    /// One entry per unit, in execution order.
    pub units: Vec<UnitLayout>,
    /// World size the padding was computed for.
    pub world: usize,
}

impl ModelLayout {
    /// The layout of `model` for `world` ranks.
    pub fn new(model: &dyn ModelUnits, world: usize) -> Self {
        let units = (0..model.num_units())
            .map(|u| UnitLayout::new(model.unit_name(u), &model.unit_params(u), world))
            .collect();
        ModelLayout { units, world }
    }

    /// Total parameter count (no padding).
    pub fn num_params(&self) -> usize {
        self.units.iter().map(|u| u.numel).sum()
    }
}

/// Fills a unit's parameters from `seed`. Each parameter draws from its own stream keyed by its
/// path, so a unit can be initialised alone (ZeRO-3 never materialises the whole model) and the
/// values never depend on the world size. Padding stays zero.
pub fn init_unit(specs: &[ParamSpec], layout: &UnitLayout, seed: u64) -> Vec<f32> {
    let mut buf = vec![0.0f32; layout.padded_len];
    for (spec, entry) in specs.iter().zip(&layout.params) {
        let dst = &mut buf[entry.range()];
        match spec.init {
            Init::Zeros => {}
            Init::Ones => dst.fill(1.0),
            Init::Normal(std) => {
                let mut rng = Rng::derive(seed, &[hash_str(&spec.path)]);
                for x in dst {
                    *x = (rng.normal() * std as f64) as f32;
                }
            }
        }
    }
    buf
}

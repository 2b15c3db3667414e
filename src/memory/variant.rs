//! The same run with another stage, offload tier or recompute setting: what `kiln memory`'s
//! matrix and `--fit` compare.

use crate::config::Recompute;
use crate::error::Result;
use crate::offload::Tier;
use crate::plan::Plan;

/// `train.recompute` as a user types it.
pub fn recompute_name(r: &Recompute) -> String {
    match r {
        Recompute::Off => "false".into(),
        Recompute::All => "true".into(),
        Recompute::Every(k) => format!("every:{k}"),
        Recompute::Units(n) => n.join(","),
    }
}

/// `plan` with another stage, tier and recompute setting (below stage 3 the parameters stay in
/// memory: `offload.param` is a stage-3 tier).
pub fn variant(plan: &Plan, stage: u8, tier: Tier, recompute: Recompute) -> Result<Plan> {
    let mut config = plan.config.clone();
    config.parallel.stage = stage;
    if stage != 3 {
        config.offload.param = Tier::None.name().into();
    }
    config.offload.optimizer = tier.name().into();
    config.train.recompute = recompute;
    Plan::resolve(&config, plan.world)
}

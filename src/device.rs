//! Where a rank computes (`train.device`, issue 11): the CPU (burn's flex backend) or a CUDA GPU
//! through burn's CUDA backend. The one place kiln picks a burn device.
//!
//! The engine is device-generic, and this first GPU version keeps ZeRO-Offload's data path
//! (Ren et al., ZeRO-Offload §4): flat parameter buffers, collectives and AdamW stay on the host;
//! a unit's parameters are uploaded before it runs and its gradients downloaded when ready. So
//! every stage, offload tier and checkpoint works on a GPU unchanged, and the cost of the path
//! shows as `transfer_ms` in metrics.jsonl.

use crate::error::{KilnError, Result};
use burn::tensor::Device;
use std::fmt;

/// `train.device`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSetting {
    /// A GPU when this build has the `cuda` feature and a GPU is visible, else the CPU.
    Auto,
    /// The CPU (burn's flex backend).
    Cpu,
    /// A CUDA GPU; an error where there is none.
    Cuda,
}

/// Whether this binary was built with the `cuda` feature.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

fn bad(msg: impl fmt::Display) -> KilnError {
    KilnError::config(format!("key `train.device`: {msg}"))
}

impl DeviceSetting {
    /// Parses `train.device`. `cuda` in a build without the `cuda` feature is an error here,
    /// the same on every rank; whether a GPU is visible is only known where the rank runs
    /// ([`RankDevice::choose`]).
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "auto" => Ok(DeviceSetting::Auto),
            "cpu" => Ok(DeviceSetting::Cpu),
            "cuda" if BUILT_WITH_CUDA => Ok(DeviceSetting::Cuda),
            "cuda" => Err(bad(
                "`cuda` needs a kiln built with the `cuda` feature \
                 (scripts/setup.sh --cuda, then cargo build --release --features cuda)",
            )),
            other => Err(bad(format!("`{other}` is not one of auto, cpu, cuda"))),
        }
    }
}

/// The device one rank computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankDevice {
    /// burn's flex backend on the host.
    Cpu,
    /// CUDA device `index` (as the driver numbers them after `CUDA_VISIBLE_DEVICES`) of
    /// `visible`.
    Cuda {
        /// Driver ordinal.
        index: usize,
        /// GPUs visible to this process.
        visible: usize,
    },
}

impl RankDevice {
    /// The device for the rank at `local_rank` on its node, asking the driver how many GPUs
    /// are visible.
    pub fn choose(setting: DeviceSetting, local_rank: usize) -> Result<Self> {
        let visible = match setting {
            DeviceSetting::Cpu => 0,
            DeviceSetting::Auto | DeviceSetting::Cuda => num_visible_gpus(),
        };
        Self::choose_among(setting, local_rank, visible)
    }

    /// [`choose`](Self::choose) with the number of visible GPUs given. Ranks on a node take
    /// GPUs round-robin, `local_rank % visible` (PyTorch's `LOCAL_RANK` convention); more
    /// ranks than GPUs share them.
    pub fn choose_among(setting: DeviceSetting, local_rank: usize, visible: usize) -> Result<Self> {
        match (setting, visible) {
            (DeviceSetting::Cpu, _) | (DeviceSetting::Auto, 0) => Ok(RankDevice::Cpu),
            (DeviceSetting::Cuda, 0) => Err(bad(if BUILT_WITH_CUDA {
                "`cuda`, but no CUDA GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES \
                 hides them all); use `auto` or `cpu`"
            } else {
                "`cuda` needs a kiln built with the `cuda` feature"
            })),
            (_, visible) => Ok(RankDevice::Cuda {
                index: local_rank % visible,
                visible,
            }),
        }
    }

    /// The burn device (without autodiff).
    pub fn burn_device(&self) -> Device {
        match *self {
            RankDevice::Cpu => Device::flex(),
            #[cfg(feature = "cuda")]
            RankDevice::Cuda { index, .. } => Device::cuda(index),
            #[cfg(not(feature = "cuda"))]
            RankDevice::Cuda { .. } => {
                unreachable!("a build without the `cuda` feature sees no GPU")
            }
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, RankDevice::Cuda { .. })
    }
}

impl fmt::Display for RankDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankDevice::Cpu => write!(f, "cpu (flex)"),
            RankDevice::Cuda { index, visible } => {
                write!(f, "cuda:{index} ({visible} GPUs visible)")
            }
        }
    }
}

/// The device of rank `rank` of `world`, chosen by its local rank on its node (from the
/// launcher, as for compute threads). The training loop logs it once start-up has succeeded.
pub fn for_rank(setting: DeviceSetting, rank: usize, world: usize) -> Result<RankDevice> {
    let local_rank = crate::comm::placement(rank, world).local_rank;
    match RankDevice::choose(setting, local_rank) {
        Ok(device) => Ok(device),
        // The ranks of a node see the same GPUs: its first rank says it, once.
        Err(e) if local_rank == 0 => Err(e),
        Err(e) => Err(KilnError::ReportedByAnotherRank(e.exit_code())),
    }
}

/// CUDA GPUs this process can see: 0 in a build without `cuda`, and 0 without an NVIDIA driver.
/// burn's enumeration asks cudarc, which loads libcuda at run time; cubecl checks that the
/// library is present first (cudarc panics when it is not), so a machine without a driver
/// answers 0 rather than failing.
pub fn num_visible_gpus() -> usize {
    #[cfg(feature = "cuda")]
    {
        Device::enumerate(burn::tensor::DeviceType::Cuda).len()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

//! ZeRO: data-parallel training with partitioned optimizer state (stage 1), gradients (stage 2)
//! and parameters (stage 3) over flat fp32 buffers.
mod device;
pub mod estimate;
pub mod flat;
pub mod offload;
pub mod partition;
pub mod stage3;
pub mod stage_1_and_2;
pub mod swap_tensor;

pub use offload::OffloadSettings;
pub use partition::FlatLayout;
pub use stage3::Stage3Config;
pub use stage_1_and_2::{AdamState, OptimizerRun, StateBytes, ZeroOptimizer};

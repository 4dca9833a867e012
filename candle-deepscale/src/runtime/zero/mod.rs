//! ZeRO (DeepSpeed's `runtime/zero/`): data-parallel training with partitioned optimizer state
//! (stage 1), gradients (stage 2) and parameters (stage 3) over flat fp32 buffers.
//!
//! - [`stage_1_and_2`]: the optimizer's flow — accumulate, reduce bucket by bucket, the global
//!   norm, AdamW on this rank's partition, all-gather — shared by every stage.
//! - [`stage3`]: the parameter coordinator (gather before use, release after, prefetch).
//! - [`states`]: where the states live, behind one trait: host memory; [`offload`]: NVMe swap
//!   files (ZeRO-Infinity, through [`swap_tensor`], set by [`offload_config`];
//!   `partitioned_param_swapper`: the parameter pieces' file when they are whole in memory too);
//!   [`device`]: the parameters' device.
//! - [`partition`]: where each parameter sits in the flat buffers and which piece a rank owns;
//!   [`flat`]: copies between tensors and flat buffers; [`estimate`]: DeepSpeed's memory estimators.
mod device;
pub mod estimate;
pub mod flat;
pub mod offload;
pub mod offload_config;
pub mod partition;
mod partitioned_param_swapper;
pub mod stage3;
pub mod stage_1_and_2;
mod states;
pub mod swap_tensor;

pub use offload_config::OffloadSettings;
pub use partition::FlatLayout;
pub use stage3::Stage3Config;
pub use stage_1_and_2::{
    AdamState, OptimizerRun, StateBytes, ZeroOptimizer, DEFAULT_ALLGATHER_BUCKET_SIZE,
};

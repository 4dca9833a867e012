//! What a model author uses: the [`Layer`](module::Layer) trait and what flows between layers,
//! rank-aware parameters with their metadata and counter-based init, linear / norm / embedding /
//! attention / loss building blocks with real backward passes, Megatron's tensor-parallel layers,
//! and releasing/refilling a parameter's storage (what ZeRO-3 and `zero.Init` build on).
//!
//! Imports [`crate::ops`] (the kernels) and [`crate::comm`] (the tensor-parallel mappings' collectives);
//! never the runtime: a model knows nothing of ZeRO or pipelines.
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod loss;
pub mod module;
pub mod norm;
pub mod parameter;
pub mod storage;
pub mod tensor_parallel;
pub mod var_builder;

pub use module::{Activations, ForwardCtx, GradLookup, Layer, Sequential};
pub use parameter::{
    Init, Param, ParamBuilder, ParamMeta, ParamOpts, ParamSource, Partition, Shard,
};

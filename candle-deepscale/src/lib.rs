//! DeepSpeed-class parallel training for candle models.
//!
//! A model is presented to the engine as an ordered list of [`module::Layer`]s whose parameters carry
//! rank-aware metadata ([`parameter::ParamMeta`]); the engine, not the model, drives forward and
//! backward layer by layer. That single loop is where pipeline stages cut the list, ZeRO gathers and
//! releases parameters, and gradients are reduced as each layer's backward ends.
pub mod activation_checkpointing;
pub mod adamw;
pub mod attention;
pub mod bf16_gemm;
pub mod blas;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod cpu_adam;
pub mod cpu_threads;
pub mod cross_entropy;
pub mod engine;
pub mod fast_math;
pub mod fused_attention;
pub mod fused_bias_gelu;
pub mod fused_embedding;
pub mod fused_layer_norm;
pub mod fused_softmax;
pub mod init;
pub mod loss_scaler;
pub mod lr_schedules;
pub mod matmul;
pub mod module;
pub mod nn;
pub mod parameter;
pub mod pipe;
pub mod random;
pub mod tensor_parallel;
pub mod topology;
pub mod zero;

pub use module::{Activations, ForwardCtx, Layer};
pub use parameter::{Param, ParamBuilder, ParamMeta, ParamSource, Partition, Shard};

/// The CPU kernels of this crate (fused LayerNorm, bias + GeLU, causal softmax, causal attention,
/// cross entropy, the embedding lookup, and the matmul op) on, or off for candle's composed ops: to compare, or to rule them out when
/// debugging (`DEEPSCALE_FUSED=0` in the binary).
pub fn set_cpu_kernels(on: bool) {
    fused_layer_norm::set_enabled(on);
    fused_bias_gelu::set_enabled(on);
    fused_embedding::set_enabled(on);
    fused_softmax::set_enabled(on);
    fused_attention::set_enabled(on);
    cross_entropy::fused::set_enabled(on);
    matmul::set_enabled(on);
}

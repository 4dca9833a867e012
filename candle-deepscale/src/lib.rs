//! DeepSpeed-class parallel training for candle models: data parallelism with ZeRO 0-3 (and
//! CPU/NVMe offload), Megatron tensor parallelism, DeepSpeed pipelines, fused CPU kernels,
//! mixed precision with loss scaling, activation checkpointing and checkpoints that reload at
//! any layout.
//!
//! # The layers of the library
//!
//! Dependencies point one way: `ops`, `comm` ← `layers` ← `runtime` (← the `zoo` models and
//! the `deepscale` binary). A test (`tests/architecture.rs`) holds the code to it.
//!
//! | module | what is in it | DeepSpeed / Megatron counterpart |
//! |---|---|---|
//! | [`ops`] | CPU kernels with their own backward (matmul, LayerNorm, GeLU, softmax, attention, cross entropy, AdamW), the BLAS loader, the counter-based RNG | fused kernels, `csrc/` |
//! | [`comm`] | one communicator trait and its backends: in-process ranks, MPI, NCCL | `deepspeed.comm` |
//! | [`layers`] | what a model author uses: [`Layer`], [`Param`] with metadata, init, linear/norm/embedding/attention/loss, tensor-parallel layers | `megatron/core/tensor_parallel`, `torch.nn` |
//! | [`runtime`] | the [`Engine`](runtime::engine::Engine), its per-layer loop, ZeRO, pipelines, DeepSpeed's config, checkpoints, the process grid, meters | `deepspeed/runtime` |
//!
//! # Two ways in
//!
//! **Any candle model** (data parallelism with ZeRO 0/1/2, offload, mixed precision, checkpoints):
//! [`initialize`] — DeepSpeed's name — takes a DeepSpeed config and this rank's communicator and
//! gives the [`Engine`](runtime::engine::Engine) and a candle-nn `VarBuilder`. Build the model with
//! it unchanged; run its forward as usual; `engine.backward(loss)` and `engine.step()` do the
//! rest (one whole-graph backward, gradients reduced after it).
//!
//! ```no_run
//! use candle_core::{Device, Module, Result, Tensor};
//! use candle_deepscale::runtime::config::DeepSpeedConfig;
//!
//! # fn main() -> Result<()> {
//! let config = DeepSpeedConfig::from_json_str(
//!     r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
//!         "zero_optimization": {"stage": 2}}"#, "inline")?;
//! // `()`: one rank; pass the rank's communicator (InProcessComm, MpiComm) for several.
//! let (mut engine, vb) = candle_deepscale::initialize(&config, ())?;
//! let model = candle_nn::seq()
//!     .add(candle_nn::linear(4, 16, vb.pp("l1"))?)
//!     .add(candle_nn::layer_norm(16, 1e-5, vb.pp("ln"))?)
//!     .add(candle_nn::linear(16, 1, vb.pp("l2"))?);
//! for _ in 0..10 {
//!     let x = Tensor::randn(0f32, 1.0, (8, 4), &Device::Cpu)?;
//!     let loss = model.forward(&x)?.sqr()?.mean_all()?;
//!     engine.backward(&loss)?;
//!     engine.step()?;
//! }
//! # Ok(()) }
//! ```
//!
//! **A layer list** (every feature: ZeRO 0-3, pipelines, tensor parallelism, activation
//! checkpointing): write the model as an ordered list of [`Layer`]s whose parameters come from a
//! [`ParamBuilder`] (rank-aware metadata, counter-based init so every layout starts from the same
//! weights), implement [`Sequential`] for it, and hand it to
//! [`Engine::new`](runtime::engine::Engine::new); `train_batch` runs an iteration. The engine, not
//! the model, drives forward and backward layer by layer: that loop is where pipeline stages cut
//! the list, ZeRO-3 gathers and releases parameters and gradients are reduced as each layer's
//! backward ends. See `examples/custom_model_zero2.rs`.
//!
//! ```no_run
//! use candle_core::{DType, Device, Result, Tensor};
//! use candle_deepscale::layers::init::RandomInit;
//! use candle_deepscale::layers::linear::Linear;
//! use candle_deepscale::runtime::engine::{Engine, EngineConfig};
//! use candle_deepscale::{Activations, ForwardCtx, Layer, Param, ParamBuilder, Sequential};
//! use std::sync::Arc;
//!
//! struct Dense(Linear, String);
//! impl Layer for Dense {
//!     fn name(&self) -> String { self.1.clone() }
//!     fn parameters(&self) -> Vec<&Param> { self.0.parameters() }
//!     fn forward(&self, x: &Activations, _: &ForwardCtx) -> Result<Activations> {
//!         Ok(Activations::new(self.0.forward(&x.hidden)?.tanh()?))
//!     }
//! }
//! struct Mlp(Vec<Dense>);
//! impl Sequential for Mlp {
//!     fn layers(&self) -> Vec<&dyn Layer> { self.0.iter().map(|l| l as &dyn Layer).collect() }
//! }
//!
//! # fn main() -> Result<()> {
//! let init = RandomInit { seed: 1 };
//! let pb = ParamBuilder::new(&init, &Device::Cpu, DType::F32);
//! let layers = (0..2)
//!     .map(|i| Ok(Dense(Linear::new(&pb.push_prefix(format!("l{i}")), 8, 8, true, 0.02)?, format!("l{i}"))))
//!     .collect::<Result<Vec<_>>>()?;
//! let mut engine = Engine::new(Arc::new(Mlp(layers)), EngineConfig::default(), None, None)?;
//! let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
//! let report = engine.train_batch(vec![(Activations::new(x), |y: &Activations| y.hidden.sqr()?.mean_all())])?;
//! println!("loss {}", report.loss);
//! # Ok(()) }
//! ```
//!
//! candle-nn 0.11's fused `layer_norm`, `rms_norm`, `softmax_last_dim` and `rope` record no
//! backward: train candle-nn / candle-transformers models with DeepScale's patched candle-nn
//! (`vendor/candle-nn`, a `[patch.crates-io]` entry; the README says how).
pub mod comm;
pub mod fs;
pub mod json;
pub mod layers;
pub mod ops;
pub mod runtime;

pub use comm::IntoComm;
pub use layers::module::{Activations, ForwardCtx, GradLookup, Layer, Sequential};
pub use layers::parameter::{Param, ParamBuilder, ParamMeta, ParamSource, Partition, Shard};
pub use runtime::initialize::{initialize, initialize_with, InitOptions};

/// The fused CPU kernels on, or off for candle's composed ops (see [`ops::set_fused`]).
pub fn set_cpu_kernels(on: bool) {
    ops::set_fused(on)
}

/// The paths of the flat layout before 0.2 (`candle_deepscale::engine::Engine`, ...), kept for
/// one release. Each is deprecated in favour of its place in `ops`, `layers` or `runtime`; the
/// CHANGELOG lists them.
macro_rules! moved {
    ($($old:ident => $($new:ident)::+, $note:literal;)*) => {$(
        #[deprecated(since = "0.2.0", note = $note)]
        #[doc(hidden)]
        pub mod $old {
            pub use crate::$($new)::+::*;
        }
    )*};
}

moved! {
    activation_checkpointing => runtime::activation_checkpointing, "moved to `candle_deepscale::runtime::activation_checkpointing`";
    adamw => runtime::adamw, "moved to `candle_deepscale::runtime::adamw`";
    attention => layers::attention, "moved to `candle_deepscale::layers::attention`";
    bf16_gemm => ops::bf16_gemm, "moved to `candle_deepscale::ops::bf16_gemm`";
    blas => ops::blas, "moved to `candle_deepscale::ops::blas`";
    checkpoint => runtime::checkpoint, "moved to `candle_deepscale::runtime::checkpoint`";
    config => runtime::config, "moved to `candle_deepscale::runtime::config`";
    cpu_adam => ops::adam, "moved to `candle_deepscale::ops::adam`";
    cpu_threads => ops::threads, "moved to `candle_deepscale::ops::threads`";
    cross_entropy => layers::loss, "moved to `candle_deepscale::layers::loss`";
    fast_math => ops::fast_math, "moved to `candle_deepscale::ops::fast_math`";
    fused_attention => ops::attention, "moved to `candle_deepscale::ops::attention`";
    fused_bias_gelu => ops::bias_gelu, "moved to `candle_deepscale::ops::bias_gelu`";
    fused_embedding => ops::embedding, "moved to `candle_deepscale::ops::embedding`";
    fused_layer_norm => ops::layer_norm, "moved to `candle_deepscale::ops::layer_norm`";
    fused_softmax => ops::softmax, "moved to `candle_deepscale::ops::softmax`";
    init => layers::init, "moved to `candle_deepscale::layers::init`";
    loss_scaler => runtime::loss_scaler, "moved to `candle_deepscale::runtime::loss_scaler`";
    lr_schedules => runtime::lr_schedules, "moved to `candle_deepscale::runtime::lr_schedules`";
    matmul => ops::matmul, "moved to `candle_deepscale::ops::matmul`";
    module => layers::module, "moved to `candle_deepscale::layers::module`";
    parameter => layers::parameter, "moved to `candle_deepscale::layers::parameter`";
    pipe => runtime::pipe, "moved to `candle_deepscale::runtime::pipe`";
    random => ops::random, "moved to `candle_deepscale::ops::random`";
    tensor_parallel => layers::tensor_parallel, "moved to `candle_deepscale::layers::tensor_parallel`";
    topology => runtime::topology, "moved to `candle_deepscale::runtime::topology`";
    zero => runtime::zero, "moved to `candle_deepscale::runtime::zero`";
}

/// The old `nn` module (linear, norm, embedding and dropout building blocks), now split over
/// `layers::{linear, norm, embedding, dropout}`.
#[deprecated(
    since = "0.2.0",
    note = "moved to `candle_deepscale::layers::{linear, norm, embedding, dropout}`"
)]
#[doc(hidden)]
pub mod nn {
    pub use crate::layers::dropout::dropout;
    pub use crate::layers::embedding::{embedding, Embedding};
    pub use crate::layers::linear::{linear, linear_params, Linear};
    pub use crate::layers::norm::{layer_norm, layer_norm_reference, LayerNorm};
    pub use crate::ops::softmax::softmax_last_dim;
}

/// The old `engine` module: the engine, its config, the per-layer loop and the meters, now in
/// `runtime::{engine, engine_config, layer_loop, meters}` and `runtime::pipe::PipeContext`.
#[deprecated(
    since = "0.2.0",
    note = "moved to `candle_deepscale::runtime::engine` (the loop: `runtime::layer_loop`, meters: `runtime::meters`)"
)]
#[doc(hidden)]
pub mod engine {
    pub use crate::layers::module::GradLookup;
    pub use crate::runtime::engine::*;
    pub use crate::runtime::layer_loop::{
        backward as stage_backward, forward as stage_forward, forward_backward,
        micro_batch as backward_pass, Grads, LayerHook, LoopHooks as StageHooks, OnGrads,
        PassState as StageState,
    };
    pub use crate::runtime::meters::{MemoryMeter, MemoryReport, WallClock};
    pub use crate::runtime::pipe::PipeContext;
}

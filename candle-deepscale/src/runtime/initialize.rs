//! `candle_deepscale::initialize` (DeepSpeed's `deepspeed.initialize`): a DeepSpeed JSON config
//! and this rank's communicator in; the engine and the `VarBuilder` to build any candle model with
//! out. The model is then built unchanged (`SomeModel::load(vb, &cfg)`), its forward written as
//! usual, and training is `engine.backward(loss)` + `engine.step()` — data parallel with ZeRO
//! 0/1/2, mixed precision, clipping, schedules, offload and checkpoints from the config.
use crate::comm::{IntoComm, ProcessGroup};
use crate::layers::parameter::ParamRegistry;
use crate::layers::var_builder::{BackendOptions, DeepScaleBackend, NoDecay, Weights};
use crate::runtime::config::DeepSpeedConfig;
use crate::runtime::engine::{Engine, EngineConfig};
use candle_core::{DType, Device, Result};
use std::sync::Arc;

/// What `initialize` builds besides the config: where the model lives and where its weights come
/// from.
#[derive(Clone)]
pub struct InitOptions {
    pub device: Device,
    /// Seed of the counter-based init (every rank draws the same weights from it).
    pub seed: u64,
    /// Weights to read (safetensors, an HF folder, a DeepScale checkpoint); parameters they do
    /// not hold are drawn from the `VarBuilder`'s init hints.
    pub weights: Option<Arc<dyn Weights>>,
    /// Megatron's no-decay rule (1-D tensors and `.bias`), or decay everywhere.
    pub no_decay: NoDecay,
    /// Parameters whose names match are frozen (fine-tuning).
    pub frozen: Option<regex::Regex>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            seed: 1234,
            weights: None,
            no_decay: NoDecay::Megatron,
            frozen: None,
        }
    }
}

/// DeepSpeed's `initialize` for any candle model (see the module docs): every rank of `comm` is
/// one data-parallel rank.
pub fn initialize(
    config: &DeepSpeedConfig,
    comm: impl IntoComm,
) -> Result<(Engine, candle_nn::VarBuilder<'static>)> {
    initialize_with(config, comm, InitOptions::default())
}

/// [`initialize`] with the device, seed, weights and parameter rules of `options`.
pub fn initialize_with(
    config: &DeepSpeedConfig,
    comm: impl IntoComm,
    options: InitOptions,
) -> Result<(Engine, candle_nn::VarBuilder<'static>)> {
    let comm = comm.into_comm();
    let world = comm.as_ref().map_or(1, |c| c.world_size());
    let dp = match comm {
        Some(c) if world > 1 => Some(ProcessGroup::new(c, (0..world).collect())?),
        _ => None,
    };
    let mut engine_config = EngineConfig::from_deepspeed(config, world)?;
    engine_config.seed = options.seed;
    // fp16 parameters with an fp32 master copy and loss scaling; bf16 parameters on a GPU. On the
    // CPU bf16 stays fp32 parameters (the layer-list mode's bf16 products are DeepScale's matmul).
    let dtype = if engine_config.fp16.is_some() {
        DType::F16
    } else if engine_config.bf16 && !options.device.is_cpu() {
        DType::BF16
    } else {
        DType::F32
    };
    let registry = ParamRegistry::new();
    let vb = DeepScaleBackend::var_builder(
        registry.clone(),
        BackendOptions {
            seed: options.seed,
            weights: options.weights,
            no_decay: options.no_decay,
            frozen: options.frozen,
        },
        dtype,
        &options.device,
    );
    let engine = Engine::whole_model(registry, engine_config, dp)?;
    Ok((engine, vb))
}

//! The engine's settings and their translation from a DeepSpeed JSON config (DeepSpeed's
//! `runtime/config.py` reading of the sections the engine acts on): batch sizes, optimizer,
//! scheduler, clipping, fp16/bf16, ZeRO and its offload knobs, activation checkpointing.
use crate::runtime::adamw::AdamWConfig;
use crate::runtime::config::{DeepSpeedConfig, Fp16Config, OffloadConfig, OptimizerKind};
use crate::runtime::lr_schedules::LrSchedule;
use crate::runtime::zero::{OffloadSettings, Stage3Config};
use candle_core::{bail, Result};

/// What an engine is told: DeepSpeed's config sections, resolved for one data-parallel size.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// ZeRO-3's knobs (used at stage 3).
    pub stage3: Stage3Config,
    pub train_micro_batch_size_per_gpu: usize,
    pub gradient_accumulation_steps: usize,
    /// 0, 1 or 2.
    pub zero_stage: u8,
    /// Elements per gradient bucket.
    pub reduce_bucket_size: usize,
    /// DeepSpeed's `overlap_comm`: complete buckets are reduced while backward goes on
    /// (DeepSpeed's default: on at stage 3, off below).
    pub overlap_comm: bool,
    /// DeepSpeed's `allgather_bucket_size`: elements (all ranks' together) per all-gather of
    /// the updated parameters at stages 1 and 2.
    pub allgather_bucket_size: usize,
    pub optimizer: AdamWConfig,
    pub lr_schedule: LrSchedule,
    /// Global gradient-norm clip (0 = off).
    pub gradient_clipping: f64,
    /// fp16 loss scaling (None: no scaling).
    pub fp16: Option<Fp16Config>,
    /// bf16 requested (no loss scaling; parameters keep an fp32 master copy when not fp32).
    pub bf16: bool,
    /// Layers per activation checkpoint (0 = keep every layer's graph).
    pub checkpoint_num_layers: usize,
    pub partition_activations: bool,
    pub cpu_checkpointing: bool,
    /// Base of the dropout streams.
    pub seed: u64,
    /// `offload_optimizer.device: cpu`: on a GPU, ZeRO's buffers and AdamW stay in host memory
    /// (ZeRO-Offload). On the CPU that is where they are anyway.
    pub offload_optimizer_cpu: bool,
    /// Keep ZeRO's buffers and AdamW as tensors on the parameters' device. None: when the
    /// parameters are on a GPU (no offload). Some(true) on the CPU runs the GPU's code path.
    pub device_states: Option<bool>,
    /// DeepSpeed's `wall_clock_breakdown`: training loops print [`Engine::take_wall_clock`].
    pub wall_clock_breakdown: bool,
    /// The monitors of the config's `tensorboard`, `csv_monitor`, `wandb` and `comet` sections:
    /// the engine writes DeepSpeed's `Train/Samples/*` events to them from global rank 0.
    pub monitor: crate::runtime::monitor::MonitorConfig,
    /// DeepSpeed's `steps_per_print`: global rank 0 prints DeepSpeed's progress line every N
    /// steps (None: not set in the config, no line).
    pub steps_per_print: Option<u64>,
    /// The config's `comms_logger` when enabled: wrap the communicator in
    /// [`crate::comm::comms_logging::CommsLogger`] (the engine is handed groups, not the world).
    pub comms_logger: Option<crate::runtime::config::CommsLoggerConfig>,
    /// The config's `flops_profiler` when enabled: the engine profiles one step and prints
    /// DeepSpeed's report.
    pub flops_profiler: Option<crate::runtime::flops_profiler::FlopsProfilerSettings>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            train_micro_batch_size_per_gpu: 1,
            gradient_accumulation_steps: 1,
            zero_stage: 0,
            stage3: Stage3Config::default(),
            reduce_bucket_size: 500_000_000,
            overlap_comm: false,
            allgather_bucket_size: crate::runtime::zero::DEFAULT_ALLGATHER_BUCKET_SIZE,
            optimizer: AdamWConfig::default(),
            lr_schedule: LrSchedule::Constant(AdamWConfig::default().lr),
            gradient_clipping: 0.0,
            fp16: None,
            bf16: false,
            checkpoint_num_layers: 0,
            partition_activations: false,
            cpu_checkpointing: false,
            wall_clock_breakdown: false,
            monitor: Default::default(),
            steps_per_print: None,
            comms_logger: None,
            flops_profiler: None,
            seed: 1234,
            offload_optimizer_cpu: false,
            device_states: None,
        }
    }
}

impl EngineConfig {
    /// The engine settings of a DeepSpeed config for `dp` data-parallel ranks, DeepSpeed's defaults
    /// where a key is absent. Activation checkpointing itself is switched on by the model's flags
    /// (`checkpoint_num_layers`); the config's section says how inputs are kept.
    pub fn from_deepspeed(ds: &DeepSpeedConfig, dp: usize) -> Result<Self> {
        let mut c = Self::default();
        let batch = ds.batch(dp, None, None)?;
        c.train_micro_batch_size_per_gpu = batch.micro_batch;
        c.gradient_accumulation_steps = batch.accumulation;
        if let Some(o) = &ds.optimizer {
            let OptimizerKind::Adam { adam_w_mode } = o.kind()?;
            let p = &o.params;
            let d = AdamWConfig::default();
            let [beta1, beta2] = p.betas.unwrap_or([d.beta1, d.beta2]);
            c.optimizer = AdamWConfig {
                lr: p.lr.unwrap_or(d.lr),
                beta1,
                beta2,
                eps: p.eps.unwrap_or(d.eps),
                // DeepSpeed's Adam defaults to no weight decay.
                weight_decay: p.weight_decay.unwrap_or(0.0),
                adam_w_mode,
            };
            c.lr_schedule = LrSchedule::Constant(c.optimizer.lr);
        }
        if let Some(s) = &ds.scheduler {
            c.lr_schedule = LrSchedule::from_config(s)?;
        }
        c.gradient_clipping = ds.gradient_clipping.unwrap_or(0.0);
        c.fp16 = ds.fp16.clone().filter(|f| f.enabled);
        c.bf16 = ds.bf16.as_ref().is_some_and(|b| b.enabled);
        if let Some(z) = &ds.zero_optimization {
            let d = Stage3Config::default();
            let pick = |v: Option<u64>, d: usize| v.map_or(d, |v| v as usize);
            c.stage3 = Stage3Config {
                prefetch_bucket_size: pick(z.stage3_prefetch_bucket_size, d.prefetch_bucket_size),
                max_live_parameters: pick(z.stage3_max_live_parameters, d.max_live_parameters),
                max_reuse_distance: pick(z.stage3_max_reuse_distance, d.max_reuse_distance),
                param_persistence_threshold: pick(
                    z.stage3_param_persistence_threshold,
                    d.param_persistence_threshold,
                ),
                offload: None,
            };
            // `device: cpu` is where this engine keeps model states anyway; `nvme` swaps them.
            let (opt, par) = (z.effective_offload_optimizer(), z.effective_offload_param());
            let nvme = |o: &Option<OffloadConfig>,
                        what: &str|
             -> Result<Option<std::path::PathBuf>> {
                let Some(o) = o else { return Ok(None) };
                match o.device.as_deref() {
                    None | Some("none") | Some("cpu") => Ok(None),
                    Some("nvme") => match &o.nvme_path {
                        Some(p) => Ok(Some(p.into())),
                        None => bail!("zero_optimization.{what}: device nvme needs nvme_path"),
                    },
                    Some(d) => {
                        bail!("zero_optimization.{what}.device `{d}`: expected cpu, nvme or none")
                    }
                }
            };
            c.offload_optimizer_cpu = opt
                .as_ref()
                .is_some_and(|o| o.device.as_deref() == Some("cpu"));
            let (opt_nvme, par_nvme) = (
                nvme(&opt, "offload_optimizer")?,
                nvme(&par, "offload_param")?,
            );
            if opt_nvme.is_some() || par_nvme.is_some() {
                if z.stage != 3 {
                    bail!(
                        "zero_optimization: offload to nvme needs stage 3 (as in DeepSpeed), \
                         the config has stage {}",
                        z.stage
                    )
                }
                let sub = z
                    .sub_group_size
                    .map_or(1_000_000_000, |v| v.max(1) as usize);
                // Each swap block takes at least one 4 KiB slot on disk: tiles of a few elements
                // multiply the swap files a thousandfold and crawl.
                if sub < 1024 {
                    bail!(
                        "zero_optimization.sub_group_size {sub} is too small for NVMe offload: \
                         each tile is swapped as at least one 4 KiB block; use 1024 elements or \
                         more (DeepSpeed's default is 1e9)"
                    )
                }
                let max_in_cpu = par.as_ref().and_then(|p| p.max_in_cpu).unwrap_or(0) as usize;
                let aio = ds.aio.clone().unwrap_or_default();
                let dflt = OffloadSettings::default();
                c.stage3.offload = Some(OffloadSettings {
                    optimizer_nvme: opt_nvme,
                    param_nvme: par_nvme,
                    sub_group_size: sub,
                    buffer_count: opt
                        .as_ref()
                        .and_then(|o| o.buffer_count)
                        .or(par.as_ref().and_then(|p| p.buffer_count))
                        .unwrap_or(dflt.buffer_count),
                    resident_blocks: (max_in_cpu / sub).max(1),
                    aio_block_size: aio.block_size.map_or(dflt.aio_block_size, |b| b as usize),
                    aio_queue_depth: aio.queue_depth.unwrap_or(dflt.aio_queue_depth),
                    aio_thread_count: aio.thread_count.unwrap_or(dflt.aio_thread_count),
                });
            }
            c.zero_stage = z.stage;
            // DeepSpeed's default: on at stage 3 only.
            c.overlap_comm = z.overlap_comm.unwrap_or(z.stage == 3);
            if let Some(b) = z.reduce_bucket_size {
                c.reduce_bucket_size = b.max(1) as usize;
            }
            if let Some(b) = z.allgather_bucket_size {
                c.allgather_bucket_size = b.max(1) as usize;
            }
        }
        if let Some(a) = &ds.activation_checkpointing {
            c.partition_activations = a.partition_activations.unwrap_or(false);
            c.cpu_checkpointing = a.cpu_checkpointing.unwrap_or(false);
        }
        c.wall_clock_breakdown = ds.wall_clock_breakdown.unwrap_or(false);
        c.monitor = crate::runtime::monitor::MonitorConfig::from_deepspeed(ds);
        c.steps_per_print = ds.steps_per_print.filter(|n| *n > 0);
        c.comms_logger = ds.comms_logger.clone().filter(|c| c.enabled);
        c.flops_profiler = ds
            .flops_profiler
            .as_ref()
            .and_then(crate::runtime::flops_profiler::FlopsProfilerSettings::from_config);
        Ok(c)
    }
}

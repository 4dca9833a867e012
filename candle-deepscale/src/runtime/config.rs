//! The DeepSpeed JSON config (`--deepspeed_config`), with DeepSpeed's key names.
//!
//! Parsing is strict: an unknown key is an error naming it, with the closest known key suggested —
//! the seed's own configs carry such mistakes (`stage3_param_persitance_threshold`, `comm_overlap`).
//! The legacy ZeRO-Offload keys (`cpu_offload`, `cpu_offload_params`, `cpu_offload_use_pin_memory`)
//! map onto `offload_optimizer` / `offload_param`, and optimizer type `DeepSpeed_Adam` means Adam.
use candle_core::{bail, Error, Result};
use serde::{Deserialize, Deserializer};
use std::path::Path;

/// Counts written as floats in DeepSpeed configs (`1e9`, `6.039798e+07`).
fn count<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let v: Option<f64> = Option::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= u64::MAX as f64 => Ok(Some(x as u64)),
        Some(x) => Err(serde::de::Error::custom(format!(
            "expected a non-negative whole number, got {x}"
        ))),
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeepSpeedConfig {
    pub train_batch_size: Option<usize>,
    pub train_micro_batch_size_per_gpu: Option<usize>,
    pub gradient_accumulation_steps: Option<usize>,
    pub optimizer: Option<OptimizerConfig>,
    pub scheduler: Option<SchedulerConfig>,
    pub fp16: Option<Fp16Config>,
    pub bf16: Option<Bf16Config>,
    pub gradient_clipping: Option<f64>,
    pub prescale_gradients: Option<bool>,
    pub gradient_predivide_factor: Option<f64>,
    pub zero_optimization: Option<ZeroConfig>,
    pub activation_checkpointing: Option<ActivationCheckpointingConfig>,
    pub aio: Option<AioConfig>,
    pub pipeline: Option<PipelineConfig>,
    pub steps_per_print: Option<u64>,
    pub wall_clock_breakdown: Option<bool>,
    pub memory_breakdown: Option<bool>,
    pub zero_allow_untested_optimizer: Option<bool>,
    /// Monitors (DeepSpeed's `monitor/config.py`).
    pub tensorboard: Option<TensorBoardConfig>,
    pub csv_monitor: Option<CsvMonitorConfig>,
    pub wandb: Option<WandbConfig>,
    pub comet: Option<CometConfig>,
    /// DeepSpeed's `comm/constants.py` section.
    pub comms_logger: Option<CommsLoggerConfig>,
    /// DeepSpeed's `profiling/constants.py` section.
    pub flops_profiler: Option<FlopsProfilerConfig>,
}

/// `tensorboard`: event files in `output_path/job_name/`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorBoardConfig {
    #[serde(default)]
    pub enabled: bool,
    pub output_path: Option<String>,
    pub job_name: Option<String>,
}

/// `csv_monitor`: one CSV per tag in `output_path/job_name/`.
pub type CsvMonitorConfig = TensorBoardConfig;

/// `wandb` (no Rust client: its events go to TensorBoard files that `wandb sync` uploads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WandbConfig {
    #[serde(default)]
    pub enabled: bool,
    pub group: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
}

/// `comet` (no Rust client: as `wandb`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CometConfig {
    #[serde(default)]
    pub enabled: bool,
    pub samples_log_interval: Option<u64>,
    pub project: Option<String>,
    pub workspace: Option<String>,
    pub api_key: Option<String>,
    pub experiment_name: Option<String>,
    pub experiment_key: Option<String>,
    pub online: Option<bool>,
    pub mode: Option<String>,
}

/// `comms_logger`: per-collective counts, sizes, latency and bandwidth.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommsLoggerConfig {
    #[serde(default)]
    pub enabled: bool,
    pub verbose: Option<bool>,
    pub prof_all: Option<bool>,
    pub prof_ops: Option<Vec<String>>,
    pub debug: Option<bool>,
}

impl CommsLoggerConfig {
    /// The ops to record: None for all (`prof_all`, DeepSpeed's default), else `prof_ops`.
    pub fn profiled_ops(&self) -> Option<Vec<String>> {
        match (self.prof_all.unwrap_or(true), &self.prof_ops) {
            (true, _) | (false, None) => None,
            (false, Some(ops)) => Some(ops.clone()),
        }
    }
}

/// `flops_profiler`: DeepSpeed's report at `profile_step`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlopsProfilerConfig {
    #[serde(default)]
    pub enabled: bool,
    pub recompute_fwd_factor: Option<f64>,
    #[serde(default, deserialize_with = "count")]
    pub profile_step: Option<u64>,
    pub module_depth: Option<i64>,
    pub top_modules: Option<usize>,
    pub detailed: Option<bool>,
    pub output_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub params: OptimizerParams,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerParams {
    pub lr: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Adam's weight decay: decoupled (AdamW, DeepSpeed's default) or L2.
    pub adam_w_mode: Option<bool>,
    pub bias_correction: Option<bool>,
    pub torch_adam: Option<bool>,
}

/// The optimizers DeepScale runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// DeepSpeed "Adam" (AdamW unless `adam_w_mode: false`) and "AdamW".
    Adam { adam_w_mode: bool },
}

impl OptimizerConfig {
    pub fn kind(&self) -> Result<OptimizerKind> {
        let w = self.params.adam_w_mode;
        match self.kind.to_ascii_lowercase().as_str() {
            "adam" | "deepspeed_adam" | "cpuadam" | "fusedadam" => Ok(OptimizerKind::Adam {
                adam_w_mode: w.unwrap_or(true),
            }),
            "adamw" => {
                if w == Some(false) {
                    bail!("optimizer `AdamW` with adam_w_mode: false is contradictory; use type `Adam`")
                }
                Ok(OptimizerKind::Adam { adam_w_mode: true })
            }
            _ => bail!(
                "optimizer type `{}` is not supported (Adam, AdamW, DeepSpeed_Adam)",
                self.kind
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub params: SchedulerParams,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerParams {
    pub warmup_min_lr: Option<f64>,
    pub warmup_max_lr: Option<f64>,
    #[serde(default, deserialize_with = "count")]
    pub warmup_num_steps: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub total_num_steps: Option<u64>,
    pub warmup_type: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fp16Config {
    #[serde(default)]
    pub enabled: bool,
    /// 0 = dynamic loss scaling.
    pub loss_scale: Option<f64>,
    pub initial_scale_power: Option<u32>,
    pub loss_scale_window: Option<u64>,
    pub hysteresis: Option<u32>,
    pub min_loss_scale: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bf16Config {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OffloadConfig {
    pub device: Option<String>,
    pub nvme_path: Option<String>,
    pub buffer_count: Option<usize>,
    #[serde(default, deserialize_with = "count")]
    pub buffer_size: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub max_in_cpu: Option<u64>,
    pub pin_memory: Option<bool>,
    pub pipeline_read: Option<bool>,
    pub pipeline_write: Option<bool>,
    pub fast_init: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZeroConfig {
    #[serde(default)]
    pub stage: u8,
    pub contiguous_gradients: Option<bool>,
    pub overlap_comm: Option<bool>,
    pub reduce_scatter: Option<bool>,
    #[serde(default, deserialize_with = "count")]
    pub reduce_bucket_size: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub allgather_bucket_size: Option<u64>,
    pub allgather_partitions: Option<bool>,
    pub offload_optimizer: Option<OffloadConfig>,
    pub offload_param: Option<OffloadConfig>,
    #[serde(default, deserialize_with = "count")]
    pub sub_group_size: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub stage3_max_live_parameters: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub stage3_max_reuse_distance: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub stage3_prefetch_bucket_size: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    pub stage3_param_persistence_threshold: Option<u64>,
    pub stage3_gather_16bit_weights_on_model_save: Option<bool>,
    pub elastic_checkpoint: Option<bool>,
    /// Legacy ZeRO-Offload: optimizer state on the CPU.
    pub cpu_offload: Option<bool>,
    /// Legacy: parameters on the CPU.
    pub cpu_offload_params: Option<bool>,
    pub cpu_offload_use_pin_memory: Option<bool>,
}

impl ZeroConfig {
    /// `offload_optimizer`, or what the legacy `cpu_offload` means.
    pub fn effective_offload_optimizer(&self) -> Option<OffloadConfig> {
        self.offload_optimizer.clone().or_else(|| {
            self.cpu_offload.filter(|b| *b).map(|_| OffloadConfig {
                device: Some("cpu".into()),
                pin_memory: self.cpu_offload_use_pin_memory,
                ..Default::default()
            })
        })
    }

    /// `offload_param`, or what the legacy `cpu_offload_params` means.
    pub fn effective_offload_param(&self) -> Option<OffloadConfig> {
        self.offload_param.clone().or_else(|| {
            self.cpu_offload_params
                .filter(|b| *b)
                .map(|_| OffloadConfig {
                    device: Some("cpu".into()),
                    pin_memory: self.cpu_offload_use_pin_memory,
                    ..Default::default()
                })
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActivationCheckpointingConfig {
    pub partition_activations: Option<bool>,
    pub cpu_checkpointing: Option<bool>,
    pub contiguous_memory_optimization: Option<bool>,
    pub number_checkpoints: Option<usize>,
    pub synchronize_checkpoint_boundary: Option<bool>,
    pub profile: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AioConfig {
    #[serde(default, deserialize_with = "count")]
    pub block_size: Option<u64>,
    pub queue_depth: Option<usize>,
    pub thread_count: Option<usize>,
    pub single_submit: Option<bool>,
    pub overlap_events: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub stages: Option<serde_json::Value>,
    pub partition: Option<String>,
    pub seed_layers: Option<bool>,
    pub activation_checkpoint_interval: Option<usize>,
}

/// Keys DeepSpeed's examples use that are not DeepSpeed keys, with what they meant.
const KNOWN_MISTAKES: &[(&str, &str)] = &[("comm_overlap", "overlap_comm")];

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into a message with a suggestion;
/// every error names its key path.
fn explain(origin: &str, e: crate::json::KeyError) -> Error {
    let msg = e.inner.to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let suggestion = KNOWN_MISTAKES
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .or_else(|| crate::json::nearest(key, expected.iter().copied()));
        let hint = match suggestion {
            Some(s) => format!("; did you mean `{s}`?"),
            None => format!("; known keys here: {}", expected.join(", ")),
        };
        let path = if e.path.is_empty() { key } else { &e.path };
        return Error::Msg(format!(
            "{origin}: unknown DeepSpeed config key `{path}` (line {}){hint}",
            e.inner.line()
        ));
    }
    Error::Msg(format!("{origin}: {e}"))
}

/// `key`'s value, when set, is a finite number in `lo..=hi`.
fn check_range(key: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<()> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => {
            let want = match (lo, hi) {
                (l, h) if l == 0.0 && h.is_infinite() => "a finite number >= 0".to_string(),
                (l, h) if l > 0.0 && l < 1e-300 && h.is_infinite() => {
                    "a finite number > 0".to_string()
                }
                (l, h) if l > 0.0 && l < 1e-300 => format!("a number > 0 and <= {h}"),
                (l, h) if h < 1.0 && h > 0.999 => format!("a number >= {l} and < 1"),
                (l, h) => format!("a number in [{l}, {h}]"),
            };
            bail!("`{key}` is {x}; expected {want}")
        }
        _ => Ok(()),
    }
}

impl DeepSpeedConfig {
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = crate::json::from_str(text).map_err(|e| explain(origin, e))?;
        cfg.validate()
            .map_err(|e| Error::Msg(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Msg(format!(
                "cannot read DeepSpeed config {}: {e}",
                path.display()
            ))
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("train_batch_size", self.train_batch_size),
            (
                "train_micro_batch_size_per_gpu",
                self.train_micro_batch_size_per_gpu,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if v == Some(0) {
                bail!("`{key}` is 0; it must be a positive number of samples (or steps)")
            }
        }
        if let Some(o) = &self.optimizer {
            o.kind()?;
            let p = &o.params;
            check_range("optimizer.params.lr", p.lr, 0.0, f64::INFINITY)?;
            check_range("optimizer.params.eps", p.eps, f64::MIN_POSITIVE, 1.0)?;
            check_range(
                "optimizer.params.weight_decay",
                p.weight_decay,
                0.0,
                f64::INFINITY,
            )?;
            if let Some([b1, b2]) = p.betas {
                check_range(
                    "optimizer.params.betas[0]",
                    Some(b1),
                    0.0,
                    1.0 - f64::EPSILON,
                )?;
                check_range(
                    "optimizer.params.betas[1]",
                    Some(b2),
                    0.0,
                    1.0 - f64::EPSILON,
                )?;
            }
        }
        if let Some(s) = &self.scheduler {
            let p = &s.params;
            check_range(
                "scheduler.params.warmup_min_lr",
                p.warmup_min_lr,
                0.0,
                f64::INFINITY,
            )?;
            check_range(
                "scheduler.params.warmup_max_lr",
                p.warmup_max_lr,
                0.0,
                f64::INFINITY,
            )?;
            if let (Some(lo), Some(hi)) = (p.warmup_min_lr, p.warmup_max_lr) {
                if lo > hi {
                    bail!("scheduler.params.warmup_min_lr {lo} is above warmup_max_lr {hi}")
                }
            }
        }
        check_range(
            "gradient_clipping",
            self.gradient_clipping,
            0.0,
            f64::INFINITY,
        )?;
        check_range(
            "gradient_predivide_factor",
            self.gradient_predivide_factor,
            f64::MIN_POSITIVE,
            f64::INFINITY,
        )?;
        if let Some(f) = &self.fp16 {
            // 0 means dynamic scaling; a static scale must be positive.
            check_range("fp16.loss_scale", f.loss_scale, 0.0, f64::INFINITY)?;
            check_range(
                "fp16.min_loss_scale",
                f.min_loss_scale,
                f64::MIN_POSITIVE,
                f64::INFINITY,
            )?;
            if let Some(p) = f.initial_scale_power.filter(|p| *p > 64) {
                bail!("fp16.initial_scale_power {p} is out of range: expected 0 to 64 (the scale is 2^power)")
            }
            if f.loss_scale_window == Some(0) {
                bail!("fp16.loss_scale_window is 0; it must be a positive number of steps")
            }
            if f.hysteresis == Some(0) {
                bail!("fp16.hysteresis is 0; it must be at least 1")
            }
        }
        if let Some(z) = &self.zero_optimization {
            if z.stage > 3 {
                bail!(
                    "zero_optimization.stage must be 0, 1, 2 or 3, got {}",
                    z.stage
                )
            }
            for (key, v) in [
                ("sub_group_size", z.sub_group_size),
                ("reduce_bucket_size", z.reduce_bucket_size),
                ("allgather_bucket_size", z.allgather_bucket_size),
            ] {
                // DeepSpeed would spin on tiles or buckets of nothing (or of one element).
                if v == Some(0) {
                    bail!("zero_optimization.{key} is 0; it must be a positive number of elements")
                }
            }
            for (what, o) in [
                ("offload_optimizer", &z.offload_optimizer),
                ("offload_param", &z.offload_param),
            ] {
                if let Some(d) = o.as_ref().and_then(|o| o.device.as_deref()) {
                    if !matches!(d, "cpu" | "nvme" | "none") {
                        bail!(
                            "zero_optimization.{what}.device must be cpu, nvme or none, got `{d}`"
                        )
                    }
                }
            }
        }
        if self.fp16.as_ref().is_some_and(|f| f.enabled)
            && self.bf16.as_ref().is_some_and(|b| b.enabled)
        {
            bail!("fp16 and bf16 cannot both be enabled")
        }
        Ok(())
    }

    pub fn zero_stage(&self) -> u8 {
        self.zero_optimization.as_ref().map_or(0, |z| z.stage)
    }

    /// DeepSpeed's batch rule for `dp` data-parallel ranks, with the command line's micro-batch and
    /// accumulation (Megatron's `--batch-size`, `--gas`) taking part: any two of train_batch_size,
    /// micro-batch and accumulation determine the third; all given must agree.
    pub fn batch(
        &self,
        dp: usize,
        flag_micro: Option<usize>,
        flag_gas: Option<usize>,
    ) -> Result<BatchSizes> {
        let pick = |cfg: Option<usize>,
                    flag: Option<usize>,
                    name: &str,
                    flag_name: &str|
         -> Result<Option<usize>> {
            match (cfg, flag) {
                (Some(a), Some(b)) if a != b => {
                    bail!("{flag_name} {b} disagrees with the DeepSpeed config's {name} {a}")
                }
                (a, b) => Ok(a.or(b)),
            }
        };
        let micro = pick(
            self.train_micro_batch_size_per_gpu,
            flag_micro,
            "train_micro_batch_size_per_gpu",
            "--batch-size",
        )?;
        let gas = pick(
            self.gradient_accumulation_steps,
            flag_gas,
            "gradient_accumulation_steps",
            "--gas",
        )?;
        BatchSizes::resolve(self.train_batch_size, micro, gas, dp)
    }
}

/// Resolved batch sizes: `train_batch_size = micro_batch * accumulation * dp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizes {
    pub train_batch_size: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
}

impl BatchSizes {
    pub fn resolve(
        train: Option<usize>,
        micro: Option<usize>,
        gas: Option<usize>,
        dp: usize,
    ) -> Result<Self> {
        if [train, micro, gas].contains(&Some(0)) || dp == 0 {
            bail!("batch sizes and the data-parallel size must be positive")
        }
        // Checked: sizes whose product overflows are refused, not wrapped.
        let overflow = || {
            candle_core::Error::Msg(format!(
                "batch sizes too large: train_batch_size {train:?}, micro batch {micro:?}, \
                 gradient_accumulation_steps {gas:?} and data-parallel size {dp} overflow"
            ))
        };
        let prod = |a: usize, b: usize| a.checked_mul(b).ok_or_else(overflow);
        let (t, m, g) = match (train, micro, gas) {
            (Some(t), Some(m), Some(g)) => (t, m, g),
            (Some(t), Some(m), None) => (t, m, t / prod(m, dp)?),
            (Some(t), None, Some(g)) => (t, t / prod(g, dp)?, g),
            (None, Some(m), g) => (prod(prod(m, g.unwrap_or(1))?, dp)?, m, g.unwrap_or(1)),
            (Some(t), None, None) => (t, t / dp, 1),
            (None, None, _) => {
                bail!("set train_batch_size or train_micro_batch_size_per_gpu (or --batch-size)")
            }
        };
        if m == 0 || g == 0 || prod(prod(m, g)?, dp)? != t {
            bail!(
                "inconsistent batch sizes: train_batch_size {} != micro batch {} x gradient_accumulation_steps {} x data-parallel size {dp}",
                train.unwrap_or(t),
                micro.unwrap_or(m),
                gas.unwrap_or(g)
            )
        }
        Ok(Self {
            train_batch_size: t,
            micro_batch: m,
            accumulation: g,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_rule() {
        let b = BatchSizes::resolve(Some(16), None, Some(1), 2).unwrap();
        assert_eq!((b.micro_batch, b.accumulation), (8, 1));
        let b = BatchSizes::resolve(None, Some(4), Some(2), 4).unwrap();
        assert_eq!(b.train_batch_size, 32);
        let b = BatchSizes::resolve(Some(30), Some(5), None, 2).unwrap();
        assert_eq!(b.accumulation, 3);
        assert!(BatchSizes::resolve(Some(30), Some(4), Some(3), 2).is_err());
        assert!(BatchSizes::resolve(Some(10), Some(4), None, 2).is_err());
        assert!(BatchSizes::resolve(None, None, Some(2), 2).is_err());
    }
}

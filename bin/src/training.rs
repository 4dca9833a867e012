//! The pretraining loop the `pretrain-*` commands share: iterations through the engine, Megatron's
//! log line every --log-interval, validation every --eval-interval and at the end, the metrics
//! JSONL, a progress bar and the loss-curve PNG.
use crate::deepspeed_args::DeepSpeedArgs;
use crate::metrics::{peak_rss_bytes, MetricsWriter};
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_deepscale::layers::module::Activations;
use candle_deepscale::runtime::adamw::AdamWConfig;
use candle_deepscale::runtime::config::{BatchSizes, DeepSpeedConfig, Fp16Config};
use candle_deepscale::runtime::engine::StepReport;
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::lr_schedules::{AnnealingLr, DecayStyle, LrSchedule};
use candle_deepscale::runtime::meters::mfu;
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The Megatron training flags every pretrain command shares.
#[derive(Args, Debug, Clone)]
pub struct TrainingArgs {
    /// Micro-batch size per data-parallel rank (Megatron-LM's --micro-batch-size; default: the
    /// DeepSpeed config's, else 4).
    #[arg(long, alias = "micro-batch-size")]
    pub batch_size: Option<usize>,
    /// Gradient accumulation steps (default: the DeepSpeed config's, else 1).
    #[arg(long)]
    pub gas: Option<usize>,
    /// Iterations (optimizer steps on the global batch) to train.
    #[arg(long, default_value_t = 200)]
    pub train_iters: u64,
    /// Peak learning rate (the DeepSpeed config's optimizer and scheduler win where it has them).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Learning rate at the end of the decay.
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f64,
    /// Decay after warmup: constant, linear or cosine (Megatron's AnnealingLR).
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_decay_style: DecayStyleArg,
    /// Defaults to --train-iters.
    #[arg(long)]
    pub lr_decay_iters: Option<u64>,
    /// Warmup as a fraction of the decay iterations (Megatron's --warmup, today's
    /// --lr-warmup-fraction).
    #[arg(long, alias = "lr-warmup-fraction", default_value_t = 0.05)]
    pub warmup: f64,
    /// Warmup in iterations instead (Megatron-LM's --lr-warmup-iters).
    #[arg(long)]
    pub lr_warmup_iters: Option<u64>,
    /// Warmup in samples instead (Megatron-LM's --lr-warmup-samples; fractional iterations count).
    #[arg(long)]
    pub lr_warmup_samples: Option<u64>,
    /// Decay over this many samples (Megatron-LM's --lr-decay-samples).
    #[arg(long)]
    pub lr_decay_samples: Option<u64>,
    /// Sample-based training (Megatron-LM's --train-samples): --train-iters becomes
    /// ceil(N / global batch).
    #[arg(long)]
    pub train_samples: Option<u64>,
    /// Megatron-LM's --global-batch-size: micro-batch x data-parallel size x accumulation steps;
    /// sets the accumulation (the DeepSpeed config's train_batch_size, when it has one, must agree).
    #[arg(long)]
    pub global_batch_size: Option<usize>,
    /// AdamW weight decay (not on biases and LayerNorms, as Megatron groups them).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// Adam's second-moment decay.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// Adam's epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Global gradient-norm clip, 0 = off (default: the config's gradient_clipping, else 1.0).
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Dropout after attention and MLP outputs and embeddings.
    #[arg(long, default_value_t = 0.1)]
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities.
    #[arg(long, default_value_t = 0.1)]
    pub attention_dropout: f64,
    /// Seed of the initialisation, dropout and data order (the same result at any layout).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Keep only each transformer layer's input in forward and recompute it in backward.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Layers per activation checkpoint (Megatron's --checkpoint-num-layers).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_num_layers: usize,
    /// Megatron-LM's --recompute-activations, i.e. --recompute-granularity selective.
    #[arg(long)]
    pub recompute_activations: bool,
    /// Megatron-LM's recompute: `full` checkpoints whole layers (--checkpoint-activations);
    /// `selective` recomputes attention's core, which the fused attention always does (it keeps
    /// no [t, t] matrix between forward and backward).
    #[arg(long, value_enum)]
    pub recompute_granularity: Option<RecomputeGranularity>,
    /// With --recompute-granularity full: `uniform` (checkpoints of --recompute-num-layers
    /// layers); `block` is not supported.
    #[arg(long)]
    pub recompute_method: Option<String>,
    /// Layers per checkpoint with --recompute-method uniform (--checkpoint-num-layers).
    #[arg(long)]
    pub recompute_num_layers: Option<usize>,
    /// Megatron-LM's flash attention: accepted, the fused attention is already flash-style (one
    /// pass per block of query rows, only the rows' log-sum-exps kept for backward).
    #[arg(long)]
    pub use_flash_attn: bool,
    /// Standard deviation of the normal weight init (Megatron's --init-method-std).
    #[arg(long, default_value_t = 0.02)]
    pub init_method_std: f64,
    /// With --load: the model's weights only; iteration, optimizer and schedule start afresh
    /// (Megatron's --finetune).
    #[arg(long)]
    pub finetune: bool,
    /// With --load: accepted — dropout masks come from --seed and the iteration through a
    /// counter-based generator, so there is no generator state to skip.
    #[arg(long)]
    pub no_load_rng: bool,
    /// fp16 static loss scale (Megatron's --loss-scale; the config's fp16.loss_scale).
    #[arg(long)]
    pub loss_scale: Option<f64>,
    /// fp16 dynamic scaling's first scale, a power of two (Megatron's --initial-loss-scale; the
    /// config's fp16.initial_scale_power).
    #[arg(long)]
    pub initial_loss_scale: Option<f64>,
    /// fp16 dynamic scaling's floor (fp16.min_loss_scale).
    #[arg(long)]
    pub min_loss_scale: Option<f64>,
    /// fp16: steps without overflow before the scale doubles (fp16.loss_scale_window).
    #[arg(long)]
    pub loss_scale_window: Option<u64>,
    /// fp16: overflows tolerated before the scale halves (fp16.hysteresis).
    #[arg(long)]
    pub hysteresis: Option<u32>,
    /// A .txt (blank-line separated documents) or .jsonl file tokenized on the fly, a Megatron
    /// dataset prefix (PREFIX.bin/.idx from preprocess-data), or `W1 PREFIX1 W2 PREFIX2 ...` to
    /// blend. Default: the shipped sample.
    #[arg(long, alias = "train-data", num_args = 1..)]
    pub data_path: Vec<String>,
    /// JSON field holding the text in .jsonl data.
    #[arg(long, default_value = "text")]
    pub text_key: String,
    /// train,valid,test weights over documents.
    #[arg(long, default_value = "949,50,1")]
    pub split: String,
    /// Iterations between Megatron's log lines (and metrics lines).
    #[arg(long, default_value_t = 10)]
    pub log_interval: u64,
    /// Iterations between validations (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_interval: u64,
    /// Micro-batches per validation.
    #[arg(long, default_value_t = 4)]
    pub eval_iters: u64,
    /// JSON lines of training metrics (rank 0). An existing file is refused without --overwrite;
    /// a run resumed with --load continues it (its lines past the checkpoint dropped).
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Replace an existing --metrics-file.
    #[arg(long)]
    pub overwrite: bool,
    /// TensorBoard event files of Megatron's training loop here (`learning_rate`, `lm loss`,
    /// `loss_scale` with fp16, validation `lm loss value` / `lm loss ppl`; step = iteration).
    /// DeepSpeed's own `Train/Samples/*` events come from the config's `tensorboard` section.
    #[arg(long)]
    pub tensorboard_dir: Option<PathBuf>,
    /// Write the TensorBoard scalars every N iterations (Megatron's --tensorboard-log-interval).
    #[arg(long, default_value_t = 1)]
    pub tensorboard_log_interval: u64,
    /// Accepted: events are flushed as they are written, no queue.
    #[arg(long)]
    pub tensorboard_queue_size: Option<usize>,
    /// Also write `forward_time`, `backward_time`, `optimizer_time` (seconds per iteration).
    #[arg(long)]
    pub log_timers_to_tensorboard: bool,
    /// Leave `learning_rate` out of the TensorBoard events.
    #[arg(long)]
    pub no_log_learning_rate_to_tensorboard: bool,
    /// Leave `loss_scale` out of the TensorBoard events.
    #[arg(long)]
    pub no_log_loss_scale_to_tensorboard: bool,
    /// Accepted: validation perplexity (`lm loss ppl`) is always written, as in Megatron v1.1.5.
    #[arg(long)]
    pub log_validation_ppl_to_tensorboard: bool,
    /// Train with fp16 parameters, fp32 master weights and dynamic loss scaling.
    #[arg(long)]
    pub fp16: bool,
    /// bf16 mixed precision (DeepSpeed's `bf16.enabled`): bf16 parameters on GPUs; on the CPU,
    /// fp32 parameters (the master weights) with every matrix product in bf16 (fp32 accumulation,
    /// AVX512-BF16 where the CPU has it).
    #[arg(long)]
    pub bf16: bool,
    /// Megatron's --exit-signal-handler: on --exit-signal, finish the iteration, save (with
    /// --save) and exit with status 0. Without it SIGTERM and SIGINT still stop the run at the same
    /// iteration on every rank and save, but exit with status 128 + the signal's number.
    #[arg(long)]
    pub exit_signal_handler: bool,
    /// The signal --exit-signal-handler acts on: SIGTERM, SIGINT, SIGUSR1 or SIGUSR2.
    #[arg(long, default_value = "SIGTERM")]
    pub exit_signal: String,
    /// Exit after each iteration that is a multiple of N (saving first with --save), status 0.
    #[arg(long)]
    pub exit_interval: Option<u64>,
    /// Exit once training has run this many minutes (saving first with --save), status 0.
    #[arg(long)]
    pub exit_duration_in_mins: Option<f64>,
    #[command(flatten)]
    pub ds: DeepSpeedArgs,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RecomputeGranularity {
    Full,
    Selective,
}

impl TrainingArgs {
    /// Megatron-LM's current names, resolved onto the v1.1.5 ones the rest reads, once the
    /// global batch is known: sample counts to iterations, warmup in iterations or samples to
    /// --warmup's fraction, recompute to activation checkpointing. Conflicting pairs are errors.
    pub fn resolve_megatron(&mut self, global_batch: usize) -> Result<()> {
        let g = global_batch.max(1) as u64;
        if let Some(s) = self.train_samples {
            if crate::args::given("train_iters") {
                bail!("give --train-iters or --train-samples, not both (Megatron-LM: iteration- or sample-based training)")
            }
            if s == 0 {
                bail!("--train-samples 0: expected at least one global batch ({g} samples)")
            }
            self.train_iters = s.div_ceil(g);
        }
        if let Some(s) = self.lr_decay_samples {
            if self.lr_decay_iters.is_some() {
                bail!("give --lr-decay-iters or --lr-decay-samples, not both")
            }
            self.lr_decay_iters = Some(s.div_ceil(g).max(1));
        }
        let decay = self.lr_decay_iters.unwrap_or(self.train_iters).max(1) as f64;
        let warmup_iters = match (self.lr_warmup_iters, self.lr_warmup_samples) {
            (Some(_), Some(_)) => bail!("give --lr-warmup-iters or --lr-warmup-samples, not both"),
            (Some(i), None) => Some(i as f64),
            (None, Some(s)) => Some(s as f64 / g as f64),
            (None, None) => None,
        };
        if let Some(w) = warmup_iters {
            if crate::args::given("warmup") {
                bail!("give one of --warmup (--lr-warmup-fraction), --lr-warmup-iters and --lr-warmup-samples")
            }
            if w > decay {
                bail!("the warmup ({w} iterations) is longer than the decay ({decay} iterations)")
            }
            self.warmup = w / decay;
        }
        let granularity = match (self.recompute_granularity, self.recompute_activations) {
            (Some(RecomputeGranularity::Full), true) => {
                bail!("--recompute-activations means --recompute-granularity selective, not full")
            }
            (g, true) => g.or(Some(RecomputeGranularity::Selective)),
            (g, false) => g,
        };
        match granularity {
            Some(RecomputeGranularity::Full) => {
                match self.recompute_method.as_deref() {
                    None | Some("uniform") => {}
                    Some("block") => bail!(
                        "not supported: --recompute-method block, because checkpoints cover \
                         every layer evenly here (use uniform with --recompute-num-layers)"
                    ),
                    Some(m) => bail!("--recompute-method {m}: expected uniform or block"),
                }
                self.checkpoint_activations = true;
                if let Some(n) = self.recompute_num_layers {
                    self.checkpoint_num_layers = n;
                }
            }
            Some(RecomputeGranularity::Selective) => {
                if self.recompute_method.is_some() || self.recompute_num_layers.is_some() {
                    bail!("--recompute-method/--recompute-num-layers go with --recompute-granularity full")
                }
            }
            None => {
                if self.recompute_method.is_some() || self.recompute_num_layers.is_some() {
                    bail!("--recompute-method/--recompute-num-layers need --recompute-granularity full")
                }
            }
        }
        Ok(())
    }

    /// Lines saying what accepted Megatron-LM flags with a built-in effect did.
    pub fn megatron_notes(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.recompute_activations
            || self.recompute_granularity == Some(RecomputeGranularity::Selective)
        {
            v.push("--recompute-granularity selective: the fused attention never keeps [t, t] scores; it recomputes them in backward, as selective recompute does");
        }
        if self.use_flash_attn {
            v.push("--use-flash-attn: the fused attention is flash-style already (blocks of query rows, log-sum-exps kept)");
        }
        if self.no_load_rng {
            v.push("--no-load-rng: dropout masks derive from --seed and the iteration; there is no generator state in a checkpoint");
        }
        v
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DecayStyleArg {
    Constant,
    Linear,
    Cosine,
}

/// `--flag`'s value is a finite number in `lo..=hi` (`open_hi`: below `hi`).
pub fn check_flag(flag: &str, v: f64, lo: f64, hi: f64, open_hi: bool) -> Result<()> {
    let ok = v.is_finite() && v >= lo && if open_hi { v < hi } else { v <= hi };
    if !ok {
        let upper = match (hi.is_infinite(), open_hi) {
            (true, _) => String::new(),
            (false, true) => format!(" and below {hi}"),
            (false, false) => format!(" and at most {hi}"),
        };
        bail!("--{flag} {v}: expected a number of at least {lo}{upper}")
    }
    Ok(())
}

impl TrainingArgs {
    /// Refuses values no run can use, naming the flag, before any work.
    pub fn check(&self) -> Result<()> {
        let inf = f64::INFINITY;
        check_flag("lr", self.lr, 0.0, inf, false)?;
        check_flag("min-lr", self.min_lr, 0.0, inf, false)?;
        if self.min_lr > self.lr {
            bail!("--min-lr {} is above --lr {}", self.min_lr, self.lr)
        }
        check_flag("warmup", self.warmup, 0.0, 1.0, false)?;
        check_flag("weight-decay", self.weight_decay, 0.0, inf, false)?;
        check_flag("adam-beta1", self.adam_beta1, 0.0, 1.0, true)?;
        check_flag("adam-beta2", self.adam_beta2, 0.0, 1.0, true)?;
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!("--adam-eps {}: expected a positive number", self.adam_eps)
        }
        if let Some(c) = self.clip_grad {
            check_flag("clip-grad", c, 0.0, inf, false)?;
        }
        // A dropout of 1 zeroes every activation: nothing would train.
        check_flag("hidden-dropout", self.hidden_dropout, 0.0, 1.0, true)?;
        check_flag("attention-dropout", self.attention_dropout, 0.0, 1.0, true)?;
        for (flag, v) in [
            ("train-iters", self.train_iters),
            ("log-interval", self.log_interval),
        ] {
            if v == 0 {
                bail!("--{flag} 0: expected at least 1")
            }
        }
        for (flag, v) in [("batch-size", self.batch_size), ("gas", self.gas)] {
            if v == Some(0) {
                bail!("--{flag} 0: expected at least 1")
            }
        }
        if !(self.init_method_std.is_finite() && self.init_method_std > 0.0) {
            bail!(
                "--init-method-std {}: expected a positive number",
                self.init_method_std
            )
        }
        if self.global_batch_size == Some(0) {
            bail!("--global-batch-size 0: expected at least 1")
        }
        if self.exit_interval == Some(0) {
            bail!("--exit-interval 0: expected at least 1")
        }
        if let Some(m) = self.exit_duration_in_mins {
            check_flag("exit-duration-in-mins", m, 0.0, inf, false)?;
        }
        if candle_deepscale::runtime::dist_signal_handler::parse_signal(&self.exit_signal).is_none()
        {
            bail!(
                "--exit-signal {}: expected SIGTERM, SIGINT, SIGUSR1 or SIGUSR2",
                self.exit_signal
            )
        }
        if self.tensorboard_log_interval == 0 {
            bail!("--tensorboard-log-interval 0: expected at least 1")
        }
        if self.tensorboard_dir.is_none()
            && (self.log_timers_to_tensorboard
                || self.no_log_learning_rate_to_tensorboard
                || self.no_log_loss_scale_to_tensorboard
                || self.log_validation_ppl_to_tensorboard
                || self.tensorboard_queue_size.is_some()
                || crate::args::given("tensorboard_log_interval"))
        {
            bail!("the --*-tensorboard flags need --tensorboard-dir DIR")
        }
        if self.lr_decay_iters == Some(0) {
            bail!("--lr-decay-iters 0: expected at least 1 (or leave it out: --train-iters)")
        }
        Ok(())
    }
}

/// The parameters' dtype: fp16 with loss scaling; bf16 on a GPU; else fp32. bf16 on the CPU keeps
/// fp32 parameters and activations and runs the matrix products in bf16 (PyTorch's CPU autocast:
/// the products are where bf16 pays, and candle's element-wise CPU ops are fp32-fast only).
pub fn param_dtype(engine: &EngineConfig, device: crate::args::DeviceKind) -> candle_core::DType {
    use candle_core::DType;
    if engine.fp16.is_some() {
        return DType::F16;
    }
    if engine.bf16 {
        if device == crate::args::DeviceKind::Cuda {
            return DType::BF16;
        }
        candle_deepscale::ops::matmul::set_float32_matmul_precision(
            candle_deepscale::ops::matmul::Precision::Bf16,
        );
    }
    DType::F32
}

/// The batch sizes from the flags (--batch-size / --micro-batch-size, --gas,
/// --global-batch-size) and the DeepSpeed config, DeepSpeed's rule: all given must agree.
pub fn batch_sizes(
    a: &TrainingArgs,
    ds: Option<&DeepSpeedConfig>,
    dp: usize,
) -> Result<BatchSizes> {
    let in_config = || {
        a.ds.deepscale_config
            .as_deref()
            .unwrap_or(Path::new("?"))
            .display()
            .to_string()
    };
    Ok(match ds {
        Some(d) => {
            let mut d = d.clone();
            match (a.global_batch_size, d.train_batch_size) {
                (Some(g), Some(t)) if g != t => bail!(
                    "--global-batch-size {g} disagrees with the DeepSpeed config's train_batch_size {t} (in {})",
                    in_config()
                ),
                (Some(g), _) => d.train_batch_size = Some(g),
                _ => {}
            }
            d.batch(dp, a.batch_size, a.gas)
                .map_err(|e| anyhow::anyhow!("{e} (in {})", in_config()))?
        }
        None => BatchSizes::resolve(
            a.global_batch_size,
            Some(a.batch_size.unwrap_or(4)),
            a.gas,
            dp,
        )?,
    })
}

/// Checks the flags, resolves Megatron-LM's current names (which need the global batch) and
/// builds the engine settings: what every pretrain command calls first.
pub fn prepare(
    a: &mut TrainingArgs,
    ds: Option<&DeepSpeedConfig>,
    dp: usize,
) -> Result<(EngineConfig, BatchSizes)> {
    a.check()?;
    let batch = batch_sizes(a, ds, dp)?;
    a.resolve_megatron(batch.train_batch_size)?;
    engine_config(a, ds, dp)
}

/// The engine settings from the flags and the DeepSpeed config (flags that disagree with the
/// config are errors; the config's optimizer and scheduler win where it has them, as in
/// Megatron + DeepSpeed).
pub fn engine_config(
    a: &TrainingArgs,
    ds: Option<&DeepSpeedConfig>,
    dp: usize,
) -> Result<(EngineConfig, BatchSizes)> {
    a.check()?;
    let batch = batch_sizes(a, ds, dp)?;
    let mut c = match ds {
        Some(d) => {
            let mut d = d.clone();
            // The batch (flags included) is resolved above.
            d.train_batch_size = Some(batch.train_batch_size);
            d.train_micro_batch_size_per_gpu = Some(batch.micro_batch);
            d.gradient_accumulation_steps = Some(batch.accumulation);
            EngineConfig::from_deepspeed(&d, dp).map_err(|e| {
                anyhow::anyhow!(
                    "{e} (in {})",
                    a.ds.deepscale_config
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                )
            })?
        }
        None => EngineConfig::default(),
    };
    c.train_micro_batch_size_per_gpu = batch.micro_batch;
    c.gradient_accumulation_steps = batch.accumulation;
    if ds.and_then(|d| d.optimizer.as_ref()).is_none() {
        c.optimizer = AdamWConfig {
            lr: a.lr,
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_eps,
            weight_decay: a.weight_decay,
            adam_w_mode: true,
        };
    }
    if ds.and_then(|d| d.scheduler.as_ref()).is_none() {
        let decay_iters = a.lr_decay_iters.unwrap_or(a.train_iters);
        c.lr_schedule = LrSchedule::Annealing(AnnealingLr {
            max_lr: a.lr,
            min_lr: a.min_lr,
            warmup_iters: a.warmup * decay_iters as f64,
            decay_iters,
            style: match a.lr_decay_style {
                DecayStyleArg::Constant => DecayStyle::Constant,
                DecayStyleArg::Linear => DecayStyle::Linear,
                DecayStyleArg::Cosine => DecayStyle::Cosine,
            },
        });
    }
    c.gradient_clipping = match (a.clip_grad, ds.and_then(|d| d.gradient_clipping)) {
        (Some(f), Some(g)) if f != g => {
            bail!("--clip-grad {f} disagrees with the DeepSpeed config's gradient_clipping {g}")
        }
        (f, g) => f.or(g).unwrap_or(1.0),
    };
    if a.fp16 && c.fp16.is_none() {
        if ds.and_then(|d| d.fp16.as_ref()).is_some() {
            bail!("--fp16 disagrees with the DeepSpeed config's fp16.enabled false")
        }
        c.fp16 = Some(Fp16Config {
            enabled: true,
            ..Default::default()
        });
    }
    apply_loss_scale_flags(a, ds, &mut c)?;
    if a.bf16 && !c.bf16 {
        if ds.and_then(|d| d.bf16.as_ref()).is_some() {
            bail!("--bf16 disagrees with the DeepSpeed config's bf16.enabled false")
        }
        if c.fp16.is_some() {
            bail!("--bf16 and fp16 cannot both be enabled")
        }
        c.bf16 = true;
    }
    if a.checkpoint_activations {
        if a.checkpoint_num_layers == 0 {
            bail!("--checkpoint-num-layers must be at least 1")
        }
        c.checkpoint_num_layers = a.checkpoint_num_layers;
    } else if c.partition_activations || c.cpu_checkpointing {
        // DeepSpeed reads these only when Megatron checkpoints activations.
        c.partition_activations = false;
        c.cpu_checkpointing = false;
    }
    if let Some(k) = ds
        .and_then(|d| d.pipeline.as_ref())
        .and_then(|p| p.activation_checkpoint_interval)
        .filter(|k| *k > 0)
    {
        // The pipeline section's interval is DeepSpeed's form of --checkpoint-num-layers.
        if a.checkpoint_activations && a.checkpoint_num_layers != k {
            bail!("--checkpoint-num-layers {} disagrees with the DeepSpeed config's pipeline.activation_checkpoint_interval {k}", a.checkpoint_num_layers)
        }
        c.checkpoint_num_layers = k;
    }
    a.ds.apply(ds, &mut c)?;
    c.seed = a.seed;
    Ok((c, batch))
}

/// Megatron's loss-scale flags onto the fp16 settings (each must agree with the config's key).
fn apply_loss_scale_flags(
    a: &TrainingArgs,
    ds: Option<&DeepSpeedConfig>,
    c: &mut EngineConfig,
) -> Result<()> {
    let any = a.loss_scale.is_some()
        || a.initial_loss_scale.is_some()
        || a.min_loss_scale.is_some()
        || a.loss_scale_window.is_some()
        || a.hysteresis.is_some();
    if !any {
        return Ok(());
    }
    let Some(f) = c.fp16.as_mut() else {
        bail!("--loss-scale, --initial-loss-scale, --min-loss-scale, --loss-scale-window and --hysteresis are fp16 settings: add --fp16")
    };
    let cfg = ds.and_then(|d| d.fp16.as_ref());
    let agree_f = |flag: &str, v: Option<f64>, key: &str, c: Option<f64>| -> Result<Option<f64>> {
        match (v, c) {
            (Some(v), Some(c)) if v != c => {
                bail!("{flag} {v} disagrees with the DeepSpeed config's fp16.{key} {c}")
            }
            (v, c) => Ok(v.or(c)),
        }
    };
    if let Some(s) = a.loss_scale {
        check_flag("loss-scale", s, f64::MIN_POSITIVE, f64::INFINITY, false)?;
    }
    f.loss_scale = agree_f(
        "--loss-scale",
        a.loss_scale,
        "loss_scale",
        cfg.and_then(|c| c.loss_scale),
    )?;
    if let Some(s) = a.initial_loss_scale {
        let p = s.log2();
        if !(s.is_finite() && s >= 1.0 && p.fract() == 0.0 && p <= 64.0) {
            bail!("--initial-loss-scale {s}: expected a power of two from 1 to 2^64 (DeepSpeed's fp16.initial_scale_power)")
        }
        let p = p as u32;
        if let Some(c) = cfg.and_then(|c| c.initial_scale_power).filter(|c| *c != p) {
            bail!("--initial-loss-scale {s} (2^{p}) disagrees with the DeepSpeed config's fp16.initial_scale_power {c}")
        }
        f.initial_scale_power = Some(p);
    }
    if let Some(m) = a.min_loss_scale {
        check_flag("min-loss-scale", m, f64::MIN_POSITIVE, f64::INFINITY, false)?;
    }
    f.min_loss_scale = agree_f(
        "--min-loss-scale",
        a.min_loss_scale,
        "min_loss_scale",
        cfg.and_then(|c| c.min_loss_scale),
    )?;
    for (flag, v, key, cv) in [
        (
            "--loss-scale-window",
            a.loss_scale_window,
            "loss_scale_window",
            cfg.and_then(|c| c.loss_scale_window),
        ),
        (
            "--hysteresis",
            a.hysteresis.map(u64::from),
            "hysteresis",
            cfg.and_then(|c| c.hysteresis).map(u64::from),
        ),
    ] {
        if v == Some(0) {
            bail!("{flag} 0: expected at least 1")
        }
        if let (Some(v), Some(c)) = (v, cv) {
            if v != c {
                bail!("{flag} {v} disagrees with the DeepSpeed config's fp16.{key} {c}")
            }
        }
    }
    if let Some(w) = a.loss_scale_window {
        f.loss_scale_window = Some(w);
    }
    if let Some(h) = a.hysteresis {
        f.hysteresis = Some(h);
    }
    Ok(())
}

/// What ZeRO-Infinity swaps to NVMe, for the log (None without offload).
pub fn describe_offload(engine: &EngineConfig) -> Option<String> {
    let o = engine.stage3.offload.as_ref()?;
    Some(format!(
        "ZeRO-Infinity: {}{}swapped to NVMe in tiles of {} elements",
        o.optimizer_nvme.as_ref().map_or(String::new(), |p| format!(
            "optimizer state and gradients -> {}; ",
            p.display()
        )),
        o.param_nvme.as_ref().map_or(String::new(), |p| format!(
            "parameters -> {}; ",
            p.display()
        )),
        o.sub_group_size
    ))
}

/// ZeRO-3 builds each rank's piece of the parameters only (DeepSpeed's `zero.Init`).
pub fn zero3_construction(
    engine: &EngineConfig,
    dp: Option<&candle_deepscale::comm::ProcessGroup>,
) -> Option<candle_deepscale::layers::parameter::Zero3Construction> {
    (engine.zero_stage == 3).then(|| candle_deepscale::layers::parameter::Zero3Construction {
        parts: dp.map_or(1, |g| g.size()),
        rank: dp.map_or(0, |g| g.rank),
        persistence_threshold: engine.stage3.param_persistence_threshold,
    })
}

/// How the loop runs.
pub struct LoopSpec<'a> {
    /// Iterations already done (a resumed run starts after them).
    pub start_iter: u64,
    /// Iterations (optimizer steps on the global batch) to train.
    pub train_iters: u64,
    /// Iterations between Megatron's log lines (and metrics lines).
    pub log_interval: u64,
    /// Iterations between validations (0: only at the end).
    pub eval_interval: u64,
    /// Tokens of one global batch.
    pub tokens_per_iter: f64,
    pub flops_per_token: f64,
    /// The machine's measured f32 GEMM rate (MFU denominator).
    pub gemm_peak: f64,
    pub metrics_file: Option<&'a Path>,
    /// Rank 0: prints, writes metrics and the plot.
    pub root: bool,
    /// Fields every metrics line carries (the layout, ZeRO stage, model-state bytes).
    pub base: serde_json::Value,
    /// Title of the loss curve.
    pub title: String,
    /// fp16: a non-finite loss is an overflow the scaler handles, not an error.
    pub fp16: bool,
    /// When to stop early: signals, Megatron's --exit-interval and --exit-duration-in-mins.
    pub exit: ExitPolicy,
    /// --save is set (for the stop message).
    pub saving: bool,
    /// Megatron's TensorBoard events (--tensorboard-dir and its flags).
    pub tensorboard: Option<MegatronTensorBoard>,
    /// The losses logged apart from the optimized one (BERT's `lm loss` and `sop loss`).
    pub loss_parts: &'a LossParts,
}

/// Megatron's loss dict: losses logged apart from the optimized total (BERT's masked-LM
/// `lm loss` and sentence-order `sop loss`, whose sum it trains on). The loss closures add each
/// micro-batch's parts on this rank; after each batch every rank takes the batch's mean, shared
/// over the pipeline's stages and averaged over data parallelism as the loss is.
pub struct LossParts {
    pub names: Vec<String>,
    sums: std::cell::RefCell<(Vec<f64>, u64)>,
}

impl LossParts {
    pub fn new(names: Vec<String>) -> Self {
        let n = names.len();
        Self {
            names,
            sums: std::cell::RefCell::new((vec![0.0; n], 0)),
        }
    }

    /// Notes one micro-batch's parts; returns its loss (a loss closure's result).
    pub fn add(&self, (loss, parts): (Tensor, Vec<Tensor>)) -> candle_core::Result<Tensor> {
        if parts.len() != self.names.len() {
            candle_core::bail!(
                "the loss function gave {} parts for {:?}",
                parts.len(),
                self.names
            )
        }
        let mut s = self.sums.borrow_mut();
        for (acc, p) in s.0.iter_mut().zip(&parts) {
            *acc += p.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        s.1 += 1;
        Ok(loss)
    }

    /// The mean of each part over the batch just run, on every rank (a collective when there
    /// are parts: every rank calls it at the same point); empty without parts.
    fn take(&self, engine: &Engine) -> Result<Vec<f64>> {
        if self.names.is_empty() {
            return Ok(Vec::new());
        }
        let (sums, n) = std::mem::replace(
            &mut *self.sums.borrow_mut(),
            (vec![0.0; self.names.len()], 0),
        );
        // Ranks that ran no loss (earlier pipeline stages) contribute zeros.
        let mut means: Vec<f64> = sums.iter().map(|s| s / n.max(1) as f64).collect();
        engine.reduce_reported(&mut means)?;
        Ok(means)
    }

    /// The metrics field of part `i` (`lm loss` -> `lm_loss`).
    fn field(&self, i: usize) -> String {
        self.names[i].replace(' ', "_")
    }
}

/// Megatron's training-loop TensorBoard scalars (v1.1.5's `training_log` and
/// `evaluate_and_print_results`): step = iteration.
#[derive(Debug, Clone)]
pub struct MegatronTensorBoard {
    pub dir: PathBuf,
    pub interval: u64,
    pub learning_rate: bool,
    pub loss_scale: bool,
    pub timers: bool,
    /// The loss's name (`lm loss`).
    pub loss_key: String,
}

impl MegatronTensorBoard {
    /// `fp16`: the run scales its loss (from --fp16 or the config).
    pub fn of(a: &TrainingArgs, loss_key: &str, fp16: bool) -> Option<Self> {
        Some(Self {
            dir: a.tensorboard_dir.clone()?,
            interval: a.tensorboard_log_interval.max(1),
            learning_rate: !a.no_log_learning_rate_to_tensorboard,
            loss_scale: fp16 && !a.no_log_loss_scale_to_tensorboard,
            timers: a.log_timers_to_tensorboard,
            loss_key: loss_key.into(),
        })
    }
}

/// When a run stops before --train-iters.
#[derive(Debug, Clone, Default)]
pub struct ExitPolicy {
    pub interval: Option<u64>,
    pub duration: Option<std::time::Duration>,
    /// Megatron's --exit-signal-handler: this signal stops with status 0.
    pub clean_signal: Option<i32>,
}

impl ExitPolicy {
    pub fn of(a: &TrainingArgs) -> Self {
        use candle_deepscale::runtime::dist_signal_handler::parse_signal;
        Self {
            interval: a.exit_interval,
            duration: a
                .exit_duration_in_mins
                .map(|m| std::time::Duration::from_secs_f64(m * 60.0)),
            clean_signal: a
                .exit_signal_handler
                .then(|| parse_signal(&a.exit_signal))
                .flatten(),
        }
    }

    /// The signals to note: SIGTERM and SIGINT always, and --exit-signal.
    pub fn signals(&self) -> Vec<i32> {
        use candle_deepscale::runtime::dist_signal_handler::{SIGINT, SIGTERM};
        let mut v = vec![SIGTERM, SIGINT];
        v.extend(self.clean_signal.filter(|s| !v.contains(s)));
        v
    }

    /// Whether to stop after `iter` (every rank gets the same answer: the signal and the deadline
    /// are agreed through a collective).
    fn stop_after(&self, engine: &Engine, iter: u64, started: Instant) -> Result<Option<Stop>> {
        if let Some(sig) = signal_on_any_rank(engine)? {
            return Ok(Some(Stop::Signal(sig)));
        }
        if let Some(d) = self.duration {
            let over = started.elapsed() >= d;
            if engine.max_over_ranks(f64::from(u8::from(over)))? > 0.0 {
                return Ok(Some(Stop::Duration));
            }
        }
        if self.interval.is_some_and(|n| iter.is_multiple_of(n)) {
            return Ok(Some(Stop::Interval));
        }
        Ok(None)
    }

    /// The process's exit status after `stop`: 0 for Megatron's exits, else 128 + the signal.
    pub fn exit_code(&self, stop: &Stop) -> i32 {
        match stop {
            Stop::Signal(s) if Some(*s) != self.clean_signal => 128 + s,
            _ => 0,
        }
    }
}

/// The stop signal any rank has received (a collective: every rank asks at the same point and
/// gets the same answer).
pub fn signal_on_any_rank(engine: &Engine) -> Result<Option<i32>> {
    let sig = candle_deepscale::runtime::dist_signal_handler::received().unwrap_or(0);
    let sig = engine.max_over_ranks(sig as f64)? as i32;
    Ok((sig != 0).then_some(sig))
}

/// Why a run stopped before --train-iters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Signal(i32),
    Interval,
    Duration,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(s) => {
                f.write_str(&candle_deepscale::runtime::dist_signal_handler::signal_name(*s))
            }
            Stop::Interval => f.write_str("--exit-interval"),
            Stop::Duration => f.write_str("--exit-duration-in-mins"),
        }
    }
}

pub struct LoopResult {
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub last_valid: Option<f64>,
    /// Seconds of training (validation included).
    pub elapsed: f64,
    /// The last iteration trained.
    pub last_iter: u64,
    /// Set when the run stopped before --train-iters.
    pub stopped: Option<Stop>,
}

/// Runs `spec.train_iters` iterations: `micro_batches(iter)` gives this rank's micro-batches of
/// iteration `iter` (1-based), `evaluate` the validation loss (mean over the data-parallel group;
/// None without validation data), `after_iteration` runs after each (checkpoints).
pub fn train_loop<F>(
    spec: &LoopSpec,
    engine: &mut Engine,
    metrics: Option<MetricsWriter>,
    mut micro_batches: impl FnMut(u64) -> Result<Vec<(Activations, F)>>,
    mut evaluate: impl FnMut(&Engine) -> Result<Option<f64>>,
    mut after_iteration: impl FnMut(&Engine, u64, bool) -> Result<()>,
) -> Result<LoopResult>
where
    F: FnOnce(&Activations) -> Result<Tensor, candle_core::Error>,
{
    let mut run = LoopState::new(spec, metrics)?;
    for iter in spec.start_iter + 1..=spec.train_iters {
        let r = engine.train_batch(micro_batches(iter)?)?;
        if !r.loss.is_finite() && !spec.fp16 {
            bail!(
                "iteration {iter}: the loss is {}; lower --lr or check the data",
                r.loss
            )
        }
        let parts = spec.loss_parts.take(engine)?;
        run.trained(iter, r.loss, &parts);
        run.tensorboard_step(engine, iter, &r, &parts)?;
        if iter % spec.log_interval.max(1) == 0 || iter == spec.train_iters {
            run.log(engine, iter, &r, &parts)?;
        }
        let eval_now =
            (spec.eval_interval > 0 && iter % spec.eval_interval == 0) || iter == spec.train_iters;
        if eval_now {
            if let Some(vl) = evaluate(engine)? {
                let parts = spec.loss_parts.take(engine)?;
                run.validated(iter, vl, &parts)?;
                if engine.pipe().is_some() {
                    // The pipeline engine's eval_batch event.
                    let samples = engine.global_samples();
                    engine.write_monitor_events(&[
                        candle_deepscale::runtime::monitor::Event::new(
                            "Train/Samples/eval_loss",
                            vl,
                            samples,
                        ),
                    ])?;
                }
            }
        }
        // Every rank asks the same question after the same iteration: they stop together.
        let stop = if iter < spec.train_iters {
            spec.exit.stop_after(engine, iter, run.started)?
        } else {
            None
        };
        // A stop saves (with --save) even between --save-interval's saves.
        run.bar
            .suspend(|| after_iteration(engine, iter, stop.is_some()))?;
        if let Some(stop) = stop {
            return run.finish(iter, Some(stop));
        }
    }
    run.finish(spec.train_iters, None)
}

/// The loop's bookkeeping: the progress bar, the loss curves, the log window and the metrics.
struct LoopState<'a> {
    spec: &'a LoopSpec<'a>,
    /// Megatron's TensorBoard writer (rank 0 with --tensorboard-dir).
    tb: Option<candle_deepscale::runtime::monitor::tensorboard::EventFileWriter>,
    /// The wall clock at the last TensorBoard timer write.
    tb_clock: candle_deepscale::runtime::meters::WallClock,
    /// The last progress line (or log line) written to a non-terminal stderr.
    heartbeat: Instant,
    bar: indicatif::ProgressBar,
    metrics: Option<MetricsWriter>,
    curve: Vec<(u64, f64)>,
    valid_curve: Vec<(u64, f64)>,
    first_loss: Option<f64>,
    last_loss: f64,
    last_valid: Option<f64>,
    started: Instant,
    window_start: Instant,
    window_loss: f64,
    window_parts: Vec<f64>,
    window_n: u64,
}

impl<'a> LoopState<'a> {
    fn new(spec: &'a LoopSpec<'a>, metrics: Option<MetricsWriter>) -> Result<Self> {
        let bar = if spec.root {
            indicatif::ProgressBar::new(spec.train_iters)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} iterations, {eta} left, {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(spec.start_iter);
        let tb = match (&spec.tensorboard, spec.root) {
            (Some(t), true) => {
                let w = candle_deepscale::runtime::monitor::tensorboard::EventFileWriter::create(
                    &t.dir,
                )?;
                eprintln!("tensorboard: Megatron's scalars in {}", w.path().display());
                Some(w)
            }
            _ => None,
        };
        Ok(Self {
            spec,
            tb,
            tb_clock: Default::default(),
            heartbeat: Instant::now(),
            bar,
            metrics,
            curve: Vec::new(),
            valid_curve: Vec::new(),
            first_loss: None,
            last_loss: f64::NAN,
            last_valid: None,
            started: Instant::now(),
            window_start: Instant::now(),
            window_loss: 0.0,
            window_parts: vec![0.0; spec.loss_parts.names.len()],
            window_n: 0,
        })
    }

    /// Megatron's `training_log` scalars for iteration `iter`.
    fn tensorboard_step(
        &mut self,
        engine: &Engine,
        iter: u64,
        r: &StepReport,
        parts: &[f64],
    ) -> Result<()> {
        let (Some(w), Some(t)) = (self.tb.as_mut(), self.spec.tensorboard.as_ref()) else {
            return Ok(());
        };
        let clock = engine.wall_clock();
        let before = std::mem::replace(&mut self.tb_clock, clock);
        if !iter.is_multiple_of(t.interval) {
            return Ok(());
        }
        if t.learning_rate {
            w.add_scalar("learning_rate", r.lr, iter)?;
        }
        // training_log writes each key of the loss dict.
        if parts.is_empty() {
            w.add_scalar(&t.loss_key, r.loss, iter)?;
        }
        for (name, v) in self.spec.loss_parts.names.iter().zip(parts) {
            w.add_scalar(name, *v, iter)?;
        }
        if t.loss_scale {
            w.add_scalar("loss_scale", r.loss_scale, iter)?;
        }
        if t.timers {
            // Megatron's timers.write: `<name>_time` in seconds (this iteration's).
            for (name, ms) in [
                ("forward_time", clock.forward_ms - before.forward_ms),
                ("backward_time", clock.backward_ms - before.backward_ms),
                ("optimizer_time", clock.step_ms - before.step_ms),
            ] {
                w.add_scalar(name, ms / 1e3, iter)?;
            }
        }
        w.flush()?;
        Ok(())
    }

    fn trained(&mut self, iter: u64, loss: f64, parts: &[f64]) {
        // In a log file (no progress bar) a line at least every 30 s between log lines.
        if self.spec.root
            && !std::io::IsTerminal::is_terminal(&std::io::stderr())
            && self.heartbeat.elapsed().as_secs() >= 30
            && !iter.is_multiple_of(self.spec.log_interval.max(1))
        {
            let done = (iter - self.spec.start_iter) as f64;
            let per = self.started.elapsed().as_secs_f64() / done.max(1.0);
            eprintln!(
                " progress: iteration {iter}/{}, {per:.2} s per iteration, about {:.0} s left, loss {loss:.4}",
                self.spec.train_iters,
                per * (self.spec.train_iters - iter) as f64
            );
            self.heartbeat = Instant::now();
        }
        self.first_loss.get_or_insert(loss);
        self.last_loss = loss;
        self.window_loss += loss;
        for (w, p) in self.window_parts.iter_mut().zip(parts) {
            *w += p;
        }
        self.window_n += 1;
        self.curve.push((iter, loss));
        self.bar.inc(1);
        self.bar.set_message(format!("loss {loss:.3}"));
    }

    /// Megatron's log line (and DeepSpeed's wall-clock line) for the window ending at `iter`,
    /// and its metrics line.
    fn log(&mut self, engine: &mut Engine, iter: u64, r: &StepReport, parts: &[f64]) -> Result<()> {
        let a = self.spec;
        let n = self.window_n.max(1) as f64;
        // Megatron's `<key>: <window mean>` for each key of the loss dict.
        let losses = if parts.is_empty() {
            format!("lm loss: {:.6E}", self.window_loss / n)
        } else {
            let names = &a.loss_parts.names;
            let each = names.iter().zip(&self.window_parts);
            each.map(|(k, v)| format!("{k}: {:.6E}", v / n))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let ms = self.window_start.elapsed().as_secs_f64() * 1000.0 / n;
        let tps = a.tokens_per_iter / (ms / 1000.0);
        // Per-rank FLOP rate against this machine's GEMM peak (ranks share its cores).
        let mfu = mfu(tps, a.flops_per_token, a.gemm_peak);
        self.heartbeat = Instant::now();
        let mem = engine.memory_report();
        let clock = engine.take_wall_clock();
        // The engine's totals restart from zero: so do the TensorBoard timers' differences.
        self.tb_clock = Default::default();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        if a.root {
            self.bar.suspend(|| {
                eprintln!(
                    " iteration {iter:>8}/{:>8} | elapsed time per iteration (ms): {ms:.1} | learning rate: {:.3E} | {losses} | loss scale: {:.1} | grad norm: {:.3} | number of skipped iterations: {:>3} | tokens/s: {tps:.0} | MFU: {:.1}% | memory (MiB): model state {:.1}, activations {:.1}, communication {:.1}, peak RSS {:.1}",
                    a.train_iters,
                    r.lr,
                    r.loss_scale,
                    r.grad_norm,
                    engine.skipped_steps(),
                    mfu * 100.0,
                    mib(mem.model_state()),
                    mib(mem.activations),
                    mib(mem.communication),
                    mib(peak_rss_bytes())
                );
                if engine.config.wall_clock_breakdown {
                    // DeepSpeed's wall_clock_breakdown line (per iteration, this window's mean).
                    eprintln!(
                        " time (ms) | forward: {:.2} | backward: {:.2} | optimizer_step: {:.2}",
                        clock.forward_ms, clock.backward_ms, clock.step_ms
                    )
                }
            });
        }
        if let Some(m) = self.metrics.as_mut() {
            let mut line = a.base.clone();
            let o = line.as_object_mut().expect("object");
            for (k, v) in [
                ("iteration", json!(iter)),
                ("loss", json!(r.loss)),
                ("lr", json!(r.lr)),
                ("loss_scale", json!(r.loss_scale)),
                ("grad_norm", json!(r.grad_norm)),
                ("skipped", json!(r.skipped)),
                ("ms_per_step", json!(ms)),
                ("tokens_per_s", json!(tps)),
                ("mfu", json!(mfu)),
                ("forward_ms", json!(clock.forward_ms)),
                ("backward_ms", json!(clock.backward_ms)),
                ("optimizer_step_ms", json!(clock.step_ms)),
                ("peak_bytes", json!(peak_rss_bytes())),
                ("activation_bytes", json!(mem.activations)),
                ("communication_bytes", json!(mem.communication)),
                ("swap_buffer_bytes", json!(mem.swap_buffers)),
            ] {
                o.insert(k.into(), v);
            }
            if let Some((read, written)) = mem.offload_bytes {
                o.insert("offload_bytes_read".into(), json!(read));
                o.insert("offload_bytes_written".into(), json!(written));
            }
            for (i, v) in parts.iter().enumerate() {
                o.insert(a.loss_parts.field(i), json!(v));
            }
            m.write(&line)?;
        }
        self.window_loss = 0.0;
        self.window_parts.iter_mut().for_each(|w| *w = 0.0);
        self.window_n = 0;
        self.window_start = Instant::now();
        Ok(())
    }

    fn validated(&mut self, iter: u64, vl: f64, parts: &[f64]) -> Result<()> {
        // evaluate_and_print_results: `<key> value` and `<key> ppl` (exp of at most 20) for each
        // key of the loss dict.
        let names = &self.spec.loss_parts.names;
        let dict: Vec<(&str, f64)> = if parts.is_empty() {
            vec![("lm loss", vl)]
        } else {
            names
                .iter()
                .map(String::as_str)
                .zip(parts.iter().copied())
                .collect()
        };
        if let Some(w) = self.tb.as_mut() {
            for (k, v) in &dict {
                w.add_scalar(&format!("{k} value"), *v, iter)?;
                w.add_scalar(&format!("{k} ppl"), v.min(20.0).exp(), iter)?;
            }
            w.flush()?;
        }
        if self.spec.root {
            let text = dict
                .iter()
                .map(|(k, v)| format!("{k}: {v:.6E} | {k} PPL: {:.3E}", v.exp()))
                .collect::<Vec<_>>()
                .join(" | ");
            self.bar
                .suspend(|| eprintln!(" validation loss at iteration {iter} | {text}"));
        }
        if let Some(m) = self.metrics.as_mut() {
            let mut line = self.spec.base.clone();
            line["iteration"] = json!(iter);
            line["valid_loss"] = json!(vl);
            for (i, v) in parts.iter().enumerate() {
                line[format!("valid_{}", self.spec.loss_parts.field(i))] = json!(v);
            }
            m.write(&line)?;
        }
        self.valid_curve.push((iter, vl));
        self.last_valid = Some(vl);
        Ok(())
    }

    fn finish(self, last_iter: u64, stopped: Option<Stop>) -> Result<LoopResult> {
        let a = self.spec;
        self.bar.finish_and_clear();
        let elapsed = self.started.elapsed().as_secs_f64();
        if a.root {
            if let Some(stop) = stopped {
                eprintln!(
                    "stopped by {stop} after iteration {last_iter} of {}{}",
                    a.train_iters,
                    if a.saving {
                        "; resume with the same command plus --load (the --save folder)"
                    } else {
                        " (no --save: nothing saved)"
                    }
                );
            }
            eprintln!(
                "done: {} iterations in {elapsed:.1} s; loss {:.4} -> {:.4}",
                last_iter - a.start_iter,
                self.first_loss.unwrap_or(f64::NAN),
                self.last_loss
            );
        }
        if let (Some(m), Some(path)) = (self.metrics.as_ref(), a.metrics_file) {
            m.finish()?;
            let png = path.with_extension("png");
            crate::plot::loss_curve(&png, &a.title, &self.curve, &self.valid_curve)?;
            eprintln!("loss curve: {}", png.display());
        }
        Ok(LoopResult {
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            last_valid: self.last_valid,
            elapsed,
            last_iter,
            stopped,
        })
    }
}

/// `--save` / `--save-interval` / `--keep-last`: saves after iteration `iter` when it is due (every
/// interval and at the last iteration).
pub struct Saver<'a> {
    pub args: &'a TrainingArgs,
    pub model: serde_json::Value,
    pub tokenizer: Option<Vec<u8>>,
    pub global_batch: usize,
    pub root: bool,
    /// Pipelines: the index of this stage's first layer.
    pub first_layer: usize,
}

impl Saver<'_> {
    /// Saves after `iter` when due (or `stopping`: a signal or an exit flag ends the run here).
    pub fn after(&self, engine: &Engine, iter: u64, stopping: bool) -> Result<()> {
        let Some(dir) = &self.args.ds.save else {
            return Ok(());
        };
        let due = self
            .args
            .ds
            .save_interval
            .is_some_and(|n| n > 0 && iter.is_multiple_of(n))
            || iter == self.args.train_iters
            || stopping;
        if !due {
            return Ok(());
        }
        let tag = candle_deepscale::runtime::checkpoint::save(
            engine,
            &candle_deepscale::runtime::checkpoint::SaveSpec {
                dir,
                consumed_samples: iter * self.global_batch as u64,
                seed: self.args.seed,
                lr_schedule: engine.config.lr_schedule,
                model: self.model.clone(),
                extra_files: self
                    .tokenizer
                    .iter()
                    .map(|t| ("tokenizer.json".to_string(), t.clone()))
                    .collect(),
                keep_last: self.args.ds.keep_last,
                first_layer: self.first_layer,
            },
        )?;
        if self.root {
            eprintln!(" saved checkpoint at iteration {iter} to {}", tag.display());
        }
        Ok(())
    }
}

//! Megatron's `training.py` `pretrain(train_valid_test_dataset_provider, model_provider,
//! forward_step_func)`: the one pretraining driver of `pretrain-gpt2` and `pretrain-bert`.
//!
//! A model family is a [`ModelProvider`] (build this rank's model or pipeline stage, describe
//! it, count its FLOPs), its data a [`DataProvider`] (micro-batches of the training and
//! validation splits) and a [`LossFn`] (the model's output and a micro-batch's targets to the
//! loss). Everything else — the ranks, the engine, resuming, the micro-batch slice of each
//! data-parallel rank, the log, the metrics, validation and checkpoints — is here once, so a third
//! model is three small pieces, not a copy of the loop.
use crate::launch::{launch, RankCtx};
use crate::metrics::MetricsWriter;
use crate::training::{train_loop, LoopSpec, Saver, TrainingArgs};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::comms_logging::CommsLogger;
use candle_deepscale::comm::Communicator;
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::{unique_parameters, Activations, Sequential};
use candle_deepscale::layers::parameter::{ParamBuilder, ParamSource};
use candle_deepscale::runtime::checkpoint::Checkpoint;
use candle_deepscale::runtime::config::BatchSizes;
use candle_deepscale::runtime::data_samplers::PretrainingSampler;
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::meters::{gemm_peak_flops, gemm_peak_flops_of};
use candle_deepscale::runtime::pipe::PartitionMethod;
use candle_deepscale::runtime::topology::Grid;
use serde_json::json;
use std::ops::Range;
use std::sync::Arc;

/// A model family: what the driver builds and reports (Megatron's `model_provider`).
pub trait ModelProvider: Sync {
    /// This rank's model: the whole model, or one pipeline stage.
    type Model: Sequential + 'static;

    /// The checkpoint manifest's model entry (`{"type": .., "config": ..}`).
    fn manifest(&self) -> serde_json::Value;

    /// The layer boundaries of `stages` pipeline stages.
    fn partition(&self, stages: usize, method: &PartitionMethod) -> Result<Vec<usize>>;

    /// Builds this rank's model from `pb`: layers `range` when `pipelined`, else the whole model.
    fn build(&self, pb: &ParamBuilder, range: Range<usize>, pipelined: bool)
        -> Result<Self::Model>;

    /// Where the weights come from when not from `--load` or a random init (an HF folder).
    fn weights(&self) -> Result<Option<Box<dyn ParamSource>>> {
        Ok(None)
    }

    /// The log line describing the model (`n_params` on this rank, tensor-parallel size `tp`).
    fn describe(&self, n_params: usize, tp: usize) -> String;

    /// The loss curve's title.
    fn title(&self) -> String;

    /// Model FLOPs per token of a training step (forward + backward; the MFU numerator).
    fn flops_per_token(&self) -> f64;

    /// Names of the losses logged apart from the optimized one, as Megatron's loss dict (BERT
    /// with its binary head: `lm loss`, `sop loss`); none when the loss is the `lm loss`.
    fn reported_losses(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs on every rank after training (exports, a sample); the text goes into the summary.
    fn after_training(
        &self,
        _model: &Self::Model,
        _engine: &Engine,
        _ctx: &RankCtx,
    ) -> Result<Option<String>> {
        Ok(None)
    }
}

/// A model family's data (Megatron's `train_valid_test_dataset_provider`).
pub trait DataProvider: Sync {
    /// What the loss needs of a micro-batch besides the model's output.
    type Targets: Send + 'static;

    /// The micro-batch of `b` samples from sample `start` of the training split (or the
    /// validation split): the model's input and the loss's targets.
    fn batch(
        &self,
        valid: bool,
        start: usize,
        b: usize,
        dev: &Device,
    ) -> Result<(Activations, Self::Targets)>;

    /// Whether there is a validation split.
    fn has_valid(&self) -> bool;

    /// Tokens per sample.
    fn seq_length(&self) -> usize;
}

/// The loss of a micro-batch from the model's output, and the parts logged apart from it
/// ([`ModelProvider::reported_losses`], in that order; detached scalars): Megatron's
/// `loss_func`, which returns the loss and its loss dict.
pub type LossFn<M, T> = fn(&M, &Activations, &T) -> candle_core::Result<(Tensor, Vec<Tensor>)>;

/// What every rank of a pretraining run shares, resolved before the ranks start.
pub struct Setup<'a> {
    pub args: &'a TrainingArgs,
    pub layout: &'a crate::args::Layout,
    pub engine: EngineConfig,
    pub batch: BatchSizes,
    pub dtype: DType,
    /// `--load`: parameters, optimizer and counters come from here.
    pub ckpt: Option<Checkpoint>,
    pub partition: PartitionMethod,
    /// Saved beside each checkpoint.
    pub tokenizer_json: Vec<u8>,
}

/// What the run gave (rank 0's view).
pub struct Summary {
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub last_valid: Option<f64>,
    pub n_params: usize,
    pub tokens_per_s: f64,
    pub model_state_bytes: u64,
    pub after: Option<String>,
    pub skipped: u64,
    /// The last iteration trained (--train-iters unless stopped).
    pub iterations: u64,
    /// Why the run stopped early, if it did.
    pub stopped: Option<crate::training::Stop>,
}

/// The end of a stopped run as an error carrying its exit status (0: Megatron's exit flags).
#[derive(Debug)]
pub struct ExitStatus {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitStatus {}

impl Summary {
    /// Ok for a finished run and Megatron's exits (status 0); an [`ExitStatus`] for a signal.
    pub fn exit_status(&self, a: &TrainingArgs) -> Result<()> {
        let Some(stop) = self.stopped else {
            return Ok(());
        };
        let code = crate::training::ExitPolicy::of(a).exit_code(&stop);
        if code == 0 {
            eprintln!("exiting program at iteration {}", self.iterations);
            return Ok(());
        }
        Err(ExitStatus {
            code,
            message: format!(
                "stopped by {stop} at iteration {} (exit status {code})",
                self.iterations
            ),
        }
        .into())
    }
}

/// Pretrains on every rank of `setup.layout`; returns rank 0's summary (None on the other
/// processes of an MPI job).
pub fn pretrain<M: ModelProvider, D: DataProvider>(
    setup: &Setup,
    model: &M,
    data: &D,
    loss_fn: LossFn<M::Model, D::Targets>,
) -> Result<Option<Summary>> {
    // Signals stop every rank at the same iteration (and save); a second one exits at once.
    candle_deepscale::runtime::dist_signal_handler::install(
        &crate::training::ExitPolicy::of(setup.args).signals(),
    )?;
    // The MFU denominator, measured once before the ranks start (CPU ranks share it).
    let cpu_peak = gemm_peak_flops(&Device::Cpu, 5)?;
    launch(setup.layout, |ctx| {
        train_rank(setup, model, data, loss_fn, &ctx, cpu_peak)
    })
}

fn train_rank<M: ModelProvider, D: DataProvider>(
    sh: &Setup,
    provider: &M,
    data: &D,
    loss_fn: LossFn<M::Model, D::Targets>,
    ctx: &RankCtx,
    cpu_peak: f64,
) -> Result<Summary> {
    let a = sh.args;
    let device = ctx.device.clone();
    let root = ctx.is_root();
    // DeepSpeed's comms_logger: the rank's communicator, every collective timed.
    let logger = match (&sh.engine.comms_logger, &ctx.grid.comm) {
        (Some(c), Some(comm)) => Some(CommsLogger::wrap(
            comm.clone(),
            c.verbose.unwrap_or(false),
            c.profiled_ops(),
        )),
        (Some(_), None) if root => {
            eprintln!("comms_logger: a single rank runs no collectives");
            None
        }
        _ => None,
    };
    let grid = match &logger {
        Some(l) => Grid::new(ctx.topo, l.clone() as Arc<dyn Communicator>)?,
        None => ctx.grid.clone(),
    };
    let (tp, dp, pipe) = (grid.tp()?, grid.dp()?, grid.pipe()?);
    let (dp_size, dp_rank) = dp.as_ref().map_or((1, 0), |g| (g.size(), g.rank));
    let init = RandomInit { seed: a.seed };
    let weights = provider.weights()?;
    let src: &dyn ParamSource = match (&weights, &sh.ckpt) {
        (Some(w), _) => w.as_ref(),
        (None, Some(c)) => c,
        (None, None) => &init,
    };
    let pb = ParamBuilder::new(src, &device, sh.dtype)
        .with_tp(tp.clone())
        .with_zero3(crate::training::zero3_construction(&sh.engine, dp.as_ref()));
    // A pipeline stage builds (and reads) only its own layers.
    let (stage, stages) = pipe
        .as_ref()
        .map_or((0, 1), |p| (p.stages.rank, p.stages.size()));
    let bounds = provider.partition(stages, &sh.partition)?;
    if root && stages > 1 {
        eprintln!("pipeline: {stages} stages, layer boundaries {bounds:?}");
    }
    let range = bounds[stage]..bounds[stage + 1];
    let model = Arc::new(provider.build(&pb, range.clone(), pipe.is_some())?);
    let n_params: usize = unique_parameters(&model.layers())
        .iter()
        .map(|p| p.meta.numel())
        .sum();
    let mut engine = Engine::new(model.clone(), sh.engine.clone(), dp.clone(), tp.clone())?;
    if let Some(p) = pipe {
        engine = engine.with_pipeline(p)?;
    }
    // --finetune: the checkpoint's weights (the model was built from them) and nothing else.
    if let (Some(c), true, true) = (&sh.ckpt, a.finetune, root) {
        eprintln!(
            "fine-tuning from the weights of {} (iteration {}); iteration, optimizer and schedule start afresh",
            c.dir.display(),
            c.manifest.iteration
        );
    }
    if let Some(c) = sh.ckpt.as_ref().filter(|_| !a.finetune) {
        restore(c, &mut engine, a, root)?;
        if engine.iteration() >= a.train_iters {
            anyhow::bail!(
                "--load {}: the checkpoint is at iteration {}, and --train-iters is {}: nothing \
                 to train (raise --train-iters to continue training)",
                c.dir.display(),
                engine.iteration(),
                a.train_iters
            )
        }
    }
    let max_state = engine.max_state_bytes()?;
    let (micro, gas, global) = (
        sh.batch.micro_batch,
        sh.batch.accumulation,
        sh.batch.train_batch_size,
    );
    let topo = ctx.topo;
    if root {
        let n = if stages > 1 {
            format!("{n_params} (stage 0)")
        } else {
            n_params.to_string()
        };
        eprintln!(
            "model: {}, {n} parameters, {:?}",
            provider.describe(n_params, topo.tp),
            sh.dtype
        );
        eprintln!(
            "layout: world {} = pp {} x tp {} x dp {dp_size}; batch {global} = micro {micro} x accumulation {gas} x dp {dp_size}; ZeRO-{}",
            topo.world_size(),
            topo.pp,
            topo.tp,
            sh.engine.zero_stage
        );
        eprintln!("{}", engine.describe_memory());
        if device.is_cpu() {
            eprintln!(
                "f32 products on {}",
                candle_deepscale::ops::blas::describe()
            );
        }
        if let Some(line) = crate::training::describe_offload(&sh.engine) {
            eprintln!("{line}");
        }
    }
    let metrics = match (&a.metrics_file, root) {
        (Some(p), true) if sh.ckpt.is_some() && !a.finetune && !a.overwrite => {
            Some(MetricsWriter::resume(p, engine.iteration())?)
        }
        (Some(p), true) => Some(MetricsWriter::create(p)?),
        _ => None,
    };
    let seq = data.seq_length();
    let parts = &crate::training::LossParts::new(provider.reported_losses());
    let spec = LoopSpec {
        start_iter: engine.iteration(),
        train_iters: a.train_iters,
        log_interval: a.log_interval,
        eval_interval: a.eval_interval,
        tokens_per_iter: (global * seq) as f64,
        flops_per_token: provider.flops_per_token(),
        // MFU against the GEMM peak of the device the rank trains on (a GPU's at the
        // parameters' dtype).
        gemm_peak: if device.is_cpu() {
            cpu_peak
        } else {
            gemm_peak_flops_of(&device, sh.dtype, 5)?
        },
        metrics_file: a.metrics_file.as_deref(),
        root,
        base: json!({
            "world_size": topo.world_size(), "tp": topo.tp, "pp": topo.pp, "dp": dp_size,
            "zero_stage": sh.engine.zero_stage, "model_state_bytes": max_state,
        }),
        title: format!(
            "{}, tp {} x dp {dp_size}, ZeRO-{}",
            provider.title(),
            topo.tp,
            sh.engine.zero_stage
        ),
        fp16: sh.engine.fp16.is_some(),
        exit: crate::training::ExitPolicy::of(a),
        saving: a.ds.save.is_some(),
        tensorboard: crate::training::MegatronTensorBoard::of(
            a,
            "lm loss",
            sh.engine.fp16.is_some(),
        ),
        loss_parts: parts,
    };
    let m = &*model;
    // This rank's slice of each global batch: the 1-rank order cut among the dp ranks.
    let sampler = PretrainingSampler::new(&sh.batch, dp_size, dp_rank);
    let rank = ctx.rank;
    let micro_batches = |iter: u64| -> Result<Vec<_>> {
        injected_stall(rank, iter);
        (0..gas)
            .map(|k| {
                let r = sampler.micro_batch(iter, k);
                let (x, t) = data.batch(false, r.start, r.len(), &device)?;
                Ok((x, move |o: &Activations| parts.add(loss_fn(m, o, &t)?)))
            })
            .collect()
    };
    let evaluate = |engine: &Engine| -> Result<Option<f64>> {
        if !data.has_valid() {
            return Ok(None);
        }
        let n = a.eval_iters.max(1) as usize;
        let mut sum = 0.0;
        for i in 0..n {
            let r = sampler.eval_micro_batch(i);
            let (x, t) = data.batch(true, r.start, r.len(), &device)?;
            sum += engine.eval_batch(x, |o| parts.add(loss_fn(m, o, &t)?))? as f64;
            // A stop signal cuts a long evaluation short (every rank after the same batch), so
            // the run saves and exits as promptly as between iterations; no partial loss.
            if let Some(sig) = crate::training::signal_on_any_rank(engine)? {
                if root {
                    eprintln!(
                        "{} received: evaluation cut short after {} of {n} batches",
                        candle_deepscale::runtime::dist_signal_handler::signal_name(sig),
                        i + 1
                    );
                }
                return Ok(None);
            }
        }
        Ok(Some(engine.dp_mean(sum / n as f64)?))
    };
    let saver = Saver {
        args: a,
        model: provider.manifest(),
        tokenizer: Some(sh.tokenizer_json.clone()),
        global_batch: global,
        root,
        first_layer: range.start,
    };
    let r = train_loop(
        &spec,
        &mut engine,
        metrics,
        micro_batches,
        evaluate,
        |e, i, stopping| saver.after(e, i, stopping),
    )?;
    if let (Some(l), true) = (&logger, root) {
        eprintln!("comms_logger (rank 0):\n{}", l.summary());
    }
    // A stopped run exits promptly: no export, no sample.
    let after = match r.stopped {
        None => provider.after_training(m, &engine, ctx)?,
        Some(_) => None,
    };
    Ok(Summary {
        first_loss: r.first_loss,
        last_loss: r.last_loss,
        last_valid: r.last_valid,
        n_params,
        tokens_per_s: spec.tokens_per_iter * (r.last_iter - spec.start_iter) as f64 / r.elapsed,
        model_state_bytes: max_state,
        after,
        skipped: engine.skipped_steps(),
        iterations: r.last_iter,
        stopped: r.stopped,
    })
}

/// Fault injection for the tests of stall handling: `DEEPSCALE_INJECT_STALL=RANK:ITER` makes rank
/// RANK hang (alive, outside any collective) before iteration ITER.
fn injected_stall(rank: usize, iter: u64) {
    if std::env::var("DEEPSCALE_INJECT_STALL").ok() == Some(format!("{rank}:{iter}")) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// `--load`: counters, loss scaler and (unless `--no-load-optim`) Adam's state.
fn restore(c: &Checkpoint, engine: &mut Engine, a: &TrainingArgs, root: bool) -> Result<()> {
    c.restore(engine, !a.ds.no_load_optim)?;
    if root {
        eprintln!(
            "loaded {} (iteration {}, saved at tp {} x dp {}, ZeRO-{}){}",
            c.dir.display(),
            c.manifest.iteration,
            c.manifest.tp,
            c.manifest.dp,
            c.manifest.zero_stage,
            if a.ds.no_load_optim {
                "; optimizer state not loaded"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Every token id of a sample is inside the model's vocabulary: at tensor parallel > 1 an id past
/// it would otherwise be looked up as a zero row, and one in the padded rows would train on
/// padding (Megatron does both silently).
pub fn check_token_ids(ids: &[u32], vocab: usize, data: &str, sample: usize) -> Result<()> {
    if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!(
            "{data}: sample {sample} holds token id {id}, outside the model's vocabulary of {vocab} \
             ids (was the data tokenized with another vocabulary? give its --vocab-file)"
        )
    }
    Ok(())
}

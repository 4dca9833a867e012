//! DeepSpeed's engine (`deepspeed.initialize` and `runtime/engine.py`) for a model given as a
//! list of layers: data parallel with ZeRO 0-3 over `dp`, tensor parallel inside the layers over
//! `tp`, pipeline stages (the 1F1B executor in [`crate::runtime::pipe::executor`]), fused AdamW,
//! loss scaling, gradient accumulation, clipping and activation checkpointing. The model knows
//! nothing of any of it.
//!
//! The engine owns (or shares) the model, takes its gradients from the per-layer loop
//! ([`crate::runtime::layer_loop`]), keeps them in ZeRO's buffers ([`crate::runtime::zero`]) and
//! steps. Its settings come from [`EngineConfig`], which a DeepSpeed JSON config translates to.
use crate::comm::{ProcessGroup, ReduceOp};
use crate::layers::module::{Activations, ForwardCtx, Layer, Sequential};
use crate::layers::parameter::Param;
use crate::layers::parameter::ParamRegistry;
use crate::runtime::activation_checkpointing::CheckpointPolicy;
use crate::runtime::data_samplers::PretrainingSampler;
use crate::runtime::flops_profiler::ForwardProfile;
use crate::runtime::layer_loop::{self, ZeroHooks};
use crate::runtime::loss_scaler::LossScaler;
use crate::runtime::meters::{MemoryMeter, WallClock};
use crate::runtime::monitor::MonitorMaster;
use crate::runtime::pipe::executor::{share_loss, StageExecutor, StageResources};
use crate::runtime::pipe::PipeContext;
use crate::runtime::zero::{AdamState, ZeroOptimizer};
use candle_core::{bail, Result, Tensor};
use std::sync::Arc;
use std::time::Instant;

pub use crate::runtime::engine_config::EngineConfig;
mod memory;
mod monitoring;
mod whole_model;

/// The engine's own counters and loss scaler: what a checkpoint needs besides parameters and
/// optimizer state to continue exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineState {
    /// Optimizer steps attempted (skipped ones included).
    pub iteration: u64,
    /// Updates applied (the LR schedule's and Adam's step count).
    pub updates: u64,
    pub skipped: u64,
    pub loss_scaler: LossScaler,
}

/// The outcome of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 1-based iteration (optimizer steps attempted, skipped ones included).
    pub iteration: u64,
    /// Mean loss over the global batch (NaN when the micro-batches were run by the caller).
    pub loss: f64,
    pub lr: f64,
    /// The loss scale the step's gradients were computed with.
    pub loss_scale: f64,
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    /// fp16 overflow: the update was skipped.
    pub skipped: bool,
}

/// DeepSpeed's engine for a layer-sequential model (see the module docs).
pub struct Engine {
    model: Arc<dyn Sequential>,
    pub config: EngineConfig,
    zero: ZeroOptimizer,
    scaler: LossScaler,
    policy: CheckpointPolicy,
    dp: Option<ProcessGroup>,
    tp: Option<ProcessGroup>,
    micro_step: usize,
    iteration: u64,
    updates: u64,
    skipped: u64,
    pipe: Option<PipeContext>,
    /// Last pipelined batch: seconds spent in forward/backward passes, and in the whole batch.
    pipe_timing: Option<(f64, f64)>,
    meter: MemoryMeter,
    /// Milliseconds in forward, backward and the optimizer step since the last `take_wall_clock`.
    clock: WallClock,
    /// Whole-model mode: the parameters come from this registry and the gradients from one
    /// whole-graph backward ([`Engine::backward`]); None: the layer list's per-layer loop.
    graph: Option<ParamRegistry>,
    /// Whole-model mode: the first backward checked that every parameter got a gradient.
    grads_checked: bool,
    /// The config's monitors, opened at the first event (on global rank 0 only).
    monitor: Option<MonitorMaster>,
    /// The flops profiler's record during its profile step.
    profile: Option<ForwardProfile>,
}

impl Engine {
    /// The engine of `model` (owned, or shared with the caller through the `Arc`) on this rank's
    /// data-parallel group `dp` and tensor-parallel group `tp` (None or a group of one: none).
    pub fn new(
        model: Arc<dyn Sequential>,
        config: EngineConfig,
        dp: Option<ProcessGroup>,
        tp: Option<ProcessGroup>,
    ) -> Result<Self> {
        if config.gradient_accumulation_steps == 0 || config.train_micro_batch_size_per_gpu == 0 {
            bail!("micro-batch size and gradient_accumulation_steps must be positive")
        }
        let (dp, tp) = (dp.filter(|g| g.size() > 1), tp.filter(|g| g.size() > 1));
        let zero = build_zero(model.as_ref(), &config, &dp, &tp)?;
        let scaler = match &config.fp16 {
            Some(f) => LossScaler::from_config(f),
            None => LossScaler::fixed(1.0),
        };
        let policy = CheckpointPolicy {
            num_layers: config.checkpoint_num_layers,
            partition: tp.clone().filter(|_| config.partition_activations),
            cpu: config.cpu_checkpointing,
        };
        Ok(Self {
            model,
            config,
            zero,
            scaler,
            policy,
            dp,
            tp,
            micro_step: 0,
            iteration: 0,
            updates: 0,
            skipped: 0,
            pipe: None,
            pipe_timing: None,
            meter: MemoryMeter::default(),
            clock: WallClock::default(),
            graph: None,
            grads_checked: false,
            monitor: None,
            profile: None,
        })
    }

    /// Runs this engine as one pipeline stage: the model is the stage's layers; `train_batch`
    /// executes the 1F1B schedule (micro-batches = gradient_accumulation_steps) with the other
    /// stages, tied weights are summed between the first and last stage, and the gradient norm
    /// spans every stage. ZeRO 0 and 1 compose with it (as in DeepSpeed).
    pub fn with_pipeline(mut self, pipe: PipeContext) -> Result<Self> {
        let stages = pipe.stages.size();
        if stages <= 1 {
            return Ok(self);
        }
        self.layer_list_only("pipelines")?;
        if self.config.zero_stage == 3 {
            bail!(
                "not supported: ZeRO stage 3 with a pipeline, because each stage would gather \
                 parameters around micro-batches interleaved by the 1F1B schedule (DeepSpeed \
                 does not combine them either); use ZeRO 0 or 1 with pipelines"
            )
        }
        if self.config.zero_stage >= 2 {
            bail!(
                "not supported: ZeRO stage {} with a pipeline, because stage 2 reduce-scatters \
                 gradients while tied weights still need their cross-stage sum (use ZeRO 0 or 1, \
                 as DeepSpeed requires)",
                self.config.zero_stage
            )
        }
        let last = pipe.stages.rank + 1 == stages;
        // The tied weight's copy on the last stage does not count twice in the norm.
        self.zero
            .set_pipeline(pipe.stages.clone(), |p| last && p.meta.tie_group.is_some())?;
        self.pipe = Some(pipe);
        Ok(self)
    }

    /// The model this engine (this pipeline stage) trains.
    pub fn model(&self) -> &Arc<dyn Sequential> {
        &self.model
    }

    /// The layers this engine (this pipeline stage) runs.
    pub fn layers(&self) -> Vec<&dyn Layer> {
        self.model.layers()
    }

    /// Pipeline stage index and count (0 and 1 without a pipeline).
    pub fn pipe_stage(&self) -> (usize, usize) {
        self.pipe
            .as_ref()
            .map_or((0, 1), |p| (p.stages.rank, p.stages.size()))
    }

    /// [`Self::pipe_stage`] under its old name ("stage" also means the ZeRO stage).
    #[deprecated(since = "0.2.0", note = "renamed to `pipe_stage`")]
    pub fn stage(&self) -> (usize, usize) {
        self.pipe_stage()
    }

    pub fn dp_size(&self) -> usize {
        self.dp.as_ref().map_or(1, |g| g.size())
    }

    pub fn dp_rank(&self) -> usize {
        self.dp.as_ref().map_or(0, |g| g.rank)
    }

    /// Optimizer steps attempted so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// Steps skipped because of fp16 overflow.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    pub fn loss_scale(&self) -> f64 {
        self.scaler.cur_scale
    }

    /// The learning rate the next optimizer step uses.
    pub fn lr(&self) -> f64 {
        self.config.lr_schedule.lr(self.updates)
    }

    pub fn optimizer(&self) -> &ZeroOptimizer {
        &self.zero
    }

    /// The data-parallel group (None at dp = 1).
    pub fn dp_group(&self) -> Option<&ProcessGroup> {
        self.dp.as_ref()
    }

    /// The tensor-parallel group (None at tp = 1).
    pub fn tp_group(&self) -> Option<&ProcessGroup> {
        self.tp.as_ref()
    }

    /// Which samples this data-parallel rank reads in each micro-batch (its slice of every
    /// global batch, as the one-rank run orders them).
    pub fn sampler(&self) -> PretrainingSampler {
        PretrainingSampler {
            micro_batch: self.config.train_micro_batch_size_per_gpu,
            accumulation: self.config.gradient_accumulation_steps,
            dp_size: self.dp_size(),
            dp_rank: self.dp_rank(),
        }
    }

    /// The pipeline this engine is a stage of (None without one).
    pub fn pipe(&self) -> Option<&PipeContext> {
        self.pipe.as_ref()
    }

    pub fn state(&self) -> EngineState {
        EngineState {
            iteration: self.iteration,
            updates: self.updates,
            skipped: self.skipped,
            loss_scaler: self.scaler.clone(),
        }
    }

    /// Continues from `state`; `optimizer(param)` gives each parameter's whole local Adam state
    /// (m, v; flattened), None to start it at zero. Parameters must already hold their values.
    pub fn restore(
        &mut self,
        state: &EngineState,
        optimizer: impl FnMut(&Param) -> Result<Option<AdamState>>,
    ) -> Result<()> {
        self.prepare()?;
        self.zero.load_state(state.updates, optimizer)?;
        self.iteration = state.iteration;
        self.updates = state.updates;
        self.skipped = state.skipped;
        self.scaler = state.loss_scaler.clone();
        self.micro_step = 0;
        Ok(())
    }

    /// The data, tensor and pipeline groups this rank belongs to (those of more than one rank).
    fn groups(&self) -> impl Iterator<Item = &ProcessGroup> {
        let stages = self.pipe.as_ref().map(|p| &p.stages);
        [self.dp.as_ref(), self.tp.as_ref(), stages]
            .into_iter()
            .flatten()
    }

    /// Waits for every rank of the grid (data, then tensor, then pipeline groups: once a rank
    /// passes, every rank has arrived).
    pub fn barrier(&self) -> Result<()> {
        for g in self.groups() {
            g.comm.barrier(&g.group)?;
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch (training mode, loss scaled), gradients accumulated
    /// into the ZeRO buffers and reduced bucket by bucket as backward goes. Returns this rank's
    /// unscaled loss.
    pub fn forward_backward(
        &mut self,
        input: Activations,
        ctx: &ForwardCtx,
        loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
    ) -> Result<f32> {
        self.layer_list_only("forward_backward")?;
        let last = self.micro_step + 1 >= self.config.gradient_accumulation_steps;
        // No clipping or loss scale: no global norm to wait on (NVMe steps during backward).
        if last && self.config.gradient_clipping <= 0.0 && self.config.fp16.is_none() {
            self.zero.arm_step(self.lr(), self.unscale());
        }
        let loss = layer_loop::micro_batch(
            &self.model.layers(),
            input,
            ctx,
            &self.policy,
            self.scaler.cur_scale,
            loss_fn,
            &mut ZeroHooks {
                zero: &mut self.zero,
                last,
                meter: &mut self.meter,
                profile: self.profile.as_mut(),
            },
            &mut self.clock,
        )?;
        self.micro_step += 1;
        Ok(loss)
    }

    /// The optimizer step at the end of an accumulation: unscale, clip, check for overflow (fp16:
    /// skip and lower the scale), AdamW on the partitions, all-gather, clear the gradients.
    pub fn step(&mut self) -> Result<StepReport> {
        if self.micro_step != self.config.gradient_accumulation_steps {
            bail!(
                "step after {} micro-batches; gradient_accumulation_steps is {}",
                self.micro_step,
                self.config.gradient_accumulation_steps
            )
        }
        let started = Instant::now();
        let (loss_scale, unscale) = (self.scaler.cur_scale, self.unscale());
        let grad_norm = self.zero.grad_norm(unscale)?;
        let overflow = !grad_norm.is_finite();
        self.iteration += 1;
        if overflow && self.config.fp16.is_none() {
            bail!(
                "iteration {}: the gradient norm is {grad_norm}; lower the learning rate or check \
                 the data",
                self.iteration
            )
        }
        let skipped = self.scaler.update(overflow);
        let lr = self.lr();
        if skipped {
            self.skipped += 1;
        } else {
            let clip = self.config.gradient_clipping;
            let coef = if clip > 0.0 && grad_norm > clip {
                clip / (grad_norm + 1e-6)
            } else {
                1.0
            };
            // Stage 3: gathered copies would be stale after the update.
            self.zero.release_all()?;
            self.zero.step(lr, unscale * coef)?;
            self.updates += 1;
        }
        self.zero.zero_grad()?;
        self.meter.clear_live();
        self.micro_step = 0;
        self.clock.step_ms += started.elapsed().as_secs_f64() * 1e3;
        self.clock.iterations += 1;
        Ok(StepReport {
            iteration: self.iteration,
            loss: f64::NAN,
            lr,
            loss_scale,
            grad_norm,
            skipped,
        })
    }

    /// Turns the summed gradients into the unscaled mean over micro-batches and ranks.
    fn unscale(&self) -> f64 {
        1.0 / ((self.config.gradient_accumulation_steps * self.dp_size()) as f64
            * self.scaler.cur_scale)
    }

    /// The forward context (dropout streams) of this rank's micro-batch `m` of the next
    /// iteration: the same streams whatever the layout.
    fn train_ctx(&self, m: usize) -> ForwardCtx {
        let gas = self.config.gradient_accumulation_steps;
        ForwardCtx::train(
            self.config.seed,
            self.iteration + 1,
            (self.dp_rank() * gas + m) as u64,
        )
    }

    fn check_micro_batches(&self, n: usize) -> Result<()> {
        let gas = self.config.gradient_accumulation_steps;
        if n != gas {
            bail!("train_batch got {n} micro-batches; gradient_accumulation_steps is {gas}")
        }
        Ok(())
    }

    /// One iteration over this rank's `gradient_accumulation_steps` micro-batches, each an input
    /// and the loss of the last layer's output; the report's loss is the global batch mean.
    pub fn train_batch<F>(&mut self, micro_batches: Vec<(Activations, F)>) -> Result<StepReport>
    where
        F: FnOnce(&Activations) -> Result<Tensor>,
    {
        self.layer_list_only("train_batch")?;
        self.check_micro_batches(micro_batches.len())?;
        let clock = self.clock;
        self.start_profile(true);
        let gas = micro_batches.len();
        let mean = if self.pipe.is_some() {
            self.train_batch_pipe(micro_batches)?
        } else {
            let mut sum = 0f64;
            for (m, (x, loss_fn)) in micro_batches.into_iter().enumerate() {
                let ctx = self.train_ctx(m);
                sum += self.forward_backward(x, &ctx, loss_fn)? as f64;
            }
            sum / gas as f64
        };
        let loss = self.dp_mean(mean)?;
        let mut report = self.step()?;
        report.loss = loss;
        self.after_train_batch(&report, clock)?;
        Ok(report)
    }

    /// Samples of global batches stepped so far (DeepSpeed's `global_samples`).
    pub fn global_samples(&self) -> u64 {
        self.iteration
            * (self.config.train_micro_batch_size_per_gpu
                * self.config.gradient_accumulation_steps
                * self.dp_size()) as u64
    }

    /// [`Engine::train_batch`] as one pipeline stage: this stage's 1F1B instruction stream. The
    /// first stage reads the micro-batches' inputs, the last their loss functions. Returns the
    /// batch's mean loss on this data-parallel rank (shared by every stage).
    fn train_batch_pipe<F>(&mut self, micro_batches: Vec<(Activations, F)>) -> Result<f64>
    where
        F: FnOnce(&Activations) -> Result<Tensor>,
    {
        let Some(pipe) = self.pipe.clone() else {
            bail!("train_batch_pipe without a pipeline")
        };
        let ctxs: Vec<ForwardCtx> = (0..micro_batches.len())
            .map(|m| self.train_ctx(m))
            .collect();
        let forward_ctx = |m: usize| ctxs[m].clone();
        let layers = self.model.layers();
        let outcome = StageExecutor::new(
            StageResources {
                layers: &layers,
                pipe: &pipe,
                zero: &mut self.zero,
                policy: &self.policy,
                meter: &mut self.meter,
                clock: &mut self.clock,
                loss_scale: self.scaler.cur_scale,
                forward_ctx: &forward_ctx,
            },
            micro_batches,
        )
        .run()?;
        self.pipe_timing = Some((outcome.busy, outcome.total));
        self.micro_step = self.config.gradient_accumulation_steps;
        // The loss lives on the last stage: share it along the pipeline.
        share_loss(&pipe, outcome.loss)
    }

    /// Evaluation loss of one batch on this rank (no dropout, no graph kept).
    pub fn eval_batch(
        &self,
        input: Activations,
        loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
    ) -> Result<f32> {
        self.layer_list_only("eval_batch")?;
        let layers = self.model.layers();
        if self.zero.stage() == 3 {
            // Stage 3: each layer's parameters are gathered around its forward.
            let ctx = ForwardCtx::eval();
            let mut x = input;
            for (i, l) in layers.iter().enumerate() {
                self.zero.fetch_layer(i, false)?;
                let y = l.forward(&x, &ctx);
                self.zero.release_layer(i, false)?;
                let y = y?;
                x = Activations::with_aux(
                    y.hidden.detach(),
                    y.aux.iter().map(|t| t.detach()).collect(),
                );
            }
            self.zero.release_all()?;
            return loss_fn(&x)?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>();
        }
        // In a pipeline the batch flows stage to stage; the last computes the loss and shares it.
        let out = crate::runtime::pipe::pipeline_forward(
            &layers,
            self.pipe.as_ref(),
            input,
            &ForwardCtx::eval(),
        )?;
        let loss = match out {
            Some(x) => loss_fn(&x)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
            None => 0.0,
        };
        Ok(match &self.pipe {
            Some(p) => share_loss(p, loss)?,
            None => loss,
        } as f32)
    }

    /// The mean of `v` over the data-parallel group.
    /// The largest `v` over every rank of the grid (data, tensor and pipeline groups in turn):
    /// how ranks agree on a stop (a signal one of them received, a deadline one of them passed).
    pub fn max_over_ranks(&self, v: f64) -> Result<f64> {
        let mut buf = [v];
        for g in self.groups() {
            g.all_reduce(&mut buf, ReduceOp::Max)?;
        }
        Ok(buf[0])
    }

    pub fn dp_mean(&self, v: f64) -> Result<f64> {
        let mut buf = [v];
        if let Some(dp) = &self.dp {
            dp.all_reduce(&mut buf, ReduceOp::Avg)?;
        }
        Ok(buf[0])
    }

    /// DeepSpeed's `GatheredParameters`: under ZeRO-3 every parameter is whole while `f` runs
    /// (every data-parallel rank must call it); at other stages it just runs `f`.
    pub fn gathered<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.zero.gathered(f)
    }
}

/// ZeRO's optimizer over the distinct parameters of `model`'s layers, its states on the
/// parameters' device where they live on a GPU (unless offloaded).
fn build_zero(
    model: &dyn Sequential,
    config: &EngineConfig,
    dp: &Option<ProcessGroup>,
    tp: &Option<ProcessGroup>,
) -> Result<ZeroOptimizer> {
    let mut zero = ZeroOptimizer::new(
        &model.layers(),
        config.zero_stage,
        config.reduce_bucket_size,
        config.optimizer,
        dp.clone(),
        tp.clone(),
        config.stage3.clone(),
    )?;
    zero.set_overlap_comm(config.overlap_comm);
    zero.set_allgather_bucket_size(config.allgather_bucket_size);
    let on_gpu = zero
        .params()
        .first()
        .is_some_and(|p| !p.tensor().device().is_cpu());
    let device_states = config
        .device_states
        .unwrap_or(on_gpu && !config.offload_optimizer_cpu && config.stage3.offload.is_none());
    if device_states {
        zero.use_device_states()?;
    }
    Ok(zero)
}

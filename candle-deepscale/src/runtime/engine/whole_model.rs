//! The engine's whole-model mode: the gradient source for any candle model (DeepSpeed's
//! `loss = model(batch); engine.backward(loss); engine.step()`).
//!
//! The model is built unchanged through DeepScale's `VarBuilder` (or a `ParamBuilder` with a
//! registry); the user's closure runs an ordinary candle forward and returns the loss. The engine
//! runs one whole-graph backward, moves every gradient into ZeRO's buffers and reduces
//! (stages 0/1) or reduce-scatters (stage 2) them bucket by bucket after it, then steps as in the
//! layer-list mode: fused AdamW on the partitions, clipping, loss scaling, schedules, offload,
//! checkpoints. candle's backward has no hooks, so every gradient exists full-size before it
//! reaches the buffers; what ZeRO-2 saves here is the persistent gradient buffer. ZeRO-3,
//! pipelines and activation checkpointing need the model as a list of layers.
use super::{build_zero, Engine, StepReport};
use crate::comm::ProcessGroup;
use crate::layers::module::{Activations, ForwardCtx, Layer, Sequential};
use crate::layers::parameter::Param;
use crate::layers::parameter::ParamRegistry;
use crate::runtime::engine::EngineConfig;
use candle_core::{bail, Result, Tensor};
use std::sync::Arc;
use std::time::Instant;

pub(super) const WHOLE_MODEL_MEMORY_NOTE: &str = "; whole-model mode: candle's backward makes \
    every gradient full-size before it reaches ZeRO's buffers, so ZeRO-2 saves the persistent \
    gradient buffer only (the layer list reduces each layer's gradients as its backward ends)";

/// A model's parameters as one layer: what ZeRO's flat layout is cut from when the gradients
/// come from one whole-graph backward. The engine never runs its forward.
struct ParamsLayer(Vec<Param>);

impl Layer for ParamsLayer {
    fn name(&self) -> String {
        "model".into()
    }

    fn parameters(&self) -> Vec<&Param> {
        self.0.iter().collect()
    }

    fn forward(&self, _: &Activations, _: &ForwardCtx) -> Result<Activations> {
        bail!(
            "the whole-model engine does not run the model: compute the loss with the model's own \
             forward and call Engine::backward(loss)"
        )
    }
}

impl Sequential for ParamsLayer {
    fn layers(&self) -> Vec<&dyn Layer> {
        vec![self]
    }
}

/// What a whole-model engine cannot do, and why.
fn refuse(config: &EngineConfig) -> Result<()> {
    let why = "needs the model as a list of layers, because the engine must run each layer's \
               forward and backward itself (the layer API: implement candle_deepscale::Layer for \
               the model's blocks and Sequential for the model, then Engine::new); ZeRO 0, 1 and \
               2, offload, clipping, mixed precision and checkpoints work in whole-model mode";
    if config.zero_stage == 3 {
        bail!("not supported in whole-model mode: ZeRO stage 3 (parameters gathered around each layer) {why}")
    }
    if config.checkpoint_num_layers > 0 {
        bail!("not supported in whole-model mode: activation checkpointing (recomputing each layer in backward) {why}")
    }
    Ok(())
}

impl Engine {
    /// The engine of a model built through a [`ParamRegistry`] (DeepScale's `VarBuilder`, or a
    /// `ParamBuilder` with the registry) on data-parallel group `dp`: gradients come from
    /// [`Engine::backward`]. Parameters are taken from the registry when the first backward
    /// runs (or at [`Engine::prepare`]), so the engine may be made before the model.
    pub fn whole_model(
        registry: ParamRegistry,
        config: EngineConfig,
        dp: Option<ProcessGroup>,
    ) -> Result<Self> {
        refuse(&config)?;
        let mut e = Self::new(Arc::new(ParamsLayer(Vec::new())), config, dp, None)?;
        e.graph = Some(registry);
        e.prepare()?;
        Ok(e)
    }

    /// Whether this engine takes its gradients from one whole-graph backward.
    pub fn is_whole_model(&self) -> bool {
        self.graph.is_some()
    }

    /// Whole-model mode: the registry the parameters come from.
    pub fn registry(&self) -> Option<&ParamRegistry> {
        self.graph.as_ref()
    }

    /// Whole-model mode: takes the parameters the registry holds now (it does at the first
    /// backward; call it to see the memory report, or to restore a checkpoint, first). New
    /// parameters after training started are an error: they would have no optimizer state.
    pub fn prepare(&mut self) -> Result<()> {
        let Some(registry) = &self.graph else {
            return Ok(());
        };
        let params = registry.params();
        if params.len() == self.zero.params().len() {
            return Ok(());
        }
        if self.iteration > 0 || self.micro_step > 0 {
            bail!(
                "{} parameters were created after training started (the engine trains the {} \
                 it took at the first backward): build the whole model before training",
                params.len() - self.zero.params().len(),
                self.zero.params().len()
            )
        }
        let model: Arc<dyn Sequential> = Arc::new(ParamsLayer(params));
        self.zero = build_zero(model.as_ref(), &self.config, &self.dp, &self.tp)?;
        self.model = model;
        Ok(())
    }

    /// A method of the layer-list mode refuses to run in whole-model mode.
    pub(super) fn layer_list_only(&self, what: &str) -> Result<()> {
        if self.graph.is_some() {
            bail!(
                "{what} needs the model as a list of layers; this engine trains a whole model \
                 (run its forward yourself, then Engine::backward(loss) and Engine::step())"
            )
        }
        Ok(())
    }

    /// DeepSpeed's `engine.backward(loss)` for a whole model: backward of `loss` (times the
    /// loss scale), every parameter's gradient into ZeRO's buffers, and the buckets reduced (at
    /// the accumulation boundary for stages 0 and 1, every micro-batch for stage 2). The first
    /// call checks that every trainable parameter received a gradient. Returns the unscaled loss.
    pub fn backward(&mut self, loss: &Tensor) -> Result<f32> {
        if self.graph.is_none() {
            bail!(
                "Engine::backward is the whole-model mode's; a layer-list engine runs forward and \
                 backward itself (forward_backward, train_batch)"
            )
        }
        self.prepare()?;
        if loss.elem_count() != 1 {
            bail!(
                "Engine::backward: the loss has shape {:?}, expected a scalar",
                loss.dims()
            )
        }
        let started = Instant::now();
        let value = loss
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?[0];
        let scale = self.scaler.cur_scale;
        let scaled = if scale == 1.0 {
            loss.clone()
        } else {
            (loss * scale)?
        };
        let grads = scaled.backward()?;
        drop(scaled);
        let mut missing = Vec::new();
        for p in self.zero.params().to_vec() {
            match grads.get(p.tensor()) {
                Some(g) => self.zero.accumulate(p.tensor(), g)?,
                None => missing.push(p.meta.name.clone()),
            }
        }
        if !self.grads_checked && !missing.is_empty() {
            bail!(
                "{} of {} trainable parameters received no gradient: {}. Likely causes: an op \
                 recorded without backward before them (candle-nn 0.11's fused layer_norm, \
                 rms_norm, softmax_last_dim or rope without DeepScale's candle-nn patch — see \
                 the README), a detach(), or parameters the loss does not use (freeze them with \
                 the frozen rule)",
                missing.len(),
                self.zero.params().len(),
                missing.join(", ")
            )
        }
        self.grads_checked = true;
        let last = self.micro_step + 1 >= self.config.gradient_accumulation_steps;
        let all: Vec<usize> = (0..self.zero.layout().buckets.len()).collect();
        self.zero.reduce_buckets(&all, last)?;
        self.micro_step += 1;
        self.clock.backward_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(value)
    }

    /// One iteration of a whole model: each closure runs one micro-batch's forward and returns
    /// its loss (`gradient_accumulation_steps` of them, this rank's), then the optimizer step;
    /// the report's loss is the global batch mean.
    pub fn train_batch_with<F>(&mut self, micro_batches: Vec<F>) -> Result<StepReport>
    where
        F: FnOnce() -> Result<Tensor>,
    {
        self.check_micro_batches(micro_batches.len())?;
        let n = micro_batches.len();
        let clock = self.clock;
        self.start_profile(false);
        let mut sum = 0f64;
        for f in micro_batches {
            let t0 = Instant::now();
            let loss = f()?;
            self.clock.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
            sum += self.backward(&loss)? as f64;
        }
        let loss = self.dp_mean(sum / n as f64)?;
        let mut report = self.step()?;
        report.loss = loss;
        self.after_train_batch(&report, clock)?;
        Ok(report)
    }
}

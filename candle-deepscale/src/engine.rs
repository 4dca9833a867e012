//! The layer-sequential forward/backward loop (the heart of DeepSpeed's `runtime/engine.py` here).
//!
//! The engine feeds each layer a fresh leaf input, keeps either the layer's graph or only its input
//! (activation checkpointing: the forward is recomputed during backward), and runs backward one
//! layer at a time from the gradient of its output. This loop is where pipeline stages cut the list,
//! ZeRO-3 gathers and releases a layer's parameters, and gradients are reduced as soon as a layer's
//! backward ends. Per-layer backward gives the same gradients as one whole-graph backward.
use crate::activation_checkpointing::{CheckpointPolicy, Saved};
use crate::adamw::AdamWConfig;
use crate::comm::{ProcessGroup, ReduceOp};
use crate::config::{DeepSpeedConfig, Fp16Config};
use crate::loss_scaler::LossScaler;
use crate::lr_schedules::LrSchedule;
use crate::module::{Activations, ForwardCtx, Layer};
use crate::zero::{Stage3Config, StateBytes, ZeroOptimizer};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::time::Instant;

/// Gradients of parameters by tensor id (a tied parameter's contributions summed).
#[derive(Default, Debug)]
pub struct Grads(HashMap<TensorId, Tensor>);

/// Anything parameter gradients can be looked up in.
pub trait GradLookup {
    fn grad(&self, param: &Tensor) -> Option<&Tensor>;
}

impl GradLookup for Grads {
    fn grad(&self, param: &Tensor) -> Option<&Tensor> {
        self.0.get(&param.id())
    }
}

impl GradLookup for GradStore {
    fn grad(&self, param: &Tensor) -> Option<&Tensor> {
        self.get(param)
    }
}

impl Grads {
    fn add(&mut self, param: &Tensor, g: &Tensor) -> Result<()> {
        let g = g.detach();
        match self.0.remove(&param.id()) {
            Some(prev) => self.0.insert(param.id(), (prev + g)?.detach()),
            None => self.0.insert(param.id(), g),
        };
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Activations whose float tensors are fresh leaves (so their gradients can be read back).
struct Leaves {
    act: Activations,
    vars: Vec<Option<Var>>,
}

fn is_float(t: &Tensor) -> bool {
    t.dtype().is_float()
}

fn leaves(a: &Activations) -> Result<Leaves> {
    let mut vars = Vec::new();
    let mut leaf = |t: &Tensor| -> Result<Tensor> {
        if is_float(t) {
            let v = Var::from_tensor(&t.detach())?;
            let out = v.as_tensor().clone();
            vars.push(Some(v));
            Ok(out)
        } else {
            vars.push(None);
            Ok(t.detach())
        }
    };
    let hidden = leaf(&a.hidden)?;
    let aux = a.aux.iter().map(&mut leaf).collect::<Result<Vec<_>>>()?;
    Ok(Leaves {
        act: Activations::with_aux(hidden, aux),
        vars,
    })
}

/// The gradients reaching each float tensor of `l` (None where nothing flowed).
fn leaf_grads(l: &Leaves, store: &GradStore) -> Vec<Option<Tensor>> {
    l.vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| store.get(v.as_tensor()).cloned()))
        .collect()
}

/// `sum(out * grad)` over the tensors that received a gradient: its backward propagates `grads`.
fn surrogate(out: &Activations, grads: &[Option<Tensor>]) -> Result<Option<Tensor>> {
    let tensors = std::iter::once(&out.hidden).chain(out.aux.iter());
    let mut total: Option<Tensor> = None;
    for (t, g) in tensors.zip(grads) {
        if let Some(g) = g {
            let term = t.mul(g)?.sum_all()?;
            total = Some(match total {
                Some(s) => (s + term)?,
                None => term,
            });
        }
    }
    Ok(total)
}

/// Called after each layer's backward with its index, the layer and its gradients.
pub type LayerHook<'a> = dyn FnMut(usize, &dyn Layer, Option<&GradStore>) -> Result<()> + 'a;

/// What the per-layer loop tells the engine: a layer is about to run (ZeRO-3 gathers its
/// parameters), is done for now (they may be released), and has finished its backward.
pub trait StageHooks {
    fn fetch(&mut self, _layer: usize, _backward: bool) -> Result<()> {
        Ok(())
    }
    fn release(&mut self, _layer: usize, _backward: bool) -> Result<()> {
        Ok(())
    }
    fn grads(&mut self, layer: usize, l: &dyn Layer, store: Option<&GradStore>) -> Result<()>;
    /// Bytes of activations a forward keeps for its backward.
    fn activations(&mut self, _bytes: u64) {}
    /// The backward of a forward that kept `bytes` has started (they are freed as it goes).
    fn activations_done(&mut self, _bytes: u64) {}
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn act_bytes(a: &Activations) -> u64 {
    tensor_bytes(&a.hidden) + a.aux.iter().map(tensor_bytes).sum::<u64>()
}

impl StageState {
    /// Bytes of the activations kept for backward (saved inputs, kept layer inputs and outputs;
    /// the tensors autograd holds inside a kept graph are not visible here).
    pub fn kept_bytes(&self) -> u64 {
        let kept: u64 = self
            .kept
            .iter()
            .map(|k| match k {
                Kept::Graph(leaf, y) => act_bytes(&leaf.act) + act_bytes(y),
                Kept::Input(s) => s.bytes() as u64,
                Kept::None => 0,
            })
            .sum();
        kept + self.head.as_ref().map_or(0, |(l, _)| act_bytes(&l.act))
    }
}

/// What the engine measures of its own memory besides model states: the activations a step
/// keeps and the communication staging buffers (peaks since the last read).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryMeter {
    pub peak_activation_bytes: u64,
    live_activation_bytes: u64,
}

/// Hooks that only receive gradients.
pub struct OnGrads<'a>(pub &'a mut LayerHook<'a>);

impl StageHooks for OnGrads<'_> {
    fn grads(&mut self, i: usize, l: &dyn Layer, store: Option<&GradStore>) -> Result<()> {
        (self.0)(i, l, store)
    }
}

/// The engine's hooks: ZeRO-3 fetches and releases; gradients go into the ZeRO buffers.
struct ZeroHooks<'a> {
    zero: &'a mut ZeroOptimizer,
    last: bool,
    meter: &'a mut MemoryMeter,
}

impl StageHooks for ZeroHooks<'_> {
    fn activations_done(&mut self, bytes: u64) {
        self.meter.live_activation_bytes = self.meter.live_activation_bytes.saturating_sub(bytes);
    }
    fn activations(&mut self, bytes: u64) {
        // Pipelines keep several micro-batches' activations at once.
        self.meter.live_activation_bytes += bytes;
        self.meter.peak_activation_bytes = self
            .meter
            .peak_activation_bytes
            .max(self.meter.live_activation_bytes);
    }
    fn fetch(&mut self, i: usize, backward: bool) -> Result<()> {
        self.zero.fetch_layer(i, backward)
    }
    fn release(&mut self, i: usize, backward: bool) -> Result<()> {
        self.zero.release_layer(i, backward)
    }
    fn grads(&mut self, i: usize, l: &dyn Layer, store: Option<&GradStore>) -> Result<()> {
        into_zero(self.zero, self.last, i, l, store)
    }
}

/// What the forward pass keeps of one layer for backward.
enum Kept {
    /// The layer's graph from a leaf input (no checkpointing).
    Graph(Leaves, Activations),
    /// The input of a checkpointed chunk of layers.
    Input(Saved),
    /// Nothing: the layer is recomputed from its chunk's input.
    None,
}

fn detached(y: &Activations) -> Activations {
    Activations::with_aux(
        y.hidden.detach(),
        y.aux.iter().map(|t| t.detach()).collect(),
    )
}

/// What a stage's forward of one micro-batch keeps for its backward.
pub struct StageState {
    kept: Vec<Kept>,
    /// Layers run as "body" (all of them, or all but the head when the stage computes the loss).
    body_len: usize,
    /// With a loss: the head's input leaves and the scaled loss.
    head: Option<(Leaves, Tensor)>,
    ctx: ForwardCtx,
}

/// Forward of one micro-batch through `layers` (a whole model or one pipeline stage). With
/// `loss = Some((scale, loss_fn))` the last layer runs straight into `loss_fn` (its output, the
/// vocabulary-sized logits, never needs a leaf copy) and the loss is kept scaled for backward;
/// otherwise the detached output is returned (to send downstream). `policy` says which inputs are
/// kept (checkpointed chunks are recomputed in backward).
pub fn stage_forward<F>(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    policy: &CheckpointPolicy,
    loss: Option<(f64, F)>,
    hooks: &mut dyn StageHooks,
) -> Result<(StageState, Option<Activations>, Option<f32>)>
where
    F: FnOnce(&Activations) -> Result<Tensor>,
{
    let k = policy.num_layers;
    let body_len = layers.len() - usize::from(loss.is_some());
    if layers.is_empty() {
        candle_core::bail!("engine: no layers")
    }
    let mut kept: Vec<Kept> = Vec::with_capacity(body_len);
    let mut x = input;
    for (i, layer) in layers[..body_len].iter().enumerate() {
        hooks.fetch(i, false)?;
        if k > 0 {
            kept.push(if i % k == 0 {
                Kept::Input(policy.save(&x)?)
            } else {
                Kept::None
            });
            x = detached(&layer.forward(&x, ctx)?);
        } else {
            let leaf = leaves(&x)?;
            let y = layer.forward(&leaf.act, ctx)?;
            x = detached(&y);
            kept.push(Kept::Graph(leaf, y));
        }
        hooks.release(i, false)?;
    }
    let mut state = StageState {
        kept,
        body_len,
        head: None,
        ctx: ctx.clone(),
    };
    hooks.activations(state.kept_bytes());
    match loss {
        Some((scale, loss_fn)) => {
            let last = leaves(&x)?;
            // The head stays fetched: its backward follows (released there).
            hooks.fetch(body_len, false)?;
            let loss = loss_fn(&layers[body_len].forward(&last.act, ctx)?)?;
            let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            let scaled = if scale == 1.0 { loss } else { (loss * scale)? };
            state.head = Some((last, scaled));
            Ok((state, None, Some(value)))
        }
        None => Ok((state, Some(x), None)),
    }
}

/// Backward of a [`stage_forward`]: from the kept loss, or from `grads_out` (the gradients of the
/// stage's output tensors, as received from downstream). After each layer's backward,
/// `on_layer(index, layer, grads)` receives its gradients (None when nothing flowed). Returns the
/// gradients of the stage's input tensors (None where nothing flowed or not float).
pub fn stage_backward(
    layers: &[&dyn Layer],
    state: StageState,
    mut grads_out: Vec<Option<Tensor>>,
    policy: &CheckpointPolicy,
    hooks: &mut dyn StageHooks,
) -> Result<Vec<Option<Tensor>>> {
    hooks.activations_done(state.kept_bytes());
    let StageState {
        mut kept,
        body_len,
        head,
        ctx,
    } = state;
    let k = policy.num_layers;
    if let Some((last, scaled)) = head {
        let store = scaled.backward()?;
        drop(scaled);
        hooks.grads(body_len, layers[body_len], Some(&store))?;
        hooks.release(body_len, true)?;
        grads_out = leaf_grads(&last, &store);
    }
    let mut end = body_len;
    while end > 0 {
        let start = (end - 1).checked_div(k).map_or(end - 1, |c| c * k);
        // The graphs of layers start..end: kept, or recomputed from the chunk's saved input.
        let mut graphs: Vec<(Leaves, Activations)> = Vec::with_capacity(end - start);
        match std::mem::replace(&mut kept[start], Kept::None) {
            Kept::Graph(leaf, y) => graphs.push((leaf, y)),
            Kept::Input(saved) => {
                let mut x = policy.restore(&saved)?;
                drop(saved);
                for (j, layer) in layers[start..end].iter().enumerate() {
                    hooks.fetch(start + j, true)?;
                    let leaf = leaves(&x)?;
                    let y = layer.forward(&leaf.act, &ctx)?;
                    x = detached(&y);
                    graphs.push((leaf, y));
                    hooks.release(start + j, true)?;
                }
            }
            Kept::None => candle_core::bail!("engine: layer {start} has no saved input"),
        }
        for i in (start..end).rev() {
            let Some((leaf, out)) = graphs.pop() else {
                candle_core::bail!("engine: missing graph of layer {i}")
            };
            let Some(s) = surrogate(&out, &grads_out)? else {
                // Nothing downstream depends on this layer's output.
                grads_out = vec![None; leaf.vars.len()];
                hooks.grads(i, layers[i], None)?;
                continue;
            };
            hooks.fetch(i, true)?;
            let store = s.backward()?;
            hooks.grads(i, layers[i], Some(&store))?;
            hooks.release(i, true)?;
            grads_out = leaf_grads(&leaf, &store);
        }
        end = start;
    }
    Ok(grads_out)
}

/// One micro-batch through `layers`: forward, `loss_fn` on the last layer's output, then backward
/// layer by layer from the loss times `loss_scale` (the last layer and the loss in one backward).
/// `policy` says which inputs are kept; after each layer's backward `on_layer(index, layer,
/// grads)` receives its gradients; `clock` gains the two halves' times. Returns the unscaled loss.
#[allow(clippy::too_many_arguments)]
pub fn backward_pass(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    policy: &CheckpointPolicy,
    loss_scale: f64,
    loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
    hooks: &mut dyn StageHooks,
    clock: &mut WallClock,
) -> Result<f32> {
    let t0 = Instant::now();
    let (state, _, loss) = stage_forward(
        layers,
        input,
        ctx,
        policy,
        Some((loss_scale, loss_fn)),
        hooks,
    )?;
    let t1 = Instant::now();
    stage_backward(layers, state, Vec::new(), policy, hooks)?;
    clock.forward_ms += (t1 - t0).as_secs_f64() * 1e3;
    clock.backward_ms += t1.elapsed().as_secs_f64() * 1e3;
    loss.ok_or_else(|| candle_core::Error::Msg("engine: no loss".into()))
}

/// One micro-batch through `layers` with every layer's graph kept, or (`checkpoint_activations`)
/// only each layer's input with its forward recomputed in backward. Returns the loss and the
/// parameter gradients.
pub fn forward_backward(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    checkpoint_activations: bool,
    loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
) -> Result<(f32, Grads)> {
    let mut grads = Grads::default();
    let policy = CheckpointPolicy::every(usize::from(checkpoint_activations));
    let loss = backward_pass(
        layers,
        input,
        ctx,
        &policy,
        1.0,
        loss_fn,
        &mut OnGrads(&mut |_, layer, store| {
            if let Some(store) = store {
                for p in layer.parameters() {
                    if let Some(g) = store.get(p.tensor()) {
                        grads.add(p.tensor(), g)?;
                    }
                }
            }
            Ok(())
        }),
        &mut WallClock::default(),
    )?;
    Ok((loss, grads))
}

/// The engine's per-layer hook: layer `i`'s gradients go into the ZeRO buffers, and the buckets
/// they complete are reduced (at the accumulation boundary `last` for stages 0 and 1).
fn into_zero(
    zero: &mut ZeroOptimizer,
    last: bool,
    i: usize,
    layer: &dyn Layer,
    store: Option<&GradStore>,
) -> Result<()> {
    if let Some(store) = store {
        let mut seen = std::collections::HashSet::new();
        for p in layer.parameters() {
            if !seen.insert(p.tensor().id()) {
                continue;
            }
            if let Some(g) = store.get(p.tensor()) {
                zero.accumulate(p.tensor(), g)?;
            }
        }
    }
    let ready: Vec<usize> = zero.layout().ready_after(i).collect();
    zero.reduce_buckets(&ready, last)
}

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            train_micro_batch_size_per_gpu: 1,
            gradient_accumulation_steps: 1,
            zero_stage: 0,
            stage3: Stage3Config::default(),
            reduce_bucket_size: 500_000_000,
            optimizer: AdamWConfig::default(),
            lr_schedule: LrSchedule::Constant(AdamWConfig::default().lr),
            gradient_clipping: 0.0,
            fp16: None,
            bf16: false,
            checkpoint_num_layers: 0,
            partition_activations: false,
            cpu_checkpointing: false,
            wall_clock_breakdown: false,
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
            let crate::config::OptimizerKind::Adam { adam_w_mode } = o.kind()?;
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
            let nvme = |o: &Option<crate::config::OffloadConfig>,
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
                let max_in_cpu = par.as_ref().and_then(|p| p.max_in_cpu).unwrap_or(0) as usize;
                let aio = ds.aio.clone().unwrap_or_default();
                let dflt = crate::zero::OffloadSettings::default();
                c.stage3.offload = Some(crate::zero::OffloadSettings {
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
            if let Some(b) = z.reduce_bucket_size {
                c.reduce_bucket_size = b.max(1) as usize;
            }
        }
        if let Some(a) = &ds.activation_checkpointing {
            c.partition_activations = a.partition_activations.unwrap_or(false);
            c.cpu_checkpointing = a.cpu_checkpointing.unwrap_or(false);
        }
        c.wall_clock_breakdown = ds.wall_clock_breakdown.unwrap_or(false);
        Ok(c)
    }
}

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

/// One rank's memory by category (bytes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryReport {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub swap_buffers: u64,
    /// Peak of the activations kept for backward.
    pub activations: u64,
    /// Peak of ZeRO's communication staging (gradient buckets, gathered pieces).
    pub communication: u64,
    /// NVMe offload: (bytes read, bytes written) so far.
    pub offload_bytes: Option<(u64, u64)>,
}

impl MemoryReport {
    pub fn model_state(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer + self.swap_buffers
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "parameters {:.2} MiB, gradients {:.2} MiB, optimizer {:.2} MiB, swap buffers {:.2} \
             MiB, activations {:.2} MiB, communication {:.2} MiB",
            mib(self.parameters),
            mib(self.gradients),
            mib(self.optimizer),
            mib(self.swap_buffers),
            mib(self.activations),
            mib(self.communication)
        );
        if let Some((r, w)) = self.offload_bytes {
            s += &format!(", NVMe read {:.2} MiB / written {:.2} MiB", mib(r), mib(w));
        }
        s
    }
}

/// This rank's place in a pipeline: its stage group (the stages of its data/tensor coordinate,
/// in order) and, on the first and last stage, the group that shares tied weights.
#[derive(Debug, Clone)]
pub struct PipeContext {
    pub stages: ProcessGroup,
    /// First and last stage (for the word embedding used as input and as logits).
    pub tied: Option<ProcessGroup>,
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

/// DeepSpeed's engine for a layer-sequential model: data parallel with ZeRO 0/1/2 over `dp`,
/// tensor parallel inside the layers over `tp`, fused AdamW, loss scaling, gradient accumulation,
/// clipping and activation checkpointing. The model knows nothing of any of it.
pub struct Engine<'m> {
    layers: Vec<&'m dyn Layer>,
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
}

/// Where training time went (DeepSpeed's `wall_clock_breakdown`): milliseconds per iteration in
/// forward passes, backward passes (with the gradient reduction they overlap) and the optimizer
/// step, averaged over `iterations`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WallClock {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub step_ms: f64,
    pub iterations: u64,
}

impl<'m> Engine<'m> {
    pub fn new(
        layers: Vec<&'m dyn Layer>,
        config: EngineConfig,
        dp: Option<ProcessGroup>,
        tp: Option<ProcessGroup>,
    ) -> Result<Self> {
        if config.gradient_accumulation_steps == 0 || config.train_micro_batch_size_per_gpu == 0 {
            bail!("micro-batch size and gradient_accumulation_steps must be positive")
        }
        let dp = dp.filter(|g| g.size() > 1);
        let tp = tp.filter(|g| g.size() > 1);
        let mut zero = ZeroOptimizer::new(
            &layers,
            config.zero_stage,
            config.reduce_bucket_size,
            config.optimizer,
            dp.clone(),
            tp.clone(),
            config.stage3.clone(),
        )?;
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
            layers,
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
        })
    }

    /// Runs this engine as one pipeline stage: `layers` are the stage's layers; `train_batch`
    /// executes the 1F1B schedule (micro-batches = gradient_accumulation_steps) with the other
    /// stages, tied weights are summed between the first and last stage, and the gradient norm
    /// spans every stage. ZeRO 0 and 1 compose with it (as in DeepSpeed).
    pub fn with_pipeline(mut self, pipe: PipeContext) -> Result<Self> {
        let stages = pipe.stages.size();
        if stages <= 1 {
            return Ok(self);
        }
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

    /// Milliseconds per iteration in forward, backward and the optimizer step since the last
    /// call (DeepSpeed's `wall_clock_breakdown`), and resets them. Pipeline stages count their
    /// own forward and backward passes (not the waits between them).
    pub fn take_wall_clock(&mut self) -> WallClock {
        let c = std::mem::take(&mut self.clock);
        let n = c.iterations.max(1) as f64;
        WallClock {
            forward_ms: c.forward_ms / n,
            backward_ms: c.backward_ms / n,
            step_ms: c.step_ms / n,
            iterations: c.iterations,
        }
    }

    /// The last pipelined `train_batch`: (seconds computing forward/backward, seconds in total);
    /// the difference is this stage's bubble and communication.
    pub fn pipeline_timing(&self) -> Option<(f64, f64)> {
        self.pipe_timing
    }

    /// Pipeline stage index and count (0 and 1 without a pipeline).
    pub fn stage(&self) -> (usize, usize) {
        self.pipe
            .as_ref()
            .map_or((0, 1), |p| (p.stages.rank, p.stages.size()))
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
        optimizer: impl FnMut(&crate::parameter::Param) -> Result<Option<crate::zero::AdamState>>,
    ) -> Result<()> {
        self.zero.load_state(state.updates, optimizer)?;
        self.iteration = state.iteration;
        self.updates = state.updates;
        self.skipped = state.skipped;
        self.scaler = state.loss_scaler.clone();
        self.micro_step = 0;
        Ok(())
    }

    /// Waits for every rank of the grid (data, then tensor, then pipeline groups: once a rank
    /// passes, every rank has arrived).
    pub fn barrier(&self) -> Result<()> {
        let stages = self.pipe.as_ref().map(|p| &p.stages);
        for g in [self.dp.as_ref(), self.tp.as_ref(), stages]
            .into_iter()
            .flatten()
        {
            g.comm.barrier(&g.group)?;
        }
        Ok(())
    }

    /// The layers this engine (this pipeline stage) runs.
    pub fn layers(&self) -> &[&'m dyn Layer] {
        &self.layers
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
        let last = self.micro_step + 1 >= self.config.gradient_accumulation_steps;
        let loss = backward_pass(
            &self.layers,
            input,
            ctx,
            &self.policy,
            self.scaler.cur_scale,
            loss_fn,
            &mut ZeroHooks {
                zero: &mut self.zero,
                last,
                meter: &mut self.meter,
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
        let loss_scale = self.scaler.cur_scale;
        let unscale = 1.0
            / (self.config.gradient_accumulation_steps as f64 * self.dp_size() as f64 * loss_scale);
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
        self.meter.live_activation_bytes = 0;
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

    /// One iteration over this rank's `gradient_accumulation_steps` micro-batches, each an input
    /// and the loss of the last layer's output; the report's loss is the global batch mean.
    pub fn train_batch<F>(&mut self, micro_batches: Vec<(Activations, F)>) -> Result<StepReport>
    where
        F: FnOnce(&Activations) -> Result<Tensor>,
    {
        if self.pipe.is_some() {
            return self.train_batch_pipe(micro_batches);
        }
        let gas = self.config.gradient_accumulation_steps;
        if micro_batches.len() != gas {
            bail!(
                "train_batch got {} micro-batches; gradient_accumulation_steps is {gas}",
                micro_batches.len()
            )
        }
        let mut sum = 0f64;
        for (m, (x, loss_fn)) in micro_batches.into_iter().enumerate() {
            let ctx = ForwardCtx::train(
                self.config.seed,
                self.iteration + 1,
                (self.dp_rank() * gas + m) as u64,
            );
            sum += self.forward_backward(x, &ctx, loss_fn)? as f64;
        }
        let loss = self.dp_mean(sum / gas as f64)?;
        let mut report = self.step()?;
        report.loss = loss;
        Ok(report)
    }

    /// [`Engine::train_batch`] as one pipeline stage: runs this stage's 1F1B instruction stream.
    /// The first stage reads the micro-batches' inputs, the last their loss functions.
    fn train_batch_pipe<F>(&mut self, micro_batches: Vec<(Activations, F)>) -> Result<StepReport>
    where
        F: FnOnce(&Activations) -> Result<Tensor>,
    {
        use crate::pipe::{p2p, Instruction, TrainSchedule};
        use std::collections::HashMap;
        let pipe = self.pipe.clone().expect("pipeline engine");
        let gas = self.config.gradient_accumulation_steps;
        if micro_batches.len() != gas {
            bail!(
                "train_batch got {} micro-batches; gradient_accumulation_steps is {gas}",
                micro_batches.len()
            )
        }
        let (stage, stages) = (pipe.stages.rank, pipe.stages.size());
        let comm = pipe.stages.comm.clone();
        let (prev, next) = (
            stage.checked_sub(1).map(|s| pipe.stages.group[s]),
            pipe.stages.group.get(stage + 1).copied(),
        );
        let first = stage == 0;
        let last = stage + 1 == stages;
        let mut inputs: Vec<Option<Activations>> = Vec::with_capacity(gas);
        let mut loss_fns: Vec<Option<F>> = Vec::with_capacity(gas);
        for (x, f) in micro_batches {
            inputs.push(Some(x));
            loss_fns.push(Some(f));
        }
        let (act_tag, grad_tag) = (
            |m: usize| 1000 + 2 * m as u64,
            |m: usize| 1001 + 2 * m as u64,
        );
        let mut stage_in: HashMap<usize, Activations> = HashMap::new();
        let mut states: HashMap<usize, StageState> = HashMap::new();
        let mut outputs: HashMap<usize, Activations> = HashMap::new();
        let mut sent: HashMap<usize, Vec<Tensor>> = HashMap::new();
        let mut grads_out: HashMap<usize, Vec<Option<Tensor>>> = HashMap::new();
        let mut grads_in: HashMap<usize, (Vec<Tensor>, Vec<Option<Tensor>>)> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut backwards = 0usize;
        // Received activations land where this stage's parameters live.
        let dev = self
            .zero
            .params()
            .first()
            .map(|p| p.tensor().device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let schedule = TrainSchedule::new(gas, stages, stage);
        let started = std::time::Instant::now();
        let mut busy = 0f64;
        for instruction in schedule.steps().into_iter().flatten() {
            let t0 = std::time::Instant::now();
            let forward = matches!(instruction, Instruction::ForwardPass { .. });
            let computes = forward || matches!(instruction, Instruction::BackwardPass { .. });
            match instruction {
                Instruction::LoadMicroBatch { micro_batch: m, .. } => {
                    if first {
                        let x = inputs[m].take().ok_or_else(|| {
                            candle_core::Error::Msg(format!("micro-batch {m} loaded twice"))
                        })?;
                        stage_in.insert(m, x);
                    }
                }
                Instruction::RecvActivation { micro_batch: m, .. } => {
                    let src = prev.expect("a previous stage");
                    stage_in.insert(
                        m,
                        p2p::recv_activations(comm.as_ref(), src, act_tag(m), &dev)?,
                    );
                }
                Instruction::ForwardPass { micro_batch: m, .. } => {
                    let x = stage_in.remove(&m).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "stage {stage}: no input for micro-batch {m}"
                        ))
                    })?;
                    let keep_in: Vec<Tensor> =
                        std::iter::once(&x.hidden).chain(&x.aux).cloned().collect();
                    let ctx = ForwardCtx::train(
                        self.config.seed,
                        self.iteration + 1,
                        (self.dp_rank() * gas + m) as u64,
                    );
                    let loss = if last {
                        let f = loss_fns[m].take().ok_or_else(|| {
                            candle_core::Error::Msg(format!("micro-batch {m}: no loss"))
                        })?;
                        Some((self.scaler.cur_scale, f))
                    } else {
                        None
                    };
                    let (state, out, value) = stage_forward(
                        &self.layers,
                        x,
                        &ctx,
                        &self.policy,
                        loss,
                        &mut ZeroHooks {
                            zero: &mut self.zero,
                            last: false,
                            meter: &mut self.meter,
                        },
                    )?;
                    if let Some(v) = value {
                        loss_sum += v as f64;
                    }
                    if let Some(out) = out {
                        outputs.insert(m, out);
                    }
                    states.insert(m, state);
                    grads_in.insert(m, (keep_in, Vec::new()));
                }
                Instruction::SendActivation { micro_batch: m, .. } => {
                    let out = outputs.remove(&m).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "stage {stage}: no output of micro-batch {m}"
                        ))
                    })?;
                    p2p::send_activations(
                        comm.as_ref(),
                        next.expect("a next stage"),
                        act_tag(m),
                        &out,
                    )?;
                    sent.insert(m, std::iter::once(out.hidden).chain(out.aux).collect());
                }
                Instruction::RecvGrad { micro_batch: m, .. } => {
                    let shapes = sent.remove(&m).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "stage {stage}: micro-batch {m} was not sent"
                        ))
                    })?;
                    let g = p2p::recv_grads(
                        comm.as_ref(),
                        next.expect("a next stage"),
                        grad_tag(m),
                        &shapes,
                    )?;
                    grads_out.insert(m, g);
                }
                Instruction::BackwardPass { micro_batch: m, .. } => {
                    let state = states.remove(&m).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "stage {stage}: micro-batch {m} not forwarded"
                        ))
                    })?;
                    let go = grads_out.remove(&m).unwrap_or_default();
                    backwards += 1;
                    let boundary = backwards == gas;
                    let g = stage_backward(
                        &self.layers,
                        state,
                        go,
                        &self.policy,
                        &mut ZeroHooks {
                            zero: &mut self.zero,
                            last: boundary,
                            meter: &mut self.meter,
                        },
                    )?;
                    if let Some(e) = grads_in.get_mut(&m) {
                        e.1 = g;
                    }
                }
                Instruction::SendGrad { micro_batch: m, .. } => {
                    let (input, g) = grads_in.remove(&m).unwrap_or_default();
                    p2p::send_grads(
                        comm.as_ref(),
                        prev.expect("a previous stage"),
                        grad_tag(m),
                        &input,
                        &g,
                    )?;
                }
                Instruction::ReduceTiedGrads => {
                    if let Some(tied) = pipe.tied.as_ref().filter(|g| g.size() > 1) {
                        let idx: Vec<usize> = (0..self.zero.params().len())
                            .filter(|&i| self.zero.params()[i].meta.tie_group.is_some())
                            .collect();
                        for i in idx {
                            self.zero.all_reduce_param_grad(i, tied)?;
                        }
                    }
                }
                // Data-parallel reduction ran bucket by bucket during the last backward; the step
                // follows the schedule.
                Instruction::ReduceGrads | Instruction::OptimizerStep => {}
            }
            if computes {
                let dt = t0.elapsed().as_secs_f64();
                busy += dt;
                if forward {
                    self.clock.forward_ms += dt * 1e3;
                } else {
                    self.clock.backward_ms += dt * 1e3;
                }
            }
        }
        self.pipe_timing = Some((busy, started.elapsed().as_secs_f64()));
        self.micro_step = gas;
        // The loss lives on the last stage: share it along the pipeline, then average over dp.
        let mut l = [if last { loss_sum / gas as f64 } else { 0.0 }];
        pipe.stages.all_reduce(&mut l, ReduceOp::Sum)?;
        let loss = self.dp_mean(l[0])?;
        let mut report = self.step()?;
        report.loss = loss;
        Ok(report)
    }

    /// Evaluation loss of one batch on this rank (no dropout, no graph kept).
    pub fn eval_batch(
        &self,
        input: Activations,
        loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
    ) -> Result<f32> {
        if self.zero.stage() == 3 {
            // Stage 3: each layer's parameters are gathered around its forward.
            let ctx = ForwardCtx::eval();
            let mut x = input;
            for (i, l) in self.layers.iter().enumerate() {
                self.zero.fetch_layer(i, false)?;
                let y = l.forward(&x, &ctx);
                self.zero.release_layer(i, false)?;
                x = detached(&y?);
            }
            self.zero.release_all()?;
            return loss_fn(&x)?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>();
        }
        // In a pipeline the batch flows stage to stage; the last computes the loss and shares it.
        let out = crate::pipe::pipeline_forward(
            &self.layers,
            self.pipe.as_ref(),
            input,
            &ForwardCtx::eval(),
        )?;
        let mut loss = [match out {
            Some(x) => loss_fn(&x)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
            None => 0.0,
        }];
        if let Some(p) = self.pipe.as_ref() {
            p.stages.all_reduce(&mut loss, ReduceOp::Sum)?;
        }
        Ok(loss[0] as f32)
    }

    /// The mean of `v` over the data-parallel group.
    pub fn dp_mean(&self, v: f64) -> Result<f64> {
        let mut buf = [v];
        if let Some(dp) = &self.dp {
            dp.all_reduce(&mut buf, ReduceOp::Avg)?;
        }
        Ok(buf[0])
    }

    /// This rank's memory by category: model states (parameters, gradients, optimizer state,
    /// swap buffers) as held now, the peak of kept activations and of communication staging
    /// since the last call, and what NVMe offload moved so far.
    pub fn memory_report(&mut self) -> MemoryReport {
        let s = self.state_bytes();
        let r = MemoryReport {
            parameters: s.parameters,
            gradients: s.gradients,
            optimizer: s.optimizer,
            swap_buffers: s.buffers,
            activations: self.meter.peak_activation_bytes,
            communication: self.zero.take_peak_comm_bytes(),
            offload_bytes: self.zero.offload_io_bytes(),
        };
        self.meter.peak_activation_bytes = 0;
        r
    }

    /// DeepSpeed's `GatheredParameters`: under ZeRO-3 every parameter is whole while `f` runs
    /// (every data-parallel rank must call it); at other stages it just runs `f`.
    pub fn gathered<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.zero.gathered(f)
    }

    /// Measured model-state bytes of this rank (parameters, gradient buffers, optimizer state).
    pub fn state_bytes(&self) -> StateBytes {
        self.zero.state_bytes()
    }

    /// DeepSpeed's formula for this rank's layout.
    pub fn formula_bytes(&self) -> StateBytes {
        self.zero.formula_bytes()
    }

    /// The largest measured model-state bytes over the data- and tensor-parallel groups.
    pub fn max_state_bytes(&self) -> Result<u64> {
        let mut buf = [self.state_bytes().total() as f64];
        let pp = self.pipe.as_ref().map(|p| &p.stages);
        for g in [self.dp.as_ref(), self.tp.as_ref(), pp]
            .into_iter()
            .flatten()
        {
            g.all_reduce(&mut buf, ReduceOp::Max)?;
        }
        Ok(buf[0] as u64)
    }

    /// One line: the layout and its measured model state against the formula.
    pub fn describe_memory(&self) -> String {
        let (m, f) = (self.state_bytes(), self.formula_bytes());
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let dtype = self
            .zero
            .params()
            .first()
            .map_or(candle_core::DType::F32, |p| p.tensor().dtype());
        let layout = if self.zero.stage() == 3 {
            "parameters partitioned as fp32 pieces, gathered per layer, K = 8"
        } else if dtype == candle_core::DType::F32 {
            "fp32 parameters updated in place, K = 8"
        } else {
            "half parameters with an fp32 master copy, K = 12"
        };
        format!(
            "model state per rank (ZeRO-{}, dp {}, {layout}): measured {:.2} MiB (parameters {:.2}, \
             gradients {:.2}, optimizer {:.2}, swap buffers {:.2}) vs formula {:.2} MiB ({:+.2}%)",
            self.zero.stage(),
            self.dp_size(),
            mib(m.total()),
            mib(m.parameters),
            mib(m.gradients),
            mib(m.optimizer),
            mib(m.buffers),
            mib(f.total()),
            100.0 * (m.total() as f64 / f.total().max(1) as f64 - 1.0)
        ) + &match self.zero.offload_io_path() {
            Some(io) => format!(
                "; the rest is offloaded to NVMe through {io} (the formula counts states in memory)"
            ),
            None => String::new(),
        }
    }
}

//! The layer-sequential forward/backward loop (the heart of DeepSpeed's `runtime/engine.py` here).
//! One of the engine's two gradient sources: gradients come layer by layer (the other is one
//! whole-graph backward).
//!
//! The engine feeds each layer a fresh leaf input, keeps either the layer's graph or only its input
//! (activation checkpointing: the forward is recomputed during backward), and runs backward one
//! layer at a time from the gradient of its output. This loop is where pipeline stages cut the list,
//! ZeRO-3 gathers and releases a layer's parameters, and gradients are reduced as soon as a layer's
//! backward ends. Per-layer backward gives the same gradients as one whole-graph backward.
use crate::layers::module::{Activations, ForwardCtx, GradLookup, Layer};
use crate::runtime::activation_checkpointing::{CheckpointPolicy, Saved};
use crate::runtime::meters::{MemoryMeter, WallClock};
use crate::runtime::zero::ZeroOptimizer;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::time::Instant;

/// Gradients of parameters by tensor id (a tied parameter's contributions summed).
#[derive(Default, Debug)]
pub struct Grads(HashMap<TensorId, Tensor>);

impl GradLookup for Grads {
    fn grad(&self, param: &Tensor) -> Option<&Tensor> {
        self.0.get(&param.id())
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
pub trait LoopHooks {
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
    /// Layer `layer`'s forward is done (the head's: with its loss), for the flops profiler.
    fn forwarded(&mut self, _layer: usize) {}
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn act_bytes(a: &Activations) -> u64 {
    tensor_bytes(&a.hidden) + a.aux.iter().map(tensor_bytes).sum::<u64>()
}

impl PassState {
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

/// Hooks that only receive gradients.
pub struct OnGrads<'a>(pub &'a mut LayerHook<'a>);

impl LoopHooks for OnGrads<'_> {
    fn grads(&mut self, i: usize, l: &dyn Layer, store: Option<&GradStore>) -> Result<()> {
        (self.0)(i, l, store)
    }
}

/// The engine's hooks: ZeRO-3 fetches and releases; gradients go into the ZeRO buffers and the
/// buckets they complete are reduced (at the accumulation boundary `last` for stages 0 and 1).
pub struct ZeroHooks<'a> {
    pub zero: &'a mut ZeroOptimizer,
    pub last: bool,
    pub meter: &'a mut MemoryMeter,
    /// The flops profiler's per-layer record, at its profile step.
    pub profile: Option<&'a mut crate::runtime::flops_profiler::ForwardProfile>,
}

impl LoopHooks for ZeroHooks<'_> {
    fn activations_done(&mut self, bytes: u64) {
        self.meter.released(bytes);
    }
    fn activations(&mut self, bytes: u64) {
        self.meter.kept(bytes);
    }
    fn fetch(&mut self, i: usize, backward: bool) -> Result<()> {
        // Between layers: gradient reductions in flight (`overlap_comm`) move on.
        self.zero.progress()?;
        self.zero.fetch_layer(i, backward)?;
        if let (Some(p), false) = (self.profile.as_mut(), backward) {
            p.begin(i);
        }
        Ok(())
    }
    fn release(&mut self, i: usize, backward: bool) -> Result<()> {
        self.zero.release_layer(i, backward)
    }
    fn grads(&mut self, i: usize, l: &dyn Layer, store: Option<&GradStore>) -> Result<()> {
        into_zero(self.zero, self.last, i, l, store)
    }
    fn forwarded(&mut self, i: usize) {
        if let Some(p) = self.profile.as_mut() {
            p.end(i);
        }
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

/// What a forward of one micro-batch through a list of layers (a model, or one pipeline stage)
/// keeps for its backward.
pub struct PassState {
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
pub fn forward<F>(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    policy: &CheckpointPolicy,
    loss: Option<(f64, F)>,
    hooks: &mut dyn LoopHooks,
) -> Result<(PassState, Option<Activations>, Option<f32>)>
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
        hooks.forwarded(i);
        hooks.release(i, false)?;
    }
    let mut state = PassState {
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
            hooks.forwarded(body_len);
            let scaled = if scale == 1.0 { loss } else { (loss * scale)? };
            state.head = Some((last, scaled));
            Ok((state, None, Some(value)))
        }
        None => Ok((state, Some(x), None)),
    }
}

/// Backward of a [`forward`]: from the kept loss, or from `grads_out` (the gradients of the
/// stage's output tensors, as received from downstream). After each layer's backward,
/// `on_layer(index, layer, grads)` receives its gradients (None when nothing flowed). Returns the
/// gradients of the stage's input tensors (None where nothing flowed or not float).
pub fn backward(
    layers: &[&dyn Layer],
    state: PassState,
    mut grads_out: Vec<Option<Tensor>>,
    policy: &CheckpointPolicy,
    hooks: &mut dyn LoopHooks,
) -> Result<Vec<Option<Tensor>>> {
    hooks.activations_done(state.kept_bytes());
    let PassState {
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
pub fn micro_batch(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    policy: &CheckpointPolicy,
    loss_scale: f64,
    loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
    hooks: &mut dyn LoopHooks,
    clock: &mut WallClock,
) -> Result<f32> {
    let t0 = Instant::now();
    let (state, _, loss) = forward(
        layers,
        input,
        ctx,
        policy,
        Some((loss_scale, loss_fn)),
        hooks,
    )?;
    let t1 = Instant::now();
    backward(layers, state, Vec::new(), policy, hooks)?;
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
    let loss = micro_batch(
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

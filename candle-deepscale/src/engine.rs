//! The layer-sequential forward/backward loop (the heart of DeepSpeed's `runtime/engine.py` here).
//!
//! The engine feeds each layer a fresh leaf input, keeps either the layer's graph or only its input
//! (activation checkpointing: the forward is recomputed during backward), and runs backward one
//! layer at a time from the gradient of its output. This loop is where pipeline stages cut the list,
//! ZeRO-3 gathers and releases a layer's parameters, and gradients are reduced as soon as a layer's
//! backward ends. Per-layer backward gives the same gradients as one whole-graph backward.
use crate::module::{Activations, ForwardCtx, Layer};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use std::collections::HashMap;

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

/// One micro-batch through `layers`: forward, `loss_fn` on the last output, then backward layer by
/// layer. With `checkpoint_activations` only each layer's input is kept and its forward recomputed
/// in backward. Returns the loss and the parameter gradients.
pub fn forward_backward(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
    checkpoint_activations: bool,
    loss_fn: impl FnOnce(&Activations) -> Result<Tensor>,
) -> Result<(f32, Grads)> {
    let mut inputs: Vec<Leaves> = Vec::with_capacity(layers.len());
    let mut outputs: Vec<Option<Activations>> = Vec::with_capacity(layers.len());
    let mut x = input;
    for layer in layers {
        let leaf = leaves(&x)?;
        let y = layer.forward(&leaf.act, ctx)?;
        x = Activations::with_aux(
            y.hidden.detach(),
            y.aux.iter().map(|t| t.detach()).collect(),
        );
        outputs.push((!checkpoint_activations).then_some(y));
        inputs.push(leaf);
    }
    let last = leaves(&x)?;
    let loss = loss_fn(&last.act)?;
    let loss_value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let mut grads_out = leaf_grads(&last, &loss.backward()?);
    drop(loss);

    let mut grads = Grads::default();
    for (i, layer) in layers.iter().enumerate().rev() {
        let out = match outputs[i].take() {
            Some(y) => y,
            None => layer.forward(&inputs[i].act, ctx)?,
        };
        let Some(s) = surrogate(&out, &grads_out)? else {
            // Nothing downstream depends on this layer's output.
            grads_out = vec![None; inputs[i].vars.len()];
            continue;
        };
        let store = s.backward()?;
        for p in layer.parameters() {
            if let Some(g) = store.get(p.tensor()) {
                grads.add(p.tensor(), g)?;
            }
        }
        grads_out = leaf_grads(&inputs[i], &store);
    }
    Ok((loss_value, grads))
}

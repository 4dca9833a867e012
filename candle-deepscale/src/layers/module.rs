//! The layer-sequential model interface (DeepSpeed's `PipelineModule` idea, used for every mode).
//!
//! A model is an ordered list of layers; each owns named parameters and maps one [`Activations`] to
//! the next with ordinary candle ops. The engine feeds each layer its input, decides what to keep
//! for backward, and cuts the list into pipeline stages.
use crate::layers::parameter::Param;
use crate::ops::random;
use candle_core::{Result, Tensor};

/// What flows between layers: the differentiable hidden state plus auxiliary tensors that ride
/// along without gradients (token-type ids, attention masks).
#[derive(Debug, Clone)]
pub struct Activations {
    pub hidden: Tensor,
    pub aux: Vec<Tensor>,
}

impl Activations {
    pub fn new(hidden: Tensor) -> Self {
        Self {
            hidden,
            aux: Vec::new(),
        }
    }

    pub fn with_aux(hidden: Tensor, aux: Vec<Tensor>) -> Self {
        Self { hidden, aux }
    }
}

/// Per-forward state: training or evaluation, and the keys of the dropout streams.
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    pub train: bool,
    /// Base key of this forward's dropout streams (seed, iteration and micro-batch mixed in).
    pub dropout_key: u64,
}

impl ForwardCtx {
    /// Evaluation: no dropout.
    pub fn eval() -> Self {
        Self {
            train: false,
            dropout_key: 0,
        }
    }

    /// Training forward number `micro_batch` of iteration `iteration`.
    pub fn train(seed: u64, iteration: u64, micro_batch: u64) -> Self {
        Self {
            train: true,
            dropout_key: random::sub_key(random::mix64(seed), &[iteration, micro_batch]),
        }
    }

    /// Key of the dropout stream at `site` (a layer-unique name) outside tensor-parallel regions.
    pub fn site_key(&self, site: &str) -> u64 {
        random::stream_key(self.dropout_key, site)
    }

    /// Key of the dropout stream at `site` inside a tensor-parallel region, for tensor-parallel
    /// rank `tp_rank` (Megatron's model-parallel RNG: seed + 2718 + tp_rank).
    pub fn tp_site_key(&self, site: &str, tp_rank: usize) -> u64 {
        random::sub_key(self.site_key(site), &[2718 + tp_rank as u64])
    }
}

/// One entry of a layer-sequential model.
pub trait Layer: Send + Sync {
    /// Unique name within the model, the prefix of its parameters (`embedding`, `layers.3`, ...).
    fn name(&self) -> String;

    /// The layer's kind, matched by the `type:REGEX` pipeline partition method (DeepSpeed matches
    /// the layer class name, e.g. `ParallelTransformerLayerPipe`). Defaults to the name.
    fn type_name(&self) -> String {
        self.name()
    }

    /// Parameters used by this layer; a tied parameter appears in every layer that uses it.
    fn parameters(&self) -> Vec<&Param>;

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations>;
}

/// A model presented as its ordered layers: what the engine runs, cuts into pipeline stages and
/// gathers layer by layer under ZeRO-3. The engine owns (or shares, through an `Arc`) the model,
/// so a model and its engine can live in one struct.
pub trait Sequential: Send + Sync {
    /// The layers in order (a tied parameter appears in every layer that uses it).
    fn layers(&self) -> Vec<&dyn Layer>;
}

impl Sequential for Vec<Box<dyn Layer>> {
    fn layers(&self) -> Vec<&dyn Layer> {
        self.iter().map(|l| l.as_ref()).collect()
    }
}

impl Sequential for Vec<std::sync::Arc<dyn Layer>> {
    fn layers(&self) -> Vec<&dyn Layer> {
        self.iter().map(|l| l.as_ref()).collect()
    }
}

/// Layers `range` of a model: one pipeline stage of a model that was built whole.
pub struct LayerSlice {
    pub model: std::sync::Arc<dyn Sequential>,
    pub range: std::ops::Range<usize>,
}

impl Sequential for LayerSlice {
    fn layers(&self) -> Vec<&dyn Layer> {
        let all = self.model.layers();
        let end = self.range.end.min(all.len());
        all[self.range.start.min(end)..end].to_vec()
    }
}

/// Anything parameter gradients can be looked up in (candle's `GradStore`, the per-layer loop's
/// collected gradients).
pub trait GradLookup {
    fn grad(&self, param: &Tensor) -> Option<&Tensor>;
}

impl GradLookup for candle_core::backprop::GradStore {
    fn grad(&self, param: &Tensor) -> Option<&Tensor> {
        self.get(param)
    }
}

/// Runs `layers` in order (one whole graph; the engine's per-layer loop builds on this).
pub fn forward_layers(
    layers: &[&dyn Layer],
    input: Activations,
    ctx: &ForwardCtx,
) -> Result<Activations> {
    layers.iter().try_fold(input, |x, l| l.forward(&x, ctx))
}

/// The distinct parameters of a list of layers, tied ones once, in first-use order.
pub fn unique_parameters<'a>(layers: &[&'a dyn Layer]) -> Vec<&'a Param> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for l in layers {
        for p in l.parameters() {
            if seen.insert(p.var.as_tensor().id()) {
                out.push(p);
            }
        }
    }
    out
}

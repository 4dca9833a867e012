//! candle-nn's `VarBuilder` with DeepScale parameters behind it, so `SomeModel::load(vb, &cfg)` of
//! any candle-nn / candle-transformers model builds rank-aware parameters unchanged.
//!
//! Each variable the model asks for becomes a [`Param`] with its logical name and shape, in the
//! [`ParamRegistry`] the whole-model engine trains. Its values come from the weights (a
//! safetensors file, an HF folder, a DeepScale checkpoint) when they hold the name, else from the
//! `VarBuilder`'s init hint drawn from the counter-based generator keyed by the name — every rank
//! and every layout get the same values, unlike candle's unseedable CPU generator. A name asked
//! for twice is one parameter (tied weights count once). Weight decay follows Megatron's rule (no
//! decay for 1-D tensors and names ending in `.bias`) unless switched off; names matching the
//! frozen rule are plain tensors, not trained (fine-tuning).
use crate::layers::init::RandomInit;
use crate::layers::parameter::ParamRegistry;
use crate::layers::parameter::{Init, Param, ParamMeta, ParamSource, Partition};
use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Logical tensors by name: where a model's weights are read from.
pub trait Weights: Send + Sync {
    /// The whole tensor `name`, None when these weights do not hold it.
    fn get(&self, name: &str) -> Result<Option<Tensor>>;

    /// Where they come from, for error messages.
    fn describe(&self) -> String;
}

/// Safetensors files (one, several, or an HF folder's shards), memory-mapped.
pub struct SafetensorsWeights {
    files: candle_core::safetensors::MmapedSafetensors,
    names: std::collections::HashSet<String>,
    origin: String,
}

impl SafetensorsWeights {
    /// The tensors of `paths`.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            bail!("no safetensors files given")
        }
        for p in paths {
            if !p.is_file() {
                bail!("safetensors file {} does not exist", p.display())
            }
        }
        // SAFETY: the files are mapped read-only; changing them while mapped is the caller's
        // error, as with candle's own VarBuilder::from_mmaped_safetensors.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }
            .map_err(|e| candle_core::Error::Msg(format!("reading {}: {e}", show(paths))))?;
        let names = files.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            files,
            names,
            origin: show(paths),
        })
    }

    /// An HF folder: `model.safetensors`, or the shards `model.safetensors.index.json` names.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(&[single]);
        }
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: no model.safetensors and no readable {} ({e})",
                dir.display(),
                index.display()
            ))
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", index.display())))?;
        let Some(map) = json["weight_map"].as_object() else {
            bail!("{}: no `weight_map` object", index.display())
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let Some(f) = file.as_str() else {
                bail!(
                    "{}: weight_map entry `{name}` is not a file name",
                    index.display()
                )
            };
            let p = crate::fs::confined(dir, f, &index, &format!("weight_map entry `{name}`"))?;
            if !files.contains(&p) {
                files.push(p);
            }
        }
        Self::from_files(&files)
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Weights for SafetensorsWeights {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.names.contains(name) {
            return Ok(None);
        }
        self.files.load(name, &Device::Cpu).map(Some).map_err(|e| {
            candle_core::Error::Msg(format!("tensor `{name}` in {}: {e}", self.origin))
        })
    }

    fn describe(&self) -> String {
        self.origin.clone()
    }
}

/// Which parameters skip weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoDecay {
    /// Megatron's rule: 1-D tensors (biases, norm weights) and names ending in `.bias`.
    #[default]
    Megatron,
    /// Every parameter decays (as `candle_nn::AdamW` does).
    None,
}

impl NoDecay {
    pub fn decays(&self, name: &str, shape: &[usize]) -> bool {
        match self {
            NoDecay::Megatron => !(shape.len() <= 1 || name.ends_with(".bias")),
            NoDecay::None => true,
        }
    }
}

/// How the backend makes parameters.
#[derive(Clone, Default)]
pub struct BackendOptions {
    /// Seed of the counter-based init.
    pub seed: u64,
    /// Where weights are read from (None: every parameter from its init hint).
    pub weights: Option<Arc<dyn Weights>>,
    pub no_decay: NoDecay,
    /// Names matching this pattern are frozen: plain tensors, not trained.
    pub frozen: Option<regex::Regex>,
}

/// candle-nn's `SimpleBackend` over a [`ParamRegistry`].
pub struct DeepScaleBackend {
    registry: ParamRegistry,
    options: BackendOptions,
    init: RandomInit,
}

impl DeepScaleBackend {
    pub fn new(registry: ParamRegistry, options: BackendOptions) -> Self {
        let init = RandomInit { seed: options.seed };
        Self {
            registry,
            options,
            init,
        }
    }

    /// A `VarBuilder` making parameters into `registry`, of `dtype` on `device`.
    pub fn var_builder(
        registry: ParamRegistry,
        options: BackendOptions,
        dtype: DType,
        device: &Device,
    ) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(
            Box::new(Self::new(registry, options)),
            dtype,
            device.clone(),
        )
    }

    fn weights(&self, name: &str) -> Result<Option<Tensor>> {
        match &self.options.weights {
            Some(w) => w.get(name),
            None => Ok(None),
        }
    }
}

/// The init a candle-nn hint asks for, on a tensor of `shape`.
pub fn init_from_hint(h: candle_nn::Init, shape: &Shape) -> Init {
    use candle_nn::init::NormalOrUniform;
    match h {
        candle_nn::Init::Const(c) => Init::Const(c),
        candle_nn::Init::Randn { mean: 0.0, stdev } => Init::Normal { std: stdev },
        candle_nn::Init::Randn { mean, stdev } => Init::Randn { mean, std: stdev },
        candle_nn::Init::Uniform { lo, up } => Init::Uniform { low: lo, high: up },
        candle_nn::Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => Init::Normal { std },
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    Init::Uniform {
                        low: -bound,
                        high: bound,
                    }
                }
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for DeepScaleBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let shape = s.dims().to_vec();
        if let Some(p) = self.registry.get(name) {
            if p.meta.shape != shape {
                bail!(
                    "parameter `{name}` asked for with shape {shape:?}, built with {:?}",
                    p.meta.shape
                )
            }
            return Ok(p.tensor().clone());
        }
        let meta = ParamMeta {
            name: name.to_string(),
            shape: shape.clone(),
            partition: Partition::Replicated,
            tie_group: None,
            weight_decay: self.options.no_decay.decays(name, &shape),
            real_rows: None,
        };
        let make = || -> Result<Tensor> {
            match self.weights(name)? {
                Some(t) => {
                    if t.dims() != shape.as_slice() {
                        bail!(
                            "tensor `{name}` in {} has shape {:?}, the model wants {shape:?}",
                            self.options
                                .weights
                                .as_ref()
                                .map_or(String::new(), |w| w.describe()),
                            t.dims()
                        )
                    }
                    t.to_dtype(dtype)?.to_device(dev)
                }
                None => self
                    .init
                    .tensor(&meta, None, init_from_hint(h, &s), dev, dtype),
            }
        };
        if self
            .options
            .frozen
            .as_ref()
            .is_some_and(|r| r.is_match(name))
        {
            return self.registry.frozen(name, make);
        }
        let var = Var::from_tensor(&make()?)?;
        let p = self.registry.register(Param {
            var,
            meta,
            piece: None,
        })?;
        Ok(p.tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(p) = self.registry.get(name) {
            return Ok(p.tensor().clone());
        }
        match self.weights(name)? {
            Some(t) => {
                // A tensor asked for without a shape (a buffer): read, not trained.
                let t = t.to_dtype(dtype)?.to_device(dev)?;
                self.registry.frozen(name, || Ok(t))
            }
            None => bail!(
                "`{name}` was asked for without a shape and is not in the weights{}",
                self.options
                    .weights
                    .as_ref()
                    .map_or(" (none given)".to_string(), |w| format!(
                        " ({})",
                        w.describe()
                    ))
            ),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.registry.get(name).is_some()
            || self
                .options
                .weights
                .as_ref()
                .is_some_and(|w| w.get(name).is_ok_and(|t| t.is_some()))
    }
}

//! Rank-aware parameters: every trainable tensor carries its logical (unsharded) identity.
//!
//! Checkpoint consolidation, universal reshape, grad-norm clipping and ZeRO's flat buffers read this
//! metadata; nothing downstream guesses from names.
use crate::layers::storage::{release_var, FlatPiece};
use crate::layers::tensor_parallel::TensorParallel;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// How a logical parameter is split over the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Partition {
    /// Every tensor-parallel rank holds the whole tensor.
    Replicated,
    /// Split along `dim` into contiguous blocks of `stride` interleaved pieces (Megatron's
    /// `partition_dim` / `partition_stride`; stride 1 is a plain contiguous split).
    Split { dim: usize, stride: usize },
}

/// Logical description of one parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamMeta {
    /// Logical name, e.g. `layers.3.attention.query_key_value.weight`.
    pub name: String,
    /// Logical (unsharded) shape.
    pub shape: Vec<usize>,
    pub partition: Partition,
    /// Parameters shared between layers (the word embedding used as input and as logits) name the
    /// same tie group; their gradients are summed and they count once.
    pub tie_group: Option<String>,
    /// Megatron puts biases and LayerNorm weights in a group without weight decay.
    pub weight_decay: bool,
    /// Rows of dim 0 that are real (vocabulary padding excluded); `None` when all are real.
    pub real_rows: Option<usize>,
}

impl ParamMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A trainable tensor with its metadata.
#[derive(Clone, Debug)]
pub struct Param {
    pub var: Var,
    pub meta: ParamMeta,
    /// Built partitioned (DeepSpeed's `zero.Init`): the tensor's storage is released and this
    /// holds the rank's piece of the flattened parameter until the optimizer takes it.
    pub piece: Option<FlatPiece>,
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }
}

/// How a parameter is initialised when no checkpoint provides it. Random values come from the
/// counter-based generator keyed by the parameter's logical name (every layout, every rank, the
/// same values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with mean 0.
    Normal {
        std: f64,
    },
    Zeros,
    Ones,
    Const(f64),
    /// Normal with a mean.
    Randn {
        mean: f64,
        std: f64,
    },
    /// Uniform in `[low, high)`.
    Uniform {
        low: f64,
        high: f64,
    },
}

impl Init {
    /// The constant every element takes, for the constant inits.
    pub fn constant(&self) -> Option<f64> {
        match *self {
            Init::Zeros => Some(0.0),
            Init::Ones => Some(1.0),
            Init::Const(c) => Some(c),
            _ => None,
        }
    }
}

/// Which contiguous block of a logical tensor a rank holds: block `index` of `count` along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The shard of `meta` held by tensor-parallel rank `rank` of `size` (None when whole).
    pub fn of(meta: &ParamMeta, rank: usize, size: usize) -> Result<Option<Self>> {
        match meta.partition {
            Partition::Replicated => Ok(None),
            _ if size <= 1 => Ok(None),
            Partition::Split { dim, stride } => {
                if stride != 1 {
                    candle_core::bail!(
                        "parameter `{}`: partition stride {stride} is not supported",
                        meta.name
                    )
                }
                let Some(&n) = meta.shape.get(dim) else {
                    candle_core::bail!(
                        "parameter `{}`: split dim {dim} of shape {:?}",
                        meta.name,
                        meta.shape
                    )
                };
                if !n.is_multiple_of(size) {
                    candle_core::bail!(
                        "parameter `{}`: dim {dim} of {:?} is not divisible by tensor-parallel size {size}",
                        meta.name,
                        meta.shape
                    )
                }
                Ok(Some(Self {
                    dim,
                    index: rank,
                    count: size,
                }))
            }
        }
    }

    /// Start and length of the block along `dim` for a logical extent `n`.
    pub fn range(&self, n: usize) -> (usize, usize) {
        let len = n / self.count;
        (self.index * len, len)
    }

    /// This shard of a whole logical tensor.
    pub fn narrow(&self, t: &Tensor) -> Result<Tensor> {
        let (start, len) = self.range(t.dim(self.dim)?);
        t.narrow(self.dim, start, len)?.contiguous()
    }
}

/// A parameter's logical value (real vocabulary rows only, as checkpoints and exports keep it)
/// laid out for `meta` — padding rows added back as zeros — and cut to this rank's `shard`;
/// `origin` names where it came from in the shape error.
pub fn relayout(
    logical: Tensor,
    meta: &ParamMeta,
    shard: Option<Shard>,
    origin: &str,
) -> Result<Tensor> {
    let mut t = logical;
    if let (Some(_), Some(&rows)) = (meta.real_rows, meta.shape.first()) {
        let have = t.dim(0)?;
        if have < rows {
            t = t.pad_with_zeros(0, 0, rows - have)?;
        }
    }
    if t.dims() != meta.shape.as_slice() {
        candle_core::bail!(
            "{origin}: parameter `{}` has shape {:?}, the model wants {:?}",
            meta.name,
            t.dims(),
            meta.shape
        )
    }
    match shard {
        Some(s) => s.narrow(&t),
        None => Ok(t),
    }
}

/// Provides the local tensor of a logical parameter: random initialisation, a checkpoint, ...
///
/// A source returns only the block this rank holds (`shard`), so tensor-parallel slicing (and
/// ZeRO-3 partitioning) happens here, below the model code, and checkpoint readers read just that
/// block.
pub trait ParamSource: Send + Sync {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor>;

    /// Elements `start..start + len` of the flattened local tensor, as f32 (ZeRO-3 builds one
    /// rank's piece). The default reads the local tensor and cuts; sources that can produce a
    /// range alone (random initialisation) override it.
    fn flat_range(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        init: Init,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        self.tensor(meta, shard, init, &Device::Cpu, DType::F32)?
            .flatten_all()?
            .narrow(0, start, len)?
            .to_vec1()
    }
}

/// Builds a model's parameters under a name prefix (like candle's `VarBuilder`), collecting the
/// metadata as it goes.
#[derive(Clone)]
pub struct ParamBuilder<'a> {
    source: &'a dyn ParamSource,
    prefix: String,
    device: Device,
    dtype: DType,
    tp: Option<TensorParallel>,
    zero3: Option<Zero3Construction>,
    registry: Option<ParamRegistry>,
}

/// ZeRO-3 construction (DeepSpeed's `zero.Init`): parameters of at least `persistence_threshold`
/// elements are built as this rank's piece only.
#[derive(Debug, Clone, Copy)]
pub struct Zero3Construction {
    /// The data-parallel size and this rank's index.
    pub parts: usize,
    pub rank: usize,
    pub persistence_threshold: usize,
}

/// Options of one parameter beyond its name, shape and init.
#[derive(Debug, Clone, Default)]
pub struct ParamOpts {
    pub partition: Option<Partition>,
    pub tie_group: Option<String>,
    pub no_weight_decay: bool,
    pub real_rows: Option<usize>,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(source: &'a dyn ParamSource, device: &Device, dtype: DType) -> Self {
        Self {
            source,
            prefix: String::new(),
            device: device.clone(),
            dtype,
            tp: None,
            zero3: None,
            registry: None,
        }
    }

    /// Registers every parameter built from here (a name built twice is one parameter): the
    /// whole-model engine trains what the registry holds.
    pub fn with_registry(mut self, registry: ParamRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Builds large parameters partitioned over the data-parallel ranks (ZeRO-3): never whole.
    pub fn with_zero3(mut self, z: Option<Zero3Construction>) -> Self {
        self.zero3 = z.filter(|z| z.parts >= 1);
        self
    }

    /// Builds the parameters of tensor-parallel rank `tp.rank` (split parameters hold their shard).
    pub fn with_tp(mut self, tp: Option<TensorParallel>) -> Self {
        self.tp = tp.filter(|t| t.size() > 1);
        self
    }

    /// The tensor-parallel group the layers built from here run in.
    pub fn tp(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// A builder whose names are prefixed by `name.` (candle's `VarBuilder::push_prefix`).
    pub fn push_prefix(&self, name: impl AsRef<str>) -> Self {
        let mut b = self.clone();
        b.prefix = self.full_name(name.as_ref());
        b
    }

    /// [`Self::push_prefix`] under its old name (`pp` means the pipeline size elsewhere).
    #[deprecated(since = "0.2.0", note = "renamed to `push_prefix`")]
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        self.push_prefix(name)
    }

    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn get(&self, shape: &[usize], name: &str, init: Init, opts: ParamOpts) -> Result<Param> {
        if let Some(p) = self
            .registry
            .as_ref()
            .and_then(|r| r.get(&self.full_name(name)))
        {
            return Ok(p);
        }
        let p = self.build(shape, name, init, opts)?;
        match &self.registry {
            Some(r) => r.register(p),
            None => Ok(p),
        }
    }

    fn build(&self, shape: &[usize], name: &str, init: Init, opts: ParamOpts) -> Result<Param> {
        let meta = ParamMeta {
            name: self.full_name(name),
            shape: shape.to_vec(),
            partition: opts.partition.unwrap_or(Partition::Replicated),
            tie_group: opts.tie_group,
            weight_decay: !opts.no_weight_decay,
            real_rows: opts.real_rows,
        };
        let (size, rank) = crate::layers::tensor_parallel::size_rank(self.tp.as_ref());
        let shard = Shard::of(&meta, rank, size)?;
        if let Some(z) = self.zero3.filter(|z| {
            let local: usize = meta.shape.iter().product::<usize>() / shard.map_or(1, |s| s.count);
            local >= z.persistence_threshold.max(1)
        }) {
            // ZeRO-3: only this data-parallel rank's piece is produced; the tensor keeps its
            // shape with its storage released (gathered by the engine around each use).
            let mut local = meta.shape.clone();
            if let Some(s) = shard {
                local[s.dim] = s.range(meta.shape[s.dim]).1;
            }
            let numel: usize = local.iter().product();
            let piece = numel.div_ceil(z.parts);
            let start = (z.rank * piece).min(numel);
            let len = piece.min(numel - start);
            let mut v = self.source.flat_range(&meta, shard, init, start, len)?;
            if self.dtype != DType::F32 {
                // The pieces hold what a whole half-precision parameter would: rounded values.
                v = Tensor::from_vec(v, len, &Device::Cpu)?
                    .to_dtype(self.dtype)?
                    .to_dtype(DType::F32)?
                    .to_vec1()?;
            }
            v.resize(piece, 0.0);
            let var = Var::zeros(local.as_slice(), self.dtype, &self.device)?;
            release_var(&var)?;
            return Ok(Param {
                var,
                meta,
                piece: Some(FlatPiece::new(z.rank, z.parts, v)),
            });
        }
        let t = self
            .source
            .tensor(&meta, shard, init, &self.device, self.dtype)?;
        let var = Var::from_tensor(&t)?;
        Ok(Param {
            var,
            meta,
            piece: None,
        })
    }
}

/// The parameters a model built: what the whole-model engine trains when the model is not given
/// as a list of layers (any candle model built through DeepScale's `VarBuilder`, or through a
/// `ParamBuilder` with a registry). A name asked for twice is one parameter (tied weights count
/// once); the order is the order of creation, the same on every rank.
#[derive(Default)]
struct RegistryInner {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
    /// Frozen tensors (not trained), by name: asked for twice, the same tensor.
    frozen: HashMap<String, Tensor>,
}

/// The trainable parameters of a model, by logical name (see [`ParamRegistry::register`]).
#[derive(Default, Clone)]
pub struct ParamRegistry(Arc<Mutex<RegistryInner>>);

impl std::fmt::Debug for ParamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamRegistry({} parameters)", self.len())
    }
}

impl ParamRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, RegistryInner>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter registry lock poisoned".into()))
    }

    /// The parameter already registered under `name`, if any.
    pub fn get(&self, name: &str) -> Option<Param> {
        let inner = self.lock().ok()?;
        inner.by_name.get(name).map(|&i| inner.params[i].clone())
    }

    /// Registers `p` under its logical name and returns the registered parameter: the one
    /// registered before when the name is taken (its shape must agree).
    pub fn register(&self, p: Param) -> Result<Param> {
        let mut inner = self.lock()?;
        if let Some(&i) = inner.by_name.get(&p.meta.name) {
            let have = &inner.params[i];
            if have.meta.shape != p.meta.shape {
                bail!(
                    "parameter `{}` asked for with shape {:?}, registered with {:?}",
                    p.meta.name,
                    p.meta.shape,
                    have.meta.shape
                )
            }
            return Ok(have.clone());
        }
        let i = inner.params.len();
        inner.by_name.insert(p.meta.name.clone(), i);
        inner.params.push(p.clone());
        Ok(p)
    }

    /// A frozen tensor under `name` (made by `make` the first time).
    pub fn frozen(&self, name: &str, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let mut inner = self.lock()?;
        if let Some(t) = inner.frozen.get(name) {
            return Ok(t.clone());
        }
        let t = make()?;
        inner.frozen.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// The registered parameters, in creation order.
    pub fn params(&self) -> Vec<Param> {
        self.lock().map(|i| i.params.clone()).unwrap_or_default()
    }

    /// Names of the frozen tensors.
    pub fn frozen_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .map(|i| i.frozen.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Writes every parameter (and, `with_frozen`, every frozen tensor) under its name to one
    /// safetensors file — what candle's `VarBuilder::from_mmaped_safetensors` reloads into the
    /// stock model. Written to a temporary name beside `path` and renamed when complete, so a
    /// failure leaves an existing file untouched.
    pub fn save_safetensors(&self, path: &std::path::Path, with_frozen: bool) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        {
            let inner = self.lock()?;
            for p in &inner.params {
                tensors.insert(
                    p.meta.name.clone(),
                    p.tensor().to_device(&candle_core::Device::Cpu)?,
                );
            }
            if with_frozen {
                for (n, t) in &inner.frozen {
                    tensors.insert(n.clone(), t.to_device(&candle_core::Device::Cpu)?);
                }
            }
        }
        crate::fs::write_atomic_with(path, |tmp| candle_core::safetensors::save(&tensors, tmp))?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().map_or(0, |i| i.params.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

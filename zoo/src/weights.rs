//! Memory-mapped safetensors checkpoints (single file or sharded with an index), and the
//! [`ParamSource`]s that feed a model's parameters from them.
use candle_core::{bail, DType, Device, Error, Result, Tensor};
use candle_deepscale::layers::parameter::{Init, Param, ParamMeta, ParamSource, Shard};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One or more memory-mapped safetensors files with a name -> file routing.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    routing: HashMap<String, usize>,
}

fn open_mmap(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::Msg(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: the file is opened read-only; like every safetensors reader we rely on nobody
    // truncating it while it is mapped.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::Msg(format!("cannot mmap {}: {e}", path.display())))
}

impl SafetensorsFiles {
    /// Opens the given files and indexes their tensor names.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let mmap = open_mmap(p)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::Msg(format!(
                    "{} is not a valid safetensors file: {e}",
                    p.display()
                ))
            })?;
            for name in st.names() {
                routing.insert(name.to_string(), i);
            }
            files.push((p.clone(), mmap));
        }
        Ok(Self { files, routing })
    }

    /// Opens a model folder: `model.safetensors.index.json` (sharded), else `model.safetensors`,
    /// else every `*.safetensors` in it.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Self::open(&index_shards(&index)?);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open(&[single]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::Msg(format!("cannot read model folder {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json",
                dir.display()
            )
        }
        Self::open(&found)
    }

    /// A short description of where the tensors come from, for error messages.
    pub fn describe(&self) -> String {
        match self.files.len() {
            1 => self.files[0].0.display().to_string(),
            n => format!("{} ({} shards)", self.files[0].0.display(), n),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routing.keys().cloned().collect();
        v.sort();
        v
    }

    /// Refuses weights whose layer count (tensors named `{layers}{N}.…`) differs from the
    /// config's `num_layers`: a config with fewer layers would silently drop the rest.
    pub fn check_layer_count(
        &self,
        layers: &str,
        num_layers: usize,
        config_key: &str,
    ) -> Result<()> {
        let held = self
            .routing
            .keys()
            .filter_map(|k| {
                k.strip_prefix(layers)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1);
        if held != num_layers {
            bail!(
                "{}: the weights hold {held} layers (`{layers}0` .. `{layers}{}`), but the \
                 config's {config_key} is {num_layers}",
                self.describe(),
                held.saturating_sub(1)
            )
        }
        Ok(())
    }

    fn view(&self, name: &str) -> Result<(safetensors::tensor::TensorView<'_>, &Path)> {
        let Some(&i) = self.routing.get(name) else {
            bail!("tensor `{name}` not found in {}", self.describe())
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::Msg(format!("{}: tensor `{name}`: {e}", path.display())))?;
        Ok((view, path))
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.0.shape().to_vec())
    }

    /// Loads a tensor as f32 on `device`.
    pub fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (view, path) = self.view(name)?;
        let dtype = float_dtype(view.dtype(), name, path)?;
        Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?.to_dtype(DType::F32)
    }

    /// Loads elements `[start, start + len)` of dim `dim` as f32, copying only those bytes out of
    /// the mapping (a tensor-parallel rank never touches the rest of the tensor).
    pub fn load_slice_f32(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let (view, path) = self.view(name)?;
        let dtype = float_dtype(view.dtype(), name, path)?;
        let shape = view.shape().to_vec();
        let Some(&n) = shape.get(dim) else {
            bail!(
                "{}: tensor `{name}` of shape {shape:?} has no dim {dim}",
                path.display()
            )
        };
        if start + len > n {
            bail!(
                "{}: tensor `{name}` of shape {shape:?}: slice {start}..{} of dim {dim} is out of range",
                path.display(),
                start + len
            )
        }
        let es = dtype.size_in_bytes();
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product::<usize>() * es;
        let data = view.data();
        let mut bytes = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let a = (o * n + start) * inner;
            bytes.extend_from_slice(&data[a..a + len * inner]);
        }
        let mut out_shape = shape;
        out_shape[dim] = len;
        Tensor::from_raw_buffer(&bytes, dtype, &out_shape, device)?.to_dtype(DType::F32)
    }

    /// The whole tensor, or only `shard` of it.
    pub fn load_shard_f32(
        &self,
        name: &str,
        shard: Option<Shard>,
        device: &Device,
    ) -> Result<Tensor> {
        match shard {
            None => self.load_f32(name, device),
            Some(s) => {
                let shape = self.shape(name)?;
                let Some(&n) = shape.get(s.dim) else {
                    bail!(
                        "{}: tensor `{name}` of shape {shape:?} has no dim {}",
                        self.describe(),
                        s.dim
                    )
                };
                let (start, len) = s.range(n);
                self.load_slice_f32(name, s.dim, start, len, device)
            }
        }
    }
}

fn float_dtype(d: Dtype, name: &str, path: &Path) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        other => bail!(
            "{}: tensor `{name}` has dtype {other:?}; weights must be f32, f16, bf16 or f64",
            path.display()
        ),
    })
}

fn index_shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::Msg(format!("cannot read {}: {e}", index.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{} is not valid JSON: {e}", index.display())))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no `weight_map` object", index.display())
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (k, v) in map {
        let Some(f) = v.as_str() else {
            bail!("{}: weight_map[`{k}`] is not a file name", index.display())
        };
        let p = candle_deepscale::fs::confined(dir, f, index, &format!("weight_map[`{k}`]"))?;
        if !shards.contains(&p) {
            shards.push(p);
        }
    }
    for p in &shards {
        if !p.exists() {
            bail!(
                "shard {} named in {} is missing",
                p.display(),
                index.display()
            )
        }
    }
    shards.sort();
    Ok(shards)
}

/// Checks a stored tensor's shape against the logical shape the model expects.
pub fn check_shape(shape: &[usize], meta: &ParamMeta, key: &str, origin: &str) -> Result<()> {
    if shape != meta.shape.as_slice() {
        bail!(
            "{origin}: tensor `{key}` has shape {shape:?}, but parameter `{}` needs {:?}",
            meta.name,
            meta.shape
        )
    }
    Ok(())
}

/// Reorders the rows of `t` from `[a, b, r]` blocks to `[b, a, r]` (QKV layouts: HF's
/// `[3, heads, head_dim]` <-> Megatron's `[heads, 3, head_dim]`).
pub fn swap_leading(t: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    let full = t.dims().to_vec();
    let rows = full[0];
    if !rows.is_multiple_of(a * b) {
        bail!("cannot split {rows} rows into {a} x {b} blocks")
    }
    let mut shape = vec![a, b, rows / (a * b)];
    shape.extend_from_slice(&full[1..]);
    t.reshape(shape)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(full)
}

/// Native layout: tensors stored under the parameters' logical names, full (unsharded) shapes.
pub struct NativeSource {
    pub files: SafetensorsFiles,
}

impl ParamSource for NativeSource {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        _init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let origin = self.files.describe();
        check_shape(&self.files.shape(&meta.name)?, meta, &meta.name, &origin)?;
        self.files
            .load_shard_f32(&meta.name, shard, device)?
            .to_dtype(dtype)
    }
}

/// Writes parameters in the native layout (logical names and shapes), one safetensors file.
pub fn save_native(params: &[&Param], path: &Path) -> Result<()> {
    let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
    for p in params {
        map.insert(p.meta.name.clone(), p.tensor().to_dtype(DType::F32)?);
    }
    let hm: HashMap<String, Tensor> = map.into_iter().collect();
    candle_core::safetensors::save(&hm, path)
        .map_err(|e| Error::Msg(format!("cannot write {}: {e}", path.display())))
}

/// Logical tensors by parameter name (vocabulary padding rows dropped), e.g. an imported
/// checkpoint; as a [`ParamSource`] it pads and cuts them for any layout.
#[derive(Debug, Clone, Default)]
pub struct LogicalTensors {
    tensors: HashMap<String, Tensor>,
}

impl LogicalTensors {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }
}

impl ParamSource for LogicalTensors {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        _init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = self
            .tensors
            .get(&meta.name)
            .ok_or_else(|| Error::Msg(format!("no tensor for parameter `{}`", meta.name)))?
            .to_dtype(DType::F32)?;
        candle_deepscale::layers::parameter::relayout(t, meta, shard, "imported checkpoint")?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

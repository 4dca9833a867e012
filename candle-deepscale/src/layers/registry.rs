//! The parameters a model built: what the whole-model engine trains when the model is not given
//! as a list of layers (any candle model built through DeepScale's `VarBuilder`, or through a
//! `ParamBuilder` with a registry). A name asked for twice is one parameter (tied weights count
//! once); the order is the order of creation, the same on every rank.
use crate::layers::parameter::Param;
use candle_core::{bail, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct Inner {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
    /// Frozen tensors (not trained), by name: asked for twice, the same tensor.
    frozen: HashMap<String, Tensor>,
}

/// The trainable parameters of a model, by logical name.
#[derive(Default, Clone)]
pub struct ParamRegistry(Arc<Mutex<Inner>>);

impl std::fmt::Debug for ParamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamRegistry({} parameters)", self.len())
    }
}

impl ParamRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
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
                tensors.insert(p.meta.name.clone(), p.tensor().to_device(&candle_core::Device::Cpu)?);
            }
            if with_frozen {
                for (n, t) in &inner.frozen {
                    tensors.insert(n.clone(), t.to_device(&candle_core::Device::Cpu)?);
                }
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model.safetensors".into());
        let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
        let res = candle_core::safetensors::save(&tensors, &tmp)
            .and_then(|_| std::fs::rename(&tmp, path).map_err(candle_core::Error::wrap));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            bail!("cannot write {}: {e}", path.display())
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().map_or(0, |i| i.params.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

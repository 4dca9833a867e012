//! Releasing and refilling a parameter's storage while its tensor keeps its shape (and its id,
//! so autograd and the optimizer still know it): what ZeRO-3 does around each use of a layer,
//! and what a partitioned construction (DeepSpeed's `zero.Init`) starts from.
use candle_core::{bail, CpuStorage, Layout, Result, Var};
use std::sync::Mutex;

/// Puts `data` (f32 values, converted to the parameter's dtype) into the CPU storage of `var`,
/// dropping what was there. The tensor's shape is untouched: an empty storage is a released
/// parameter.
struct Swap(Mutex<Option<Vec<f32>>>);

impl candle_core::InplaceOp1 for Swap {
    fn name(&self) -> &'static str {
        "zero3-swap"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        let data = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("zero3-swap lock".into()))?
            .take()
            .unwrap_or_default();
        match storage {
            CpuStorage::F32(v) => *v = data,
            CpuStorage::F16(v) => *v = data.iter().map(|x| half::f16::from_f32(*x)).collect(),
            CpuStorage::BF16(v) => *v = data.iter().map(|x| half::bf16::from_f32(*x)).collect(),
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 CPU tensors"),
        }
        Ok(())
    }

    /// On a GPU the gathered values are uploaded (ZeRO-3 keeps its pieces in host memory); a
    /// released parameter keeps a one-element allocation.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let mut data = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("zero3-swap lock".into()))?
            .take()
            .unwrap_or_default();
        if data.is_empty() {
            data.push(0.0);
        }
        let dev = storage.device.clone();
        let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            candle_core::Error::Msg(format!("zero3-swap upload: {e:?}"))
        };
        let stream = dev.cuda_stream();
        storage.slice = match &storage.slice {
            S::F32(_) => S::F32(stream.clone_htod(&data).map_err(err)?),
            S::F16(_) => {
                let h: Vec<half::f16> = data.iter().map(|x| half::f16::from_f32(*x)).collect();
                S::F16(stream.clone_htod(&h).map_err(err)?)
            }
            S::BF16(_) => {
                let h: Vec<half::bf16> = data.iter().map(|x| half::bf16::from_f32(*x)).collect();
                S::BF16(stream.clone_htod(&h).map_err(err)?)
            }
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 tensors"),
        };
        Ok(())
    }
}

/// Replaces the storage of a parameter with a copy of the elements of another tensor of its
/// dtype (device-resident ZeRO-3: the gathered values never leave the device).
struct SwapIn;

impl candle_core::InplaceOp2 for SwapIn {
    fn name(&self) -> &'static str {
        "zero3-swap-in"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        _: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let Some((a, b)) = sl.contiguous_offsets() else {
            bail!("zero3-swap-in: the gathered tensor is not contiguous")
        };
        *dst = match src {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 tensors"),
        };
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        _: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let mut out = src.device().zeros_impl(sl.shape(), src.dtype())?;
        src.copy_strided_src(&mut out, 0, sl)?;
        *dst = out;
        Ok(())
    }
}

/// Makes `var` whole with the values of `t` (its shape; converted to its dtype).
pub fn set_storage_tensor(var: &Var, t: &candle_core::Tensor) -> Result<()> {
    let t = t.to_dtype(var.dtype())?;
    var.as_tensor().inplace_op2(&t, &SwapIn)
}

pub fn set_storage(var: &Var, data: Vec<f32>) -> Result<()> {
    var.as_tensor().inplace_op1(&Swap(Mutex::new(Some(data))))
}

/// Frees the storage of `var` (its shape stays): the parameter must be gathered before use.
pub fn release_var(var: &Var) -> Result<()> {
    set_storage(var, Vec::new())
}

/// Elements resident in the storage of `t` (0 for a released parameter).
pub fn resident_len(t: &candle_core::Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        candle_core::Storage::Cpu(CpuStorage::F16(v)) => v.len(),
        candle_core::Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(c) => {
            use candle_core::cuda_backend::CudaStorageSlice as S;
            let n = match &c.slice {
                S::F32(v) => v.len(),
                S::F16(v) => v.len(),
                S::BF16(v) => v.len(),
                _ => t.elem_count(),
            };
            // Released: the one-element placeholder.
            if n < t.elem_count() {
                0
            } else {
                t.elem_count()
            }
        }
        _ => t.elem_count(),
    }
}

/// Whether the storage of `t` is released (a partitioned parameter, not gathered now).
pub fn is_released(t: &candle_core::Tensor) -> bool {
    resident_len(t) < t.elem_count()
}

/// A parameter built as one rank's piece of its flattened values (padded to `count` equal
/// pieces) instead of whole, as DeepSpeed's `zero.Init` builds them: the values wait here until
/// the optimizer that partitions parameters takes them (so they are never held twice).
#[derive(Clone, Debug)]
pub struct FlatPiece {
    /// Which piece, of how many.
    pub index: usize,
    pub count: usize,
    values: std::sync::Arc<Mutex<Option<Vec<f32>>>>,
}

impl FlatPiece {
    pub fn new(index: usize, count: usize, values: Vec<f32>) -> Self {
        Self {
            index,
            count,
            values: std::sync::Arc::new(Mutex::new(Some(values))),
        }
    }

    /// Runs `f` on the piece's values (None once taken).
    pub fn with_values<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
        let guard = self
            .values
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter piece lock poisoned".into()))?;
        Ok(f(guard.as_deref()))
    }

    /// Drops the values (the optimizer holds its copy now).
    pub fn release(&self) {
        if let Ok(mut g) = self.values.lock() {
            g.take();
        }
    }
}

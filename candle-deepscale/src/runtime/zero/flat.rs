//! Copies between candle tensors and flat fp32 buffers without detours through new tensors.
//!
//! `Var::from_tensor` copies, so a parameter cannot be a view into a ZeRO buffer: gradients are
//! copied in and updated parameters written back in place (`Tensor::inplace_op1`) on CPU; other
//! devices take the copy path.
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, Var};

/// Calls `f` with the elements of `t` (flattened) as f32, borrowing CPU f32 storage when it is
/// contiguous and converting otherwise.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((s, e))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[s..e]));
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// Elements per rayon task in the flat-buffer passes (big enough to amortise the task).
const CHUNK: usize = 1 << 16;

/// `dst[i] += src[i]` for the flattened elements of `t` (over the cores: the embedding's and the
/// LM head's gradients are tens of MB).
pub fn add_into(t: &Tensor, dst: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    with_f32(t, |src| {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s))
    })
}

/// Zeroes `v` over the cores.
pub fn fill_zero(v: &mut [f32]) {
    use rayon::prelude::*;
    v.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
}

struct Write<'a> {
    src: &'a [f32],
    /// Where `src` starts among the tensor's elements.
    offset: usize,
}

impl candle_core::InplaceOp1 for Write<'_> {
    fn name(&self) -> &'static str {
        "zero-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((s, e)) = layout.contiguous_offsets() else {
            candle_core::bail!("zero-write: parameter storage is not contiguous")
        };
        if self.offset + self.src.len() > e - s {
            candle_core::bail!(
                "zero-write: {} values at {} for {} elements",
                self.src.len(),
                self.offset,
                e - s
            )
        }
        let (s, e) = (s + self.offset, s + self.offset + self.src.len());
        match storage {
            CpuStorage::F32(v) => v[s..e].copy_from_slice(self.src),
            CpuStorage::F16(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = half::f16::from_f32(*x)),
            CpuStorage::BF16(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = half::bf16::from_f32(*x)),
            CpuStorage::F64(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = *x as f64),
            _ => candle_core::bail!("zero-write: parameters must be floating point"),
        }
        Ok(())
    }
}

struct Update<F> {
    f: std::cell::RefCell<F>,
}

impl<F: FnMut(&mut [f32])> candle_core::InplaceOp1 for Update<F> {
    fn name(&self) -> &'static str {
        "zero-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((s, e))) => {
                (self.f.borrow_mut())(&mut v[s..e]);
                Ok(())
            }
            _ => candle_core::bail!("zero-update: the parameter is not a contiguous f32 tensor"),
        }
    }
}

/// Runs `f` on the elements of the contiguous f32 CPU tensor `t`, in place.
pub fn update_f32(t: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    t.inplace_op1(&Update {
        f: std::cell::RefCell::new(f),
    })
}

/// Overwrites elements `offset..offset + src.len()` of the parameter `var` (flattened) with
/// `src` (as f32, converted to the parameter's dtype). A contiguous CPU tensor only.
pub fn write_var_range(var: &Var, offset: usize, src: &[f32]) -> Result<()> {
    let t = var.as_tensor();
    if !(t.device().is_cpu() && t.is_contiguous()) {
        candle_core::bail!("zero-write: a range of a parameter that is not a contiguous CPU tensor")
    }
    t.inplace_op1(&Write { src, offset })
}

/// Overwrites the parameter `var` with `src` (its flattened elements, as f32).
pub fn write_var(var: &Var, src: &[f32]) -> Result<()> {
    let t = var.as_tensor();
    if t.elem_count() != src.len() {
        candle_core::bail!(
            "zero-write: {} values for {} elements",
            src.len(),
            t.elem_count()
        )
    }
    if t.device().is_cpu() && t.is_contiguous() {
        return write_var_range(var, 0, src);
    }
    let new = Tensor::from_slice(src, t.shape(), t.device())?.to_dtype(t.dtype())?;
    var.set(&new)
}

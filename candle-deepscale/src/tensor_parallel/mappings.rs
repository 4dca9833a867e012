//! The four tensor-parallel mappings of Megatron's `mpu/mappings.py`, as candle autograd ops.
//!
//! | op | forward | backward |
//! |---|---|---|
//! | copy-to-tp | identity | all-reduce |
//! | reduce-from-tp | all-reduce | identity |
//! | scatter-to-tp | keep own slice of last dim | all-gather |
//! | gather-from-tp | all-gather last dim | keep own slice |
use super::TensorParallel;
use crate::comm::ReduceOp;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!(
            "{op}: tensor-parallel mappings carry f32 tensors, got {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        )
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Concatenates `parts` (each `[rows, w]` flattened, back to back) along the last dim.
fn interleave_last(all: &[f32], parts: usize, rows: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; all.len()];
    for p in 0..parts {
        for r in 0..rows {
            let src = &all[p * rows * w + r * w..p * rows * w + (r + 1) * w];
            out[r * parts * w + p * w..r * parts * w + (p + 1) * w].copy_from_slice(src);
        }
    }
    out
}

fn all_gather_last(tp: &TensorParallel, t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let w = *dims.last().unwrap_or(&1);
    let rows = t.elem_count() / w.max(1);
    let local = t.flatten_all()?.to_vec1::<f32>()?;
    let mut all = vec![0f32; local.len() * tp.size()];
    tp.comm.all_gather(&tp.group, &local, &mut all)?;
    let mut shape = dims;
    let last = shape.len() - 1;
    shape[last] = w * tp.size();
    Tensor::from_vec(interleave_last(&all, tp.size(), rows, w), shape, t.device())
}

fn own_slice_last(tp: &TensorParallel, t: &Tensor) -> Result<Tensor> {
    let w = t.dim(D::Minus1)?;
    if !w.is_multiple_of(tp.size()) {
        bail!(
            "last dimension {w} is not divisible by tensor-parallel size {}",
            tp.size()
        )
    }
    let local = w / tp.size();
    t.narrow(D::Minus1, tp.rank * local, local)?.contiguous()
}

/// Half-precision activations cross the group as f32 (the conversions are differentiable, so
/// gradients come back in the activation's dtype).
fn in_f32(x: &Tensor, op: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dtype = x.dtype();
    if dtype == candle_core::DType::F32 {
        return op(&x.contiguous()?);
    }
    op(&x.to_dtype(candle_core::DType::F32)?.contiguous()?)?.to_dtype(dtype)
}

struct CopyToTp(TensorParallel);
struct ReduceFromTp(TensorParallel);
struct ScatterToTp(TensorParallel);
struct GatherFromTp(TensorParallel);

impl CustomOp1 for CopyToTp {
    fn name(&self) -> &'static str {
        "copy-to-tp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = f32_slice(s, l, self.name())?.to_vec();
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let tp = &self.0;
        Ok(Some(tp.comm.all_reduce_tensor(
            &tp.group,
            grad,
            ReduceOp::Sum,
        )?))
    }
}

impl CustomOp1 for ReduceFromTp {
    fn name(&self) -> &'static str {
        "reduce-from-tp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut v = f32_slice(s, l, self.name())?.to_vec();
        self.0
            .comm
            .all_reduce(&self.0.group, &mut v, ReduceOp::Sum)?;
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

impl CustomOp1 for ScatterToTp {
    fn name(&self) -> &'static str {
        "scatter-to-tp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = f32_slice(s, l, self.name())?;
        let dims = l.shape().dims().to_vec();
        let w = *dims.last().unwrap_or(&1);
        let n = self.0.size();
        if !w.is_multiple_of(n) {
            bail!("scatter-to-tp: last dimension {w} is not divisible by tensor-parallel size {n}")
        }
        let lw = w / n;
        let off = self.0.rank * lw;
        let out: Vec<f32> = v
            .chunks(w)
            .flat_map(|row| row[off..off + lw].iter().copied())
            .collect();
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = lw;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(all_gather_last(&self.0, grad)?))
    }
}

impl CustomOp1 for GatherFromTp {
    fn name(&self) -> &'static str {
        "gather-from-tp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = f32_slice(s, l, self.name())?;
        let dims = l.shape().dims().to_vec();
        let w = *dims.last().unwrap_or(&1);
        let rows = v.len() / w.max(1);
        let n = self.0.size();
        let mut all = vec![0f32; v.len() * n];
        self.0.comm.all_gather(&self.0.group, v, &mut all)?;
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = w * n;
        Ok((
            CpuStorage::F32(interleave_last(&all, n, rows, w)),
            Shape::from(shape),
        ))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(own_slice_last(&self.0, grad)?))
    }
}

/// Identity forward, all-reduce of the gradient backward (entering a tensor-parallel region).
pub fn copy_to_tp(x: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(CopyToTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

/// All-reduce forward, identity backward (leaving a row-parallel region).
pub fn reduce_from_tp(x: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(ReduceFromTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

/// Keeps this rank's slice of the last dim; backward all-gathers.
pub fn scatter_to_tp(x: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(ScatterToTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

/// All-gathers the last dim; backward keeps this rank's slice.
pub fn gather_from_tp(x: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(GatherFromTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

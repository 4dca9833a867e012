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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::whole_copy(s, l)?, l.shape().clone()))
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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut out = cuda::whole_copy(s, l)?;
        cuda::collectives(&self.0)?.all_reduce_cuda(&self.0.group, &mut out, ReduceOp::Sum)?;
        Ok((out, l.shape().clone()))
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

/// All-gather stacking the members' tensors on a new leading axis; backward keeps this rank's
/// entry (every rank holds the same downstream gradient).
struct GatherStacked(TensorParallel);

impl CustomOp1 for GatherStacked {
    fn name(&self) -> &'static str {
        "gather-stacked-tp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = f32_slice(s, l, self.name())?;
        let mut all = vec![0f32; v.len() * self.0.size()];
        self.0.comm.all_gather(&self.0.group, v, &mut all)?;
        let mut dims = vec![self.0.size()];
        dims.extend_from_slice(l.dims());
        Ok((CpuStorage::F32(all), Shape::from(dims)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let src = cuda::whole_copy(s, l)?;
        let mut dims = vec![self.0.size()];
        dims.extend_from_slice(l.dims());
        let shape = Shape::from(dims);
        let mut out = s.device().zeros_impl(&shape, s.dtype())?;
        cuda::collectives(&self.0)?.all_gather_cuda(&self.0.group, &src, &mut out)?;
        Ok((out, shape))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.get(self.0.rank)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::TensorParallel;
    use crate::comm::CudaCollectives;
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::{bail, CudaStorage, Layout, Result};

    /// A whole, contiguous copy of the elements `l` describes.
    pub fn whole_copy(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
        s.copy_strided_src(&mut dst, 0, l)?;
        Ok(dst)
    }

    pub fn collectives(tp: &TensorParallel) -> Result<&dyn CudaCollectives> {
        match tp.comm.cuda() {
            Some(c) => Ok(c),
            None => bail!(
                "tensor parallel on a GPU needs a device communicator (NCCL); the {} backend \
                 carries host memory only",
                tp.comm.backend()
            ),
        }
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
        // On a GPU: the gradient of the kept slice, zero elsewhere, summed over the group is the
        // gathered gradient (an all-reduce where the host path all-gathers).
        Some(tp) if tp.size() > 1 && x.device().is_cuda() => scatter_by_all_reduce(x, tp),
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(ScatterToTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

/// All-gathers the last dim; backward keeps this rank's slice.
pub fn gather_from_tp(x: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        // On a GPU: gather whole tensors in device memory, then move the member axis next to
        // the last dim with tensor ops (whose backward is the matching slice).
        Some(tp) if tp.size() > 1 && x.device().is_cuda() => gather_stacked(x, tp),
        Some(tp) if tp.size() > 1 => in_f32(x, |x| x.apply_op1(GatherFromTp(tp.clone()))),
        _ => Ok(x.clone()),
    }
}

/// [`scatter_to_tp`] as the GPU runs it: copy-to-tp then the own slice.
fn scatter_by_all_reduce(x: &Tensor, tp: &TensorParallel) -> Result<Tensor> {
    own_slice_last(tp, &copy_to_tp(x, Some(tp))?)
}

/// [`gather_from_tp`] as the GPU runs it: whole tensors gathered on a new leading axis, which
/// tensor ops then move next to the last dim.
fn gather_stacked(x: &Tensor, tp: &TensorParallel) -> Result<Tensor> {
    in_f32(x, |x| {
        let all = x.apply_op1(GatherStacked(tp.clone()))?;
        let rank = x.rank();
        let mut order: Vec<usize> = (1..rank).collect();
        order.extend([0, rank]);
        let mut dims = x.dims().to_vec();
        dims[rank - 1] *= tp.size();
        all.permute(order)?.contiguous()?.reshape(dims)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Communicator, InProcessWorld};
    use candle_core::{Device, Var};
    use std::sync::Arc;
    use std::time::Duration;

    /// The GPU formulations of scatter and gather (run here on CPU tensors) give the host
    /// ops' values and gradients.
    #[test]
    fn device_formulations_equal_host_ops() {
        let out = InProcessWorld::run(2, Duration::from_secs(30), |comm| {
            let comm: Arc<dyn Communicator> = comm;
            let tp = TensorParallel::new(comm.clone(), vec![0, 1])?;
            let r = tp.rank as f32;
            let x = Var::from_vec(
                (0..24).map(|i| i as f32 * 0.5 + r).collect::<Vec<_>>(),
                (2, 3, 4),
                &Device::Cpu,
            )?;
            let w = Tensor::arange(0f32, 48., &Device::Cpu)?.reshape((2, 3, 8))?;
            let mut got = Vec::new();
            for stacked in [false, true] {
                let g = if stacked {
                    gather_stacked(x.as_tensor(), &tp)?
                } else {
                    gather_from_tp(x.as_tensor(), Some(&tp))?
                };
                let loss = (g.clone() * &w)?.sum_all()?;
                let grads = loss.backward()?;
                got.push((g, grads.get(x.as_tensor()).cloned()));
                let wide = Var::from_tensor(&w)?;
                let s = if stacked {
                    scatter_by_all_reduce(wide.as_tensor(), &tp)?
                } else {
                    scatter_to_tp(wide.as_tensor(), Some(&tp))?
                };
                let loss = (s.sqr()? * (r + 1.0) as f64)?.sum_all()?;
                let grads = loss.backward()?;
                got.push((s, grads.get(wide.as_tensor()).cloned()));
            }
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            for i in 0..2 {
                let (a, ga) = &got[i];
                let (b, gb) = &got[i + 2];
                assert_eq!(flat(a)?, flat(b)?, "values {i}");
                let (Some(ga), Some(gb)) = (ga, gb) else {
                    panic!("no gradient {i}")
                };
                assert_eq!(flat(ga)?, flat(gb)?, "gradients {i}");
            }
            Ok(())
        });
        for r in out {
            r.unwrap();
        }
    }
}

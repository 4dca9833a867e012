//! Tensor collectives in device memory (feature `cuda`): the output tensor is allocated on the
//! device and a candle in-place op hands its storage, and the input's, to the backend's
//! [`CudaCollectives`]. No element crosses host memory and the work stays ordered on the stream.
use super::{CudaCollectives, ReduceOp};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, InplaceOp2, Layout};
use candle_core::{Result, Tensor};

/// A whole storage holding exactly `l`'s elements of `s` in order: None when `s` already is one,
/// else a copy.
fn whole(s: &CudaStorage, l: &Layout) -> Result<Option<CudaStorage>> {
    if l.is_contiguous() && l.start_offset() == 0 && storage_len(s)? == l.shape().elem_count() {
        return Ok(None);
    }
    let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(Some(dst))
}

fn storage_len(s: &CudaStorage) -> Result<usize> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    Ok(match &s.slice {
        S::U8(v) => v.len(),
        S::U32(v) => v.len(),
        S::I16(v) => v.len(),
        S::I32(v) => v.len(),
        S::I64(v) => v.len(),
        S::BF16(v) => v.len(),
        S::F16(v) => v.len(),
        S::F32(v) => v.len(),
        S::F64(v) => v.len(),
        _ => bail!("collective: {:?} tensors are not carried", s.dtype()),
    })
}

fn check_dst(dst: &CudaStorage, l: &Layout, what: &str) -> Result<()> {
    if !(l.is_contiguous() && l.start_offset() == 0 && storage_len(dst)? == l.shape().elem_count())
    {
        bail!("{what}: the output must be a fresh whole storage")
    }
    Ok(())
}

fn host_only(name: &str) -> Result<()> {
    bail!("{name}: a device collective was given host tensors")
}

/// The in-place op behind every collective: `dst` (fresh zeros of the result's shape) receives
/// the result computed from `src`.
struct Collective<'a> {
    name: &'static str,
    run: &'a dyn Fn(&mut CudaStorage, &CudaStorage) -> Result<()>,
}

impl InplaceOp2 for Collective<'_> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        host_only(self.name)
    }
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        check_dst(dst, dl, self.name)?;
        let copy = whole(src, sl)?;
        (self.run)(dst, copy.as_ref().unwrap_or(src))
    }
}

/// A collective on one buffer, in place (broadcast, send, receive).
struct InPlace<'a> {
    name: &'static str,
    run: &'a dyn Fn(&mut CudaStorage) -> Result<()>,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        host_only(self.name)
    }
    fn cuda_fwd(&self, dst: &mut CudaStorage, l: &Layout) -> Result<()> {
        check_dst(dst, l, self.name)?;
        (self.run)(dst)
    }
}

fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros(shape, dtype, device)
}

pub(super) fn all_reduce(
    cc: &dyn CudaCollectives,
    group: &[usize],
    t: &Tensor,
    op: ReduceOp,
) -> Result<Tensor> {
    let out = zeros(t.dims(), t.dtype(), t.device())?;
    let run = |dst: &mut CudaStorage, src: &CudaStorage| {
        src.copy_strided_src(dst, 0, &Layout::contiguous(t.shape()))?;
        cc.all_reduce_cuda(group, dst, op)
    };
    out.inplace_op2(
        t,
        &Collective {
            name: "all_reduce",
            run: &run,
        },
    )?;
    Ok(out)
}

pub(super) fn all_gather(
    cc: &dyn CudaCollectives,
    group: &[usize],
    t: &Tensor,
    dims: Vec<usize>,
) -> Result<Tensor> {
    let out = zeros(&dims, t.dtype(), t.device())?;
    let run = |dst: &mut CudaStorage, src: &CudaStorage| cc.all_gather_cuda(group, src, dst);
    out.inplace_op2(
        t,
        &Collective {
            name: "all_gather",
            run: &run,
        },
    )?;
    Ok(out)
}

pub(super) fn reduce_scatter(
    cc: &dyn CudaCollectives,
    group: &[usize],
    t: &Tensor,
    dims: Vec<usize>,
    op: ReduceOp,
) -> Result<Tensor> {
    let out = zeros(&dims, t.dtype(), t.device())?;
    let run =
        |dst: &mut CudaStorage, src: &CudaStorage| cc.reduce_scatter_cuda(group, src, dst, op);
    out.inplace_op2(
        t,
        &Collective {
            name: "reduce_scatter",
            run: &run,
        },
    )?;
    Ok(out)
}

pub(super) fn broadcast(
    cc: &dyn CudaCollectives,
    group: &[usize],
    t: &Tensor,
    root: usize,
) -> Result<Tensor> {
    let out = zeros(t.dims(), t.dtype(), t.device())?;
    let run = |dst: &mut CudaStorage, src: &CudaStorage| {
        src.copy_strided_src(dst, 0, &Layout::contiguous(t.shape()))?;
        cc.broadcast_cuda(group, dst, root)
    };
    out.inplace_op2(
        t,
        &Collective {
            name: "broadcast",
            run: &run,
        },
    )?;
    Ok(out)
}

pub(super) fn send(cc: &dyn CudaCollectives, dst: usize, tag: u64, t: &Tensor) -> Result<()> {
    // The op writes its first operand, so the data rides as the (never written) second; the
    // first is a one-element placeholder.
    let placeholder = zeros(&[1], t.dtype(), t.device())?;
    let run = |_: &mut CudaStorage, s: &CudaStorage| cc.send_cuda(dst, tag, s);
    placeholder.inplace_op2(
        t,
        &Collective {
            name: "send",
            run: &run,
        },
    )
}

pub(super) fn recv(
    cc: &dyn CudaCollectives,
    src: usize,
    tag: u64,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let out = zeros(shape, dtype, device)?;
    let run = |d: &mut CudaStorage| cc.recv_cuda(src, tag, d);
    out.inplace_op1(&InPlace {
        name: "recv",
        run: &run,
    })?;
    Ok(out)
}

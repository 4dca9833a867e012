//! One communicator trait for every backend: in-process ranks (threads), MPI, NCCL.
//!
//! Collectives work on a group (a list of global ranks, in group order) and take raw bytes tagged
//! with an element kind, so the trait stays object-safe; the typed helpers on `dyn Communicator`
//! are what callers use. Every collective has a deadline: a dead or stuck peer becomes an error
//! naming the collective and the peer on every other rank, never a hang.
pub mod comms_logging;
#[cfg(feature = "cuda")]
mod device;
mod in_process;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod shape_only;
// Used by the MPI backend; built without it too, for its tests.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
mod shm;
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
mod single_copy;
pub mod tcp_rendezvous;
mod work;

pub use in_process::{InProcessComm, InProcessWorld};
pub use shape_only::ShapeOnly;
pub use work::{ReduceScatterWork, SendBuffer, Work};

use candle_core::{bail, Result, Tensor};
use std::time::Duration;

/// The default collective deadline: `DEEPSCALE_COMM_TIMEOUT` seconds, else 300. A value that is
/// not a positive number falls back to 300 here; [`timeout_from_env`] reports it instead.
pub fn default_timeout() -> Duration {
    timeout_from_env()
        .ok()
        .flatten()
        .unwrap_or(Duration::from_secs(300))
}

/// `DEEPSCALE_COMM_TIMEOUT` as a deadline (None when unset), or an error naming the variable.
pub fn timeout_from_env() -> Result<Option<Duration>> {
    match std::env::var("DEEPSCALE_COMM_TIMEOUT") {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            _ => bail!("DEEPSCALE_COMM_TIMEOUT={v:?}: expected a positive number of seconds"),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Avg,
}

/// Element types that collectives carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
    U32,
    U8,
}

impl ElemKind {
    pub fn size(self) -> usize {
        match self {
            ElemKind::F64 | ElemKind::I64 => 8,
            ElemKind::F32 | ElemKind::I32 | ElemKind::U32 => 4,
            ElemKind::F16 | ElemKind::BF16 => 2,
            ElemKind::U8 => 1,
        }
    }
}

/// A type collectives can carry.
pub trait Element: bytemuck::Pod + Send + Sync + PartialOrd {
    const KIND: ElemKind;
}

macro_rules! element {
    ($($t:ty => $k:ident),*) => {$(impl Element for $t { const KIND: ElemKind = ElemKind::$k; })*};
}
element!(f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16, i32 => I32, i64 => I64, u32 => U32, u8 => U8);

/// Reduces `parts` (one byte buffer per group member, group order) element-wise into `out`, in
/// that fixed order so every rank computes bit-identical results. Half types accumulate in f32.
pub fn reduce_bytes(parts: &[&[u8]], out: &mut [u8], kind: ElemKind, op: ReduceOp) -> Result<()> {
    fn go<T: bytemuck::Pod + PartialOrd>(
        parts: &[&[u8]],
        out: &mut [u8],
        op: ReduceOp,
        add: impl Fn(T, T) -> T,
        div: impl Fn(T, usize) -> T,
    ) {
        let out: &mut [T] = bytemuck::cast_slice_mut(out);
        let first: &[T] = bytemuck::cast_slice(parts[0]);
        out.copy_from_slice(first);
        for p in &parts[1..] {
            let p: &[T] = bytemuck::cast_slice(p);
            for (o, x) in out.iter_mut().zip(p) {
                *o = match op {
                    ReduceOp::Sum | ReduceOp::Avg => add(*o, *x),
                    ReduceOp::Max => {
                        if *x > *o {
                            *x
                        } else {
                            *o
                        }
                    }
                };
            }
        }
        if op == ReduceOp::Avg {
            out.iter_mut().for_each(|o| *o = div(*o, parts.len()));
        }
    }
    if parts.is_empty() || parts.iter().any(|p| p.len() != out.len()) {
        bail!("reduction over buffers of different sizes")
    }
    if out.is_empty() {
        // Nothing to reduce; an empty scratch buffer's pointer need not be aligned for the
        // element type (bytemuck refuses to cast it).
        return Ok(());
    }
    match kind {
        ElemKind::F32 => go::<f32>(parts, out, op, |a, b| a + b, |a, n| a / n as f32),
        ElemKind::F64 => go::<f64>(parts, out, op, |a, b| a + b, |a, n| a / n as f64),
        ElemKind::F16 => go::<half::f16>(
            parts,
            out,
            op,
            |a, b| half::f16::from_f32(a.to_f32() + b.to_f32()),
            |a, n| half::f16::from_f32(a.to_f32() / n as f32),
        ),
        ElemKind::BF16 => go::<half::bf16>(
            parts,
            out,
            op,
            |a, b| half::bf16::from_f32(a.to_f32() + b.to_f32()),
            |a, n| half::bf16::from_f32(a.to_f32() / n as f32),
        ),
        ElemKind::I32 => go::<i32>(
            parts,
            out,
            op,
            |a, b| a.wrapping_add(b),
            |a, n| a / n as i32,
        ),
        ElemKind::I64 => go::<i64>(
            parts,
            out,
            op,
            |a, b| a.wrapping_add(b),
            |a, n| a / n as i64,
        ),
        ElemKind::U32 => go::<u32>(
            parts,
            out,
            op,
            |a, b| a.wrapping_add(b),
            |a, n| a / n as u32,
        ),
        ElemKind::U8 => go::<u8>(parts, out, op, |a, b| a.wrapping_add(b), |a, n| a / n as u8),
    }
    Ok(())
}

/// A communicator: this rank's view of the world.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `in-process`, `mpi`, `nccl`.
    fn backend(&self) -> &'static str;

    /// In place, over `group`.
    fn all_reduce_bytes(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()>;
    /// `recv` = every member's `send`, concatenated in group order.
    fn all_gather_bytes(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// Reduces `send` (group size x `recv.len()`) and keeps this member's chunk.
    fn reduce_scatter_bytes(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()>;
    /// `buf` of the member with global rank `root`, to every member.
    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()>;
    fn send_bytes(&self, dst: usize, tag: u64, buf: &[u8]) -> Result<()>;
    fn recv_bytes(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<()>;
    fn barrier(&self, group: &[usize]) -> Result<()>;

    /// Starts [`Self::reduce_scatter_bytes`] of `send` (kept alive by the collective until it
    /// completes) and returns without waiting for the peers; [`Work::wait`] gives this member's
    /// chunk. The same bits as the blocking call. Backends without a nonblocking path do the
    /// whole collective here.
    fn reduce_scatter_start(
        self: std::sync::Arc<Self>,
        group: &[usize],
        send: std::sync::Arc<dyn SendBuffer>,
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>> {
        work::reduce_scatter_now(&*self, group, &*send, kind, op)
    }

    /// The device-memory collectives of a backend that runs them on CUDA storage without host
    /// copies (NCCL). Others return None and tensors on a GPU cross through host memory.
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Option<&dyn CudaCollectives> {
        None
    }
}

/// Collectives on CUDA storage. Every buffer is a whole storage (contiguous from offset 0), and
/// the operations are ordered on the device's stream with the kernels that made the data.
#[cfg(feature = "cuda")]
pub trait CudaCollectives: Send + Sync {
    fn all_reduce_cuda(
        &self,
        group: &[usize],
        buf: &mut candle_core::CudaStorage,
        op: ReduceOp,
    ) -> Result<()>;
    /// `recv` holds every member's `send`, in group order.
    fn all_gather_cuda(
        &self,
        group: &[usize],
        send: &candle_core::CudaStorage,
        recv: &mut candle_core::CudaStorage,
    ) -> Result<()>;
    /// `send` holds one `recv`-sized chunk per member; this member keeps its reduced chunk.
    fn reduce_scatter_cuda(
        &self,
        group: &[usize],
        send: &candle_core::CudaStorage,
        recv: &mut candle_core::CudaStorage,
        op: ReduceOp,
    ) -> Result<()>;
    fn broadcast_cuda(
        &self,
        group: &[usize],
        buf: &mut candle_core::CudaStorage,
        root: usize,
    ) -> Result<()>;
    fn send_cuda(&self, dst: usize, tag: u64, buf: &candle_core::CudaStorage) -> Result<()>;
    fn recv_cuda(&self, src: usize, tag: u64, buf: &mut candle_core::CudaStorage) -> Result<()>;
}

/// Typed collectives.
impl dyn Communicator + '_ {
    pub fn all_reduce<T: Element>(
        &self,
        group: &[usize],
        data: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_bytes(group, bytemuck::cast_slice_mut(data), T::KIND, op)
    }

    pub fn all_gather<T: Element>(
        &self,
        group: &[usize],
        send: &[T],
        recv: &mut [T],
    ) -> Result<()> {
        self.all_gather_bytes(
            group,
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
        )
    }

    pub fn reduce_scatter<T: Element>(
        &self,
        group: &[usize],
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.reduce_scatter_bytes(
            group,
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
            T::KIND,
            op,
        )
    }

    pub fn broadcast<T: Element>(
        &self,
        group: &[usize],
        data: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.broadcast_bytes(group, bytemuck::cast_slice_mut(data), root)
    }

    pub fn send<T: Element>(&self, dst: usize, tag: u64, data: &[T]) -> Result<()> {
        self.send_bytes(dst, tag, bytemuck::cast_slice(data))
    }

    pub fn recv<T: Element>(&self, src: usize, tag: u64, data: &mut [T]) -> Result<()> {
        self.recv_bytes(src, tag, bytemuck::cast_slice_mut(data))
    }

    /// All-reduce of a tensor (any device and float dtype; the result on the same device, in
    /// the same dtype). On a GPU with a device backend (NCCL) no byte crosses host memory.
    pub fn all_reduce_tensor(&self, group: &[usize], t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if group.len() == 1 {
            return Ok(t.clone());
        }
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), t.device().is_cuda()) {
            return device::all_reduce(cc, group, t, op);
        }
        let mut v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.all_reduce(group, &mut v, op)?;
        Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())
    }

    /// Every member's `t` stacked in group order: shape `(group, ..t.shape)`.
    pub fn all_gather_tensor(&self, group: &[usize], t: &Tensor) -> Result<Tensor> {
        let mut dims = vec![group.len()];
        dims.extend_from_slice(t.dims());
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), t.device().is_cuda()) {
            return device::all_gather(cc, group, t, dims);
        }
        let send = host_f32(t)?;
        let mut recv = vec![0f32; send.len() * group.len()];
        self.all_gather(group, &send, &mut recv)?;
        Tensor::from_vec(recv, dims, t.device())?.to_dtype(t.dtype())
    }

    /// Reduces `t` (`group` equal chunks along dim 0) and returns this member's chunk.
    pub fn reduce_scatter_tensor(
        &self,
        group: &[usize],
        t: &Tensor,
        op: ReduceOp,
    ) -> Result<Tensor> {
        let n = group.len();
        let rows = t.dim(0)?;
        if rows % n != 0 {
            bail!("reduce_scatter: {rows} rows do not split over {n} members")
        }
        let mut dims = t.dims().to_vec();
        dims[0] = rows / n;
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), t.device().is_cuda()) {
            return device::reduce_scatter(cc, group, t, dims, op);
        }
        let send = host_f32(t)?;
        let mut recv = vec![0f32; send.len() / n];
        self.reduce_scatter(group, &send, &mut recv, op)?;
        Tensor::from_vec(recv, dims, t.device())?.to_dtype(t.dtype())
    }

    /// The `t` of the member with global rank `root`, on every member.
    pub fn broadcast_tensor(&self, group: &[usize], t: &Tensor, root: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), t.device().is_cuda()) {
            return device::broadcast(cc, group, t, root);
        }
        let mut v = host_f32(t)?;
        self.broadcast(group, &mut v, root)?;
        Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())
    }

    /// Sends `t`'s elements to `dst` (the receiver knows shape and dtype). Float tensors cross
    /// as f32 through host memory, or as they are in device memory with a device backend.
    pub fn send_tensor(&self, dst: usize, tag: u64, t: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), t.device().is_cuda()) {
            return device::send(cc, dst, tag, t);
        }
        let flat = t.flatten_all()?;
        match t.dtype() {
            candle_core::DType::U32 => self.send(dst, tag, &flat.to_vec1::<u32>()?),
            _ => self.send(dst, tag, &host_f32(t)?),
        }
    }

    /// Receives what [`Self::send_tensor`] sent: a tensor of `shape` and `dtype` on `device`.
    pub fn recv_tensor(
        &self,
        src: usize,
        tag: u64,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(cc), true) = (self.cuda(), device.is_cuda()) {
            return device::recv(cc, src, tag, shape, dtype, device);
        }
        let n: usize = shape.iter().product();
        if dtype == candle_core::DType::U32 {
            let mut v = vec![0u32; n];
            self.recv(src, tag, &mut v)?;
            return Tensor::from_vec(v, shape, device);
        }
        let mut v = vec![0f32; n];
        self.recv(src, tag, &mut v)?;
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}

/// `all_gather` buffers: `recv` holds one `send` per member.
pub fn check_all_gather(group: &[usize], send_len: usize, recv_len: usize) -> Result<()> {
    if recv_len != send_len * group.len() {
        bail!(
            "all_gather: receive buffer of {recv_len} for {} x {send_len}",
            group.len()
        )
    }
    Ok(())
}

/// `reduce_scatter` buffers: `send` holds one `recv`-sized chunk per member.
pub fn check_reduce_scatter(group: &[usize], send_len: usize, recv_len: usize) -> Result<()> {
    if send_len != recv_len * group.len() {
        bail!(
            "reduce_scatter: send buffer of {send_len} for {} x {recv_len}",
            group.len()
        )
    }
    Ok(())
}

/// The index of `rank` within `group`, or an error naming both.
pub fn group_index(group: &[usize], rank: usize, what: &str) -> Result<usize> {
    group.iter().position(|&r| r == rank).ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: rank {rank} is not in group {group:?}"))
    })
}

/// A group of ranks as seen from one member: the communicator, the members' global ranks in group
/// order, and this rank's index among them.
#[derive(Clone)]
pub struct ProcessGroup {
    pub comm: std::sync::Arc<dyn Communicator>,
    pub group: Vec<usize>,
    pub rank: usize,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup(member {} of {:?})", self.rank, self.group)
    }
}

impl ProcessGroup {
    pub fn new(comm: std::sync::Arc<dyn Communicator>, group: Vec<usize>) -> Result<Self> {
        let rank = group_index(&group, comm.rank(), "process group")?;
        Ok(Self { comm, group, rank })
    }

    pub fn size(&self) -> usize {
        self.group.len()
    }

    /// Sum (or max/avg) of `data` over the group, in place.
    pub fn all_reduce<T: Element>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        if self.size() == 1 && op != ReduceOp::Avg {
            return Ok(());
        }
        self.comm.all_reduce(&self.group, data, op)
    }
}

/// A rank's communicator, however the caller holds it: `Arc<InProcessComm>`, `Arc<MpiComm>`,
/// `Arc<dyn Communicator>`, or `()` (and `None`) for a world of one — no `Arc<dyn>` cast needed.
pub trait IntoComm {
    fn into_comm(self) -> Option<std::sync::Arc<dyn Communicator>>;
}

impl IntoComm for () {
    fn into_comm(self) -> Option<std::sync::Arc<dyn Communicator>> {
        None
    }
}

impl<C: Communicator + 'static> IntoComm for std::sync::Arc<C> {
    fn into_comm(self) -> Option<std::sync::Arc<dyn Communicator>> {
        Some(self)
    }
}

impl IntoComm for std::sync::Arc<dyn Communicator> {
    fn into_comm(self) -> Option<std::sync::Arc<dyn Communicator>> {
        Some(self)
    }
}

impl<T: IntoComm> IntoComm for Option<T> {
    fn into_comm(self) -> Option<std::sync::Arc<dyn Communicator>> {
        self.and_then(IntoComm::into_comm)
    }
}

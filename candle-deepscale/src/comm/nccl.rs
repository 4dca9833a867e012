//! The NCCL backend (feature `nccl`): one rank per GPU, collectives in device memory.
//!
//! Bootstrap (the NCCL unique id reaching every rank): [`NcclComm::in_process`] for several GPUs
//! driven by one process (`ncclCommInitAll`), [`NcclComm::from_mpi`] under `mpirun` (rank 0's id
//! broadcast over MPI), [`NcclComm::from_tcp`] for torchrun-style environments (rank 0 hands the
//! id over a TCP rendezvous on `MASTER_PORT + 1`, as torch's TCPStore does), or
//! [`NcclComm::from_file`] (rank 0 writes the id to a file on a path every rank sees, as torch's
//! `file://` init). The device of a rank is its local rank modulo the GPUs
//! present ([`local_device_ordinal`]).
//!
//! Sub-groups get their own NCCL communicator on first use: the group's first member creates an
//! id and sends it to the others over the world communicator, then the members initialise it.
//! Collectives run on the candle device's stream, so they are ordered with the kernels that made
//! their inputs. Host-buffer collectives wait for completion against the deadline; device ones are
//! watched by a thread: a collective not complete by its deadline aborts every communicator of the
//! rank (which releases the stuck kernels) and every later call fails naming it: never a hang.
//! Reductions are NCCL's (ring/tree order), so results match the host backends to rounding, not
//! bit for bit.
use super::{
    check_all_gather, check_reduce_scatter, group_index, Communicator, CudaCollectives, ElemKind,
    ReduceOp,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::CudaStorageSlice as S;
use candle_core::{bail, CudaStorage, Device, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The GPU of a rank: its local rank on the node (launcher variables, else the global rank)
/// modulo the number of GPUs.
pub fn local_device_ordinal(rank: usize) -> Result<usize> {
    let local = [
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
    .unwrap_or(rank);
    let n = cudarc::driver::CudaContext::device_count().map_err(nccl_err("cuDeviceGetCount"))?;
    if n <= 0 {
        bail!("no CUDA device is visible to rank {rank}")
    }
    Ok(local % n as usize)
}

fn nccl_err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Msg(format!("{what}: {e:?}"))
}

/// An NCCL communicator handle; null once aborted.
struct RawComm(Mutex<sys::ncclComm_t>);

// SAFETY: an NCCL communicator may be used from any thread; calls are serialised by the rank's
// lock, and the handle is only freed by Drop or abort (both exclusive).
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

impl RawComm {
    fn handle(&self) -> Result<sys::ncclComm_t> {
        let h = *self
            .0
            .lock()
            .map_err(|_| Error::Msg("nccl: poisoned".into()))?;
        if h.is_null() {
            bail!("nccl: the communicator was aborted after an earlier failure")
        }
        Ok(h)
    }

    fn abort(&self) {
        if let Ok(mut h) = self.0.lock() {
            if !h.is_null() {
                // SAFETY: a live handle, aborted once and then forgotten.
                unsafe {
                    let _ = result::comm_abort(*h);
                }
                *h = std::ptr::null_mut();
            }
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if let Ok(h) = self.0.get_mut() {
            if !h.is_null() {
                // SAFETY: the last owner of a live handle.
                unsafe {
                    let _ = result::comm_destroy(*h);
                }
            }
        }
    }
}

/// Device collectives issued but maybe not yet complete, with their deadlines.
struct Watch {
    pending: Mutex<VecDeque<(CudaEvent, Instant, String)>>,
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
}

struct Inner {
    rank: usize,
    size: usize,
    stream: Arc<CudaStream>,
    world: Arc<RawComm>,
    groups: Mutex<HashMap<Vec<usize>, Arc<RawComm>>>,
    lock: Mutex<()>,
    timeout: Duration,
    watch: Watch,
}

/// A rank's NCCL communicator (see the module docs).
pub struct NcclComm {
    inner: Arc<Inner>,
}

fn datatype(kind: ElemKind) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as D;
    match kind {
        ElemKind::F32 => D::ncclFloat32,
        ElemKind::F64 => D::ncclFloat64,
        ElemKind::F16 => D::ncclFloat16,
        ElemKind::BF16 => D::ncclBfloat16,
        ElemKind::I32 => D::ncclInt32,
        ElemKind::I64 => D::ncclInt64,
        ElemKind::U32 => D::ncclUint32,
        ElemKind::U8 => D::ncclUint8,
    }
}

fn red_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
}

/// Raw device pointer, element count and kind of a whole storage. The pointer is valid while
/// `s` lives; the work using it is queued on `stream`, the stream candle uses for `s`.
fn raw(s: &CudaStorage, stream: &Arc<CudaStream>) -> Result<(u64, usize, ElemKind)> {
    macro_rules! ptr {
        ($v:expr, $k:expr) => {{
            let (p, _sync) = $v.device_ptr(stream);
            (p as u64, $v.len(), $k)
        }};
    }
    Ok(match &s.slice {
        S::F32(v) => ptr!(v, ElemKind::F32),
        S::F64(v) => ptr!(v, ElemKind::F64),
        S::F16(v) => ptr!(v, ElemKind::F16),
        S::BF16(v) => ptr!(v, ElemKind::BF16),
        S::I32(v) => ptr!(v, ElemKind::I32),
        S::I64(v) => ptr!(v, ElemKind::I64),
        S::U32(v) => ptr!(v, ElemKind::U32),
        S::U8(v) => ptr!(v, ElemKind::U8),
        _ => bail!("nccl: {:?} tensors are not carried", s.dtype()),
    })
}

fn raw_mut(s: &mut CudaStorage, stream: &Arc<CudaStream>) -> Result<(u64, usize, ElemKind)> {
    macro_rules! ptr {
        ($v:expr, $k:expr) => {{
            let n = $v.len();
            let (p, _sync) = $v.device_ptr_mut(stream);
            (p as u64, n, $k)
        }};
    }
    Ok(match &mut s.slice {
        S::F32(v) => ptr!(v, ElemKind::F32),
        S::F64(v) => ptr!(v, ElemKind::F64),
        S::F16(v) => ptr!(v, ElemKind::F16),
        S::BF16(v) => ptr!(v, ElemKind::BF16),
        S::I32(v) => ptr!(v, ElemKind::I32),
        S::I64(v) => ptr!(v, ElemKind::I64),
        S::U32(v) => ptr!(v, ElemKind::U32),
        S::U8(v) => ptr!(v, ElemKind::U8),
        _ => bail!("nccl: {:?} tensors are not carried", s.dtype()),
    })
}

fn cuda_stream(device: &Device) -> Result<Arc<CudaStream>> {
    Ok(device.as_cuda_device()?.cuda_stream())
}

impl NcclComm {
    fn from_raw(
        rank: usize,
        size: usize,
        stream: Arc<CudaStream>,
        comm: sys::ncclComm_t,
        timeout: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            rank,
            size,
            stream,
            world: Arc::new(RawComm(Mutex::new(comm))),
            groups: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
            timeout,
            watch: Watch {
                pending: Mutex::new(VecDeque::new()),
                failed: Mutex::new(None),
                stop: AtomicBool::new(false),
            },
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let Some(inner) = weak.upgrade() else { return };
                if inner.watch.stop.load(Ordering::Relaxed) {
                    return;
                }
                inner.sweep();
            })
            .ok();
        Self { inner }
    }

    /// A fresh NCCL unique id (rank 0 makes it; the bootstrap carries it to the others).
    pub fn unique_id() -> Result<[u8; 128]> {
        let id = result::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the world of `size` ranks named by `id` as `rank`, on the CUDA `device`.
    pub fn from_unique_id(
        device: &Device,
        rank: usize,
        size: usize,
        id: &[u8; 128],
        timeout: Duration,
    ) -> Result<Self> {
        let stream = cuda_stream(device)?;
        let comm = init_rank(&stream, rank, size, id)?;
        Ok(Self::from_raw(rank, size, stream, comm, timeout))
    }

    /// Several GPUs in one process (`ncclCommInitAll`): rank i drives `devices[i]`, each from
    /// its own thread.
    pub fn in_process(devices: &[Device], timeout: Duration) -> Result<Vec<Self>> {
        let streams = devices
            .iter()
            .map(cuda_stream)
            .collect::<Result<Vec<_>>>()?;
        let ordinals: Vec<i32> = streams
            .iter()
            .map(|s| s.context().ordinal() as i32)
            .collect();
        let mut comms = vec![std::ptr::null_mut(); streams.len()];
        // SAFETY: `comms` has room for one handle per ordinal.
        unsafe {
            result::comm_init_all(comms.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr())
                .map_err(nccl_err("ncclCommInitAll"))?;
        }
        let n = streams.len();
        Ok(streams
            .into_iter()
            .zip(comms)
            .enumerate()
            .map(|(r, (s, c))| Self::from_raw(r, n, s, c, timeout))
            .collect())
    }

    /// Bootstrap through a file every rank can read (`--comm-file`): rank 0 writes a fresh id
    /// (atomically, by rename), the others wait for it until `timeout`.
    pub fn from_file(
        device: &Device,
        rank: usize,
        size: usize,
        path: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self> {
        let id = if rank == 0 {
            let id = Self::unique_id()?;
            let mut body = format!("deepscale-nccl-id {size}\n").into_bytes();
            body.extend_from_slice(&id);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &body)
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| Error::Msg(format!("--comm-file {}: {e}", path.display())))?;
            id
        } else {
            read_id_file(path, size, timeout)?
        };
        Self::from_unique_id(device, rank, size, &id, timeout)
    }

    /// Bootstrap for torchrun / `deepspeed`-launcher environments outside MPI: rank 0 makes the
    /// id and hands it to the others over [`super::tcp_rendezvous`] at `host:port`
    /// (`MASTER_ADDR`, `MASTER_PORT + 1`: see [`super::tcp_rendezvous::address_from_env`]).
    pub fn from_tcp(
        device: &Device,
        rank: usize,
        size: usize,
        (host, port): (&str, u16),
        timeout: Duration,
    ) -> Result<Self> {
        let mine = if rank == 0 {
            Some(Self::unique_id()?)
        } else {
            None
        };
        let got = super::tcp_rendezvous::exchange(
            host,
            port,
            rank,
            size,
            mine.as_ref().map(|m| &m[..]),
            timeout,
        )?;
        let id: [u8; 128] = got.as_slice().try_into().map_err(|_| {
            Error::Msg(format!(
                "rendezvous at {host}:{port}: rank 0 sent {} bytes, not a 128-byte NCCL id",
                got.len()
            ))
        })?;
        Self::from_unique_id(device, rank, size, &id, timeout)
    }

    /// Bootstrap under `mpirun`: rank 0's id broadcast over MPI.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &super::mpi::MpiComm, device: &Device, timeout: Duration) -> Result<Self> {
        let (rank, size) = (mpi.rank(), mpi.world_size());
        let mut id = if rank == 0 {
            Self::unique_id()?
        } else {
            [0u8; 128]
        };
        let world: Vec<usize> = (0..size).collect();
        mpi.broadcast_bytes(&world, &mut id, 0)?;
        Self::from_unique_id(device, rank, size, &id, timeout)
    }

    /// The rank's CUDA stream (where every collective is queued).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }
}

fn init_rank(
    stream: &Arc<CudaStream>,
    rank: usize,
    size: usize,
    id: &[u8; 128],
) -> Result<sys::ncclComm_t> {
    stream
        .context()
        .bind_to_thread()
        .map_err(nccl_err("cuCtxSetCurrent"))?;
    let id = sys::ncclUniqueId {
        internal: id.map(|b| b as core::ffi::c_char),
    };
    let mut comm = std::mem::MaybeUninit::uninit();
    // SAFETY: `comm` receives the new handle.
    unsafe {
        result::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32)
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(comm.assume_init())
    }
}

fn read_id_file(path: &std::path::Path, size: usize, timeout: Duration) -> Result<[u8; 128]> {
    let deadline = Instant::now() + timeout;
    let header = format!("deepscale-nccl-id {size}\n");
    loop {
        if let Ok(body) = std::fs::read(path) {
            if body.len() == header.len() + 128 && body.starts_with(header.as_bytes()) {
                let mut id = [0u8; 128];
                id.copy_from_slice(&body[header.len()..]);
                return Ok(id);
            }
            if body.starts_with(b"deepscale-nccl-id ") && !body.starts_with(header.as_bytes()) {
                bail!(
                    "--comm-file {}: written for another world size (this run has {size} ranks)",
                    path.display()
                )
            }
        }
        if Instant::now() > deadline {
            bail!(
                "--comm-file {}: rank 0 did not write the NCCL id within {:?}",
                path.display(),
                timeout
            )
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Inner {
    fn check_failed(&self) -> Result<()> {
        if let Some(msg) = self.watch.failed.lock().ok().and_then(|f| f.clone()) {
            bail!("nccl rank {}: {msg}", self.rank)
        }
        Ok(())
    }

    /// Drops completed collectives; aborts everything when the oldest is past its deadline.
    fn sweep(&self) {
        let Ok(mut pending) = self.watch.pending.lock() else {
            return;
        };
        while let Some((ev, deadline, what)) = pending.front() {
            if ev.is_complete() {
                pending.pop_front();
            } else if Instant::now() > *deadline {
                let msg = format!(
                    "{what} did not complete within {:?} (a peer died or is stuck); \
                     communicators aborted",
                    self.timeout
                );
                pending.clear();
                drop(pending);
                self.abort_all(msg);
                return;
            } else {
                break;
            }
        }
    }

    fn abort_all(&self, msg: String) {
        if let Ok(mut f) = self.watch.failed.lock() {
            f.get_or_insert(msg);
        }
        self.world.abort();
        if let Ok(g) = self.groups.lock() {
            g.values().for_each(|c| c.abort());
        }
    }

    /// Queues `f` on the stream with the communicator of `group`, then registers its completion
    /// with the watchdog (`wait`: also block until it completes, for host buffers).
    fn run(
        &self,
        what: &str,
        group: &[usize],
        wait: bool,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
    ) -> Result<()> {
        self.check_failed()?;
        let comm = self.comm_for(group)?;
        let _serial = self
            .lock
            .lock()
            .map_err(|_| Error::Msg("nccl: poisoned".into()))?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(nccl_err("cuCtxSetCurrent"))?;
        f(comm.handle()?, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| Error::Msg(format!("nccl rank {}: {what}: {e}", self.rank)))?;
        let ev = self
            .stream
            .record_event(None)
            .map_err(nccl_err("cuEventRecord"))?;
        let deadline = Instant::now() + self.timeout;
        let what = format!("{what} over ranks {group:?}");
        if !wait {
            if let Ok(mut p) = self.watch.pending.lock() {
                p.push_back((ev, deadline, what));
            }
            return Ok(());
        }
        while !ev.is_complete() {
            if Instant::now() > deadline {
                let msg = format!("{what} did not complete within {:?}", self.timeout);
                self.abort_all(msg);
                return self.check_failed();
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        self.check_failed()
    }

    /// The communicator of `group` (the world's, or a sub-group's made on first use).
    fn comm_for(&self, group: &[usize]) -> Result<Arc<RawComm>> {
        if group.len() == self.size && group.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(self.world.clone());
        }
        if let Some(c) = self.groups.lock().ok().and_then(|g| g.get(group).cloned()) {
            return Ok(c);
        }
        let me = group_index(group, self.rank, "nccl group")?;
        let world = self.world.handle()?;
        let stream = self.stream.clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(nccl_err("cuCtxSetCurrent"))?;
        // The id travels over the world communicator, from the group's first member.
        let mut buf = stream
            .alloc_zeros::<u8>(128)
            .map_err(nccl_err("cuMemAlloc"))?;
        let id = if me == 0 {
            let id = NcclComm::unique_id()?;
            stream
                .memcpy_htod(&id, &mut buf)
                .map_err(nccl_err("cuMemcpyHtoD"))?;
            let (p, _sync) = buf.device_ptr(&stream);
            for &m in &group[1..] {
                // SAFETY: `buf` holds 128 bytes on this stream's device.
                unsafe {
                    result::send(
                        p as *const _,
                        128,
                        sys::ncclDataType_t::ncclUint8,
                        m as i32,
                        world,
                        stream.cu_stream() as _,
                    )
                    .map_err(nccl_err("ncclSend (group id)"))?;
                }
            }
            id
        } else {
            {
                let (p, _sync) = buf.device_ptr_mut(&stream);
                // SAFETY: as above.
                unsafe {
                    result::recv(
                        p as *mut _,
                        128,
                        sys::ncclDataType_t::ncclUint8,
                        group[0] as i32,
                        world,
                        stream.cu_stream() as _,
                    )
                    .map_err(nccl_err("ncclRecv (group id)"))?;
                }
            }
            let v = stream.clone_dtoh(&buf).map_err(nccl_err("cuMemcpyDtoH"))?;
            let mut id = [0u8; 128];
            id.copy_from_slice(&v);
            id
        };
        stream
            .synchronize()
            .map_err(nccl_err("cuStreamSynchronize"))?;
        let comm = Arc::new(RawComm(Mutex::new(init_rank(
            &stream,
            me,
            group.len(),
            &id,
        )?)));
        if let Ok(mut g) = self.groups.lock() {
            g.insert(group.to_vec(), comm.clone());
        }
        Ok(comm)
    }

    fn peer(&self, group: &[usize], global: usize, what: &str) -> Result<i32> {
        Ok(group_index(group, global, what)? as i32)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.inner.watch.stop.store(true, Ordering::Relaxed);
    }
}

/// Host bytes staged through device memory for the host-buffer collectives.
fn stage(inner: &Inner, bytes: &[u8]) -> Result<cudarc::driver::CudaSlice<u8>> {
    inner
        .stream
        .context()
        .bind_to_thread()
        .map_err(nccl_err("cuCtxSetCurrent"))?;
    if bytes.is_empty() {
        return inner
            .stream
            .alloc_zeros::<u8>(1)
            .map_err(nccl_err("cuMemAlloc"));
    }
    inner
        .stream
        .clone_htod(bytes)
        .map_err(nccl_err("cuMemcpyHtoD"))
}

fn unstage(inner: &Inner, d: &cudarc::driver::CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    inner
        .stream
        .memcpy_dtoh(&d.slice(..out.len()), out)
        .map_err(nccl_err("cuMemcpyDtoH"))?;
    inner
        .stream
        .synchronize()
        .map_err(nccl_err("cuStreamSynchronize"))
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.inner.rank
    }
    fn world_size(&self) -> usize {
        self.inner.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_bytes(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let i = &self.inner;
        let mut d = stage(i, buf)?;
        let n = buf.len() / kind.size();
        i.run("all_reduce", group, true, |c, s| {
            let (p, _sync) = d.device_ptr_mut(&i.stream);
            // SAFETY: `d` holds `n` elements of `kind`, in place.
            unsafe {
                result::all_reduce(
                    p as *const _,
                    p as *mut _,
                    n,
                    datatype(kind),
                    red_op(op),
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclAllReduce"))
        })?;
        unstage(i, &d, buf)
    }

    fn all_gather_bytes(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_all_gather(group, send.len(), recv.len())?;
        let i = &self.inner;
        let sd = stage(i, send)?;
        let mut rd = stage(i, recv)?;
        i.run("all_gather", group, true, |c, s| {
            let (sp, _a) = sd.device_ptr(&i.stream);
            let (rp, _b) = rd.device_ptr_mut(&i.stream);
            // SAFETY: `rd` has room for every member's `send.len()` bytes.
            unsafe {
                result::all_gather(
                    sp as *const _,
                    rp as *mut _,
                    send.len(),
                    sys::ncclDataType_t::ncclUint8,
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclAllGather"))
        })?;
        unstage(i, &rd, recv)
    }

    fn reduce_scatter_bytes(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        check_reduce_scatter(group, send.len(), recv.len())?;
        let i = &self.inner;
        let sd = stage(i, send)?;
        let mut rd = stage(i, recv)?;
        i.run("reduce_scatter", group, true, |c, s| {
            let (sp, _a) = sd.device_ptr(&i.stream);
            let (rp, _b) = rd.device_ptr_mut(&i.stream);
            // SAFETY: `sd` holds one `recv`-sized chunk per member.
            unsafe {
                result::reduce_scatter(
                    sp as *const _,
                    rp as *mut _,
                    recv.len() / kind.size(),
                    datatype(kind),
                    red_op(op),
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclReduceScatter"))
        })?;
        unstage(i, &rd, recv)
    }

    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        let i = &self.inner;
        let r = i.peer(group, root, "broadcast root")?;
        let mut d = stage(i, buf)?;
        let n = buf.len();
        i.run("broadcast", group, true, |c, s| {
            let (p, _sync) = d.device_ptr_mut(&i.stream);
            // SAFETY: in place over `n` bytes.
            unsafe {
                result::broadcast(
                    p as *const _,
                    p as *mut _,
                    n,
                    sys::ncclDataType_t::ncclUint8,
                    r,
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclBroadcast"))
        })?;
        unstage(i, &d, buf)
    }

    fn send_bytes(&self, dst: usize, _tag: u64, buf: &[u8]) -> Result<()> {
        // NCCL matches point-to-point calls by order between a pair of ranks, which is how the
        // pipeline uses tags (one stream of messages per pair and direction).
        let i = &self.inner;
        let d = stage(i, buf)?;
        let world: Vec<usize> = (0..i.size).collect();
        i.run(&format!("send to {dst}"), &world, true, |c, s| {
            let (p, _sync) = d.device_ptr(&i.stream);
            // SAFETY: `d` holds `buf.len()` bytes.
            unsafe {
                result::send(
                    p as *const _,
                    buf.len(),
                    sys::ncclDataType_t::ncclUint8,
                    dst as i32,
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclSend"))
        })
    }

    fn recv_bytes(&self, src: usize, _tag: u64, buf: &mut [u8]) -> Result<()> {
        let i = &self.inner;
        let mut d = stage(i, buf)?;
        let world: Vec<usize> = (0..i.size).collect();
        let n = buf.len();
        i.run(&format!("recv from {src}"), &world, true, |c, s| {
            let (p, _sync) = d.device_ptr_mut(&i.stream);
            // SAFETY: room for `n` bytes.
            unsafe {
                result::recv(
                    p as *mut _,
                    n,
                    sys::ncclDataType_t::ncclUint8,
                    src as i32,
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclRecv"))
        })?;
        unstage(i, &d, buf)
    }

    fn barrier(&self, group: &[usize]) -> Result<()> {
        // A one-element all-reduce completes only when every member has joined.
        let mut one = [0u8; 4];
        self.all_reduce_bytes(group, &mut one, ElemKind::F32, ReduceOp::Sum)
    }

    fn cuda(&self) -> Option<&dyn CudaCollectives> {
        Some(self)
    }
}

impl CudaCollectives for NcclComm {
    fn all_reduce_cuda(&self, group: &[usize], buf: &mut CudaStorage, op: ReduceOp) -> Result<()> {
        let i = &self.inner;
        i.run("all_reduce", group, false, |c, s| {
            let (p, n, kind) = raw_mut(buf, &i.stream)?;
            // SAFETY: a whole storage of `n` elements of `kind`, in place.
            unsafe {
                result::all_reduce(
                    p as *const _,
                    p as *mut _,
                    n,
                    datatype(kind),
                    red_op(op),
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclAllReduce"))
        })
    }

    fn all_gather_cuda(
        &self,
        group: &[usize],
        send: &CudaStorage,
        recv: &mut CudaStorage,
    ) -> Result<()> {
        let i = &self.inner;
        i.run("all_gather", group, false, |c, s| {
            let (sp, n, kind) = raw(send, &i.stream)?;
            let (rp, m, rkind) = raw_mut(recv, &i.stream)?;
            if rkind != kind {
                bail!("all_gather: {kind:?} sent into a {rkind:?} buffer")
            }
            check_all_gather(group, n, m)?;
            // SAFETY: `recv` holds one `send` per member.
            unsafe { result::all_gather(sp as *const _, rp as *mut _, n, datatype(kind), c, s) }
                .map(|_| ())
                .map_err(nccl_err("ncclAllGather"))
        })
    }

    fn reduce_scatter_cuda(
        &self,
        group: &[usize],
        send: &CudaStorage,
        recv: &mut CudaStorage,
        op: ReduceOp,
    ) -> Result<()> {
        let i = &self.inner;
        i.run("reduce_scatter", group, false, |c, s| {
            let (sp, n, kind) = raw(send, &i.stream)?;
            let (rp, m, rkind) = raw_mut(recv, &i.stream)?;
            if rkind != kind {
                bail!("reduce_scatter: {kind:?} reduced into a {rkind:?} buffer")
            }
            check_reduce_scatter(group, n, m)?;
            // SAFETY: `send` holds one `recv`-sized chunk per member.
            unsafe {
                result::reduce_scatter(
                    sp as *const _,
                    rp as *mut _,
                    m,
                    datatype(kind),
                    red_op(op),
                    c,
                    s,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclReduceScatter"))
        })
    }

    fn broadcast_cuda(&self, group: &[usize], buf: &mut CudaStorage, root: usize) -> Result<()> {
        let i = &self.inner;
        let r = i.peer(group, root, "broadcast root")?;
        i.run("broadcast", group, false, |c, s| {
            let (p, n, kind) = raw_mut(buf, &i.stream)?;
            // SAFETY: in place over a whole storage.
            unsafe { result::broadcast(p as *const _, p as *mut _, n, datatype(kind), r, c, s) }
                .map(|_| ())
                .map_err(nccl_err("ncclBroadcast"))
        })
    }

    fn send_cuda(&self, dst: usize, _tag: u64, buf: &CudaStorage) -> Result<()> {
        let i = &self.inner;
        let world: Vec<usize> = (0..i.size).collect();
        i.run(&format!("send to {dst}"), &world, false, |c, s| {
            let (p, n, kind) = raw(buf, &i.stream)?;
            // SAFETY: a whole storage; it lives until the op completes because candle keeps
            // the tensor alive through the in-place op and the stream orders its reuse.
            unsafe { result::send(p as *const _, n, datatype(kind), dst as i32, c, s) }
                .map(|_| ())
                .map_err(nccl_err("ncclSend"))
        })
    }

    fn recv_cuda(&self, src: usize, _tag: u64, buf: &mut CudaStorage) -> Result<()> {
        let i = &self.inner;
        let world: Vec<usize> = (0..i.size).collect();
        i.run(&format!("recv from {src}"), &world, false, |c, s| {
            let (p, n, kind) = raw_mut(buf, &i.stream)?;
            // SAFETY: room for the whole message.
            unsafe { result::recv(p as *mut _, n, datatype(kind), src as i32, c, s) }
                .map(|_| ())
                .map_err(nccl_err("ncclRecv"))
        })
    }
}

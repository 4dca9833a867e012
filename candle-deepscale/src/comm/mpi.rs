//! The Open MPI backend (feature `mpi`): one rank per process, launched by `mpirun`.
//!
//! Open MPI has no fault tolerance, so every operation is issued non-blocking and polled against a
//! deadline; a rank that times out (or whose caller fails, see [`MpiComm::abort`]) ends the whole job
//! with `MPI_Abort` and a message naming the collective: never a hang. Sub-group communicators are
//! created on first use with `MPI_Comm_create_group`, which only the group's members call.
//! Reductions sum in group order, so results are bit-identical on every rank and to the in-process
//! backend, whatever MPI's own reduction tree would associate: reduce-scatter is direct (an
//! all-to-all hands each rank the n pieces of its own chunk, which it sums in group order: (n-1)/n
//! of the data per rank, as a ring moves, but a ring would sum in rotated order and change the
//! rounding for n >= 3); all-reduce is that reduce-scatter followed by an all-gather of the
//! reduced chunks (small buffers, where latency rules: one all-gather of the whole buffers).
use super::{
    check_all_gather, check_reduce_scatter, group_index, reduce_bytes, Communicator, ElemKind,
    ReduceOp, SendBuffer, Work,
};
use candle_core::{bail, Error, Result};
use mpi::environment::{Threading, Universe};
use mpi::request::{Request, Scope, StaticScope};
use mpi::topology::{Communicator as _, Group as _, SimpleCommunicator};
use mpi::traits::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// True when this process was started by an MPI launcher.
pub fn launched_by_mpirun() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

pub struct MpiComm {
    world: SimpleCommunicator,
    groups: Mutex<HashMap<Vec<usize>, SimpleCommunicator>>,
    /// MPI runs at `MPI_THREAD_SERIALIZED`: one call at a time.
    lock: Mutex<()>,
    /// Receive buffers of the direct reduce-scatter (the pieces, the reduced chunk), kept between
    /// calls up to [`KEPT_SCRATCH`] bytes: a fresh large buffer costs a page fault per 4 KiB.
    scratch: Mutex<(Vec<u8>, Vec<u8>)>,
    timeout: Duration,
    rank: usize,
    size: usize,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

// SAFETY: every MPI call goes through `lock` (MPI_THREAD_SERIALIZED), and the handles are plain
// integers/pointers owned by the MPI library for the life of the universe.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process).
    pub fn init(timeout: Duration) -> Result<Self> {
        let Some((universe, level)) = mpi::initialize_with_threading(Threading::Serialized) else {
            bail!("MPI is already initialised in this process")
        };
        if level < Threading::Serialized {
            bail!("this MPI library offers threading level {level:?}; DeepScale needs Serialized")
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            groups: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
            scratch: Mutex::new((Vec::new(), Vec::new())),
            timeout,
            rank,
            size,
            _universe: universe,
        })
    }

    /// Ends the whole job with a message: the only safe way out of a failed collective in MPI.
    pub fn abort(&self, msg: &str) -> ! {
        eprintln!("deepscale rank {}: {msg}; aborting the MPI job", self.rank);
        self.world.abort(1)
    }

    fn with_group<R>(
        &self,
        group: &[usize],
        op: &str,
        f: impl FnOnce(&SimpleCommunicator) -> R,
    ) -> Result<R> {
        group_index(group, self.rank, op)?;
        if let Some(&bad) = group.iter().find(|&&r| r >= self.size) {
            bail!(
                "{op}: rank {bad} in group {group:?} is outside the world of {}",
                self.size
            )
        }
        if group.len() == self.size && group.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(f(&self.world));
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if !groups.contains_key(group) {
            let ranks: Vec<i32> = group.iter().map(|&r| r as i32).collect();
            let g = self.world.group().include(&ranks);
            // A tag per group keeps concurrent creations of different groups apart.
            let tag = (group
                .iter()
                .fold(17usize, |h, r| h.wrapping_mul(31).wrapping_add(*r))
                % 30000) as i32;
            let comm = self
                .world
                .split_by_subgroup_with_tag(&g, tag)
                .ok_or_else(|| {
                    Error::Msg(format!(
                        "{op}: cannot create a communicator for group {group:?}"
                    ))
                })?;
            groups.insert(group.to_vec(), comm);
        }
        Ok(f(&groups[group]))
    }

    /// Polls `req` until it completes or the deadline passes (then aborts the job).
    fn wait<'a, R: ?Sized, S: Scope<'a>>(
        &self,
        op: &str,
        group: &[usize],
        mut req: Request<'a, R, S>,
    ) {
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() >= deadline {
                self.abort(&format!(
                    "{op} on group {group:?} timed out after {:.1} s (a peer died or stalled)",
                    self.timeout.as_secs_f64()
                ))
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn gather_all(&self, op: &'static str, group: &[usize], send: &[u8]) -> Result<Vec<u8>> {
        let mut recv = vec![0u8; send.len() * group.len()];
        self.gather_into(op, group, send, &mut recv)?;
        Ok(recv)
    }

    fn gather_into(&self, op: &str, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.with_group(group, op, |c| {
            mpi::request::scope(|scope| {
                let req = c.immediate_all_gather_into(scope, send, recv);
                self.wait(op, group, req);
            })
        })
    }

    /// The direct reduce-scatter: `send` holds one chunk per member; each member receives its own
    /// chunk's n pieces (an all-to-all) and reduces them in group order into `recv`.
    fn direct_reduce_scatter(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let pieces = sized(&mut scratch.0, send.len());
        {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.with_group(group, "reduce_scatter", |c| {
                mpi::request::scope(|scope| {
                    let req = c.immediate_all_to_all_into(scope, send, &mut pieces[..]);
                    self.wait("reduce_scatter", group, req);
                })
            })?;
        }
        let parts: Vec<&[u8]> = pieces.chunks(recv.len()).collect();
        let r = reduce_bytes(&parts, recv, kind, op);
        release(&mut scratch.0);
        r
    }

    /// All-reduce as a direct reduce-scatter of `padded` (a whole number of elements per member)
    /// and an all-gather of the reduced chunks back into it.
    fn reduce_scatter_all_gather(
        &self,
        group: &[usize],
        padded: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let chunk = padded.len() / group.len();
        let mut mine = {
            let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut s.1)
        };
        sized(&mut mine, chunk);
        self.direct_reduce_scatter(group, padded, &mut mine[..chunk], kind, op)?;
        self.gather_into("all_reduce", group, &mine[..chunk], padded)?;
        release(&mut mine);
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).1 = mine;
        Ok(())
    }
}

/// Scratch buffers larger than this are freed after use.
const KEPT_SCRATCH: usize = 64 << 20;

/// `v` with at least `len` bytes (old contents kept: it is overwritten), as a slice of `len`.
fn sized(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}

fn release(v: &mut Vec<u8>) {
    if v.len() > KEPT_SCRATCH {
        *v = Vec::new();
    }
}

/// Below this many bytes per rank an all-reduce is one all-gather of the whole buffers (one
/// latency) rather than a reduce-scatter and an all-gather (two).
const SMALL_ALL_REDUCE: usize = 64 << 10;

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_bytes(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        if group.len() == 1 {
            return group_index(group, self.rank, "all_reduce").map(|_| ());
        }
        let n = group.len();
        let size = kind.size();
        if buf.len() < SMALL_ALL_REDUCE || buf.len() < n * size {
            // Gather, then reduce locally in group order.
            let all = self.gather_all("all_reduce", group, buf)?;
            let parts: Vec<&[u8]> = all.chunks(buf.len()).collect();
            return reduce_bytes(&parts, buf, kind, op);
        }
        // Reduce-scatter, then all-gather, in place when the buffer splits into whole elements
        // per member; else through a copy padded to that (the padding is reduced and dropped).
        let chunk = buf.len().div_ceil(n * size) * size;
        if chunk * n == buf.len() {
            return self.reduce_scatter_all_gather(group, buf, kind, op);
        }
        let mut padded = buf.to_vec();
        padded.resize(chunk * n, 0);
        self.reduce_scatter_all_gather(group, &mut padded, kind, op)?;
        buf.copy_from_slice(&padded[..buf.len()]);
        Ok(())
    }

    fn all_gather_bytes(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_all_gather(group, send.len(), recv.len())?;
        self.gather_into("all_gather", group, send, recv)
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
        if group.len() == 1 || recv.is_empty() {
            recv.copy_from_slice(send);
            return Ok(());
        }
        self.direct_reduce_scatter(group, send, recv, kind, op)
    }

    fn reduce_scatter_start(
        self: Arc<Self>,
        group: &[usize],
        send: Arc<dyn SendBuffer>,
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>> {
        let len = send.bytes().len();
        check_reduce_scatter(group, len, len / group.len().max(1))?;
        let mut pieces = vec![0u8; len];
        // SAFETY: both buffers are heap memory the work owns (moving the Vec or the Arc does not
        // move it) and the request completes before they are freed (`MpiWork`'s drop waits).
        let (s, r): (&'static [u8], &'static mut [u8]) = unsafe {
            (
                std::slice::from_raw_parts(send.bytes().as_ptr(), len),
                std::slice::from_raw_parts_mut(pieces.as_mut_ptr(), len),
            )
        };
        let req = {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.with_group(group, "reduce_scatter", |c| {
                c.immediate_all_to_all_into(StaticScope, s, r)
            })?
        };
        Ok(Box::new(MpiWork {
            req: Some(req),
            comm: self,
            group: group.to_vec(),
            pieces,
            _send: send,
            kind,
            op,
        }))
    }

    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        let r = group_index(group, root, "broadcast root")? as i32;
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.with_group(group, "broadcast", |c| {
            mpi::request::scope(|scope| {
                let req = c.process_at_rank(r).immediate_broadcast_into(scope, buf);
                self.wait("broadcast", group, req);
            })
        })
    }

    fn send_bytes(&self, dst: usize, tag: u64, buf: &[u8]) -> Result<()> {
        if dst >= self.size {
            bail!(
                "send: destination rank {dst} is outside the world of {}",
                self.size
            )
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        mpi::request::scope(|scope| {
            let req = self
                .world
                .process_at_rank(dst as i32)
                .immediate_send_with_tag(scope, buf, (tag % 30000) as i32);
            self.wait(
                &format!("send to rank {dst} (tag {tag})"),
                &[self.rank, dst],
                req,
            );
        });
        Ok(())
    }

    fn recv_bytes(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<()> {
        if src >= self.size {
            bail!(
                "recv: source rank {src} is outside the world of {}",
                self.size
            )
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        mpi::request::scope(|scope| {
            let req = self
                .world
                .process_at_rank(src as i32)
                .immediate_receive_into_with_tag(scope, buf, (tag % 30000) as i32);
            self.wait(
                &format!("recv from rank {src} (tag {tag})"),
                &[src, self.rank],
                req,
            );
        });
        Ok(())
    }

    fn barrier(&self, group: &[usize]) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.with_group(group, "barrier", |c| {
            let req = c.immediate_barrier();
            self.wait("barrier", group, req);
        })
    }
}

/// A started direct reduce-scatter: the all-to-all of the pieces in flight (MPI moves it when
/// the process calls into MPI: `is_completed` is such a call), the sum in group order when
/// waited for.
struct MpiWork {
    /// Declared first: completed before the buffers it reads and writes are freed.
    req: Option<Request<'static, [u8], StaticScope>>,
    comm: Arc<MpiComm>,
    group: Vec<usize>,
    pieces: Vec<u8>,
    _send: Arc<dyn SendBuffer>,
    kind: ElemKind,
    op: ReduceOp,
}

// SAFETY: the request is a handle only touched under the communicator's lock (and through
// `&mut self`).
unsafe impl Send for MpiWork {}
unsafe impl Sync for MpiWork {}

impl MpiWork {
    fn finish_request(&mut self) {
        if let Some(req) = self.req.take() {
            let _g = self.comm.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.comm.wait("reduce_scatter", &self.group, req);
        }
    }
}

impl Work for MpiWork {
    fn is_completed(&mut self) -> Result<bool> {
        let Some(req) = self.req.take() else {
            return Ok(true);
        };
        let _g = self.comm.lock.lock().unwrap_or_else(|e| e.into_inner());
        match req.test() {
            Ok(_) => Ok(true),
            Err(req) => {
                self.req = Some(req);
                Ok(false)
            }
        }
    }

    fn wait(mut self: Box<Self>, recv: &mut [u8]) -> Result<()> {
        check_reduce_scatter(&self.group, self.pieces.len(), recv.len())?;
        self.finish_request();
        if recv.is_empty() {
            return Ok(());
        }
        let parts: Vec<&[u8]> = self.pieces.chunks(recv.len()).collect();
        reduce_bytes(&parts, recv, self.kind, self.op)
    }
}

impl Drop for MpiWork {
    fn drop(&mut self) {
        // Never free a buffer MPI may still write: wait (a stalled peer aborts the job).
        self.finish_request();
    }
}

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
//!
//! Groups whose members all run on one node (the common case: `mpirun -np N` on a machine) skip
//! MPI's messages for their blocking collectives and use a mapped shared-memory segment instead
//! ([`super::shm`]: the same group-order sums, about twice the bandwidth at 4-16 MiB);
//! `DEEPSCALE_MPI_SHM=0` turns that off. Large ones read the other processes' buffers directly
//! where the kernel allows it ([`super::single_copy`]; `DEEPSCALE_MPI_SINGLE_COPY=0` turns that
//! off). Point-to-point sends and started reduce-scatters (which
//! must not wait for the peers) stay on MPI.
use super::shm::{self, ShmGroup};
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
use std::path::Path;
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
    /// Each group's shared-memory segment, or None where its members span nodes or one of
    /// them could not map it (then MPI's messages carry its collectives).
    shm: Mutex<HashMap<Vec<usize>, Option<Arc<ShmGroup>>>>,
    /// A hash of each world rank's node name (MPI's processor name).
    nodes: Vec<u64>,
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
        let node = mpi::environment::processor_name()
            .map(|name| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                name.hash(&mut h);
                h.finish()
            })
            .unwrap_or(rank as u64);
        let mut nodes = vec![0u64; size];
        world.all_gather_into(&node, &mut nodes[..]);
        Ok(Self {
            world,
            groups: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
            scratch: Mutex::new((Vec::new(), Vec::new())),
            shm: Mutex::new(HashMap::new()),
            nodes,
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

    /// The shared-memory segment of `group`, mapped on its first collective (every member calls
    /// that at the same point of its program, so the setup's messages match): the first member
    /// creates it and tells the others its name. None for groups spanning nodes, with
    /// `DEEPSCALE_MPI_SHM=0` on any member, or where any member could not map it.
    fn shm_group(&self, group: &[usize], op: &str) -> Result<Option<Arc<ShmGroup>>> {
        let me = group_index(group, self.rank, op)?;
        if group.len() < 2 {
            return Ok(None);
        }
        let mut cache = self.shm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = cache.get(group) {
            return Ok(g.clone());
        }
        let one_node = group
            .iter()
            .all(|&r| self.nodes.get(r) == self.nodes.get(group[0]));
        if !one_node {
            cache.insert(group.to_vec(), None);
            return Ok(None);
        }
        let enabled = std::env::var("DEEPSCALE_MPI_SHM").map_or(true, |v| v.trim() != "0");
        let mut name = [0u8; 256];
        let mut segment = None;
        if me == 0 && enabled {
            if let Ok(s) = shm::create_segment(group.len()) {
                let s_name = s.name.to_string_lossy().into_owned();
                if s_name.len() < name.len() {
                    name[..s_name.len()].copy_from_slice(s_name.as_bytes());
                    segment = Some(s);
                }
            }
        }
        let mut mapped = None;
        let mut oks = vec![0u8; group.len()];
        {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.with_group(group, op, |c| {
                mpi::request::scope(|scope| {
                    let req = c
                        .process_at_rank(0)
                        .immediate_broadcast_into(scope, &mut name[..]);
                    self.wait(op, group, req);
                });
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                mapped = match &segment {
                    Some(s) => ShmGroup::map(&s.file, &s.name, group.len(), me, self.timeout).ok(),
                    None if len > 0 && enabled => {
                        let p = String::from_utf8_lossy(&name[..len]).into_owned();
                        ShmGroup::open(Path::new(&p), group.len(), me, self.timeout).ok()
                    }
                    None => None,
                };
                let ok = [mapped.is_some() as u8];
                mpi::request::scope(|scope| {
                    let req = c.immediate_all_gather_into(scope, &ok[..], &mut oks[..]);
                    self.wait(op, group, req);
                });
                // Every member has mapped it and written its process id: each probes whether
                // it may read the others' memory; single-copy only where all may.
                if let (true, Some(g)) = (oks.iter().all(|&ok| ok == 1), &mapped) {
                    let can = [g.probe_single_copy() as u8];
                    let mut cans = vec![0u8; group.len()];
                    mpi::request::scope(|scope| {
                        let req = c.immediate_all_gather_into(scope, &can[..], &mut cans[..]);
                        self.wait(op, group, req);
                    });
                    g.set_single_copy(cans.iter().all(|&v| v == 1));
                }
            })?;
        }
        // Every member has opened it (or failed to): the first member's handle is not needed.
        drop(segment);
        let g = match oks.iter().all(|&ok| ok == 1) {
            true => mapped.map(Arc::new),
            false => None,
        };
        cache.insert(group.to_vec(), g.clone());
        Ok(g)
    }

    /// Whether `group`'s blocking collectives go through shared memory (sets it up if needed:
    /// a collective call, like the others).
    pub fn uses_shared_memory(&self, group: &[usize]) -> Result<bool> {
        Ok(self.shm_group(group, "shared-memory setup")?.is_some())
    }

    /// Whether `group`'s large blocking collectives read the other processes' buffers directly
    /// (shared memory with single-copy reads; sets it up if needed, a collective call).
    pub fn uses_single_copy(&self, group: &[usize]) -> Result<bool> {
        let g = self.shm_group(group, "shared-memory setup")?;
        Ok(g.is_some_and(|g| g.uses_single_copy()))
    }

    /// A shared-memory collective's result; its failure (a timeout, members calling different
    /// collectives) leaves the group's steps out of step, so it ends the job like MPI's.
    fn shm_done(&self, r: Result<()>) -> Result<()> {
        if let Err(e) = r {
            self.abort(&e.to_string())
        }
        Ok(())
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

    /// The direct reduce-scatter: `send` holds one chunk per member; each member receives the
    /// other members' pieces of its own chunk and reduces them with its own piece (read where it
    /// is: no copy of it, as an all-to-all would make) in group order into `recv`. Pairwise, a
    /// segment at a time, so that the received pieces are reduced while still in cache.
    fn direct_reduce_scatter(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, chunk) = (group.len(), recv.len());
        let me = group_index(group, self.rank, "reduce_scatter")?;
        let seg = (SEGMENT / kind.size()).max(1) * kind.size();
        let peers: Vec<usize> = (0..n).filter(|&k| k != me).collect();
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let bufs = sized(&mut scratch.0, peers.len() * seg.min(chunk));
        let mut at = 0;
        while at < chunk {
            let len = seg.min(chunk - at);
            {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.with_group(group, "reduce_scatter", |c| {
                    mpi::request::scope(|scope| {
                        let mut reqs = Vec::with_capacity(2 * peers.len());
                        for (&k, buf) in peers.iter().zip(bufs.chunks_mut(len)) {
                            let from = c.process_at_rank(k as i32);
                            reqs.push(from.immediate_receive_into_with_tag(scope, buf, RS_TAG));
                        }
                        for &k in &peers {
                            let piece = &send[k * chunk + at..k * chunk + at + len];
                            let to = c.process_at_rank(k as i32);
                            reqs.push(to.immediate_send_with_tag(scope, piece, RS_TAG));
                        }
                        for req in reqs {
                            self.wait("reduce_scatter", group, req);
                        }
                    })
                })?;
            }
            let own = &send[me * chunk + at..me * chunk + at + len];
            let out = &mut recv[at..at + len];
            reduce_own_and_received(n, me, own, &bufs[..(n - 1) * len], out, kind, op)?;
            at += len;
        }
        release(&mut scratch.0);
        Ok(())
    }

    /// All-reduce of `padded` (a whole number of elements per member) in place, as the direct
    /// reduce-scatter and an all-gather pipelined a segment at a time: each member receives the
    /// others' pieces of a segment of its chunk, reduces them with its own in group order, writes
    /// the sum over its own piece and exchanges it with the others' sums of the same segment of
    /// their chunks — the reduced segment goes out while still in cache, and no scratch the size
    /// of the chunk is needed.
    fn reduce_scatter_all_gather(
        &self,
        group: &[usize],
        padded: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let n = group.len();
        let chunk = padded.len() / n;
        let me = group_index(group, self.rank, "all_reduce")?;
        let seg = (SEGMENT / kind.size()).max(1) * kind.size();
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (pieces, reduced) = &mut *scratch;
        let received = sized(pieces, (n - 1) * seg.min(chunk));
        let sum = sized(reduced, seg.min(chunk));
        let mut chunks: Vec<&mut [u8]> = padded.chunks_mut(chunk).collect();
        let mut at = 0;
        while at < chunk {
            let len = seg.min(chunk - at);
            let range = at..at + len;
            // The others' pieces of this segment of my chunk; mine of theirs.
            self.exchange_segments(
                "all_reduce",
                group,
                me,
                &mut chunks,
                &range,
                received,
                false,
            )?;
            let (own, peers) = (&chunks[me][range.clone()], &received[..(n - 1) * len]);
            reduce_own_and_received(n, me, own, peers, &mut sum[..len], kind, op)?;
            chunks[me][range.clone()].copy_from_slice(&sum[..len]);
            // My sum of this segment to everyone; theirs into their chunks' segment.
            self.exchange_segments("all_reduce", group, me, &mut chunks, &range, received, true)?;
            at += len;
        }
        release(pieces);
        release(reduced);
        Ok(())
    }

    /// One segment `range` of every member's chunk: without `gather`, this member's pieces of
    /// the others' chunks are sent and the others' pieces of its own chunk received into
    /// `received` (group order, one `range` each); with `gather`, its own chunk's segment is sent
    /// and the others' received in place into their chunks.
    #[allow(clippy::too_many_arguments)]
    fn exchange_segments(
        &self,
        op: &str,
        group: &[usize],
        me: usize,
        chunks: &mut [&mut [u8]],
        range: &std::ops::Range<usize>,
        received: &mut [u8],
        gather: bool,
    ) -> Result<()> {
        let len = range.len();
        let (before, rest) = chunks.split_at_mut(me);
        let Some((mine, after)) = rest.split_first_mut() else {
            bail!("{op}: member {me} has no chunk")
        };
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.with_group(group, op, |c| {
            mpi::request::scope(|scope| {
                let mut reqs = Vec::with_capacity(2 * group.len());
                let others = before.iter_mut().chain(after.iter_mut());
                let peers = (0..group.len()).filter(|&k| k != me);
                let mut slots = received.chunks_mut(len);
                for (k, theirs) in peers.zip(others) {
                    let peer = c.process_at_rank(k as i32);
                    if gather {
                        let into = &mut theirs[range.clone()];
                        reqs.push(peer.immediate_receive_into_with_tag(scope, into, AR_TAG));
                        reqs.push(peer.immediate_send_with_tag(
                            scope,
                            &mine[range.clone()],
                            AR_TAG,
                        ));
                    } else {
                        let Some(slot) = slots.next() else { break };
                        reqs.push(peer.immediate_receive_into_with_tag(scope, slot, RS_TAG));
                        reqs.push(peer.immediate_send_with_tag(
                            scope,
                            &theirs[range.clone()],
                            RS_TAG,
                        ));
                    }
                }
                for req in reqs {
                    self.wait(op, group, req);
                }
            })
        })
    }
}

/// Bytes of each peer's piece received and reduced at a time by the blocking reduce-scatter:
/// fewer, larger messages measured as fast here from 512 KiB to 2 MiB, smaller ones slower
/// (each is a rendezvous between the two processes).
const SEGMENT: usize = 512 << 10;

/// Point-to-point tags of the reduce-scatters (above the 30000 the pipeline's sends use, below
/// the MPI standard's guaranteed 32767): blocking and started ones apart.
const RS_TAG: i32 = 30001;
const STARTED_RS_TAG: i32 = 30002;
const AR_TAG: i32 = 30003;

/// Reduces into `out`, in group order, member `me`'s own piece `own` (read where it is) and the
/// other `n - 1` members' pieces, `received` back to back in group order.
fn reduce_own_and_received(
    n: usize,
    me: usize,
    own: &[u8],
    received: &[u8],
    out: &mut [u8],
    kind: ElemKind,
    op: ReduceOp,
) -> Result<()> {
    let mut peers = received.chunks(own.len().max(1));
    let parts: Vec<&[u8]> = (0..n)
        .map(|k| match k == me {
            true => own,
            false => peers.next().unwrap_or_default(),
        })
        .collect();
    reduce_bytes(&parts, out, kind, op)
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
        if let Some(g) = self.shm_group(group, "all_reduce")? {
            return self.shm_done(g.all_reduce(group, buf, kind, op));
        }
        if buf.is_empty() {
            // Every member's is empty (the sizes must agree): nothing to move. (Two empty
            // buffers share one dangling address, which MPI takes for aliased arguments.)
            return Ok(());
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
        if let Some(g) = self.shm_group(group, "all_gather")? {
            return self.shm_done(g.all_gather(group, send, recv));
        }
        if send.is_empty() {
            return Ok(());
        }
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
        if let Some(g) = self.shm_group(group, "reduce_scatter")? {
            return self.shm_done(g.reduce_scatter(group, send, recv, kind, op));
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
        let n = group.len().max(1);
        let chunk = len / n;
        check_reduce_scatter(group, len, chunk)?;
        let me = group_index(group, self.rank, "reduce_scatter")?;
        if chunk == 0 {
            return Ok(Box::new(super::work::Done(Vec::new())));
        }
        let peers: Vec<usize> = (0..n).filter(|&k| k != me).collect();
        let mut pieces = vec![0u8; peers.len() * chunk];
        // SAFETY: both buffers are heap memory the work owns (moving the Vec or the Arc does not
        // move it) and every request completes before they are freed (`MpiWork`'s drop waits).
        let (s, r): (&'static [u8], &'static mut [u8]) = unsafe {
            (
                std::slice::from_raw_parts(send.bytes().as_ptr(), len),
                std::slice::from_raw_parts_mut(pieces.as_mut_ptr(), pieces.len()),
            )
        };
        let reqs = {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.with_group(group, "reduce_scatter", |c| {
                let mut reqs = Vec::with_capacity(2 * peers.len());
                for (&k, buf) in peers.iter().zip(r.chunks_mut(chunk)) {
                    let from = c.process_at_rank(k as i32);
                    reqs.push(from.immediate_receive_into_with_tag(
                        StaticScope,
                        buf,
                        STARTED_RS_TAG,
                    ));
                }
                for &k in &peers {
                    let to = c.process_at_rank(k as i32);
                    let piece = &s[k * chunk..(k + 1) * chunk];
                    reqs.push(to.immediate_send_with_tag(StaticScope, piece, STARTED_RS_TAG));
                }
                reqs
            })?
        };
        Ok(Box::new(MpiWork {
            reqs,
            comm: self,
            group: group.to_vec(),
            me,
            pieces,
            send,
            kind,
            op,
        }))
    }

    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        let r = group_index(group, root, "broadcast root")?;
        if let Some(g) = self.shm_group(group, "broadcast")? {
            return self.shm_done(g.broadcast(group, buf, r));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let r = r as i32;
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
        if let Some(g) = self.shm_group(group, "barrier")? {
            return self.shm_done(g.barrier(group));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.with_group(group, "barrier", |c| {
            let req = c.immediate_barrier();
            self.wait("barrier", group, req);
        })
    }
}

/// A started direct reduce-scatter: the pairwise exchange of the pieces in flight (MPI moves it
/// when the process calls into MPI: `is_completed` is such a call), the sum in group order when
/// waited for.
struct MpiWork {
    /// Declared first: completed before the buffers they read and write are freed.
    reqs: Vec<Request<'static, [u8], StaticScope>>,
    comm: Arc<MpiComm>,
    group: Vec<usize>,
    me: usize,
    /// The other members' pieces of this member's chunk, in group order.
    pieces: Vec<u8>,
    send: Arc<dyn SendBuffer>,
    kind: ElemKind,
    op: ReduceOp,
}

// SAFETY: the requests are handles only touched under the communicator's lock (and through
// `&mut self`).
unsafe impl Send for MpiWork {}
unsafe impl Sync for MpiWork {}

impl MpiWork {
    fn finish_requests(&mut self) {
        if self.reqs.is_empty() {
            return;
        }
        let _g = self.comm.lock.lock().unwrap_or_else(|e| e.into_inner());
        for req in std::mem::take(&mut self.reqs) {
            self.comm.wait("reduce_scatter", &self.group, req);
        }
    }
}

impl Work for MpiWork {
    fn is_completed(&mut self) -> Result<bool> {
        if self.reqs.is_empty() {
            return Ok(true);
        }
        let _g = self.comm.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = Vec::with_capacity(self.reqs.len());
        for req in std::mem::take(&mut self.reqs) {
            if let Err(req) = req.test() {
                pending.push(req);
            }
        }
        self.reqs = pending;
        Ok(self.reqs.is_empty())
    }

    fn wait(mut self: Box<Self>, recv: &mut [u8]) -> Result<()> {
        let chunk = recv.len();
        check_reduce_scatter(&self.group, self.send.bytes().len(), chunk)?;
        self.finish_requests();
        if chunk == 0 {
            return Ok(());
        }
        let own = &self.send.bytes()[self.me * chunk..(self.me + 1) * chunk];
        let n = self.group.len();
        reduce_own_and_received(n, self.me, own, &self.pieces, recv, self.kind, self.op)
    }
}

impl Drop for MpiWork {
    fn drop(&mut self) {
        // Never free a buffer MPI may still read or write: wait (a stalled peer aborts the job).
        self.finish_requests();
    }
}

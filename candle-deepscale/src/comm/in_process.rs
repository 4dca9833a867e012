//! In-process ranks: N OS threads of one process sharing a rendezvous.
//!
//! Each collective on a group is matched by a per-group sequence number; every member deposits its
//! buffer, and once all are there each member computes the result itself from the same inputs in
//! group order (so all ranks get bit-identical results). A member that panics, returns an error or
//! leaves is marked failed and every rank waiting on it gets an error; a deadline bounds every wait.
use super::{
    check_all_gather, check_reduce_scatter, group_index, reduce_bytes, Communicator, ElemKind,
    ReduceOp, SendBuffer, Work,
};
use candle_core::{bail, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A member's deposit: bytes it handed over (a copy, or a started collective's buffer), or
/// (reduce-scatter and all-gather, which read large buffers once) the address and length of its
/// own buffer, which it keeps alive by not returning until every member has read it (see
/// [`InProcessComm::exchange_borrowed`]).
#[derive(Clone)]
enum Part {
    Owned(Arc<dyn SendBuffer>),
    Borrowed(usize, usize),
}

impl Part {
    /// The bytes.
    ///
    /// # Safety
    /// A borrowed part is read only between the moment every part is present and the moment
    /// this member marks its reading done (its owner waits for that before returning).
    unsafe fn bytes(&self) -> &[u8] {
        match self {
            Part::Owned(v) => v.bytes(),
            Part::Borrowed(at, len) => std::slice::from_raw_parts(*at as *const u8, *len),
        }
    }
}

/// A collective's slot: its group and its sequence number on that group.
type SlotKey = (Vec<usize>, u64);

struct Slot {
    op: &'static str,
    parts: Vec<Option<Part>>,
    /// Members that have read every part.
    done: Vec<bool>,
}

#[derive(Default)]
struct State {
    slots: HashMap<SlotKey, Slot>,
    mail: HashMap<(usize, usize, u64), VecDeque<Vec<u8>>>,
    /// Why a rank stopped taking part (error, panic, or it finished).
    gone: HashMap<usize, String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock leaves consistent data (we never panic inside).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The world of in-process ranks.
#[derive(Clone)]
pub struct InProcessWorld {
    shared: Arc<Shared>,
}

/// One rank's communicator.
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    seqs: Mutex<HashMap<Vec<usize>, u64>>,
    /// A large all-reduce's reduced chunk, kept between calls (u64s: aligned for every kind).
    scratch: Mutex<Vec<u64>>,
}

/// All-reduces from this size on run as reduce-scatter + all-gather on the members' buffers in
/// place; below it one copy of each buffer is cheaper than a second rendezvous.
const IN_PLACE_ALL_REDUCE_BYTES: usize = 64 << 10;

impl InProcessWorld {
    pub fn new(world: usize, timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                world,
                timeout,
                state: Mutex::new(State::default()),
                cv: Condvar::new(),
            }),
        }
    }

    pub fn comm(&self, rank: usize) -> InProcessComm {
        InProcessComm {
            rank,
            shared: self.shared.clone(),
            seqs: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Marks `rank` as no longer taking part, waking everyone waiting on it.
    pub fn mark_gone(&self, rank: usize, why: String) {
        self.shared.lock().gone.insert(rank, why);
        self.shared.cv.notify_all();
    }

    /// Runs `f` on `world` ranks, each an OS thread (never a rayon task), and returns each rank's
    /// result. A rank that errors or panics is reported as such, and its peers' pending collectives
    /// fail instead of hanging.
    pub fn run<T, F>(world: usize, timeout: Duration, f: F) -> Vec<Result<T>>
    where
        T: Send,
        F: Fn(Arc<InProcessComm>) -> Result<T> + Send + Sync,
    {
        let w = Self::new(world, timeout);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let w = w.clone();
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(s, move || {
                            let comm = Arc::new(w.comm(rank));
                            let run = || on_rank_pool(rank, world, || f(comm));
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
                            let r = match r {
                                Ok(r) => r,
                                Err(p) => {
                                    let msg = p
                                        .downcast_ref::<String>()
                                        .cloned()
                                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                        .unwrap_or_else(|| "unknown panic".into());
                                    Err(Error::Msg(format!("rank {rank} panicked: {msg}")))
                                }
                            };
                            let why = match &r {
                                Ok(_) => "it finished".to_string(),
                                Err(e) => format!("it failed: {e}"),
                            };
                            w.mark_gone(rank, why);
                            r
                        })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(Error::Msg(format!("rank {rank} thread was lost")))
                    }),
                    Err(e) => Err(Error::Msg(format!("cannot start rank {rank}: {e}"))),
                })
                .collect()
        })
    }
}

/// Runs rank `rank`'s `f` on a rayon pool of its own, with its share of the process's threads
/// (at least one), the rank itself on one of the pool's workers.
///
/// Sharing the global pool, every rank's parallel kernels were injected into the same two
/// workers from outside: a wake-up and hand-back per op, and one rank's op waiting behind
/// another's. On its own pool, a rank of one thread runs its kernels inline, and a rank blocked
/// in a collective holds only its own workers. candle's own element-wise ops follow the rank onto
/// this pool (the vendored candle-core's `utils::rayon_share`) instead of candle's process-wide
/// pool. If no pool can be built, the global one serves.
fn on_rank_pool<R: Send>(rank: usize, world: usize, f: impl FnOnce() -> R + Send) -> R {
    let threads = (rayon::current_num_threads() / world.max(1)).max(1);
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("rank-{rank}-worker-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

impl InProcessComm {
    fn next_seq(&self, group: &[usize]) -> u64 {
        let mut s = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(group.to_vec()).or_insert(0);
        *e += 1;
        *e
    }

    fn check_group(&self, group: &[usize], op: &str) -> Result<usize> {
        if let Some(&bad) = group.iter().find(|&&r| r >= self.shared.world) {
            bail!(
                "{op}: rank {bad} in group {group:?} is outside the world of {}",
                self.shared.world
            )
        }
        group_index(group, self.rank, op)
    }

    /// Sleeps until woken or `deadline`; past it, the error `what()` with the rank and timeout.
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Instant,
        what: impl FnOnce() -> String,
    ) -> Result<MutexGuard<'a, State>> {
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "rank {}: {} after {:.1} s",
                self.rank,
                what(),
                self.shared.timeout.as_secs_f64()
            )
        }
        Ok(self
            .shared
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0)
    }

    /// Deposits `data`, waits for every member, and returns all parts in group order.
    fn exchange(
        &self,
        op: &'static str,
        group: &[usize],
        data: Vec<u8>,
    ) -> Result<Vec<Arc<dyn SendBuffer>>> {
        let (me, key, parts) = self.deposit(op, group, Part::Owned(Arc::new(data)))?;
        let owned = parts
            .into_iter()
            .map(|p| match p {
                Part::Owned(v) => Ok(v),
                Part::Borrowed(..) => Err(Error::Msg(format!(
                    "{op} on group {group:?}: members called it differently"
                ))),
            })
            .collect();
        // Owned parts live on in their Arcs: nobody waits for this member's reading.
        self.mark_done(&key, me, false)?;
        owned
    }

    /// Deposits the address of `data` instead of a copy, lets `read` see every member's bytes
    /// in group order, and returns once every member has read this one's: no copy of `data`,
    /// no allocation (a fresh buffer of tens of MB page-faults every 4 KiB).
    fn exchange_borrowed<R>(
        &self,
        op: &'static str,
        group: &[usize],
        data: &[u8],
        read: impl FnOnce(&[&[u8]]) -> Result<R>,
    ) -> Result<R> {
        let part = Part::Borrowed(data.as_ptr() as usize, data.len());
        let (me, key, parts) = self.deposit(op, group, part)?;
        // SAFETY: every part is present and no owner returns before this member is done.
        let views: Vec<&[u8]> = parts.iter().map(|p| unsafe { p.bytes() }).collect();
        let r = read(&views);
        drop(views);
        self.mark_done(&key, me, true)?;
        r
    }

    /// Puts this member's part into the collective's slot and waits for every member's.
    fn deposit(
        &self,
        op: &'static str,
        group: &[usize],
        part: Part,
    ) -> Result<(usize, SlotKey, Vec<Part>)> {
        let (me, key) = self.put(op, group, part)?;
        let parts = self.await_parts(op, &key, me)?;
        Ok((me, key, parts))
    }

    /// Puts this member's part into the next collective's slot on `group` without waiting.
    fn put(&self, op: &'static str, group: &[usize], part: Part) -> Result<(usize, SlotKey)> {
        let me = self.check_group(group, op)?;
        let key = (group.to_vec(), self.next_seq(group));
        let mut st = self.shared.lock();
        {
            let slot = st.slots.entry(key.clone()).or_insert_with(|| Slot {
                op,
                parts: vec![None; group.len()],
                done: vec![false; group.len()],
            });
            if slot.op != op {
                bail!(
                    "rank {}: collective mismatch on group {group:?}: this rank called {op} while another called {}",
                    self.rank,
                    slot.op
                )
            }
            slot.parts[me] = Some(part);
        }
        drop(st);
        self.shared.cv.notify_all();
        Ok((me, key))
    }

    /// Whether every member's part of `key` is in.
    fn complete(&self, key: &SlotKey) -> bool {
        let st = self.shared.lock();
        st.slots
            .get(key)
            .is_some_and(|s| s.parts.iter().all(Option::is_some))
    }

    /// Waits (bounded by the deadline) until every member's part of `key` is in, and returns them
    /// in group order. On failure this member's part is taken back.
    fn await_parts(&self, op: &'static str, key: &SlotKey, me: usize) -> Result<Vec<Part>> {
        let group = &key.0;
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.shared.lock();
        loop {
            let slot = st
                .slots
                .get(key)
                .expect("slot lives until every member took its result");
            let missing: Vec<usize> = slot
                .parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_none())
                .map(|(i, _)| group[i])
                .collect();
            if missing.is_empty() {
                break;
            }
            let failed = match missing
                .iter()
                .find_map(|r| st.gone.get(r).map(|w| (*r, w.clone())))
            {
                Some((r, why)) => format!(
                    "rank {}: {op} on group {group:?} cannot complete: peer rank {r} is gone ({why})",
                    self.rank
                ),
                None => match self.wait(st, deadline, || {
                    format!("{op} on group {group:?} timed out waiting for rank(s) {missing:?}")
                }) {
                    Ok(g) => {
                        st = g;
                        continue;
                    }
                    Err(e) => {
                        st = self.shared.lock();
                        // The last part may have come while the lock was free: a peer that saw
                        // it complete is reading this member's part.
                        if st
                            .slots
                            .get(key)
                            .is_some_and(|s| s.parts.iter().all(Option::is_some))
                        {
                            continue;
                        }
                        e.to_string()
                    }
                },
            };
            // Never complete: take this member's part back (a late peer must not read a
            // buffer this member is about to release).
            if let Some(slot) = st.slots.get_mut(key) {
                slot.parts[me] = None;
            }
            bail!("{failed}")
        }
        let slot = st.slots.get(key).expect("slot present");
        Ok(slot
            .parts
            .iter()
            .map(|p| p.clone().expect("complete"))
            .collect())
    }

    /// All-reduce as a reduce-scatter and an all-gather over the members' buffers in place: each
    /// member reduces its chunk of every buffer (in group order, as the copying path reduces
    /// every element: the same bits), then copies every member's reduced chunk. (n-1)/n of the
    /// buffer read per phase instead of a copy of every buffer and a whole reduction each.
    fn all_reduce_in_place(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let me = self.check_group(group, "all_reduce")?;
        let (size, len) = (kind.size(), buf.len());
        let per = (len / size).div_ceil(group.len()) * size;
        let chunk = |i: usize| (i * per).min(len)..((i + 1) * per).min(len);
        let mine = chunk(me);
        let mut scratch =
            std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|e| e.into_inner()));
        scratch.resize(mine.len().div_ceil(8), 0);
        let reduced = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut scratch)[..mine.len()];
        self.exchange_borrowed("all_reduce", group, buf, |parts| {
            if let Some(i) = parts.iter().position(|p| p.len() != len) {
                bail!(
                    "all_reduce on group {group:?}: rank {} sent {} bytes, this rank {len}",
                    group[i],
                    parts[i].len()
                )
            }
            let views: Vec<&[u8]> = parts.iter().map(|p| &p[mine.clone()]).collect();
            reduce_bytes(&views, reduced, kind, op)
        })?;
        // Every member has read this buffer: it may change now.
        let r = self.exchange_borrowed("all_reduce_gather", group, reduced, |parts| {
            for (i, p) in parts.iter().enumerate() {
                buf[chunk(i)].copy_from_slice(p);
            }
            Ok(())
        });
        *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = scratch;
        r
    }

    /// This member has read every part; with `wait`, also waits until every other member has
    /// (or is gone: a member's thread is gone only after its collectives returned), so that its
    /// borrowed buffer stays valid while read. Not bounded by the timeout: the members still
    /// reading are past the rendezvous, only copying.
    fn mark_done(&self, key: &SlotKey, me: usize, wait: bool) -> Result<()> {
        let mut st = self.shared.lock();
        let Some(slot) = st.slots.get_mut(key) else {
            bail!("rank {}: collective slot vanished", self.rank)
        };
        slot.done[me] = true;
        if slot.done.iter().all(|&d| d) {
            st.slots.remove(key);
            drop(st);
            self.shared.cv.notify_all();
            return Ok(());
        }
        self.shared.cv.notify_all();
        if !wait {
            return Ok(());
        }
        loop {
            let Some(slot) = st.slots.get(key) else {
                return Ok(());
            };
            let reading = slot
                .done
                .iter()
                .zip(&key.0)
                .any(|(&d, r)| !d && !st.gone.contains_key(r));
            if !reading {
                return Ok(());
            }
            st = self.shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn backend(&self) -> &'static str {
        "in-process"
    }

    fn all_reduce_bytes(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        if group.len() == 1 {
            // Sum, max and average over one member are the identity.
            return self.check_group(group, "all_reduce").map(|_| ());
        }
        if buf.len() >= IN_PLACE_ALL_REDUCE_BYTES {
            return self.all_reduce_in_place(group, buf, kind, op);
        }
        let parts = self.exchange("all_reduce", group, buf.to_vec())?;
        let views: Vec<&[u8]> = parts.iter().map(|p| p.bytes()).collect();
        reduce_bytes(&views, buf, kind, op)
    }

    fn all_gather_bytes(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_all_gather(group, send.len(), recv.len())?;
        self.exchange_borrowed("all_gather", group, send, |parts| {
            for (i, p) in parts.iter().enumerate() {
                if p.len() != send.len() {
                    bail!(
                        "all_gather on group {group:?}: rank {} sent {} bytes, this rank {}",
                        group[i],
                        p.len(),
                        send.len()
                    )
                }
                recv[i * send.len()..(i + 1) * send.len()].copy_from_slice(p);
            }
            Ok(())
        })
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
        let me = self.check_group(group, "reduce_scatter")?;
        self.exchange_borrowed("reduce_scatter", group, send, |parts| {
            reduce_chunk(group, me, parts, send.len(), recv, kind, op)
        })
    }

    fn reduce_scatter_start(
        self: Arc<Self>,
        group: &[usize],
        send: Arc<dyn SendBuffer>,
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>> {
        let len = send.bytes().len();
        let n = len / group.len().max(1);
        check_reduce_scatter(group, len, n)?;
        let (me, key) = self.put("reduce_scatter", group, Part::Owned(send))?;
        Ok(Box::new(InProcessWork {
            comm: self,
            key,
            me,
            len,
            kind,
            op,
        }))
    }

    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        let r = group_index(group, root, "broadcast root")?;
        let me = self.check_group(group, "broadcast")?;
        let data = if me == r { buf.to_vec() } else { Vec::new() };
        let parts = self.exchange("broadcast", group, data)?;
        let root_bytes = parts[r].bytes();
        if root_bytes.len() != buf.len() {
            bail!(
                "broadcast on group {group:?}: root {root} sent {} bytes, this rank expects {}",
                root_bytes.len(),
                buf.len()
            )
        }
        buf.copy_from_slice(root_bytes);
        Ok(())
    }

    fn send_bytes(&self, dst: usize, tag: u64, buf: &[u8]) -> Result<()> {
        if dst >= self.shared.world {
            bail!(
                "send: destination rank {dst} is outside the world of {}",
                self.shared.world
            )
        }
        let mut st = self.shared.lock();
        if let Some(why) = st.gone.get(&dst) {
            bail!(
                "rank {}: send to rank {dst} (tag {tag}): the peer is gone ({why})",
                self.rank
            )
        }
        st.mail
            .entry((self.rank, dst, tag))
            .or_default()
            .push_back(buf.to_vec());
        drop(st);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn recv_bytes(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<()> {
        if src >= self.shared.world {
            bail!(
                "recv: source rank {src} is outside the world of {}",
                self.shared.world
            )
        }
        let deadline = Instant::now() + self.shared.timeout;
        let key = (src, self.rank, tag);
        let mut st = self.shared.lock();
        loop {
            if let Some(msg) = st.mail.get_mut(&key).and_then(|q| q.pop_front()) {
                if msg.len() != buf.len() {
                    bail!(
                        "rank {}: recv from rank {src} (tag {tag}): got {} bytes, expected {}",
                        self.rank,
                        msg.len(),
                        buf.len()
                    )
                }
                buf.copy_from_slice(&msg);
                return Ok(());
            }
            if let Some(why) = st.gone.get(&src) {
                bail!("rank {}: recv from rank {src} (tag {tag}) cannot complete: the peer is gone ({why})", self.rank)
            }
            st = self.wait(st, deadline, || {
                format!("recv from rank {src} (tag {tag}) timed out")
            })?;
        }
    }

    fn barrier(&self, group: &[usize]) -> Result<()> {
        self.exchange("barrier", group, Vec::new()).map(|_| ())
    }
}

/// Reduce-scatter's reduction on member `me`: its chunk of every member's `parts` (each `len`
/// bytes, checked), in group order, into `recv`.
fn reduce_chunk(
    group: &[usize],
    me: usize,
    parts: &[&[u8]],
    len: usize,
    recv: &mut [u8],
    kind: ElemKind,
    op: ReduceOp,
) -> Result<()> {
    if let Some(i) = parts.iter().position(|p| p.len() != len) {
        bail!(
            "reduce_scatter on group {group:?}: rank {} sent {} bytes, this rank {len}",
            group[i],
            parts[i].len()
        )
    }
    let n = recv.len();
    let chunks: Vec<&[u8]> = parts.iter().map(|p| &p[me * n..(me + 1) * n]).collect();
    reduce_bytes(&chunks, recv, kind, op)
}

/// A started reduce-scatter: this member's buffer is in the slot (owned there, so no member
/// waits for another's reading), and its chunk is reduced when it is waited for.
struct InProcessWork {
    comm: Arc<InProcessComm>,
    key: SlotKey,
    me: usize,
    /// Bytes every member sends.
    len: usize,
    kind: ElemKind,
    op: ReduceOp,
}

impl Work for InProcessWork {
    fn is_completed(&mut self) -> Result<bool> {
        Ok(self.comm.complete(&self.key))
    }

    fn wait(self: Box<Self>, recv: &mut [u8]) -> Result<()> {
        let (group, me, n) = (&self.key.0, self.me, recv.len());
        check_reduce_scatter(group, self.len, n)?;
        let parts = self.comm.await_parts("reduce_scatter", &self.key, me)?;
        // SAFETY: every part is present; a borrowed one (a peer in the blocking call) stays
        // valid until this member marks its reading done.
        let views: Vec<&[u8]> = parts.iter().map(|p| unsafe { p.bytes() }).collect();
        let r = reduce_chunk(group, me, &views, self.len, recv, self.kind, self.op);
        drop(views);
        self.comm.mark_done(&self.key, me, false)?;
        r
    }
}

//! Collectives through a shared-memory segment: how the MPI backend's ranks on one node reduce
//! and gather without Open MPI's point-to-point messages.
//!
//! Open MPI moves each large message with a rendezvous between the two processes (a request in
//! the receiver's FIFO, a single-copy read, an acknowledgement), and a rank's sends advance only
//! while it is inside MPI: at 4-16 MiB two ranks reached about half the in-process backend's
//! bandwidth. Here the members of a group map one file: a collective is a sequence of steps; in
//! each, a member writes its part into its own slot and publishes the step's number, and reads the
//! others' slots once they have published theirs. Slots are reused step after step (two phases,
//! so a member writes step t+1 while the others still read step t), so the copy into them stays in
//! cache. Reductions sum the pieces in group order where they lie, as the in-process backend
//! does: the results are bit-identical to it.
//!
//! Large all-gathers, reduce-scatters and all-reduces skip the slots where the processes may read
//! each other's memory ([`super::single_copy`]): a step publishes the address of each member's
//! buffer, the others read what they need from it directly (one copy instead of two, as the
//! in-process ranks do), and the member returns only once they all have.
//!
//! Every member must call the same collectives on a group in the same order with the same sizes
//! (as MPI requires); each step carries a signature of the call, and a member that reads a
//! different one fails with a message naming both calls instead of misreading the data.
use super::single_copy;
use super::{check_all_gather, check_reduce_scatter, reduce_bytes, ElemKind, ReduceOp};
use candle_core::{bail, Result};
use memmap2::MmapRaw;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of header per member: the published step and two signatures on one cache line pair,
/// the finished step on the next (written by the member, read by the others).
const HEADER: usize = 256;
const PUBLISHED: usize = 0;
const SIGNATURE: usize = 8;
const DONE: usize = 128;
/// The member's process id and the address of its own mapping of the segment (for the probe).
const PID: usize = 32;
const BASE: usize = 40;

/// Bytes per member for which the large collectives read the others' buffers directly. Below
/// the range the two copies through a slot cost less than the extra step that waits for the
/// readers; above it the buffers outgrow the caches, the copy through a slot (which stays in
/// L2) is nearly free, and the kernel's page-by-page copy falls behind it (two processes on the
/// AVX-512 Xeon of BENCHMARKS' session 23: reduce-scatter busbw 4.8-5.3 GB/s single-copy
/// against 4.0-4.6 through the slots at 8-16 MiB per member, 2.3-2.6 against 3.1-3.9 at 32).
const SINGLE_COPY: std::ops::RangeInclusive<usize> = (256 << 10)..=(16 << 20);
/// Bytes a reduction reads from each member before summing them (the pieces stay in L2).
const READ_PIECE: usize = 256 << 10;

/// Bytes a member writes per step and phase: up to 1 MiB (the pieces of a step stay in the
/// cores' L2), less for large groups so the segment stays within 16 MiB per phase.
pub fn slot_bytes(members: usize) -> usize {
    ((16usize << 20) / members.max(1)).clamp(64 << 10, 1 << 20) / 4096 * 4096
}

fn header_bytes(members: usize) -> usize {
    (members * HEADER).div_ceil(4096) * 4096
}

/// The size of the file a group of `members` maps.
pub fn segment_bytes(members: usize) -> usize {
    header_bytes(members) + members * 2 * slot_bytes(members)
}

/// A group's segment as its first member made it: the file (kept open until every member has
/// opened it) and the name the others open it by.
pub struct Segment {
    pub file: std::fs::File,
    pub name: PathBuf,
    /// A named file in `/dev/shm` (not Linux): removed when this is dropped.
    named: bool,
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.named {
            let _ = std::fs::remove_file(&self.name);
        }
    }
}

/// Creates the (zero-filled) memory of a group's segment. On Linux an anonymous memory file
/// (`memfd_create`), which the others open through `/proc/<pid>/fd/<fd>` (the same permission
/// Open MPI's single-copy transport already needs) and which the kernel frees when the last
/// member exits, however the job ends: nothing is left behind in `/dev/shm` by a killed job.
pub fn create_segment(members: usize) -> std::io::Result<Segment> {
    let len = segment_bytes(members) as u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated name and a flag; the descriptor is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"deepscale-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len)?;
        let name = PathBuf::from(format!("/proc/{}/fd/{fd}", std::process::id()));
        Ok(Segment {
            file,
            name,
            named: false,
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        static SEGMENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEGMENTS.fetch_add(1, Ordering::Relaxed);
        let name = std::env::temp_dir().join(format!("deepscale-{}-{seq}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&name)?;
        let segment = Segment {
            file,
            name,
            named: true,
        };
        segment.file.set_len(len)?;
        Ok(segment)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// What a step says about its call: the collective, its size in bytes and (broadcast) the root.
fn signature(op: Op, bytes: usize, root: usize) -> u64 {
    ((op as u64) << 56) | ((root as u64 & 0xff) << 48) | (bytes as u64 & ((1 << 48) - 1))
}

fn describe(sig: u64) -> String {
    let ops = [
        Op::AllReduce,
        Op::AllGather,
        Op::ReduceScatter,
        Op::Broadcast,
        Op::Barrier,
    ];
    let op = ops.iter().find(|o| **o as u64 == sig >> 56);
    let name = op.map_or("nothing", |o| o.name());
    format!("{name} of {} bytes", sig & ((1 << 48) - 1))
}

/// A single-copy step's slot carries the address of its member's buffer.
fn put_addr(slot: &mut [u8], addr: usize) {
    slot[..8].copy_from_slice(&(addr as u64).to_ne_bytes());
}

fn addr_in(slot: &[u8]) -> usize {
    let mut a = [0u8; 8];
    a.copy_from_slice(&slot[..8]);
    u64::from_ne_bytes(a) as usize
}

/// How long a waiting member spins before it sleeps: when every member has a core, a peer
/// answers within microseconds and a futex's wake-up would cost more than the wait (two ranks
/// on two cores: 2.6 GB/s with 50 us of spinning, 8 with 2 ms); with more members than cores a
/// spinning member takes the core from the one it waits for. The node's cores count, not this
/// process's share: `mpirun` binds each rank to its own core by default, and a rank spinning
/// there takes nothing from the others.
fn spin_for(members: usize) -> Duration {
    // SAFETY: a plain query.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cores = match online > 0 {
        true => online as usize,
        false => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    match members <= cores {
        true => Duration::from_millis(2),
        false => Duration::from_micros(20),
    }
}

/// Sleeps while the low 32 bits of `word` (the futex word: x86 and ARM are little-endian, and
/// the counters stay below 2^32 steps between wakes) still read `seen`, at most `timeout`.
/// A shared futex (no PRIVATE flag): the word lives in a mapping of several processes.
#[cfg(target_os = "linux")]
fn futex_wait(word: &AtomicU64, seen: u64, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid, aligned word of the mapping and a valid timespec; FUTEX_WAIT only reads
    // the word and returns at once if it no longer holds `seen`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr() as *const u32,
            libc::FUTEX_WAIT,
            seen as u32,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

#[cfg(target_os = "linux")]
fn futex_wake(word: &AtomicU64) {
    // SAFETY: wakes the waiters on a valid word; touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr() as *const u32,
            libc::FUTEX_WAKE,
            i32::MAX,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn futex_wait(_: &AtomicU64, _: u64, _: Duration) {
    std::thread::sleep(Duration::from_micros(20));
}

#[cfg(not(target_os = "linux"))]
fn futex_wake(_: &AtomicU64) {}

/// One member's view of a group's mapped segment.
pub struct ShmGroup {
    map: MmapRaw,
    members: usize,
    me: usize,
    slot: usize,
    timeout: Duration,
    spin: Duration,
    /// The number of the last step, and the reductions' scratch.
    state: Mutex<(u64, Vec<u8>)>,
    /// Whether every member may read the others' memory ([`Self::probe_single_copy`]).
    single_copy: AtomicBool,
    /// Collectives that took the single-copy path (the tests check which path ran).
    #[cfg(test)]
    single_copy_calls: AtomicU64,
}

// SAFETY: the mapping lives as long as the struct; which member writes which bytes when is
// settled by the step protocol (a member writes only its own slot and header, readers read a
// slot only between its publication and their `done` store).
unsafe impl Send for ShmGroup {}
unsafe impl Sync for ShmGroup {}

impl ShmGroup {
    /// Opens and maps the segment named `path` (made by [`create_segment`] for `members`) as
    /// member `me`.
    pub fn open(path: &Path, members: usize, me: usize, timeout: Duration) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Self::map(&f, path, members, me, timeout)
    }

    /// Maps the open segment `f` (named `path` in messages).
    pub fn map(
        f: &std::fs::File,
        path: &Path,
        members: usize,
        me: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        if len != segment_bytes(members) || me >= members {
            bail!(
                "{}: {len} bytes, member {me} of {members} (expected {} bytes)",
                path.display(),
                segment_bytes(members)
            )
        }
        let map = MmapRaw::map_raw(f)
            .map_err(|e| candle_core::Error::Msg(format!("mapping {}: {e}", path.display())))?;
        let g = Self {
            map,
            members,
            me,
            slot: slot_bytes(members),
            timeout,
            spin: spin_for(members),
            state: Mutex::new((0, Vec::new())),
            single_copy: AtomicBool::new(false),
            #[cfg(test)]
            single_copy_calls: AtomicU64::new(0),
        };
        g.atomic(me, PID)
            .store(std::process::id() as u64, Ordering::Release);
        g.atomic(me, BASE)
            .store(g.map.as_mut_ptr() as u64, Ordering::Release);
        Ok(g)
    }

    /// Whether this member can read every other member's memory (each reads the others' process
    /// ids from their own mappings). Call it once every member has mapped the segment, agree on
    /// the answer, then [`Self::set_single_copy`]. False with `DEEPSCALE_MPI_SINGLE_COPY=0`.
    pub fn probe_single_copy(&self) -> bool {
        if !single_copy::enabled() {
            return false;
        }
        (0..self.members).filter(|&k| k != self.me).all(|k| {
            let pid = self.atomic(k, PID).load(Ordering::Acquire);
            let base = self.atomic(k, BASE).load(Ordering::Acquire) as usize;
            let mut word = [0u8; 8];
            let at = base + k * HEADER + PID;
            single_copy::read(pid as i32, at, &mut word).is_ok() && u64::from_ne_bytes(word) == pid
        })
    }

    /// Turns the single-copy collectives on or off (every member the same).
    pub fn set_single_copy(&self, on: bool) {
        self.single_copy.store(on, Ordering::Relaxed);
    }

    pub fn uses_single_copy(&self) -> bool {
        self.single_copy.load(Ordering::Relaxed)
    }

    /// Whether a collective moving `bytes` per member reads the others' buffers directly.
    fn single_copy_for(&self, bytes: usize) -> bool {
        let on = SINGLE_COPY.contains(&bytes) && self.uses_single_copy();
        #[cfg(test)]
        self.single_copy_calls
            .fetch_add(on as u64, Ordering::Relaxed);
        on
    }

    /// Member `k`'s `dst.len()` bytes at `addr` (an address it published), for `op`.
    fn read_peer(
        &self,
        k: usize,
        addr: usize,
        dst: &mut [u8],
        op: Op,
        group: &[usize],
    ) -> Result<()> {
        let pid = self.atomic(k, PID).load(Ordering::Relaxed) as i32;
        single_copy::read(pid, addr, dst).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{} on group {group:?}: reading {} bytes of member {k}'s (rank {}, process {pid}) buffer: {e}",
                op.name(),
                dst.len(),
                group.get(k).copied().unwrap_or(k)
            ))
        })
    }

    /// Waits until every other member has finished step `t` (read this member's buffer).
    fn await_readers(&self, t: u64, op: Op, group: &[usize]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        for k in (0..self.members).filter(|&k| k != self.me) {
            if !self.wait_for(self.atomic(k, DONE), t, deadline) {
                bail!(
                    "{} on group {group:?} timed out after {:.1} s waiting for member {k} (rank {}) to read this rank's buffer (a peer died or stalled)",
                    op.name(),
                    self.timeout.as_secs_f64(),
                    group.get(k).copied().unwrap_or(k)
                )
            }
        }
        Ok(())
    }

    fn atomic(&self, member: usize, offset: usize) -> &AtomicU64 {
        debug_assert!(member < self.members && offset + 8 <= HEADER);
        // SAFETY: inside the mapping, 8-byte aligned (page-aligned base, offsets multiples of 8),
        // and only ever accessed atomically.
        unsafe { &*(self.map.as_mut_ptr().add(member * HEADER + offset) as *const AtomicU64) }
    }

    fn slot_ptr(&self, member: usize, phase: usize) -> *mut u8 {
        let at = header_bytes(self.members) + (member * 2 + phase) * self.slot;
        // SAFETY: `member < members`, `phase < 2`: inside the mapping.
        unsafe { self.map.as_mut_ptr().add(at) }
    }

    /// Waits until `word` reaches `at_least`: spins briefly (two ranks on two cores answer in
    /// microseconds), then sleeps on a futex the writer wakes (more ranks than cores: a spinning
    /// rank would take the core from the one it waits for). False once `deadline` passes.
    fn wait_for(&self, word: &AtomicU64, at_least: u64, deadline: Instant) -> bool {
        let spin_until = Instant::now() + self.spin;
        let mut spins = 0u32;
        loop {
            let now = word.load(Ordering::Acquire);
            if now >= at_least {
                return true;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let t = Instant::now();
            if t >= deadline {
                return false;
            }
            if t >= spin_until {
                futex_wait(word, now, (deadline - t).min(Duration::from_millis(10)));
            }
        }
    }

    /// Step `t`: waits until the others have read this member's slot of the same phase two
    /// steps ago, fills it with `write`, publishes, waits for the others' step `t`, and hands
    /// every member's slot (group order) to `read`.
    fn step(
        &self,
        t: u64,
        op: Op,
        sig: u64,
        group: &[usize],
        write: impl FnOnce(&mut [u8]),
        read: impl FnOnce(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let phase = (t % 2) as usize;
        let deadline = Instant::now() + self.timeout;
        let others = || (0..self.members).filter(|&k| k != self.me);
        let timed_out = || {
            candle_core::Error::Msg(format!(
                "{} on group {group:?} timed out after {:.1} s (a peer died or stalled)",
                op.name(),
                self.timeout.as_secs_f64()
            ))
        };
        for k in others() {
            if !self.wait_for(self.atomic(k, DONE), t.saturating_sub(2), deadline) {
                return Err(timed_out());
            }
        }
        // SAFETY: this member's slot of this phase: no one reads it until it is published below,
        // and the others finished reading its previous contents (their `done`).
        write(unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(self.me, phase), self.slot) });
        self.atomic(self.me, SIGNATURE + 8 * phase)
            .store(sig, Ordering::Relaxed);
        let published = self.atomic(self.me, PUBLISHED);
        published.store(t, Ordering::Release);
        futex_wake(published);
        for k in others() {
            if !self.wait_for(self.atomic(k, PUBLISHED), t, deadline) {
                return Err(timed_out());
            }
            let theirs = self
                .atomic(k, SIGNATURE + 8 * phase)
                .load(Ordering::Relaxed);
            if theirs != sig {
                bail!(
                    "{} on group {group:?}: member {} (rank {}) called {} where this rank called {}; every member must call the same collectives with the same sizes in the same order",
                    op.name(),
                    k,
                    group.get(k).copied().unwrap_or(k),
                    describe(theirs),
                    describe(sig)
                )
            }
        }
        let slots: Vec<&[u8]> = (0..self.members)
            // SAFETY: published for step `t` (Acquire above); its writer will not touch it again
            // before this member's `done` reaches `t`.
            .map(|k| unsafe { std::slice::from_raw_parts(self.slot_ptr(k, phase), self.slot) })
            .collect();
        let r = read(&slots);
        let done = self.atomic(self.me, DONE);
        done.store(t, Ordering::Release);
        futex_wake(done);
        r
    }

    fn check(&self, group: &[usize]) -> Result<()> {
        if group.len() != self.members {
            bail!(
                "a shared-memory group of {} members used for group {group:?}",
                self.members
            )
        }
        Ok(())
    }

    /// `recv` = every member's `send`, in group order.
    pub fn all_gather(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.check(group)?;
        check_all_gather(group, send.len(), recv.len())?;
        let m = send.len();
        let sig = signature(Op::AllGather, m, 0);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.single_copy_for(m) {
            st.0 += 1;
            let (t, me, addr) = (st.0, self.me, send.as_ptr() as usize);
            let write = |slot: &mut [u8]| put_addr(slot, addr);
            self.step(t, Op::AllGather, sig, group, write, |slots| {
                for (k, s) in slots.iter().enumerate() {
                    let dst = &mut recv[k * m..(k + 1) * m];
                    match k == me {
                        true => dst.copy_from_slice(send),
                        false => self.read_peer(k, addr_in(s), dst, Op::AllGather, group)?,
                    }
                }
                Ok(())
            })?;
            return self.await_readers(t, Op::AllGather, group);
        }
        let mut at = 0;
        while at < m {
            let len = self.slot.min(m - at);
            st.0 += 1;
            let piece = &send[at..at + len];
            self.step(
                st.0,
                Op::AllGather,
                sig,
                group,
                |slot| slot[..len].copy_from_slice(piece),
                |slots| {
                    for (k, s) in slots.iter().enumerate() {
                        let from = if k == self.me { piece } else { &s[..len] };
                        recv[k * m + at..k * m + at + len].copy_from_slice(from);
                    }
                    Ok(())
                },
            )?;
            at += len;
        }
        Ok(())
    }

    /// `recv` = this member's chunk of the group-order reduction of everyone's `send`.
    pub fn reduce_scatter(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        self.check(group)?;
        check_reduce_scatter(group, send.len(), recv.len())?;
        let (n, c, me) = (self.members, recv.len(), self.me);
        let piece = (self.slot / n / kind.size()).max(1) * kind.size();
        let sig = signature(Op::ReduceScatter, send.len(), 0);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.single_copy_for(c) {
            st.0 += 1;
            let (t, addr) = (st.0, send.as_ptr() as usize);
            let (_, scratch) = &mut *st;
            let p = (READ_PIECE / kind.size()).max(1) * kind.size();
            if scratch.len() < n * p {
                scratch.resize(n * p, 0);
            }
            let write = |slot: &mut [u8]| put_addr(slot, addr);
            self.step(t, Op::ReduceScatter, sig, group, write, |slots| {
                let mut at = 0;
                while at < c {
                    let len = p.min(c - at);
                    for k in (0..n).filter(|&k| k != me) {
                        let from = addr_in(slots[k]) + me * c + at;
                        let dst = &mut scratch[k * p..k * p + len];
                        self.read_peer(k, from, dst, Op::ReduceScatter, group)?;
                    }
                    let parts: Vec<&[u8]> = (0..n)
                        .map(|k| match k == me {
                            true => &send[me * c + at..me * c + at + len],
                            false => &scratch[k * p..k * p + len],
                        })
                        .collect();
                    reduce_bytes(&parts, &mut recv[at..at + len], kind, op)?;
                    at += len;
                }
                Ok(())
            })?;
            if scratch.len() > 4 << 20 {
                *scratch = Vec::new();
            }
            return self.await_readers(t, Op::ReduceScatter, group);
        }
        let mut at = 0;
        while at < c {
            let len = piece.min(c - at);
            st.0 += 1;
            let out = &mut recv[at..at + len];
            self.step(
                st.0,
                Op::ReduceScatter,
                sig,
                group,
                |slot| {
                    for k in (0..n).filter(|&k| k != me) {
                        slot[k * piece..k * piece + len]
                            .copy_from_slice(&send[k * c + at..k * c + at + len]);
                    }
                },
                |slots| {
                    let parts: Vec<&[u8]> = (0..n)
                        .map(|k| match k == me {
                            true => &send[me * c + at..me * c + at + len],
                            false => &slots[k][me * piece..me * piece + len],
                        })
                        .collect();
                    reduce_bytes(&parts, out, kind, op)
                },
            )?;
            at += len;
        }
        Ok(())
    }

    /// In place, over the group: small buffers in one step (every member reduces the whole
    /// buffer), large ones a segment at a time as a reduce-scatter of the segment's pieces and
    /// an all-gather of the reduced ones.
    pub fn all_reduce(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        self.check(group)?;
        let (n, me, size) = (self.members, self.me, kind.size());
        if !buf.len().is_multiple_of(size) {
            bail!(
                "all_reduce: {} bytes is not a whole number of elements",
                buf.len()
            )
        }
        let sig = signature(Op::AllReduce, buf.len(), 0);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (step, sum) = &mut *st;
        if self.single_copy_for(buf.len() / n) {
            return self.all_reduce_single_copy(step, sum, sig, group, buf, kind, op);
        }
        if buf.len() <= (64 << 10).min(self.slot) {
            // Every member reduces the whole buffer from the slots (its own included).
            let len = buf.len();
            *step += 1;
            if sum.len() < len {
                sum.resize(len, 0);
            }
            let mine = &*buf;
            self.step(
                *step,
                Op::AllReduce,
                sig,
                group,
                |slot| slot[..len].copy_from_slice(mine),
                |slots| {
                    let parts: Vec<&[u8]> = slots.iter().map(|s| &s[..len]).collect();
                    reduce_bytes(&parts, &mut sum[..len], kind, op)
                },
            )?;
            buf.copy_from_slice(&sum[..len]);
            return Ok(());
        }
        // A segment is n pieces of `q` bytes (the last ones shorter or empty).
        let q = (self.slot / n / size).max(1) * size;
        let piece = |k: usize, seg: usize| (k * q).min(seg)..((k + 1) * q).min(seg);
        if sum.len() < q {
            sum.resize(q, 0);
        }
        let mut at = 0;
        while at < buf.len() {
            let seg = (q * n).min(buf.len() - at);
            let own = piece(me, seg);
            let segment = &buf[at..at + seg];
            *step += 1;
            self.step(
                *step,
                Op::AllReduce,
                sig,
                group,
                |slot| {
                    for k in (0..n).filter(|&k| k != me) {
                        let r = piece(k, seg);
                        slot[r.clone()].copy_from_slice(&segment[r]);
                    }
                },
                |slots| {
                    let parts: Vec<&[u8]> = (0..n)
                        .map(|k| match k == me {
                            true => &segment[own.clone()],
                            false => &slots[k][own.clone()],
                        })
                        .collect();
                    reduce_bytes(&parts, &mut sum[..own.len()], kind, op)
                },
            )?;
            buf[at + own.start..at + own.end].copy_from_slice(&sum[..own.len()]);
            let segment = &mut buf[at..at + seg];
            *step += 1;
            let reduced = &sum[..own.len()];
            self.step(
                *step,
                Op::AllReduce,
                sig,
                group,
                |slot| slot[own.clone()].copy_from_slice(reduced),
                |slots| {
                    for k in (0..n).filter(|&k| k != me) {
                        let r = piece(k, seg);
                        segment[r.clone()].copy_from_slice(&slots[k][r]);
                    }
                    Ok(())
                },
            )?;
            at += seg;
        }
        if sum.len() > 4 << 20 {
            *sum = Vec::new();
        }
        Ok(())
    }

    /// A large all-reduce reading the others' buffers: each member reduces its piece of the
    /// buffer from everyone's (group order, in place in its own buffer: the others read only
    /// their own pieces of it), then reads the others' reduced pieces.
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_single_copy(
        &self,
        step: &mut u64,
        scratch: &mut Vec<u8>,
        sig: u64,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, me, size, len) = (self.members, self.me, kind.size(), buf.len());
        let q = (len / size).div_ceil(n) * size;
        let piece = |k: usize| (k * q).min(len)..((k + 1) * q).min(len);
        let p = (READ_PIECE / size).max(1) * size;
        if scratch.len() < (n + 1) * p {
            scratch.resize((n + 1) * p, 0);
        }
        let addr = buf.as_ptr() as usize;
        let write = |slot: &mut [u8]| put_addr(slot, addr);
        *step += 1;
        self.step(*step, Op::AllReduce, sig, group, write, |slots| {
            let (reads, sum) = scratch.split_at_mut(n * p);
            let own = piece(me);
            let mut at = own.start;
            while at < own.end {
                let l = p.min(own.end - at);
                for k in (0..n).filter(|&k| k != me) {
                    let dst = &mut reads[k * p..k * p + l];
                    self.read_peer(k, addr_in(slots[k]) + at, dst, Op::AllReduce, group)?;
                }
                let parts: Vec<&[u8]> = (0..n)
                    .map(|k| match k == me {
                        true => &buf[at..at + l],
                        false => &reads[k * p..k * p + l],
                    })
                    .collect();
                reduce_bytes(&parts, &mut sum[..l], kind, op)?;
                buf[at..at + l].copy_from_slice(&sum[..l]);
                at += l;
            }
            Ok(())
        })?;
        // Every member publishes this step after reducing its piece: once all have, the
        // reduced pieces are complete.
        *step += 1;
        self.step(*step, Op::AllReduce, sig, group, write, |slots| {
            for k in (0..n).filter(|&k| k != me) {
                let r = piece(k);
                let from = addr_in(slots[k]) + r.start;
                self.read_peer(k, from, &mut buf[r], Op::AllReduce, group)?;
            }
            Ok(())
        })?;
        if scratch.len() > 4 << 20 {
            *scratch = Vec::new();
        }
        self.await_readers(*step, Op::AllReduce, group)
    }

    /// `buf` of member `root` (a group index) to every member.
    pub fn broadcast(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        self.check(group)?;
        let me = self.me;
        let sig = signature(Op::Broadcast, buf.len(), root);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = 0;
        while at < buf.len() {
            let len = self.slot.min(buf.len() - at);
            st.0 += 1;
            if me == root {
                let source = &buf[at..at + len];
                let write = |slot: &mut [u8]| slot[..len].copy_from_slice(source);
                self.step(st.0, Op::Broadcast, sig, group, write, |_| Ok(()))?;
            } else {
                let dest = &mut buf[at..at + len];
                self.step(
                    st.0,
                    Op::Broadcast,
                    sig,
                    group,
                    |_| {},
                    |slots| {
                        dest.copy_from_slice(&slots[root][..len]);
                        Ok(())
                    },
                )?;
            }
            at += len;
        }
        Ok(())
    }

    pub fn barrier(&self, group: &[usize]) -> Result<()> {
        self.check(group)?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        let sig = signature(Op::Barrier, 0, 0);
        self.step(st.0, Op::Barrier, sig, group, |_| {}, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Values whose sum depends on the order they are added in.
    fn values(member: usize, len: usize, salt: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let x = (i * 2654435761 + member as u64 * 40503 + salt) % 1_000_003;
                (x as f32 * 1e-3).powi(3 - (i % 3) as i32) * if i % 2 == 0 { 1.0 } else { -1e-4 }
            })
            .collect()
    }

    fn bytes(v: &[f32]) -> &[u8] {
        bytemuck::cast_slice(v)
    }

    /// The group-order reduction of every member's `values(.., salt)`.
    fn reference(n: usize, len: usize, salt: u64, op: ReduceOp) -> Vec<f32> {
        let all: Vec<Vec<f32>> = (0..n).map(|k| values(k, len, salt)).collect();
        let parts: Vec<&[u8]> = all.iter().map(|v| bytes(v)).collect();
        let mut out = vec![0f32; len];
        reduce_bytes(
            &parts,
            bytemuck::cast_slice_mut(&mut out),
            ElemKind::F32,
            op,
        )
        .unwrap();
        out
    }

    /// Runs `f(member, group)` on `n` threads sharing one segment, the large collectives
    /// reading each other's buffers directly where `single_copy`.
    fn on_members<R: Send + 'static>(
        n: usize,
        timeout: Duration,
        single_copy: bool,
        f: impl Fn(usize, &ShmGroup) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let segment = create_segment(n).unwrap();
        let groups: Vec<ShmGroup> = (0..n)
            .map(|k| match k {
                0 => ShmGroup::map(&segment.file, &segment.name, n, k, timeout).unwrap(),
                _ => ShmGroup::open(&segment.name, n, k, timeout).unwrap(),
            })
            .collect();
        drop(segment);
        for g in &groups {
            // Threads of one process may always read its memory.
            assert_eq!(g.probe_single_copy(), cfg!(target_os = "linux"));
            g.set_single_copy(single_copy);
        }
        let f = Arc::new(f);
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(k, g)| {
                let f = f.clone();
                std::thread::spawn(move || f(k, &g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_equal_the_group_order_reduction_bit_for_bit() {
        let single_copy = [false, cfg!(target_os = "linux")];
        for (n, single_copy) in [2, 3, 4]
            .into_iter()
            .flat_map(|n| single_copy.map(|s| (n, s)))
        {
            let calls = on_members(n, Duration::from_secs(60), single_copy, move |me, g| {
                let group: Vec<usize> = (0..n).map(|k| 10 + k).collect();
                // Small and several-segment sizes, none a multiple of the group size or a slot.
                for (len, salt) in [(12, 1), (100_003, 2), (700_001, 3)] {
                    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                        let mut v = values(me, len, salt);
                        g.all_reduce(&group, bytemuck::cast_slice_mut(&mut v), ElemKind::F32, op)
                            .unwrap();
                        let want = reference(n, len, salt, op);
                        assert!(v == want, "all_reduce {op:?} of {len} on {n} members");
                    }
                    let send = values(me, len, salt);
                    let mut all = vec![0f32; len * n];
                    g.all_gather(&group, bytes(&send), bytemuck::cast_slice_mut(&mut all))
                        .unwrap();
                    let want: Vec<f32> = (0..n).flat_map(|k| values(k, len, salt)).collect();
                    assert!(all == want, "all_gather of {len} on {n} members");

                    let chunk = len;
                    let send = values(me, chunk * n, salt);
                    let mut part = vec![0f32; chunk];
                    let part_bytes = bytemuck::cast_slice_mut(&mut part);
                    g.reduce_scatter(
                        &group,
                        bytes(&send),
                        part_bytes,
                        ElemKind::F32,
                        ReduceOp::Sum,
                    )
                    .unwrap();
                    let want = reference(n, chunk * n, salt, ReduceOp::Sum);
                    assert!(
                        part[..] == want[me * chunk..(me + 1) * chunk],
                        "reduce_scatter of {chunk} per member on {n} members"
                    );

                    let root = n - 1;
                    let mut b = if me == root {
                        values(me, len, salt)
                    } else {
                        vec![0f32; len]
                    };
                    g.broadcast(&group, bytemuck::cast_slice_mut(&mut b), root)
                        .unwrap();
                    assert!(
                        b == values(root, len, salt),
                        "broadcast of {len} on {n} members"
                    );
                    g.barrier(&group).unwrap();
                }
                let mut h = vec![half::bf16::from_f32(1.5 + me as f32); 3];
                g.all_reduce(
                    &group,
                    bytemuck::cast_slice_mut(&mut h),
                    ElemKind::BF16,
                    ReduceOp::Sum,
                )
                .unwrap();
                let want: f32 = (0..n).map(|k| 1.5 + k as f32).sum();
                assert_eq!(h[0].to_f32(), want);
                g.single_copy_calls.load(Ordering::Relaxed)
            });
            // Both large sizes' all-gathers and reduce-scatters and the largest one's three
            // all-reduces (100_003 elements all-reduced are under the range per member).
            let want = if single_copy { 2 + 2 + 3 } else { 0 };
            assert!(
                calls.iter().all(|&c| c == want),
                "{n} members: {calls:?} single-copy calls"
            );
        }
    }

    #[test]
    fn members_calling_different_collectives_fail_naming_both() {
        let errs = on_members(2, Duration::from_secs(30), false, |me, g| {
            let send = vec![1u8; 16 * (me + 1)];
            let mut recv = vec![0u8; 2 * send.len()];
            g.all_gather(&[0, 1], &send, &mut recv)
                .unwrap_err()
                .to_string()
        });
        assert!(
            errs[0].contains(
                "called all_gather of 32 bytes where this rank called all_gather of 16 bytes"
            ),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("(rank 0) called all_gather of 16 bytes"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn a_member_that_never_comes_times_out() {
        let t = Instant::now();
        let errs = on_members(2, Duration::from_millis(300), false, |me, g| {
            (me == 0).then(|| g.barrier(&[4, 7]).unwrap_err().to_string())
        });
        let e = errs[0].as_deref().unwrap_or_default();
        assert!(
            e.contains("barrier on group [4, 7] timed out after 0.3 s"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}

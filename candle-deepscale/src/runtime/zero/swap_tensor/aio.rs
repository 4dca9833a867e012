//! The swapper's I/O engine (DeepSpeed's `aio` section and `AsyncIOBuilder`): a fixed pool of
//! 4096-aligned buffers, and an io_uring ring served by one thread or, where the kernel or
//! sandbox refuses io_uring, `aio.thread_count` threads doing `pread`/`pwrite`.
use candle_core::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};

/// Alignment of the buffers and of every file offset (`O_DIRECT`'s rule).
pub(super) const ALIGN: usize = 4096;
/// Bytes of a block's header in front of its payload.
pub(super) const HEADER: usize = 64;

/// DeepSpeed's `aio` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AioSettings {
    pub block_size: usize,
    pub queue_depth: usize,
    pub thread_count: usize,
    pub single_submit: bool,
    pub overlap_events: bool,
}

impl Default for AioSettings {
    fn default() -> Self {
        Self {
            block_size: 1 << 20,
            queue_depth: 8,
            thread_count: 1,
            single_submit: false,
            overlap_events: true,
        }
    }
}

/// A 4096-aligned byte buffer (what `O_DIRECT` needs).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(ALIGN), ALIGN).expect("layout");
        // SAFETY: non-zero size, valid alignment.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            len: len.max(ALIGN),
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes were allocated and are initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The payload after the header, as f32 (the header keeps it 4-byte aligned).
    pub(super) fn payload(&self, n: usize) -> &[f32] {
        bytemuck::cast_slice(&self.bytes()[HEADER..HEADER + 4 * n])
    }

    pub(super) fn payload_mut(&mut self, n: usize) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.bytes_mut()[HEADER..HEADER + 4 * n])
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Bytes moved, for the metrics (`offload_bytes_read` / `offload_bytes_written`).
#[derive(Debug, Default)]
pub struct IoStats {
    pub read: std::sync::atomic::AtomicU64,
    pub written: std::sync::atomic::AtomicU64,
    /// Blocks read ahead of a gather (ZeRO-3's next layers, while this one runs).
    pub read_ahead: std::sync::atomic::AtomicU64,
    /// Blocks of the step's states read early (into the pool's spare buffers).
    pub read_early: std::sync::atomic::AtomicU64,
}

/// The fixed pool of aligned buffers shared by a rank's swapped buffers.
pub struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    cond: Condvar,
    pub slot_bytes: usize,
    pub count: usize,
    /// How long a swap waits for a free buffer before it is an error: writes return theirs in
    /// milliseconds, so a long wait means every buffer is held by blocks nobody will release.
    wait: std::time::Duration,
}

impl BufferPool {
    pub fn new(count: usize, slot_bytes: usize) -> Arc<Self> {
        Self::with_wait(count, slot_bytes, std::time::Duration::from_secs(120))
    }

    pub fn with_wait(count: usize, slot_bytes: usize, wait: std::time::Duration) -> Arc<Self> {
        let count = count.max(2);
        Arc::new(Self {
            free: Mutex::new((0..count).map(|_| AlignedBuf::new(slot_bytes)).collect()),
            cond: Condvar::new(),
            slot_bytes,
            count,
            wait,
        })
    }

    /// A free buffer, waiting for one to come back (an error, not a hang, past `wait`).
    pub(super) fn take(&self) -> Result<AlignedBuf> {
        let poisoned = || Error::Msg("swap buffer pool poisoned".into());
        let mut free = self.free.lock().map_err(|_| poisoned())?;
        let start = std::time::Instant::now();
        loop {
            if let Some(b) = free.pop() {
                return Ok(b);
            }
            let left = self.wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                candle_core::bail!(
                    "NVMe offload: all {} swap buffers stayed in use for {:?}; raise \
                     offload_optimizer.buffer_count (or lower sub_group_size)",
                    self.count,
                    self.wait
                )
            }
            free = self
                .cond
                .wait_timeout(free, left)
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// A free buffer if there is one now (reads ahead are optional: they never wait).
    pub(super) fn try_take(&self) -> Option<AlignedBuf> {
        self.free.lock().ok()?.pop()
    }

    pub(super) fn give(&self, b: AlignedBuf) {
        if let Ok(mut free) = self.free.lock() {
            free.push(b);
            self.cond.notify_one();
        }
    }

    pub fn bytes(&self) -> u64 {
        (self.count * self.slot_bytes) as u64
    }
}

pub(super) enum Job {
    Read {
        file: Arc<File>,
        path: Arc<PathBuf>,
        offset: u64,
        buf: AlignedBuf,
        done: Sender<Result<AlignedBuf>>,
    },
    /// The buffer goes back to `pool` once written, so a writer waiting for a buffer is never
    /// stuck behind an uncollected completion.
    Write {
        file: Arc<File>,
        path: Arc<PathBuf>,
        offset: u64,
        buf: AlignedBuf,
        pool: Arc<BufferPool>,
        done: Sender<Result<()>>,
    },
}

/// The I/O engine: an io_uring ring served by one thread, or `aio.thread_count` threads.
pub struct IoThreads {
    tx: Mutex<Sender<Job>>,
    pub stats: Arc<IoStats>,
    /// `io_uring` or `threads`.
    pub backend: &'static str,
}

impl Job {
    fn finish(self, result: std::io::Result<usize>, stats: &IoStats) {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            Job::Read {
                path, buf, done, ..
            } => {
                let r = match result {
                    Ok(n) if n == buf.len => {
                        stats.read.fetch_add(n as u64, Relaxed);
                        Ok(buf)
                    }
                    Ok(n) => Err(Error::Msg(format!(
                        "swap read {}: {n} of {} bytes (truncated file?)",
                        path.display(),
                        buf.len
                    ))),
                    Err(e) => Err(Error::Msg(format!("swap read {}: {e}", path.display()))),
                };
                let _ = done.send(r);
            }
            Job::Write {
                path,
                buf,
                pool,
                done,
                ..
            } => {
                let r = match result {
                    Ok(n) if n == buf.len => {
                        stats.written.fetch_add(n as u64, Relaxed);
                        Ok(())
                    }
                    Ok(n) => Err(Error::Msg(format!(
                        "swap write {}: {n} of {} bytes (disk full?)",
                        path.display(),
                        buf.len
                    ))),
                    Err(e) => Err(Error::Msg(format!("swap write {}: {e}", path.display()))),
                };
                pool.give(buf);
                let _ = done.send(r);
            }
        }
    }
}

/// Serves jobs through an io_uring of `depth` entries; Err when the kernel or sandbox refuses
/// io_uring (the caller then uses threads).
fn start_uring(depth: usize, stats: Arc<IoStats>) -> std::io::Result<Sender<Job>> {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;
    let depth = depth.clamp(1, 4096) as u32;
    let (ready_tx, ready_rx) = channel::<std::io::Result<()>>();
    let (tx, rx) = channel::<Job>();
    std::thread::spawn(move || {
        let mut ring = match IoUring::new(depth) {
            // A no-op round trip: seccomp filters can allow setup and refuse submission.
            Ok(mut r) => {
                let nop = opcode::Nop::new().build().user_data(u64::MAX);
                // SAFETY: a NOP references no memory.
                let pushed = unsafe { r.submission().push(&nop) }.is_ok();
                match (pushed, r.submit_and_wait(1)) {
                    (true, Ok(_)) => {
                        r.completion().for_each(drop);
                        let _ = ready_tx.send(Ok(()));
                        r
                    }
                    (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    (false, _) => {
                        let _ = ready_tx.send(Err(std::io::Error::other("io_uring queue full")));
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let mut in_flight: HashMap<u64, Job> = HashMap::new();
        let mut next_id = 0u64;
        let mut open = true;
        while open || !in_flight.is_empty() {
            // Take new jobs: wait for one when idle, then as many as the ring holds.
            while open && in_flight.len() < depth as usize {
                let job = if in_flight.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                };
                let entry = match &job {
                    Job::Read {
                        file, offset, buf, ..
                    } => opcode::Read::new(
                        types::Fd(file.as_raw_fd()),
                        buf.ptr.as_ptr(),
                        buf.len as u32,
                    )
                    .offset(*offset)
                    .build(),
                    Job::Write {
                        file, offset, buf, ..
                    } => opcode::Write::new(
                        types::Fd(file.as_raw_fd()),
                        buf.ptr.as_ptr(),
                        buf.len as u32,
                    )
                    .offset(*offset)
                    .build(),
                };
                let id = next_id;
                next_id += 1;
                // SAFETY: the buffer and file stay alive in `in_flight` until the completion.
                if unsafe { ring.submission().push(&entry.user_data(id)) }.is_err() {
                    job.finish(Err(std::io::Error::other("io_uring queue full")), &stats);
                    continue;
                }
                in_flight.insert(id, job);
            }
            if in_flight.is_empty() {
                continue;
            }
            if let Err(e) = ring.submit_and_wait(1) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                for (_, job) in in_flight.drain() {
                    job.finish(Err(std::io::Error::new(e.kind(), e.to_string())), &stats);
                }
                continue;
            }
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (id, res) in done {
                if let Some(job) = in_flight.remove(&id) {
                    let r = if res < 0 {
                        Err(std::io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as usize)
                    };
                    job.finish(r, &stats);
                }
            }
        }
    });
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("io_uring thread died")))?;
    Ok(tx)
}

impl IoThreads {
    /// io_uring with `queue_depth` entries when available, else `threads` pread/pwrite threads.
    pub fn with_aio(queue_depth: usize, threads: usize) -> Arc<Self> {
        let stats = Arc::new(IoStats::default());
        if std::env::var_os("DEEPSCALE_NO_IO_URING").is_none() {
            if let Ok(tx) = start_uring(queue_depth, stats.clone()) {
                return Arc::new(Self {
                    tx: Mutex::new(tx),
                    stats,
                    backend: "io_uring",
                });
            }
        }
        Self::new(threads)
    }

    /// `threads` threads doing pread/pwrite.
    pub fn new(threads: usize) -> Arc<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(IoStats::default());
        for _ in 0..threads.max(1) {
            let rx = rx.clone();
            let stats = stats.clone();
            std::thread::spawn(move || loop {
                let job = match rx.lock().map(|r| r.recv()) {
                    Ok(Ok(j)) => j,
                    _ => return,
                };
                let r = match &job {
                    Job::Read {
                        file, offset, buf, ..
                    } => {
                        // SAFETY: the buffer is owned by the job and not aliased.
                        let bytes =
                            unsafe { std::slice::from_raw_parts_mut(buf.ptr.as_ptr(), buf.len) };
                        file.read_exact_at(bytes, *offset).map(|_| buf.len)
                    }
                    Job::Write {
                        file, offset, buf, ..
                    } => file.write_all_at(buf.bytes(), *offset).map(|_| buf.len),
                };
                job.finish(r, &stats);
            });
        }
        Arc::new(Self {
            tx: Mutex::new(tx),
            stats,
            backend: "threads",
        })
    }

    pub(super) fn submit(&self, job: Job) -> Result<()> {
        self.tx
            .lock()
            .map_err(|_| Error::Msg("swap I/O queue poisoned".into()))?
            .send(job)
            .map_err(|_| Error::Msg("swap I/O threads are gone".into()))
    }
}

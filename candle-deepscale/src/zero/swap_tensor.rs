//! NVMe swapping of ZeRO's flat fp32 buffers (DeepSpeed's `runtime/swap_tensor/`, the
//! ZeRO-Infinity path): a buffer lives in a file as blocks of `sub_group_size` elements; a few
//! blocks stay resident (the working set); reads run ahead and writes behind through a fixed
//! pool of 4096-aligned buffers, with `O_DIRECT` where the filesystem allows it (tmpfs does not:
//! then buffered I/O). The I/O goes through io_uring (`aio.queue_depth` entries) where the kernel
//! and sandbox allow it, else automatically through `aio.thread_count` threads doing
//! `pread`/`pwrite`.
//!
//! Every block on disk carries a header: a magic number, the block's generation (incremented on
//! every write) and a CRC-32 of the payload. A read checks all three against what this process
//! last wrote, so a torn write (a crash mid-step) or a stale block is an error naming the file —
//! never data fed to the optimizer.
use candle_core::{bail, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

const MAGIC: u64 = 0x5a45_524f_5357_4150; // "ZEROSWAP"
const HEADER: usize = 64;
const ALIGN: usize = 4096;

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
    fn new(len: usize) -> Self {
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

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes were allocated and are initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The payload after the header, as f32 (the header keeps it 4-byte aligned).
    fn payload(&self, n: usize) -> &[f32] {
        bytemuck::cast_slice(&self.bytes()[HEADER..HEADER + 4 * n])
    }

    fn payload_mut(&mut self, n: usize) -> &mut [f32] {
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
}

/// The fixed pool of aligned buffers shared by a rank's swapped buffers.
pub struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    cond: Condvar,
    pub slot_bytes: usize,
    pub count: usize,
}

impl BufferPool {
    pub fn new(count: usize, slot_bytes: usize) -> Arc<Self> {
        let count = count.max(2);
        Arc::new(Self {
            free: Mutex::new((0..count).map(|_| AlignedBuf::new(slot_bytes)).collect()),
            cond: Condvar::new(),
            slot_bytes,
            count,
        })
    }

    fn take(&self) -> Result<AlignedBuf> {
        let mut free = self
            .free
            .lock()
            .map_err(|_| Error::Msg("swap buffer pool poisoned".into()))?;
        loop {
            if let Some(b) = free.pop() {
                return Ok(b);
            }
            free = self
                .cond
                .wait(free)
                .map_err(|_| Error::Msg("swap buffer pool poisoned".into()))?;
        }
    }

    fn give(&self, b: AlignedBuf) {
        if let Ok(mut free) = self.free.lock() {
            free.push(b);
            self.cond.notify_one();
        }
    }

    pub fn bytes(&self) -> u64 {
        (self.count * self.slot_bytes) as u64
    }
}

enum Job {
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

    fn submit(&self, job: Job) -> Result<()> {
        self.tx
            .lock()
            .map_err(|_| Error::Msg("swap I/O queue poisoned".into()))?
            .send(job)
            .map_err(|_| Error::Msg("swap I/O threads are gone".into()))
    }
}

/// Opens `path` for swapping: `O_DIRECT` when the filesystem accepts it, else buffered.
fn open_swap_file(path: &Path) -> Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).create(true).truncate(true);
    let direct = o.clone().custom_flags(libc::O_DIRECT).open(path);
    if let Ok(f) = direct {
        // Some filesystems accept the flag at open and fail the first aligned write.
        let probe = AlignedBuf::new(ALIGN);
        if f.write_all_at(probe.bytes(), 0).is_ok() {
            return Ok((f, true));
        }
    }
    let f = o
        .open(path)
        .map_err(|e| Error::Msg(format!("cannot create swap file {}: {e}", path.display())))?;
    Ok((f, false))
}

struct Slot {
    buf: AlignedBuf,
    dirty: bool,
}

struct Inner {
    /// Resident blocks, least recently used first.
    resident: VecDeque<(usize, Slot)>,
    /// Reads in flight (read ahead).
    reading: HashMap<usize, Receiver<Result<AlignedBuf>>>,
    /// Writes in flight (write behind).
    writing: Vec<Receiver<Result<()>>>,
    /// Generation each block was last written with (0: never written: zeros).
    generation: Vec<u64>,
}

/// A flat f32 buffer of `len` elements kept on NVMe in blocks of `block_elems`, at most
/// `max_resident` blocks in memory.
pub struct SwappedBuffer {
    path: Arc<PathBuf>,
    file: Arc<File>,
    pub direct: bool,
    len: usize,
    block_elems: usize,
    slot_bytes: usize,
    max_resident: usize,
    pool: Arc<BufferPool>,
    io: Arc<IoThreads>,
    inner: Mutex<Inner>,
}

/// Bytes one block slot takes (header + payload, 4096-aligned).
pub fn slot_bytes(block_elems: usize) -> usize {
    (HEADER + 4 * block_elems).div_ceil(ALIGN) * ALIGN
}

impl SwappedBuffer {
    /// An all-zero buffer in `dir/name.swp`.
    pub fn new(
        dir: &Path,
        name: &str,
        len: usize,
        block_elems: usize,
        max_resident: usize,
        pool: Arc<BufferPool>,
        io: Arc<IoThreads>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Msg(format!("cannot create swap folder {}: {e}", dir.display())))?;
        let path = dir.join(format!("{name}.swp"));
        let (file, direct) = open_swap_file(&path)?;
        let block_elems = block_elems.max(1);
        if slot_bytes(block_elems) > pool.slot_bytes {
            bail!(
                "swap block of {block_elems} elements does not fit the pool's {}-byte buffers",
                pool.slot_bytes
            )
        }
        let blocks = len.div_ceil(block_elems);
        Ok(Self {
            path: Arc::new(path),
            file: Arc::new(file),
            direct,
            len,
            block_elems,
            slot_bytes: pool.slot_bytes,
            max_resident: max_resident.max(1),
            pool,
            io,
            inner: Mutex::new(Inner {
                resident: VecDeque::new(),
                reading: HashMap::new(),
                writing: Vec::new(),
                generation: vec![0; blocks],
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn blocks(&self) -> usize {
        self.len.div_ceil(self.block_elems)
    }

    /// Elements of block `b`.
    pub fn block_range(&self, b: usize) -> std::ops::Range<usize> {
        let s = b * self.block_elems;
        s..(s + self.block_elems).min(self.len)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Msg(format!("swap buffer {} poisoned", self.path.display())))
    }

    fn offset(&self, b: usize) -> u64 {
        (b * self.slot_bytes) as u64
    }

    /// Checks a block read back: magic, generation and checksum.
    fn verify(&self, b: usize, buf: &AlignedBuf, generation: u64) -> Result<()> {
        let h = &buf.bytes()[..HEADER];
        let word = |i: usize| u64::from_le_bytes(h[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let n = self.block_range(b).len();
        let crc = crc32fast::hash(&buf.bytes()[HEADER..HEADER + 4 * n]) as u64;
        if word(0) != MAGIC || word(2) != n as u64 {
            bail!(
                "swap file {} block {b}: no valid block header (torn or foreign write)",
                self.path.display()
            )
        }
        if word(1) != generation {
            bail!(
                "swap file {} block {b}: generation {} on disk, {generation} expected (a stale \
                 block from an interrupted write)",
                self.path.display(),
                word(1)
            )
        }
        if word(3) != crc {
            bail!(
                "swap file {} block {b}: checksum mismatch (a partly written block)",
                self.path.display()
            )
        }
        Ok(())
    }

    /// Starts reading block `b` unless it is resident or already coming.
    fn prefetch_locked(&self, inner: &mut Inner, b: usize) -> Result<()> {
        if b >= inner.generation.len()
            || inner.resident.iter().any(|(i, _)| *i == b)
            || inner.reading.contains_key(&b)
            || inner.generation[b] == 0
        {
            return Ok(());
        }
        let (tx, rx) = channel();
        self.io.submit(Job::Read {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.offset(b),
            buf: self.pool.take()?,
            done: tx,
        })?;
        inner.reading.insert(b, rx);
        Ok(())
    }

    /// Reads block `b` ahead, in the background.
    pub fn prefetch(&self, b: usize) -> Result<()> {
        let mut inner = self.lock()?;
        self.prefetch_locked(&mut inner, b)
    }

    /// Writes a dirty slot behind (the buffer returns to the pool when written).
    fn write_behind(&self, inner: &mut Inner, b: usize, mut slot: Slot) -> Result<()> {
        if !slot.dirty {
            self.pool.give(slot.buf);
            return Ok(());
        }
        let n = self.block_range(b).len();
        inner.generation[b] += 1;
        let crc = crc32fast::hash(&slot.buf.bytes()[HEADER..HEADER + 4 * n]) as u64;
        let h = &mut slot.buf.bytes_mut()[..HEADER];
        for (i, w) in [MAGIC, inner.generation[b], n as u64, crc]
            .iter()
            .enumerate()
        {
            h[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        let (tx, rx) = channel();
        self.io.submit(Job::Write {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.offset(b),
            buf: slot.buf,
            pool: self.pool.clone(),
            done: tx,
        })?;
        inner.writing.push(rx);
        // Collect finished writes (their errors surface here or at the next flush).
        let mut pending = Vec::new();
        for w in inner.writing.drain(..) {
            match w.try_recv() {
                Ok(r) => r?,
                Err(std::sync::mpsc::TryRecvError::Empty) => pending.push(w),
                Err(_) => bail!("swap write of {} lost", self.path.display()),
            }
        }
        inner.writing = pending;
        Ok(())
    }

    /// Makes block `b` resident (reading it, or zeros if never written), evicting the least
    /// recently used block beyond `max_resident`.
    fn load(&self, inner: &mut Inner, b: usize) -> Result<()> {
        if let Some(at) = inner.resident.iter().position(|(i, _)| *i == b) {
            let e = inner.resident.remove(at).expect("present");
            inner.resident.push_back(e);
            return Ok(());
        }
        while inner.resident.len() >= self.max_resident {
            let (old, slot) = inner.resident.pop_front().expect("non-empty");
            self.write_behind(inner, old, slot)?;
        }
        let n = self.block_range(b).len();
        let buf = if inner.generation[b] == 0 {
            let mut buf = self.pool.take()?;
            buf.payload_mut(n).iter_mut().for_each(|x| *x = 0.0);
            buf
        } else {
            self.prefetch_locked(inner, b)?;
            let rx = inner.reading.remove(&b).expect("read issued");
            let buf = rx
                .recv()
                .map_err(|_| Error::Msg(format!("swap read of {} lost", self.path.display())))??;
            if let Err(e) = self.verify(b, &buf, inner.generation[b]) {
                self.pool.give(buf);
                return Err(e);
            }
            buf
        };
        inner.resident.push_back((b, Slot { buf, dirty: false }));
        Ok(())
    }

    /// Calls `f` with elements `range` (within one block or across several).
    pub fn read_range(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let mut inner = self.lock()?;
        let mut at = range.start;
        while at < range.end {
            let b = at / self.block_elems;
            let br = self.block_range(b);
            let end = range.end.min(br.end);
            self.load(&mut inner, b)?;
            let slot = &inner.resident.back().expect("loaded").1;
            out[at - range.start..end - range.start]
                .copy_from_slice(&slot.buf.payload(br.len())[at - br.start..end - br.start]);
            at = end;
        }
        Ok(())
    }

    /// Applies `f(offset_in_range, chunk)` to elements `range`, block by block, marking them dirty.
    pub fn update_range(
        &self,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let mut at = range.start;
        while at < range.end {
            let b = at / self.block_elems;
            let br = self.block_range(b);
            let end = range.end.min(br.end);
            self.load(&mut inner, b)?;
            let slot = &mut inner.resident.back_mut().expect("loaded").1;
            slot.dirty = true;
            f(
                at - range.start,
                &mut slot.buf.payload_mut(br.len())[at - br.start..end - br.start],
            );
            at = end;
        }
        Ok(())
    }

    /// Forgets every block: the buffer reads as zeros again (no I/O).
    pub fn zero(&self) -> Result<()> {
        self.flush()?;
        let mut inner = self.lock()?;
        while let Some((_, slot)) = inner.resident.pop_front() {
            self.pool.give(slot.buf);
        }
        inner.generation.iter_mut().for_each(|g| *g = 0);
        Ok(())
    }

    /// Writes every dirty resident block and waits for all writes.
    pub fn flush(&self) -> Result<()> {
        let mut inner = self.lock()?;
        let resident: Vec<(usize, Slot)> = inner.resident.drain(..).collect();
        for (b, slot) in resident {
            self.write_behind(&mut inner, b, slot)?;
        }
        for w in std::mem::take(&mut inner.writing) {
            w.recv()
                .map_err(|_| Error::Msg(format!("swap write of {} lost", self.path.display())))??;
        }
        // Reads ahead that nobody consumed.
        for (_, r) in std::mem::take(&mut inner.reading) {
            if let Ok(Ok(buf)) = r.recv() {
                self.pool.give(buf);
            }
        }
        Ok(())
    }

    /// Bytes of this buffer resident in memory (its blocks in the pool's buffers).
    pub fn resident_bytes(&self) -> u64 {
        self.lock()
            .map(|i| (i.resident.len() * self.slot_bytes) as u64)
            .unwrap_or(0)
    }
}

impl Drop for SwappedBuffer {
    fn drop(&mut self) {
        let _ = self.flush();
        let _ = std::fs::remove_file(self.path.as_ref());
    }
}

/// Sequential write and read bandwidth (bytes/s) of the filesystem under `dir`, with 4 MiB
/// aligned blocks through the same `O_DIRECT`-when-possible path as the swapper (so the page
/// cache does not flatter the read), synced; and whether `O_DIRECT` was used.
pub fn sequential_bandwidth(dir: &Path, bytes: usize) -> Result<(f64, f64, bool)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Msg(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("bandwidth.probe");
    let (file, direct) = open_swap_file(&path)?;
    let block = 4 << 20;
    let n = (bytes / block).max(1);
    let mut buf = AlignedBuf::new(block);
    buf.bytes_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let io = |e: std::io::Error| Error::Msg(format!("{}: {e}", path.display()));
    let t = std::time::Instant::now();
    for i in 0..n {
        file.write_all_at(buf.bytes(), (i * block) as u64)
            .map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    let write = (n * block) as f64 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for i in 0..n {
        file.read_exact_at(buf.bytes_mut(), (i * block) as u64)
            .map_err(io)?;
    }
    let read = (n * block) as f64 / t.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok((write, read, direct))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(dir: &Path, len: usize, block: usize, resident: usize) -> SwappedBuffer {
        let pool = BufferPool::new(4, slot_bytes(block));
        SwappedBuffer::new(dir, "t", len, block, resident, pool, IoThreads::new(2)).unwrap()
    }

    #[test]
    fn values_survive_eviction_and_read_back_exactly() {
        // Both I/O engines: io_uring (where this kernel and sandbox allow it) and threads.
        for io in [IoThreads::with_aio(8, 1), IoThreads::new(2)] {
            let dir = tempfile::tempdir().unwrap();
            let pool = BufferPool::new(4, slot_bytes(1000));
            let b = SwappedBuffer::new(dir.path(), "t", 10_000, 1000, 2, pool, io.clone()).unwrap();
            round_trip(&b);
            use std::sync::atomic::Ordering::Relaxed;
            assert!(io.stats.written.load(Relaxed) > 0, "{}", io.backend);
        }
    }

    fn round_trip(b: &SwappedBuffer) {
        b.update_range(0..10_000, |o, c| {
            c.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (o + i) as f32 * 0.5)
        })
        .unwrap();
        b.flush().unwrap();
        let mut out = vec![0f32; 3000];
        b.read_range(4500..7500, &mut out).unwrap();
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, x)| *x == (4500 + i) as f32 * 0.5));
        b.zero().unwrap();
        b.read_range(4500..7500, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn a_torn_or_stale_block_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffer(dir.path(), 4000, 1000, 1);
        b.update_range(0..4000, |_, c| c.iter_mut().for_each(|x| *x = 1.0))
            .unwrap();
        b.flush().unwrap();
        let path = b.path().to_path_buf();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A crash mid-write: half of block 1's payload never reached the disk.
        let slot = slot_bytes(1000) as u64;
        f.write_all_at(&[0u8; 1000], slot + HEADER as u64 + 1000)
            .unwrap();
        let mut out = vec![0f32; 10];
        let e = b.read_range(1000..1010, &mut out).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("t.swp"), "{e}");
        // A stale block: block 2 as an older write left it (its generation behind).
        let mut old = vec![0u8; slot as usize];
        f.sync_all().unwrap();
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut old, 2 * slot)
            .unwrap();
        b.update_range(2000..2010, |_, c| c.iter_mut().for_each(|x| *x = 3.0))
            .unwrap();
        b.flush().unwrap();
        f.write_all_at(&old, 2 * slot).unwrap();
        let e = b.read_range(2000..2010, &mut out).unwrap_err().to_string();
        assert!(e.contains("generation"), "{e}");
    }
}

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
mod aio;

pub use aio::{AioSettings, AlignedBuf, BufferPool, IoStats, IoThreads};
use aio::{Job, ALIGN, HEADER};
use candle_core::{bail, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

const MAGIC: u64 = 0x5a45_524f_5357_4150; // "ZEROSWAP"

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
    /// Reads started long before their use ([`SwappedBuffer::read_early`]), kept apart so that
    /// they do not hold back the reads ahead of the coming tile or gather (one at a time).
    early: HashMap<usize, Receiver<Result<AlignedBuf>>>,
    /// Writes in flight (write behind), by block: a read of a block waits for its write (the
    /// I/O engine may reorder requests to one offset).
    writing: Vec<(usize, Receiver<Result<()>>)>,
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
    /// Bytes of the reads and writes this buffer issued (where a step's I/O goes).
    issued: [std::sync::atomic::AtomicU64; 2],
}

/// Swap files of this process that are alive, so a second interrupt (which exits at once, without
/// unwinding) can still remove them.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every live swap file of this process (the exit path of a second SIGINT/SIGTERM).
pub fn remove_live_swap_files() {
    let files = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for f in files {
        let _ = std::fs::remove_file(f);
    }
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
        if let Ok(mut l) = LIVE.lock() {
            l.push(path.clone());
        }
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
                early: HashMap::new(),
                writing: Vec::new(),
                generation: vec![0; blocks],
            }),
            issued: Default::default(),
        })
    }

    /// (bytes read, bytes written) through this buffer so far.
    pub fn io_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.issued[0].load(Relaxed), self.issued[1].load(Relaxed))
    }

    /// The swap file's name without `.swp` (`exp_avg`, `gradients`, ...).
    pub fn name(&self) -> &str {
        self.path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
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

    /// The block holding element `at`.
    pub fn block_of(&self, at: usize) -> usize {
        at / self.block_elems
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

    /// Starts reading block `b` unless it is resident or already coming (after its write, if
    /// one is in flight). A read ahead (`!needed`) is skipped when no buffer is free: waiting
    /// for one could wait on the buffers of other reads ahead nobody consumes yet.
    fn prefetch_locked(&self, inner: &mut Inner, b: usize, needed: bool) -> Result<()> {
        if b >= inner.generation.len()
            || inner.resident.iter().any(|(i, _)| *i == b)
            || inner.reading.contains_key(&b)
            || inner.early.contains_key(&b)
            || inner.generation[b] == 0
        {
            return Ok(());
        }
        self.wait_write(inner, b)?;
        let buf = match needed {
            true => self.pool.take()?,
            false => match self.pool.try_take() {
                Some(b) => b,
                None => return Ok(()),
            },
        };
        let rx = self.submit_read(b, buf)?;
        inner.reading.insert(b, rx);
        Ok(())
    }

    /// Waits for block `b`'s write in flight, if any: the I/O engine may reorder requests to
    /// one offset, so a read must not pass it.
    fn wait_write(&self, inner: &mut Inner, b: usize) -> Result<()> {
        while let Some(at) = inner.writing.iter().position(|(wb, _)| *wb == b) {
            let (_, w) = inner.writing.remove(at);
            w.recv()
                .map_err(|_| Error::Msg(format!("swap write of {} lost", self.path.display())))??;
        }
        Ok(())
    }

    /// Starts reading block `b` into `buf`.
    fn submit_read(&self, b: usize, buf: AlignedBuf) -> Result<Receiver<Result<AlignedBuf>>> {
        let (tx, rx) = channel();
        self.issued[0].fetch_add(self.slot_bytes as u64, std::sync::atomic::Ordering::Relaxed);
        self.io.submit(Job::Read {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.offset(b),
            buf,
            done: tx,
        })?;
        Ok(rx)
    }

    /// Starts reading block `b` long before its use (the next step's first tiles while the
    /// forward runs), into a free pool buffer if there is one; false when none is free. A block
    /// that is resident, coming or never written needs nothing.
    pub fn read_early(&self, b: usize) -> Result<bool> {
        let mut inner = self.lock()?;
        if b >= inner.generation.len()
            || inner.generation[b] == 0
            || inner.resident.iter().any(|(i, _)| *i == b)
            || inner.reading.contains_key(&b)
            || inner.early.contains_key(&b)
        {
            return Ok(true);
        }
        self.wait_write(&mut inner, b)?;
        let Some(buf) = self.pool.try_take() else {
            return Ok(false);
        };
        let rx = self.submit_read(b, buf)?;
        inner.early.insert(b, rx);
        let early = &self.io.stats.read_early;
        early.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Blocks read early and not used yet (each holds a pool buffer).
    pub fn early_reads(&self) -> usize {
        self.lock().map_or(0, |i| i.early.len())
    }

    /// Reads block `b` ahead, in the background.
    pub fn prefetch(&self, b: usize) -> Result<()> {
        let mut inner = self.lock()?;
        self.prefetch_locked(&mut inner, b, false)
    }

    /// Reads ahead the first block of `range` that is neither resident nor coming, unless a read
    /// is in flight already (one at a time: a read ahead holds a pool buffer until it is used).
    pub fn read_ahead(&self, range: std::ops::Range<usize>) -> Result<()> {
        let mut inner = self.lock()?;
        if !inner.reading.is_empty() || range.is_empty() {
            return Ok(());
        }
        let first = range.start / self.block_elems;
        let last = (range.end - 1) / self.block_elems;
        for b in first..=last {
            if !inner.resident.iter().any(|(i, _)| *i == b) {
                self.prefetch_locked(&mut inner, b, false)?;
                if inner.reading.contains_key(&b) {
                    let ahead = &self.io.stats.read_ahead;
                    ahead.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(());
            }
        }
        Ok(())
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
        self.issued[1].fetch_add(self.slot_bytes as u64, std::sync::atomic::Ordering::Relaxed);
        self.io.submit(Job::Write {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.offset(b),
            buf: slot.buf,
            pool: self.pool.clone(),
            done: tx,
        })?;
        inner.writing.push((b, rx));
        // Collect finished writes (their errors surface here or at the next flush).
        let mut pending = Vec::new();
        for (wb, w) in inner.writing.drain(..) {
            match w.try_recv() {
                Ok(r) => r?,
                Err(std::sync::mpsc::TryRecvError::Empty) => pending.push((wb, w)),
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
            self.prefetch_locked(inner, b, true)?;
            let rx = match inner.early.remove(&b) {
                Some(rx) => rx,
                None => inner.reading.remove(&b).expect("read issued"),
            };
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

    /// Reads elements `range` (within one block or across several) into `out`. Across several,
    /// the next block's read is in flight while this one is waited for and copied out.
    pub fn read_range(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let mut inner = self.lock()?;
        let mut at = range.start;
        while at < range.end {
            let b = at / self.block_elems;
            let br = self.block_range(b);
            let end = range.end.min(br.end);
            if end < range.end && inner.reading.len() <= 1 {
                self.prefetch_locked(&mut inner, b, false)?;
                self.prefetch_locked(&mut inner, b + 1, false)?;
            }
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

    /// Replaces block `b`'s whole content with `values` without reading it (written behind
    /// like an updated block). A read of it in flight is dropped; a write in flight finishes
    /// first (two writes to one offset must not pass each other).
    pub fn overwrite_block(&self, b: usize, values: &[f32]) -> Result<()> {
        let br = self.block_range(b);
        if values.len() != br.len() {
            bail!(
                "swap file {} block {b}: {} values for its {} elements",
                self.path.display(),
                values.len(),
                br.len()
            )
        }
        let mut inner = self.lock()?;
        if let Some(at) = inner.resident.iter().position(|(i, _)| *i == b) {
            let (_, mut slot) = inner.resident.remove(at).expect("present");
            slot.buf.payload_mut(br.len()).copy_from_slice(values);
            slot.dirty = true;
            inner.resident.push_back((b, slot));
            return Ok(());
        }
        let stale = [inner.early.remove(&b), inner.reading.remove(&b)];
        for rx in stale.into_iter().flatten() {
            if let Ok(Ok(buf)) = rx.recv() {
                self.pool.give(buf);
            }
        }
        self.wait_write(&mut inner, b)?;
        while inner.resident.len() >= self.max_resident {
            let (old, slot) = inner.resident.pop_front().expect("non-empty");
            self.write_behind(&mut inner, old, slot)?;
        }
        let mut buf = self.pool.take()?;
        buf.payload_mut(br.len()).copy_from_slice(values);
        inner.resident.push_back((b, Slot { buf, dirty: true }));
        Ok(())
    }

    /// Starts writing block `b` now if it is resident (done with: it makes room for others).
    pub fn write_block(&self, b: usize) -> Result<()> {
        let mut inner = self.lock()?;
        if let Some(at) = inner.resident.iter().position(|(i, _)| *i == b) {
            let (_, slot) = inner.resident.remove(at).expect("present");
            self.write_behind(&mut inner, b, slot)?;
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

    /// Starts writing every dirty resident block (their buffers return to the pool as the writes
    /// finish) without waiting: the optimizer step's last writes go on while the next forward
    /// runs. A read of a block waits for its write; errors surface at the next write or flush.
    pub fn write_out(&self) -> Result<()> {
        let mut inner = self.lock()?;
        let resident: Vec<(usize, Slot)> = inner.resident.drain(..).collect();
        for (b, slot) in resident {
            self.write_behind(&mut inner, b, slot)?;
        }
        Ok(())
    }

    /// Writes every dirty resident block and waits for all writes.
    pub fn flush(&self) -> Result<()> {
        let mut inner = self.lock()?;
        let resident: Vec<(usize, Slot)> = inner.resident.drain(..).collect();
        for (b, slot) in resident {
            self.write_behind(&mut inner, b, slot)?;
        }
        for (_, w) in std::mem::take(&mut inner.writing) {
            w.recv()
                .map_err(|_| Error::Msg(format!("swap write of {} lost", self.path.display())))??;
        }
        // Reads ahead that nobody consumed.
        let early = std::mem::take(&mut inner.early);
        for (_, r) in std::mem::take(&mut inner.reading).into_iter().chain(early) {
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
        if let Ok(mut l) = LIVE.lock() {
            l.retain(|p| p != self.path.as_ref());
        }
    }
}

/// A rank's swapper: the buffer pool its swapped buffers share and the I/O engine.
pub struct SwapIo {
    pool: Arc<BufferPool>,
    io: Arc<IoThreads>,
    direct: bool,
}

impl SwapIo {
    pub fn new(pool: Arc<BufferPool>, io: Arc<IoThreads>, direct: bool) -> Self {
        Self { pool, io, direct }
    }

    /// (bytes read, bytes written) so far.
    pub fn io_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.io.stats.read.load(Relaxed),
            self.io.stats.written.load(Relaxed),
        )
    }

    pub fn pool_bytes(&self) -> u64 {
        self.pool.bytes()
    }

    /// Blocks read ahead of the gathers so far.
    pub fn reads_ahead(&self) -> u64 {
        self.io
            .stats
            .read_ahead
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blocks of the step's states read early so far.
    pub fn reads_early(&self) -> u64 {
        self.io
            .stats
            .read_early
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the files are opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// How the swapper does I/O: `io_uring` or `threads`, with or without O_DIRECT.
    pub fn io_path(&self) -> String {
        format!(
            "{}, {}",
            self.io.backend,
            if self.direct { "O_DIRECT" } else { "buffered" }
        )
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
mod tests;

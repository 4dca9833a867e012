//! ZeRO-3 offload to NVMe (ZeRO-Infinity, the swappers of DeepSpeed's `runtime/swap_tensor/`;
//! the settings are [`offload_config`](super::offload_config)'s): `offload_optimizer {device:
//! nvme}` keeps Adam's moments and the gradient partition in swap files, `offload_param
//! {device: nvme}` the fp32 parameter pieces;
//! the optimizer step walks the partition in `sub_group_size` tiles, reading the next tile ahead
//! and writing the last behind. `device: cpu` is where this engine keeps model states anyway
//! (host memory), so it changes nothing here.
use super::flat::UpdatedPiece;
use super::offload_config::OffloadSettings;
use super::partition::Run;
use super::partitioned_param_swapper::{gathered_piece, write_pieces};
use super::stage_1_and_2::{AdamState, ZeroCore, ZeroOptimizer};
use super::states::{gather_host, load_runs, HeldBytes, RunState, Staging, ZeroStates};
use super::swap_tensor::{slot_bytes, BufferPool, IoThreads, SwapIo, SwappedBuffer};
use crate::comm::ProcessGroup;
use crate::ops::adam::{adam_step, AdamStep};
use candle_core::{bail, DType, Result, Tensor};
use std::borrow::Cow;
use std::ops::Range;
use std::path::PathBuf;

/// A flat buffer of this rank's partition: in memory, or swapped to NVMe.
pub(super) enum Flat {
    Memory(Vec<f32>),
    /// Boxed: a swapped buffer's bookkeeping is far larger than a Vec.
    Swapped(Box<SwappedBuffer>),
}

impl Flat {
    fn read(&self, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        match self {
            Flat::Memory(v) => {
                out.copy_from_slice(&v[range]);
                Ok(())
            }
            Flat::Swapped(b) => b.read_range(range, out),
        }
    }

    fn read_cow(&self, range: Range<usize>) -> Result<Cow<'_, [f32]>> {
        match self {
            Flat::Memory(v) => Ok(Cow::Borrowed(&v[range])),
            Flat::Swapped(b) => {
                let mut v = vec![0f32; range.len()];
                b.read_range(range, &mut v)?;
                Ok(Cow::Owned(v))
            }
        }
    }

    /// Applies `f(offset_in_range, chunk)` to elements `range`.
    fn update(&mut self, range: Range<usize>, mut f: impl FnMut(usize, &mut [f32])) -> Result<()> {
        match self {
            Flat::Memory(v) => {
                f(0, &mut v[range]);
                Ok(())
            }
            Flat::Swapped(b) => b.update_range(range, f),
        }
    }

    fn memory_len(&self) -> usize {
        match self {
            Flat::Memory(v) => v.len(),
            Flat::Swapped(_) => 0,
        }
    }

    pub(super) fn swapped(&self) -> Option<&SwappedBuffer> {
        match self {
            Flat::Memory(_) => None,
            Flat::Swapped(b) => Some(b),
        }
    }
}

/// A rank's stage-3 states with some swapped to NVMe: Adam's moments always, the gradients with
/// `offload_optimizer`, the fp32 parameter pieces with `offload_param`.
pub(crate) struct NvmeStates {
    m: SwappedBuffer,
    v: SwappedBuffer,
    grads: Flat,
    master: Flat,
    staging: Staging,
    io: SwapIo,
    /// Each update segment's sum of squared gradients, taken as the accumulation's last
    /// micro-batch writes them (None: not final yet): the norm without reading them back.
    norm_sq: Vec<Option<f64>>,
    /// The accumulation's final gradient pieces by bucket, kept in memory for the step instead
    /// of written to the swap file and read back (two passes over the partition fewer per
    /// step), up to `kept_cap` elements (`reduce_bucket_size` over the data-parallel size).
    kept: Vec<Option<Vec<f32>>>,
    kept_elems: usize,
    kept_cap: usize,
    /// Buckets whose gradients went to the swap file since they were zeroed (earlier
    /// micro-batches): the final sum adds what is there.
    accumulated: Vec<bool>,
    /// The coming step's constants and the buckets whose updated pieces to keep, where the
    /// step runs during the last backward (see `ZeroOptimizer::arm_step`).
    armed: Option<([AdamStep; 2], Vec<bool>)>,
    /// Buckets updated so far during this backward, and the kept updated pieces.
    updated: Vec<bool>,
    collected: Vec<(usize, Vec<f32>)>,
    /// A bucket's final gradients waiting one layer for its update, while the first blocks of
    /// its states are read ahead.
    pending: Option<(usize, Vec<f32>)>,
    /// Elements updated during backward so far.
    stepped_in_backward: u64,
    /// Pool buffers beyond the working set (`buffer_count` above it): the next step's tiles
    /// are read into them in the order the step takes them (the partition's, backward's), from
    /// the end of a step on — while the next forward leaves the disk idle — topped up as
    /// backward consumes them.
    spare: usize,
    /// The next block to read early in this step (each is read once per step).
    stream: usize,
    /// The fp32 parameter pieces live in the swap file but are also whole in memory while the
    /// armed step runs (every parameter fp32 and gathered for the next forward from the step's
    /// kept pieces): the update then takes a piece's values from its gathered parameter, and
    /// the swap file's blocks are written whole from the kept pieces at the step's end — no
    /// block of them is read (a third of the step's reads). Kept from step to step: the early
    /// reads after a step leave those blocks out while it holds.
    pieces_in_memory: bool,
    /// Whether every parameter is fp32 (its gathered values are its pieces' own).
    fp32_params: bool,
    /// Blocks of the pieces' file written whole this step (with `pieces_in_memory` the
    /// buckets `updated` during backward left their write for later).
    pieces_written: Vec<bool>,
}

impl NvmeStates {
    /// Adds this rank's reduced pieces `mine` of buckets `bs` (in order) into the swapped
    /// gradient partition; with `last` (the accumulation's last micro-batch: the sums are final)
    /// the norm's squares of the segments that count in it are taken on the way.
    fn add_reduced(&mut self, z: &ZeroCore, bs: &[usize], mine: &[f32], last: bool) -> Result<()> {
        use crate::ops::fast_math::sum_squares;
        let mut at = 0;
        for &b in bs {
            let bk = &z.layout.buckets[b];
            let piece = &mine[at..at + bk.piece];
            at += bk.piece;
            if last && self.armed.is_some() {
                let sum = self.final_sum(z, b, piece)?;
                self.step_pending(z)?;
                let first = self.m.block_of(bk.part_offset);
                self.prefetch_states(first)?;
                if bk.piece > 0 && self.m.block_of(bk.part_offset + bk.piece - 1) > first {
                    self.prefetch_states(first + 1)?;
                }
                self.pending = Some((b, sum));
                self.read_early()?;
                continue;
            }
            if last {
                self.read_early()?;
            }
            if last && self.grads.swapped().is_some() && self.kept_elems + bk.piece <= self.kept_cap
            {
                let sum = self.final_sum(z, b, piece)?;
                self.kept_elems += bk.piece;
                self.kept[b] = Some(sum);
                continue;
            }
            self.accumulated[b] = true;
            let segs: Vec<(usize, Range<usize>)> = match last {
                true => z
                    .segments
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.bucket == b && s.counts_in_norm)
                    .map(|(i, s)| (i, s.piece_offset..s.piece_offset + s.len))
                    .collect(),
                false => Vec::new(),
            };
            let mut sums = vec![0f64; segs.len()];
            self.grads
                .update(bk.part_offset..bk.part_offset + bk.piece, |o, d| {
                    d.iter_mut().zip(&piece[o..]).for_each(|(d, s)| *d += s);
                    for ((_, r), sum) in segs.iter().zip(sums.iter_mut()) {
                        let (lo, hi) = (r.start.max(o), r.end.min(o + d.len()));
                        if lo < hi {
                            *sum += sum_squares(&d[lo - o..hi - o]);
                        }
                    }
                })?;
            for ((i, _), sum) in segs.iter().zip(sums) {
                self.norm_sq[*i] = Some(sum);
            }
        }
        Ok(())
    }

    /// Bucket `b`'s final gradient piece (this micro-batch's `piece` plus what earlier ones
    /// wrote), with the norm's squares of its counted segments noted.
    fn final_sum(&mut self, z: &ZeroCore, b: usize, piece: &[f32]) -> Result<Vec<f32>> {
        use crate::ops::fast_math::sum_squares;
        let bk = &z.layout.buckets[b];
        let mut sum = piece.to_vec();
        if self.accumulated[b] {
            let mut before = vec![0f32; bk.piece];
            self.grads
                .read(bk.part_offset..bk.part_offset + bk.piece, &mut before)?;
            sum.iter_mut().zip(&before).for_each(|(s, d)| *s += d);
        }
        for (i, s) in z.segments.iter().enumerate() {
            if s.bucket == b && s.counts_in_norm {
                self.norm_sq[i] = Some(sum_squares(&sum[s.piece_offset..s.piece_offset + s.len]));
            }
        }
        Ok(sum)
    }

    /// The armed step's AdamW on bucket `b` with its final gradients `sum`, block by block
    /// (the next block read ahead), during backward. A non-finite gradient leaves the bucket to
    /// the step, which stops the run (fp32) before updating anything more.
    fn step_bucket(&mut self, z: &ZeroCore, b: usize, sum: &[f32]) -> Result<()> {
        let Some((consts, keep)) = &self.armed else {
            return Ok(());
        };
        let (consts, keep) = (*consts, keep.get(b).copied().unwrap_or(false));
        if !sum.iter().all(|g| g.is_finite()) {
            return Ok(());
        }
        let bk = &z.layout.buckets[b];
        let range = bk.part_offset..bk.part_offset + bk.piece;
        let segs: Vec<(usize, usize, bool)> = z
            .segments_of(b)
            .map(|s| {
                let at = range.start + s.piece_offset;
                (at, at + s.len, s.decay)
            })
            .collect();
        let mut out = vec![0f32; if keep { bk.piece } else { 0 }];
        let mut params = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let blk = self.m.block_of(at);
            let end = self.m.block_range(blk).end.min(range.end);
            if end < range.end {
                self.prefetch_states(blk + 1)?;
            }
            // The early reads stay ahead of the update (the blocks behind it are done).
            self.stream = self.stream.max(blk + 1);
            self.read_early()?;
            let g = &sum[at - range.start..end - range.start];
            let from = match self.pieces_in_memory {
                true => gathered_piece(z, b, at - range.start..end - range.start)?,
                false => None,
            };
            let write = !self.pieces_in_memory;
            self.adam_tile(at..end, g, &segs, &consts, &mut params, from, write)?;
            if keep {
                out[at - range.start..end - range.start].copy_from_slice(&params);
            }
            at = end;
        }
        self.updated[b] = true;
        self.stepped_in_backward += bk.piece as u64;
        if keep {
            self.collected.push((b, out));
        }
        if self.pieces_in_memory {
            // Only the blocks of this bucket can have become whole.
            let blocks = self.m.block_of(range.start)..self.m.block_of(range.end.max(1) - 1) + 1;
            let (updated, done) = (&self.updated, &mut self.pieces_written);
            write_pieces(
                z,
                &self.master,
                updated,
                done,
                &self.collected,
                blocks,
                false,
            )?;
        }
        Ok(())
    }

    /// Updates the bucket waiting for it, if any.
    fn step_pending(&mut self, z: &ZeroCore) -> Result<()> {
        match self.pending.take() {
            Some((b, sum)) => self.step_bucket(z, b, &sum),
            None => Ok(()),
        }
    }

    /// The swapped buffers the update reads: the moments and, offloaded, the parameter pieces.
    fn step_buffers(&self) -> impl Iterator<Item = &SwappedBuffer> {
        let master = self.master.swapped().filter(|_| !self.pieces_in_memory);
        [Some(&self.m), Some(&self.v), master].into_iter().flatten()
    }

    /// Reads block `b` of the moments and the parameter pieces ahead.
    fn prefetch_states(&self, b: usize) -> Result<()> {
        self.step_buffers().try_for_each(|buf| buf.prefetch(b))
    }

    /// AdamW on partition elements `r` (within one swap block) with gradients `grads`, on the
    /// parts of segments `segs` (partition ranges, decay) inside it; `params` gets the updated
    /// parameters of `r`. The parameters' values come `from` memory where given, else from
    /// the pieces' buffer; with `write` the updated ones go back there.
    #[allow(clippy::too_many_arguments)]
    fn adam_tile(
        &mut self,
        r: Range<usize>,
        grads: &[f32],
        segs: &[(usize, usize, bool)],
        consts: &[AdamStep; 2],
        params: &mut Vec<f32>,
        from: Option<Vec<f32>>,
        write: bool,
    ) -> Result<()> {
        match from {
            Some(v) => *params = v,
            None => {
                params.resize(r.len(), 0.0);
                self.master.read(r.clone(), params)?;
            }
        }
        let (mut m, mut v) = (vec![0f32; r.len()], vec![0f32; r.len()]);
        self.m.read_range(r.clone(), &mut m)?;
        self.v.read_range(r.clone(), &mut v)?;
        for &(lo, hi, decay) in segs {
            let (lo, hi) = (lo.max(r.start), hi.min(r.end));
            if lo >= hi {
                continue;
            }
            let (a, e) = (lo - r.start, hi - r.start);
            adam_step(
                &mut params[a..e],
                &grads[a..e],
                &mut m[a..e],
                &mut v[a..e],
                &consts[usize::from(decay)],
            );
        }
        // The tiles are resident: these writes touch memory, written behind later.
        self.m
            .update_range(r.clone(), |o, t| t.copy_from_slice(&m[o..o + t.len()]))?;
        self.v
            .update_range(r.clone(), |o, t| t.copy_from_slice(&v[o..o + t.len()]))?;
        match write {
            true => self
                .master
                .update(r, |o, p| p.copy_from_slice(&params[o..o + p.len()])),
            false => Ok(()),
        }
    }

    /// Whether the gradients of partition elements `r` are all kept in memory.
    fn kept_covers(&self, z: &ZeroCore, r: &Range<usize>) -> bool {
        let mut at = r.start;
        for (bk, k) in z.layout.buckets.iter().zip(&self.kept) {
            let end = bk.part_offset + bk.piece;
            if k.is_some() && bk.part_offset <= at && at < end {
                at = end;
            }
        }
        at >= r.end
    }

    /// Final gradients of partition elements `r`: the kept pieces where there are, the swap
    /// file elsewhere.
    fn read_grads(&self, z: &ZeroCore, r: Range<usize>, out: &mut [f32]) -> Result<()> {
        let mut at = r.start;
        for (bk, k) in z.layout.buckets.iter().zip(&self.kept) {
            let Some(k) = k else { continue };
            let (lo, hi) = (
                bk.part_offset.max(r.start),
                (bk.part_offset + bk.piece).min(r.end),
            );
            if lo >= hi {
                continue;
            }
            if at < lo {
                self.grads
                    .read(at..lo, &mut out[at - r.start..lo - r.start])?;
            }
            out[lo - r.start..hi - r.start]
                .copy_from_slice(&k[lo - bk.part_offset..hi - bk.part_offset]);
            at = hi;
        }
        if at < r.end {
            self.grads.read(at..r.end, &mut out[at - r.start..])?;
        }
        Ok(())
    }

    /// Buffers for this rank's partition (global rank `rank`: its own folder); `master` (the
    /// fp32 pieces) is written out when the parameters are offloaded. Up to `keep_grads`
    /// elements of the accumulation's final gradients stay in memory for the step.
    pub fn new(
        s: &OffloadSettings,
        z: &ZeroCore,
        rank: usize,
        master: Vec<f32>,
        keep_grads: usize,
    ) -> Result<Self> {
        let len = z.layout.partition_len;
        let (count, working, block) = s.pool(len);
        let pool = BufferPool::new(count, slot_bytes(block));
        let threads = IoThreads::with_aio(s.aio_queue_depth, s.aio_thread_count);
        let dir = |p: &PathBuf| p.join("zero_stage_3").join(format!("rank{rank}"));
        let Some(opt_dir) = s.optimizer_nvme.as_ref().or(s.param_nvme.as_ref()) else {
            bail!("offload without an nvme_path")
        };
        let mk = |d: &PathBuf, name: &str| {
            SwappedBuffer::new(
                &dir(d),
                name,
                len,
                block,
                s.resident_blocks,
                pool.clone(),
                threads.clone(),
            )
        };
        let (m, v) = (mk(opt_dir, "exp_avg")?, mk(opt_dir, "exp_avg_sq")?);
        let grads = match &s.optimizer_nvme {
            Some(d) => Flat::Swapped(Box::new(mk(d, "gradients")?)),
            None => Flat::Memory(vec![0f32; len]),
        };
        let master = match &s.param_nvme {
            Some(d) => {
                let b = mk(d, "fp32_params")?;
                b.update_range(0..len, |o, c| c.copy_from_slice(&master[o..o + c.len()]))?;
                b.flush()?;
                Flat::Swapped(Box::new(b))
            }
            None => Flat::Memory(master),
        };
        let direct = m.direct;
        let fp32_params = z.params.iter().all(|p| p.tensor().dtype() == DType::F32);
        Ok(Self {
            m,
            v,
            grads,
            master,
            staging: Staging::default(),
            io: SwapIo::new(pool, threads, direct),
            norm_sq: vec![None; z.segments.len()],
            kept: vec![None; z.layout.buckets.len()],
            kept_elems: 0,
            kept_cap: keep_grads,
            accumulated: vec![false; z.layout.buckets.len()],
            armed: None,
            updated: vec![false; z.layout.buckets.len()],
            collected: Vec::new(),
            pending: None,
            stepped_in_backward: 0,
            spare: count - working,
            stream: 0,
            pieces_in_memory: false,
            fp32_params,
            pieces_written: vec![false; len.div_ceil(block)],
        })
    }

    /// Reads the states of the step's next tiles early, as far as the spare buffers go.
    fn read_early(&mut self) -> Result<()> {
        if self.spare == 0 {
            return Ok(());
        }
        let bufs: Vec<&SwappedBuffer> = self.step_buffers().collect();
        let held = || bufs.iter().map(|b| b.early_reads()).sum::<usize>();
        let mut next = self.stream;
        'blocks: while next < self.m.blocks() && held() + bufs.len() <= self.spare {
            for b in &bufs {
                if !b.read_early(next)? {
                    break 'blocks;
                }
            }
            next += 1;
        }
        self.stream = next;
        Ok(())
    }

    fn buffers(&self) -> impl Iterator<Item = &SwappedBuffer> {
        [
            Some(&self.m),
            Some(&self.v),
            self.grads.swapped(),
            self.master.swapped(),
        ]
        .into_iter()
        .flatten()
    }
}

impl ZeroStates for NvmeStates {
    fn kind(&self) -> &'static str {
        "nvme"
    }

    fn accumulate(&mut self, z: &ZeroCore, i: usize, grad: &Tensor) -> Result<()> {
        self.staging.add(z, i, grad)
    }

    fn reduce(&mut self, z: &ZeroCore, bs: &[usize], last: bool) -> Result<()> {
        if bs.is_empty() {
            return Ok(());
        }
        if z.overlaps() {
            self.staging.start_reduce_scatter(z, bs, last)?;
            return self.settle(z, false);
        }
        let mine = self.staging.reduce_scatter(z, bs)?;
        self.add_reduced(z, bs, &mine, last)
    }

    fn settle(&mut self, z: &ZeroCore, all: bool) -> Result<()> {
        for r in self.staging.take_finished(z, all)? {
            self.add_reduced(z, &r.buckets, &r.data, r.last)?;
        }
        Ok(())
    }

    fn grad_norm_sq(&mut self, z: &ZeroCore) -> Result<f64> {
        // Taken as the final gradients were written, where every counted segment has it.
        let counted = z
            .segments
            .iter()
            .enumerate()
            .filter(|(_, s)| s.counts_in_norm);
        if let Some(sq) = counted
            .map(|(i, _)| self.norm_sq.get(i).copied().flatten())
            .sum::<Option<f64>>()
        {
            return Ok(sq);
        }
        let mut sq = 0.0;
        let mut tmp = Vec::new();
        for s in z.segments.iter().filter(|s| s.counts_in_norm) {
            let at = z.layout.buckets[s.bucket].part_offset + s.piece_offset;
            tmp.resize(s.len, 0.0);
            self.read_grads(z, at..at + s.len, &mut tmp)?;
            sq += crate::ops::fast_math::sum_squares(&tmp);
        }
        Ok(sq)
    }

    /// The AdamW step over swapped buffers, one `sub_group_size` tile at a time: the next tile
    /// is read ahead while this one is updated, and written behind.
    fn step(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        self.step_and_gather(z, lr, grad_scale, write_back, &[])
    }

    /// The step, keeping the updated pieces of `ahead`'s buckets as the tiles pass: the next
    /// forward's first gather then reads nothing back from the swap file.
    fn step_and_gather(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
        ahead: &[usize],
    ) -> Result<()> {
        let consts = [false, true].map(|decay| z.adam_consts(lr, grad_scale, decay));
        // Partition ranges of the segments (weight decay differs between them) not updated
        // during backward already.
        self.step_pending(z)?;
        if self.armed.is_none() {
            // A step after backward (clipping, a loss scale) reads the pieces from the file.
            self.pieces_in_memory = false;
        }
        self.armed = None;
        let segs: Vec<(usize, usize, bool)> = z
            .segments
            .iter()
            .zip(z.segments_ranges())
            .filter(|(s, _)| !self.updated[s.bucket])
            .map(|(_, r)| r)
            .collect();
        // The parameters that stay whole (stage 3's persistent ones) take the update, and
        // those gathered ahead: their pieces are copied out as the tiles pass (or were, during
        // backward), not read back from the swap file (stage 3: a bucket per parameter).
        let ahead_buckets: Vec<usize> = ahead.iter().map(|&p| z.layout.params[p].bucket).collect();
        let mut whole: Vec<(usize, Vec<f32>)> = std::mem::take(&mut self.collected);
        let mut missing: Vec<(usize, Vec<f32>)> = (0..z.layout.buckets.len())
            .filter(|&b| write_back(b) || ahead_buckets.contains(&b))
            .filter(|b| !whole.iter().any(|w| w.0 == *b))
            .map(|b| (b, vec![0f32; z.layout.buckets[b].piece]))
            .collect();
        let (mut grads_tile, mut params_tile) = (Vec::new(), Vec::new());
        let blocks = match segs.is_empty() && missing.is_empty() {
            true => 0,
            false => self.m.blocks(),
        };
        for b in 0..blocks {
            self.prefetch_states(b + 1)?;
            self.stream = self.stream.max(b + 1);
            self.read_early()?;
            if let Some(g) = self.grads.swapped() {
                if b + 1 < g.blocks() && !self.kept_covers(z, &g.block_range(b + 1)) {
                    g.prefetch(b + 1)?;
                }
            }
            let r = self.m.block_range(b);
            grads_tile.resize(r.len(), 0.0);
            self.read_grads(z, r.clone(), &mut grads_tile)?;
            let tile = &mut params_tile;
            self.adam_tile(r.clone(), &grads_tile, &segs, &consts, tile, None, true)?;
            for (wb, piece) in missing.iter_mut() {
                let bk = &z.layout.buckets[*wb];
                let (lo, hi) = (
                    bk.part_offset.max(r.start),
                    (bk.part_offset + bk.piece).min(r.end),
                );
                if lo < hi {
                    piece[lo - bk.part_offset..hi - bk.part_offset]
                        .copy_from_slice(&params_tile[lo - r.start..hi - r.start]);
                }
            }
        }
        whole.append(&mut missing);
        whole.sort_unstable_by_key(|w| w.0);
        if self.pieces_in_memory {
            let all = 0..self.pieces_written.len();
            let (updated, done) = (&self.updated, &mut self.pieces_written);
            write_pieces(z, &self.master, updated, done, &whole, all, true)?;
        }
        // The last tiles' writes go on behind the write-back and the next forward (which
        // reads no state; a gather that reads a piece waits for its block's write).
        self.buffers().try_for_each(|b| b.write_out())?;
        // The next step's first tiles come in while the next forward runs.
        self.stream = 0;
        self.read_early()?;
        let mut kept = Vec::new();
        for (b, piece) in whole {
            if write_back(b) {
                z.write_bucket(&z.layout.buckets[b], UpdatedPiece::Values(piece))?;
            } else {
                kept.push((z.layout.buckets[b].part_offset, piece));
            }
        }
        // `gather_host` asks for whole pieces, by partition range.
        gather_host(z, ahead, &|range, out| {
            let at = kept.partition_point(|k| k.0 < range.start);
            match kept.get(at) {
                Some((off, piece)) if *off == range.start && piece.len() == out.len() => {
                    out.copy_from_slice(piece);
                    Ok(())
                }
                _ => bail!("ZeRO-3 step: no updated piece at {range:?} to gather"),
            }
        })
    }

    fn gather(&self, z: &ZeroCore, todo: &[usize]) -> Result<()> {
        gather_host(z, todo, &|range, out| self.master.read(range, out))
    }

    fn read_ahead(&self, z: &ZeroCore, params: &[usize]) -> Result<()> {
        let Some(master) = self.master.swapped() else {
            return Ok(());
        };
        for r in z.layout.runs.iter().filter(|r| params.contains(&r.param)) {
            let at = z.layout.buckets[r.bucket].part_offset + r.piece_offset;
            master.read_ahead(at..at + r.len)?;
        }
        Ok(())
    }

    fn all_reduce_param_grad(&mut self, _: &ZeroCore, _: usize, _: &ProcessGroup) -> Result<()> {
        bail!("NVMe offload (stage 3) keeps only this rank's gradient partition")
    }

    fn run_state<'a>(&'a self, z: &ZeroCore, r: &Run) -> Result<RunState<'a>> {
        let at = z.layout.buckets[r.bucket].part_offset + r.piece_offset;
        let read = |b: &SwappedBuffer| -> Result<Cow<'a, [f32]>> {
            let mut v = vec![0f32; r.len];
            b.read_range(at..at + r.len, &mut v)?;
            Ok(Cow::Owned(v))
        };
        Ok((
            read(&self.m)?,
            read(&self.v)?,
            Some(self.master.read_cow(at..at + r.len)?),
        ))
    }

    fn load(&mut self, z: &ZeroCore, state: &[Option<AdamState>]) -> Result<()> {
        let (mb, vb) = (&self.m, &self.v);
        load_runs(z, state, |range, m, v| {
            mb.update_range(range.clone(), |o, d| d.copy_from_slice(&m[o..o + d.len()]))?;
            vb.update_range(range, |o, d| d.copy_from_slice(&v[o..o + d.len()]))
        })
    }

    fn segments_changed(&mut self, z: &ZeroCore) -> Result<()> {
        self.norm_sq = vec![None; z.segments.len()];
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.staging.clear();
        self.norm_sq.iter_mut().for_each(|s| *s = None);
        self.kept.iter_mut().for_each(|k| *k = None);
        self.kept_elems = 0;
        self.accumulated.iter_mut().for_each(|a| *a = false);
        self.armed = None;
        self.updated.iter_mut().for_each(|u| *u = false);
        self.collected.clear();
        self.pending = None;
        self.pieces_written.iter_mut().for_each(|w| *w = false);
        match &mut self.grads {
            Flat::Memory(v) => super::flat::fill_zero(v),
            Flat::Swapped(b) => b.zero()?,
        }
        Ok(())
    }

    /// The resident blocks live in the pool, which is counted once, as buffers.
    fn bytes(&self, _z: &ZeroCore) -> HeldBytes {
        HeldBytes {
            gradients: 4 * (self.grads.memory_len() + self.kept_elems) as u64,
            moments: 0,
            master: 4 * self.master.memory_len() as u64,
            buffers: self.io.pool_bytes(),
        }
    }

    fn has_master(&self) -> bool {
        true
    }

    fn swap_io(&self) -> Option<&SwapIo> {
        Some(&self.io)
    }

    fn pieces_swapped(&self) -> bool {
        self.master.swapped().is_some()
    }

    fn arm_step(&mut self, consts: [AdamStep; 2], keep: Vec<bool>) -> bool {
        // Every piece kept for the next forward's gather: the step's end has them all.
        self.pieces_in_memory =
            self.fp32_params && self.master.swapped().is_some() && keep.iter().all(|&k| k);
        self.armed = Some((consts, keep));
        true
    }

    fn stepped_in_backward(&self) -> u64 {
        self.stepped_in_backward
    }

    fn swap_io_by_buffer(&self) -> Vec<(String, u64, u64)> {
        self.buffers()
            .map(|b| {
                let (r, w) = b.io_bytes();
                (b.name().to_string(), r, w)
            })
            .collect()
    }
}

impl ZeroOptimizer {
    /// Before the accumulation's last backward, where the update needs no global gradient norm
    /// (no clipping, no loss scale): with NVMe offload each bucket's pieces are then updated as
    /// its final gradients arrive, while backward goes on, and [`Self::step`] does the rest. `lr`
    /// and `grad_scale` must be what `step` will be given. Returns whether the backend does it.
    pub fn arm_step(&mut self, lr: f64, grad_scale: f64) -> bool {
        let consts = [false, true].map(|decay| AdamStep {
            step: self.core.step + 1,
            ..self.core.adam_consts(lr, grad_scale, decay)
        });
        let ahead: Vec<usize> = self
            .gather_ahead()
            .iter()
            .map(|&p| self.core.layout.params[p].bucket)
            .collect();
        let keep = (0..self.core.layout.buckets.len())
            .map(|b| self.writes_back(b) || ahead.contains(&b))
            .collect();
        self.states.arm_step(consts, keep)
    }
}

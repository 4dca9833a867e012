//! Where ZeRO keeps a rank's states — the gradient buffers, Adam's moments and the fp32 master
//! pieces — behind one trait, [`ZeroStates`]: host memory ([`HostStates`], here), NVMe swap files
//! ([`NvmeStates`](super::offload::NvmeStates)) and the parameters' device
//! ([`DeviceStates`](super::device::DeviceStates)). The optimizer's flow
//! ([`ZeroOptimizer`](super::ZeroOptimizer)) is the same for all three: it never asks which one
//! it holds.
use super::flat::{add_into, fill_zero, update_f32, with_f32, UpdatedPiece};
use super::partition::{FlatLayout, Run};
use super::stage_1_and_2::{AdamState, ZeroCore};
use super::swap_tensor::SwapIo;
use crate::comm::{ProcessGroup, ReduceOp, ReduceScatterWork};
use crate::layers::parameter::Param;
use crate::layers::storage::set_storage;
use crate::ops::adam::{adam_step, AdamStep};
use candle_core::{DType, Result, Tensor};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

/// One run's Adam state (m, v) and fp32 master values, borrowed where they are in memory.
pub(crate) type RunState<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>, Option<Cow<'a, [f32]>>);

/// Bytes a backend holds, by category (what of them is resident).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeldBytes {
    pub gradients: u64,
    pub moments: u64,
    /// The fp32 pieces (a master copy of half parameters, or stage 3's partition).
    pub master: u64,
    /// Swap buffers.
    pub buffers: u64,
}

/// A rank's ZeRO states. Every method gets the optimizer's shared description (`z`).
pub(crate) trait ZeroStates: Send + Sync {
    /// `host`, `nvme` or `device`.
    fn kind(&self) -> &'static str;

    /// Adds a local gradient of parameter `i` (its element count checked).
    fn accumulate(&mut self, z: &ZeroCore, i: usize, grad: &Tensor) -> Result<()>;

    /// Buckets `bs` are complete for this micro-batch: reduce-scatter them into the partition
    /// (stages 2, 3), or all-reduce them at the accumulation boundary `last` (stages 0, 1).
    fn reduce(&mut self, z: &ZeroCore, bs: &[usize], last: bool) -> Result<()>;

    /// Sum of squares of this rank's gradients that count in the norm (not yet summed over ranks).
    fn grad_norm_sq(&mut self, z: &ZeroCore) -> Result<f64>;

    /// AdamW on this rank's partition (the step count is `z.step`), then bucket `b`'s updated
    /// pieces all-gathered into its parameters where `write_back(b)`.
    fn step(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
    ) -> Result<()>;

    /// Stage 3: all-gathers the pieces of parameters `todo` into their tensors.
    fn gather(&self, z: &ZeroCore, todo: &[usize]) -> Result<()>;

    /// [`Self::step`], then parameters `ahead` (the next forward's first gather) gathered from
    /// the updated pieces. Where reading the pieces back costs I/O, the step keeps them as its
    /// tiles pass instead.
    fn step_and_gather(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
        ahead: &[usize],
    ) -> Result<()> {
        self.step(z, lr, grad_scale, write_back)?;
        match ahead.is_empty() {
            true => Ok(()),
            false => self.gather(z, ahead),
        }
    }

    /// Whether the parameter pieces are read back through I/O (NVMe): worth gathering the next
    /// forward's first parameters from the step's updated tiles.
    fn pieces_swapped(&self) -> bool {
        false
    }

    /// Takes the coming step's constants before the accumulation's last backward, to update
    /// each bucket as its final gradients arrive (the pieces of buckets `keep[b]` are kept for
    /// the step's write-back and gather). False where the backend does not.
    fn arm_step(&mut self, _consts: [AdamStep; 2], _keep: Vec<bool>) -> bool {
        false
    }

    /// Partition elements updated during backward so far (armed steps).
    fn stepped_in_backward(&self) -> u64 {
        0
    }

    /// Sums parameter `i`'s reduced gradient over `group` (stages 0 and 1: tied weights).
    fn all_reduce_param_grad(&mut self, z: &ZeroCore, i: usize, group: &ProcessGroup)
        -> Result<()>;

    /// Adam's state and master values of run `r`.
    fn run_state<'a>(&'a self, z: &ZeroCore, r: &Run) -> Result<RunState<'a>>;

    /// Restores Adam's state from each parameter's whole local (m, v) (None: zero), and re-reads
    /// a master copy of half parameters from the parameters (stages 0-2).
    fn load(&mut self, z: &ZeroCore, state: &[Option<AdamState>]) -> Result<()>;

    /// Clears the gradients for the next accumulation.
    fn zero_grad(&mut self) -> Result<()>;

    /// What is held, by category.
    fn bytes(&self, z: &ZeroCore) -> HeldBytes;

    /// Whether an fp32 master copy of the pieces is kept.
    fn has_master(&self) -> bool;

    /// Adds in the reductions started with `overlap_comm` that have finished (oldest first;
    /// with `all`, waits for every one). Called between layers, and before anything reads the
    /// gradients.
    fn settle(&mut self, _z: &ZeroCore, _all: bool) -> Result<()> {
        Ok(())
    }

    /// Stage 3: starts reading the pieces of parameters `params` where they are swapped out
    /// (the next gather's), without waiting.
    fn read_ahead(&self, _z: &ZeroCore, _params: &[usize]) -> Result<()> {
        Ok(())
    }

    /// The segments changed (a pipeline's duplicate tied weight no longer counts in the norm).
    fn segments_changed(&mut self, _z: &ZeroCore) -> Result<()> {
        Ok(())
    }

    /// NVMe offload's swapper (None elsewhere).
    fn swap_io(&self) -> Option<&SwapIo> {
        None
    }

    /// NVMe offload: (swap file name, bytes read, bytes written) of each swapped buffer.
    fn swap_io_by_buffer(&self) -> Vec<(String, u64, u64)> {
        Vec::new()
    }
}

/// Stage 2 and 3's buckets of local gradients being filled by the running backward, and their
/// reduce-scatters (shared by the host and NVMe backends); with `overlap_comm`, the reductions
/// in flight while backward goes on.
#[derive(Default)]
pub(crate) struct Staging {
    buffers: HashMap<usize, Vec<f32>>,
    /// Started reductions, oldest first: finished in that order, so a bucket's pieces of
    /// successive micro-batches are added in the order the blocking path adds them.
    in_flight: VecDeque<InFlight>,
    /// Elements of the send buffers held by `in_flight`.
    in_flight_len: usize,
}

/// A reduction started with `overlap_comm`.
struct InFlight {
    buckets: Vec<usize>,
    work: ReduceScatterWork<f32>,
    send_len: usize,
    /// Stages 0/1: an all-reduce of one bucket, whose reduced chunk is all-gathered back.
    whole: bool,
    /// Of the accumulation's last micro-batch: adding it in makes the gradients final.
    last: bool,
}

/// A finished reduction: this rank's pieces of `buckets` (in order), or (`whole`, stages 0/1)
/// the whole reduced bucket.
pub(crate) struct Reduced {
    pub buckets: Vec<usize>,
    pub data: Vec<f32>,
    pub whole: bool,
    pub last: bool,
}

impl Staging {
    /// Adds parameter `i`'s local gradient into its bucket's staging buffer.
    pub fn add(&mut self, z: &ZeroCore, i: usize, grad: &Tensor) -> Result<()> {
        let fp = &z.layout.params[i];
        let b = &z.layout.buckets[fp.bucket];
        if !self.buffers.contains_key(&fp.bucket) {
            let staged: usize = self.buffers.values().map(|v| v.len()).sum();
            z.note_comm(4 * (staged + self.in_flight_len + b.padded));
        }
        let buf = self
            .buffers
            .entry(fp.bucket)
            .or_insert_with(|| vec![0f32; b.padded]);
        add_into(grad, &mut buf[fp.offset..fp.offset + fp.numel])
    }

    /// Rank k's chunk of buckets `bs`, for every k in turn: its piece of every bucket, in order
    /// (buckets nothing was staged for count as zeros).
    fn send_buffer(&mut self, z: &ZeroCore, bs: &[usize]) -> Vec<f32> {
        let parts = z.layout.parts;
        let pieces: usize = bs.iter().map(|&b| z.layout.buckets[b].piece).sum();
        // One bucket's staging buffer is already in that order: it is sent as it is (no copy of
        // the bucket, no fresh buffer).
        if let [b] = bs {
            if self
                .buffers
                .get(b)
                .is_some_and(|v| v.len() == pieces * parts)
            {
                return self.buffers.remove(b).unwrap_or_default();
            }
        }
        let mut send = vec![0f32; pieces * parts];
        let mut at = 0;
        for &b in bs {
            let bk = &z.layout.buckets[b];
            if let Some(local) = self.buffers.remove(&b) {
                for k in 0..parts {
                    let dst = k * pieces + at;
                    send[dst..dst + bk.piece]
                        .copy_from_slice(&local[k * bk.piece..(k + 1) * bk.piece]);
                }
            }
            at += bk.piece;
        }
        send
    }

    /// One reduce-scatter over the ranks' pieces of buckets `bs` into `out`: this rank's pieces
    /// of all of them, in order (`out` has their length; there must be peers).
    pub fn reduce_scatter_into(
        &mut self,
        z: &ZeroCore,
        bs: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let send = self.send_buffer(z, bs);
        z.note_comm(4 * (send.len() + self.in_flight_len));
        match &z.dp {
            Some(dp) => dp.comm.reduce_scatter(&dp.group, &send, out, ReduceOp::Sum),
            None => candle_core::bail!("reduce_scatter_into without a data-parallel group"),
        }
    }

    /// [`Self::reduce_scatter_into`] a new buffer (without peers: the staged gradients).
    pub fn reduce_scatter(&mut self, z: &ZeroCore, bs: &[usize]) -> Result<Vec<f32>> {
        if z.dp.is_none() || z.layout.parts < 2 {
            return Ok(self.send_buffer(z, bs));
        }
        let pieces: usize = bs.iter().map(|&b| z.layout.buckets[b].piece).sum();
        z.note_comm(4 * (pieces * (z.layout.parts + 1) + self.in_flight_len));
        let mut piece = vec![0f32; pieces];
        self.reduce_scatter_into(z, bs, &mut piece)?;
        Ok(piece)
    }

    /// [`Self::reduce_scatter`] started and queued, not waited for (`overlap_comm`); `last`:
    /// of the accumulation's last micro-batch.
    pub fn start_reduce_scatter(&mut self, z: &ZeroCore, bs: &[usize], last: bool) -> Result<()> {
        let send = self.send_buffer(z, bs);
        let work = match (&z.dp, z.layout.parts > 1) {
            (Some(dp), true) => dp.reduce_scatter_start(send, ReduceOp::Sum)?,
            _ => ReduceScatterWork::done(send),
        };
        self.queue(z, bs.to_vec(), work, false, last);
        Ok(())
    }

    /// Stages 0/1 (`overlap_comm`): starts the all-reduce of bucket `b`'s gradients `grads`
    /// over the data-parallel group as a reduce-scatter; its reduced chunk is all-gathered when
    /// it is finished. Element for element the same sums as the blocking all-reduce.
    pub fn start_all_reduce(&mut self, z: &ZeroCore, b: usize, grads: &[f32]) -> Result<()> {
        let Some(dp) = &z.dp else { return Ok(()) };
        let mut send = Vec::with_capacity(grads.len().div_ceil(dp.size()) * dp.size());
        send.extend_from_slice(grads);
        send.resize(send.capacity(), 0.0);
        let work = dp.reduce_scatter_start(send, ReduceOp::Sum)?;
        self.queue(z, vec![b], work, true, true);
        Ok(())
    }

    fn queue(
        &mut self,
        z: &ZeroCore,
        buckets: Vec<usize>,
        work: ReduceScatterWork<f32>,
        whole: bool,
        last: bool,
    ) {
        let send_len = work.len() * z.dp.as_ref().map_or(1, |g| g.size());
        self.in_flight_len += send_len;
        let staged: usize = self.buffers.values().map(|v| v.len()).sum();
        z.note_comm(4 * (staged + self.in_flight_len + work.len()));
        self.in_flight.push_back(InFlight {
            buckets,
            work,
            send_len,
            whole,
            last,
        });
        z.note_in_flight(self.in_flight.len());
    }

    /// The reductions that are finished, oldest first, stopping at the first that is not (with
    /// `all`: every one, waiting for them). A stage 0/1 all-reduce's all-gather is a blocking
    /// collective: it is done only with `all`, when every rank is past its backward.
    pub fn take_finished(&mut self, z: &ZeroCore, all: bool) -> Result<Vec<Reduced>> {
        let mut out = Vec::new();
        while let Some(front) = self.in_flight.front_mut() {
            if !all && (front.whole || !front.work.is_completed()?) {
                break;
            }
            let Some(f) = self.in_flight.pop_front() else {
                break;
            };
            self.in_flight_len -= f.send_len;
            let mut chunk = vec![0f32; f.work.len()];
            f.work.wait(&mut chunk)?;
            let data = match (&z.dp, f.whole) {
                (Some(dp), true) => {
                    let mut full = vec![0f32; chunk.len() * dp.size()];
                    dp.comm.all_gather(&dp.group, &chunk, &mut full)?;
                    full
                }
                _ => chunk,
            };
            out.push(Reduced {
                buckets: f.buckets,
                data,
                whole: f.whole,
                last: f.last,
            });
        }
        Ok(out)
    }

    pub fn clear(&mut self) {
        self.buffers.clear();
    }
}

/// Reads this rank's fp32 pieces `range` into a buffer (from memory or a swap file).
pub(crate) type ReadMaster<'a> = dyn Fn(std::ops::Range<usize>, &mut [f32]) -> Result<()> + 'a;

/// Stage 3 on host memory: all-gathers the fp32 pieces of parameters `todo` (this rank's read by
/// `read_master`) into their tensors.
pub(crate) fn gather_host(z: &ZeroCore, todo: &[usize], read_master: &ReadMaster) -> Result<()> {
    if todo.is_empty() {
        return Ok(());
    }
    let layout = &z.layout;
    let pieces: Vec<(usize, usize, usize)> = todo
        .iter()
        .map(|&p| {
            let b = &layout.buckets[layout.params[p].bucket];
            (p, b.part_offset, b.piece)
        })
        .collect();
    let send_len: usize = pieces.iter().map(|x| x.2).sum();
    let mut send = vec![0f32; send_len];
    // Read in partition order (the layers come in forward order, the partition in backward
    // order): a swapped partition then loads each block once, not again at every boundary.
    let mut at = 0;
    let mut order: Vec<(usize, usize, usize)> = pieces
        .iter()
        .map(|&(_, off, piece)| {
            at += piece;
            (off, piece, at - piece)
        })
        .collect();
    order.sort_unstable();
    for (off, piece, at) in order {
        read_master(off..off + piece, &mut send[at..at + piece])?;
    }
    let parts = layout.parts;
    z.note_comm(4 * send_len * (parts + 1));
    let recv = match (&z.dp, parts > 1) {
        (Some(dp), true) => {
            let mut recv = vec![0f32; send_len * parts];
            dp.comm.all_gather(&dp.group, &send, &mut recv)?;
            recv
        }
        _ => send,
    };
    // Rank k's block holds its piece of every parameter in `todo`, in order.
    let mut within = 0;
    for &(p, _, piece) in &pieces {
        let numel = z.params[p].tensor().elem_count();
        let mut full = Vec::with_capacity(piece * parts);
        for k in 0..parts {
            let at = k * send_len + within;
            full.extend_from_slice(&recv[at..at + piece]);
        }
        full.truncate(numel);
        set_storage(&z.params[p].var, full)?;
        within += piece;
    }
    Ok(())
}

/// Writes each run's slice of its parameter's (m, v) into this rank's partition-ordered
/// `exp_avg` / `exp_avg_sq` through `put(partition range, m, v)`.
pub(crate) fn load_runs(
    z: &ZeroCore,
    state: &[Option<AdamState>],
    mut put: impl FnMut(std::ops::Range<usize>, &[f32], &[f32]) -> Result<()>,
) -> Result<()> {
    for r in &z.layout.runs {
        if let Some((m, v)) = &state[r.param] {
            let at = z.layout.buckets[r.bucket].part_offset + r.piece_offset;
            let src = r.param_offset..r.param_offset + r.len;
            put(at..at + r.len, &m[src.clone()], &v[src])?;
        }
    }
    Ok(())
}

/// States in host memory (on the CPU, where they are anyway; on a GPU, ZeRO-Offload's
/// `offload_optimizer.device: cpu`).
pub(crate) struct HostStates {
    /// Stages 0/1: the whole padded flat buffer. Stages 2/3: this rank's partition.
    grads: Vec<f32>,
    /// Stages 2/3: buckets of local gradients being filled by the running backward.
    staging: Staging,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// fp32 copy of this rank's partition when parameters are fp16/bf16; at stage 3 the
    /// partitioned parameters themselves.
    master: Option<Vec<f32>>,
    /// Stages 2/3, by bucket: its gradient piece is still zero since the last `zero_grad`, so
    /// its first reduction is written there directly (no buffer for the reduced piece, no pass
    /// adding it in: 0 + x is x).
    zeroed: Vec<bool>,
}

impl HostStates {
    pub fn new(z: &ZeroCore, master: Option<Vec<f32>>) -> Self {
        let n = z.layout.partition_len;
        Self {
            grads: vec![0f32; z.grad_len()],
            zeroed: vec![true; z.layout.buckets.len()],
            staging: Staging::default(),
            exp_avg: vec![0f32; n],
            exp_avg_sq: vec![0f32; n],
            master,
        }
    }

    /// A master copy of this rank's partition read from the (half-precision) parameters.
    pub fn master_from_params(layout: &FlatLayout, params: &[Param]) -> Result<Vec<f32>> {
        let mut m = vec![0f32; layout.partition_len];
        read_params_into(layout, params, &mut m)?;
        Ok(m)
    }

    /// Where this rank's pieces of buckets `bs` lie in the partition when they can take a
    /// reduction directly: peers to reduce with, every piece still zero, and the pieces
    /// adjacent in `bs`'s order (as the reduce-scatter returns them).
    fn zeroed_pieces(&self, z: &ZeroCore, bs: &[usize]) -> Option<std::ops::Range<usize>> {
        let (&first, buckets) = (bs.first()?, &z.layout.buckets);
        if z.dp.is_none() || z.layout.parts < 2 || !bs.iter().all(|&b| self.zeroed[b]) {
            return None;
        }
        let mut end = buckets[first].part_offset;
        for &b in bs {
            if buckets[b].part_offset != end {
                return None;
            }
            end += buckets[b].piece;
        }
        Some(buckets[first].part_offset..end)
    }

    /// Adds this rank's reduced pieces `mine` of buckets `bs` (in order) into its partition.
    fn add_reduced(&mut self, z: &ZeroCore, bs: &[usize], mine: &[f32]) {
        bs.iter().for_each(|&b| self.zeroed[b] = false);
        let mut at = 0;
        for &b in bs {
            let bk = &z.layout.buckets[b];
            let range = bk.part_offset..bk.part_offset + bk.piece;
            self.grads[range]
                .iter_mut()
                .zip(&mine[at..at + bk.piece])
                .for_each(|(d, s)| *d += s);
            at += bk.piece;
        }
    }

    /// This rank's piece of bucket `b`'s reduced gradients.
    fn grad_piece(&self, z: &ZeroCore, b: usize) -> &[f32] {
        let start = z.grad_piece_offset(b);
        &self.grads[start..start + z.layout.buckets[b].piece]
    }

    /// Bucket `b`'s AdamW step on this rank's piece, applied to its parameters' own storage
    /// (fp32 CPU tensors, no master copy); false, with nothing done, where a parameter is not
    /// such a tensor.
    fn step_bucket_in_place(
        &mut self,
        z: &ZeroCore,
        b: usize,
        lr: f64,
        grad_scale: f64,
    ) -> Result<bool> {
        let bk = &z.layout.buckets[b];
        let (gstart, mstart) = (z.grad_piece_offset(b), bk.part_offset);
        let runs: Vec<_> = z.layout.runs.iter().filter(|r| r.bucket == b).collect();
        let fits = runs.iter().all(|r| {
            let t = z.params[r.param].tensor();
            t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
        });
        if !fits {
            return Ok(false);
        }
        for r in runs {
            let p = &z.params[r.param];
            let consts = z.adam_consts(lr, grad_scale, p.meta.weight_decay);
            let (lo, hi) = (r.piece_offset, r.piece_offset + r.len);
            let (exp_avg, exp_avg_sq) = (
                &mut self.exp_avg[mstart + lo..mstart + hi],
                &mut self.exp_avg_sq[mstart + lo..mstart + hi],
            );
            let grads = &self.grads[gstart + lo..gstart + hi];
            update_f32(p.tensor(), |v| {
                adam_step(
                    &mut v[r.param_offset..r.param_offset + r.len],
                    grads,
                    exp_avg,
                    exp_avg_sq,
                    &consts,
                )
            })?;
        }
        Ok(true)
    }
}

/// Copies each run of this rank's partition out of its parameter (flattened, as f32) into
/// `dst` (partition-ordered).
pub(crate) fn read_params_into(
    layout: &FlatLayout,
    params: &[Param],
    dst: &mut [f32],
) -> Result<()> {
    for r in &layout.runs {
        let at = layout.buckets[r.bucket].part_offset + r.piece_offset;
        with_f32(params[r.param].tensor(), |v| {
            dst[at..at + r.len].copy_from_slice(&v[r.param_offset..r.param_offset + r.len])
        })?;
    }
    Ok(())
}

impl ZeroStates for HostStates {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn accumulate(&mut self, z: &ZeroCore, i: usize, grad: &Tensor) -> Result<()> {
        if z.partitioned_grads() {
            return self.staging.add(z, i, grad);
        }
        let fp = &z.layout.params[i];
        let at = z.layout.buckets[fp.bucket].offset + fp.offset;
        add_into(grad, &mut self.grads[at..at + fp.numel])
    }

    fn reduce(&mut self, z: &ZeroCore, bs: &[usize], last: bool) -> Result<()> {
        if !z.partitioned_grads() {
            if let (true, Some(dp)) = (last, &z.dp) {
                for &b in bs {
                    let bucket = &z.layout.buckets[b];
                    let buf = &mut self.grads[bucket.offset..bucket.offset + bucket.padded];
                    if z.overlap_comm {
                        self.staging.start_all_reduce(z, b, buf)?;
                    } else {
                        dp.comm.all_reduce(&dp.group, buf, ReduceOp::Sum)?;
                    }
                }
            }
            return self.settle(z, false);
        }
        if bs.is_empty() {
            return Ok(());
        }
        if z.overlaps() {
            self.staging.start_reduce_scatter(z, bs, last)?;
            return self.settle(z, false);
        }
        if let Some(range) = self.zeroed_pieces(z, bs) {
            self.staging
                .reduce_scatter_into(z, bs, &mut self.grads[range])?;
            bs.iter().for_each(|&b| self.zeroed[b] = false);
            return Ok(());
        }
        let mine = self.staging.reduce_scatter(z, bs)?;
        self.add_reduced(z, bs, &mine);
        Ok(())
    }

    fn settle(&mut self, z: &ZeroCore, all: bool) -> Result<()> {
        for r in self.staging.take_finished(z, all)? {
            if r.whole {
                let bk = &z.layout.buckets[r.buckets[0]];
                self.grads[bk.offset..bk.offset + bk.padded].copy_from_slice(&r.data[..bk.padded]);
            } else {
                self.add_reduced(z, &r.buckets, &r.data);
            }
        }
        Ok(())
    }

    fn grad_norm_sq(&mut self, z: &ZeroCore) -> Result<f64> {
        Ok(z.segments
            .iter()
            .filter(|s| s.counts_in_norm)
            .map(|s| {
                let g = &self.grad_piece(z, s.bucket)[s.piece_offset..s.piece_offset + s.len];
                crate::ops::fast_math::sum_squares(g)
            })
            .sum())
    }

    fn step(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        // fp32 parameters are updated where they live: no copy of this rank's piece out and
        // back (the write-back's all-gather reads it from the parameters).
        let in_place = self.master.is_none() && z.stage != 3;
        for b in 0..z.layout.buckets.len() {
            if in_place && self.step_bucket_in_place(z, b, lr, grad_scale)? {
                if write_back(b) {
                    z.write_bucket(&z.layout.buckets[b], UpdatedPiece::InParams)?;
                }
                continue;
            }
            let bk = &z.layout.buckets[b];
            let part = bk.part_offset..bk.part_offset + bk.piece;
            let mut piece = match &self.master {
                Some(m) => m[part.clone()].to_vec(),
                None => {
                    let mut v = vec![0f32; bk.piece];
                    for r in z.layout.runs.iter().filter(|r| r.bucket == b) {
                        with_f32(z.params[r.param].tensor(), |p| {
                            v[r.piece_offset..r.piece_offset + r.len]
                                .copy_from_slice(&p[r.param_offset..r.param_offset + r.len])
                        })?;
                    }
                    v
                }
            };
            let start = z.grad_piece_offset(b);
            for s in z.segments_of(b) {
                let (lo, hi) = (s.piece_offset, s.piece_offset + s.len);
                let (plo, phi) = (bk.part_offset + lo, bk.part_offset + hi);
                adam_step(
                    &mut piece[lo..hi],
                    &self.grads[start + lo..start + hi],
                    &mut self.exp_avg[plo..phi],
                    &mut self.exp_avg_sq[plo..phi],
                    &z.adam_consts(lr, grad_scale, s.decay),
                );
            }
            if let Some(m) = &mut self.master {
                m[part].copy_from_slice(&piece);
            }
            if write_back(b) {
                z.write_bucket(bk, UpdatedPiece::Values(piece))?;
            }
        }
        Ok(())
    }

    fn gather(&self, z: &ZeroCore, todo: &[usize]) -> Result<()> {
        let Some(master) = &self.master else {
            candle_core::bail!("ZeRO-3 without a partition")
        };
        gather_host(z, todo, &|range, out| {
            out.copy_from_slice(&master[range]);
            Ok(())
        })
    }

    fn all_reduce_param_grad(
        &mut self,
        z: &ZeroCore,
        i: usize,
        group: &ProcessGroup,
    ) -> Result<()> {
        let fp = &z.layout.params[i];
        let at = z.layout.buckets[fp.bucket].offset + fp.offset;
        let g = &mut self.grads[at..at + fp.numel];
        group.comm.all_reduce(&group.group, g, ReduceOp::Sum)
    }

    fn run_state<'a>(&'a self, z: &ZeroCore, r: &Run) -> Result<RunState<'a>> {
        let at = z.layout.buckets[r.bucket].part_offset + r.piece_offset;
        let range = at..at + r.len;
        Ok((
            Cow::Borrowed(&self.exp_avg[range.clone()]),
            Cow::Borrowed(&self.exp_avg_sq[range.clone()]),
            self.master.as_ref().map(|m| Cow::Borrowed(&m[range])),
        ))
    }

    fn load(&mut self, z: &ZeroCore, state: &[Option<AdamState>]) -> Result<()> {
        let (exp_avg, exp_avg_sq) = (&mut self.exp_avg, &mut self.exp_avg_sq);
        load_runs(z, state, |range, m, v| {
            exp_avg[range.clone()].copy_from_slice(m);
            exp_avg_sq[range].copy_from_slice(v);
            Ok(())
        })?;
        // Stage 3's master is the partition itself (loaded at construction).
        if let (Some(master), true) = (&mut self.master, z.stage != 3) {
            read_params_into(&z.layout, &z.params, master)?;
        }
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        fill_zero(&mut self.grads);
        self.zeroed.fill(true);
        self.staging.clear();
        Ok(())
    }

    fn bytes(&self, _z: &ZeroCore) -> HeldBytes {
        HeldBytes {
            gradients: 4 * self.grads.len() as u64,
            moments: 4 * (self.exp_avg.len() + self.exp_avg_sq.len()) as u64,
            master: 4 * self.master.as_ref().map_or(0, |m| m.len()) as u64,
            buffers: 0,
        }
    }

    fn has_master(&self) -> bool {
        self.master.is_some()
    }
}

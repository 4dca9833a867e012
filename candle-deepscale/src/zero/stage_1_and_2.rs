//! ZeRO stages 0, 1 and 2 over flat fp32 buffers (DeepSpeed's `stage_1_and_2.py`).
//!
//! Stage 0 keeps every gradient and all optimizer state on every rank and all-reduces gradients;
//! stage 1 partitions the optimizer state (each rank updates its piece of every bucket, then the
//! updated pieces are all-gathered); stage 2 also partitions the gradients: each bucket is
//! reduce-scattered as soon as backward has produced it, so a rank never holds the whole gradient.
//! Parameters are updated in place in their own tensors (fp32) or, for fp16/bf16 parameters, in an
//! fp32 master copy of the rank's partition that is written back rounded.
use super::flat::{add_into, update_f32, with_f32, write_var};
use super::partition::FlatLayout;
use crate::adamw::AdamWConfig;
use crate::comm::{ProcessGroup, ReduceOp};
use crate::cpu_adam::{adam_step, AdamStep};
use crate::module::Layer;
use crate::parameter::{Param, Partition};
use candle_core::{bail, DType, Result, Tensor, TensorId};
use std::collections::HashMap;

/// A stretch of a rank's piece with one weight-decay and grad-norm setting.
#[derive(Debug, Clone)]
struct Segment {
    bucket: usize,
    piece_offset: usize,
    len: usize,
    decay: bool,
    counts_in_norm: bool,
}

/// Model-state bytes of one rank: measured from the buffers held, and DeepSpeed's formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StateBytes {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    /// NVMe offload: the swap buffers' pool (what of the swapped state is resident is counted
    /// in its category).
    pub buffers: u64,
}

impl StateBytes {
    pub fn total(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer + self.buffers
    }
}

/// A parameter's whole local Adam state (m, v), flattened.
pub type AdamState = (Vec<f32>, Vec<f32>);

/// One stretch of a parameter's optimizer state held by this rank.
pub struct OptimizerRun<'a> {
    pub param: &'a Param,
    /// Offset within the parameter's flattened local tensor.
    pub offset: usize,
    pub exp_avg: std::borrow::Cow<'a, [f32]>,
    pub exp_avg_sq: std::borrow::Cow<'a, [f32]>,
    pub master: Option<std::borrow::Cow<'a, [f32]>>,
}

pub struct ZeroOptimizer {
    pub(super) stage: u8,
    pub(super) layout: FlatLayout,
    pub(super) params: Vec<Param>,
    index: HashMap<TensorId, usize>,
    /// Stage 0/1: the whole padded flat buffer. Stage 2: this rank's partition.
    pub(super) grads: Vec<f32>,
    /// Stage 2: buckets of local gradients being filled by the running backward.
    staging: HashMap<usize, Vec<f32>>,
    pub(super) exp_avg: Vec<f32>,
    pub(super) exp_avg_sq: Vec<f32>,
    /// fp32 copy of this rank's partition when parameters are fp16/bf16; at stage 3 the
    /// partitioned parameters themselves.
    pub(super) master: Option<Vec<f32>>,
    segments: Vec<Segment>,
    pub(super) dp: Option<ProcessGroup>,
    /// Stage 3: which parameters are gathered, and the knobs that decide it.
    pub(super) stage3: Option<super::stage3::Stage3>,
    /// Stage 3 with NVMe offload: the swapped buffers (the matching fields above stay empty).
    pub(super) swap: Option<super::offload::Swapped>,
    /// The buffers as tensors on the parameters' device (a GPU); the host fields stay empty.
    pub(super) device: Option<super::device::DeviceState>,
    /// Peak bytes of communication staging since last read.
    pub(super) peak_comm: std::sync::atomic::AtomicU64,
    tp: Option<ProcessGroup>,
    /// The pipeline group (stages of this data/tensor coordinate), for the gradient norm.
    pp: Option<ProcessGroup>,
    pub config: AdamWConfig,
    pub(super) step: u64,
}

impl ZeroOptimizer {
    /// The optimizer of the distinct parameters of `layers`, partitioned over `dp` at `stage`
    /// (0, 1, 2 or 3), with gradient buckets of about `bucket_elems` elements (stage 3: one per
    /// parameter, each partitioned on its own as `zero.Init` does). `tp` is the tensor-parallel
    /// group, consulted by the gradient norm.
    pub fn new(
        layers: &[&dyn Layer],
        stage: u8,
        bucket_elems: usize,
        config: AdamWConfig,
        dp: Option<ProcessGroup>,
        tp: Option<ProcessGroup>,
        stage3: super::stage3::Stage3Config,
    ) -> Result<Self> {
        if stage > 3 {
            bail!("ZeRO stages are 0, 1, 2 and 3, got {stage}")
        }
        let dp = dp.filter(|g| g.size() > 1);
        let tp = tp.filter(|g| g.size() > 1);
        let mut params: Vec<Param> = Vec::new();
        let mut index = HashMap::new();
        let mut layer_params = Vec::with_capacity(layers.len());
        for l in layers {
            let mut ids = Vec::new();
            for p in l.parameters() {
                let id = p.tensor().id();
                let i = *index.entry(id).or_insert_with(|| {
                    params.push(p.clone());
                    params.len() - 1
                });
                if !ids.contains(&i) {
                    ids.push(i);
                }
            }
            layer_params.push(ids);
        }
        for p in &params {
            if !p.tensor().dtype().is_float() {
                bail!("parameter `{}` is not floating point", p.meta.name)
            }
        }
        let numels: Vec<usize> = params.iter().map(|p| p.tensor().elem_count()).collect();
        let (parts, rank) = match (&dp, stage) {
            (Some(g), 1..=3) => (g.size(), g.rank),
            _ => (1, 0),
        };
        let bucket_elems = if stage == 3 { 1 } else { bucket_elems };
        let layout = FlatLayout::new(&layer_params, &numels, bucket_elems, parts, rank);
        let tp_rank = tp.as_ref().map_or(0, |g| g.rank);
        // Split parameters count on every tensor-parallel rank; replicated ones once (rank 0).
        let segments = build_segments(&layout, &params, |p| {
            matches!(p.meta.partition, Partition::Split { .. }) || tp_rank == 0
        });
        let grads = vec![
            0f32;
            if stage >= 2 {
                layout.partition_len
            } else {
                layout.full_len
            }
        ];
        let master = if stage == 3 {
            Some(super::stage3::take_partitions(&layout, &params)?)
        } else if params.iter().all(|p| p.tensor().dtype() == DType::F32) {
            None
        } else {
            let mut m = vec![0f32; layout.partition_len];
            for r in &layout.runs {
                let at = layout.buckets[r.bucket].part_offset + r.piece_offset;
                with_f32(params[r.param].tensor(), |v| {
                    m[at..at + r.len].copy_from_slice(&v[r.param_offset..r.param_offset + r.len])
                })?;
            }
            Some(m)
        };
        let offload = stage3
            .offload
            .clone()
            .filter(|o| o.optimizer_nvme.is_some() || o.param_nvme.is_some());
        let stage3 = if stage == 3 {
            Some(super::stage3::Stage3::new(stage3, &params, layer_params)?)
        } else {
            None
        };
        let (mut master, mut exp_len, mut grads) = (master, layout.partition_len, grads);
        let swap = match offload {
            Some(_) if stage != 3 => bail!(
                "not supported: NVMe offload at ZeRO stage {stage}, because swapping is built \
                 for stage 3 (as in DeepSpeed, offload to nvme needs stage 3)"
            ),
            Some(o) => {
                // Swap folders per global rank (tensor-parallel peers share a data-parallel rank).
                let global = dp.as_ref().or(tp.as_ref()).map_or(0, |g| g.comm.rank());
                let s = super::offload::Swapped::new(
                    &o,
                    layout.partition_len,
                    global,
                    master.as_deref().unwrap_or_default(),
                )?;
                exp_len = 0;
                if s.grads.is_some() {
                    grads = Vec::new();
                }
                if s.master.is_some() {
                    master = None;
                }
                Some(s)
            }
            None => None,
        };
        Ok(Self {
            stage,
            exp_avg: vec![0f32; exp_len],
            exp_avg_sq: vec![0f32; exp_len],
            layout,
            params,
            index,
            grads,
            staging: HashMap::new(),
            master,
            segments,
            dp,
            stage3,
            swap,
            device: None,
            peak_comm: std::sync::atomic::AtomicU64::new(0),
            tp,
            pp: None,
            config,
            step: 0,
        })
    }

    /// Pipeline stage: the gradient norm also sums over `pp` (the other stages), and parameters for
    /// which `duplicate(param)` holds (a tied weight's copy on the last stage) do not count.
    pub fn set_pipeline(
        &mut self,
        pp: ProcessGroup,
        duplicate: impl Fn(&Param) -> bool,
    ) -> Result<()> {
        let tp_rank = self.tp.as_ref().map_or(0, |g| g.rank);
        self.segments = build_segments(&self.layout, &self.params, |p| {
            (matches!(p.meta.partition, Partition::Split { .. }) || tp_rank == 0) && !duplicate(p)
        });
        self.pp = Some(pp).filter(|g| g.size() > 1);
        self.refresh_device_masks()
    }

    /// Sums parameter `i`'s reduced gradient over `group` (stages 0 and 1, which keep every
    /// gradient): weights tied across pipeline stages.
    pub fn all_reduce_param_grad(&mut self, i: usize, group: &ProcessGroup) -> Result<()> {
        if self.device.is_some() {
            return self.device_all_reduce_param_grad(i, group);
        }
        let g = self.param_grad_mut(i)?;
        group.comm.all_reduce(&group.group, g, ReduceOp::Sum)
    }

    /// This rank's update segments in bucket `b`: (piece offset, length, decays, counts in norm).
    pub(super) fn segments_of(&self, b: usize) -> Vec<(usize, usize, bool, bool)> {
        self.segments
            .iter()
            .filter(|s| s.bucket == b)
            .map(|s| (s.piece_offset, s.len, s.decay, s.counts_in_norm))
            .collect()
    }

    /// The reduced gradient of parameter `i` (stages 0 and 1, which keep every gradient).
    pub fn param_grad_mut(&mut self, i: usize) -> Result<&mut [f32]> {
        if self.device.is_some() {
            bail!("the gradients are in device memory (use all_reduce_param_grad)")
        }
        if self.stage >= 2 {
            bail!("ZeRO-2 keeps only this rank's gradient partition")
        }
        let fp = &self.layout.params[i];
        let at = self.layout.buckets[fp.bucket].offset + fp.offset;
        Ok(&mut self.grads[at..at + fp.numel])
    }

    pub fn stage(&self) -> u8 {
        self.stage
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The distinct parameters, in flat-buffer order of first appearance in the layers.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Adds a local gradient of the parameter `param` (a tensor of the layers) to the buffers.
    pub fn accumulate(&mut self, param: &Tensor, grad: &Tensor) -> Result<()> {
        let Some(&i) = self.index.get(&param.id()) else {
            bail!("gradient for a tensor that is not a parameter of the engine's layers")
        };
        let fp = &self.layout.params[i];
        if grad.elem_count() != fp.numel {
            bail!(
                "gradient of `{}` has {} elements, the parameter {}",
                self.params[i].meta.name,
                grad.elem_count(),
                fp.numel
            )
        }
        if self.device.is_some() {
            return self.device_accumulate(i, grad);
        }
        let b = &self.layout.buckets[fp.bucket];
        if self.stage >= 2 && !self.staging.contains_key(&fp.bucket) {
            let staged: usize = self.staging.values().map(|v| v.len()).sum();
            self.note_comm(4 * (staged + b.padded));
        }
        let dst = if self.stage >= 2 {
            let buf = self
                .staging
                .entry(fp.bucket)
                .or_insert_with(|| vec![0f32; b.padded]);
            &mut buf[fp.offset..fp.offset + fp.numel]
        } else {
            &mut self.grads[b.offset + fp.offset..b.offset + fp.offset + fp.numel]
        };
        add_into(grad, dst)
    }

    /// Records `bytes` of communication staging in use now.
    pub(super) fn note_comm(&self, bytes: usize) {
        self.peak_comm
            .fetch_max(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peak of communication staging since the last call.
    pub fn take_peak_comm_bytes(&self) -> u64 {
        self.peak_comm.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Bucket `b`'s local gradients are complete for this micro-batch: stage 2 reduce-scatters them
    /// into the partition; stages 0 and 1 all-reduce them at the accumulation boundary (`last`).
    pub fn reduce_bucket(&mut self, b: usize, last: bool) -> Result<()> {
        self.reduce_buckets(&[b], last)
    }

    /// [`Self::reduce_bucket`] for several buckets completed together (a layer's parameters at
    /// ZeRO-3): one reduce-scatter over the ranks' pieces of all of them.
    pub fn reduce_buckets(&mut self, bs: &[usize], last: bool) -> Result<()> {
        if self.device.is_some() {
            return self.device_reduce(bs, last);
        }
        if self.stage < 2 {
            if let (true, Some(dp)) = (last, &self.dp) {
                for &b in bs {
                    let bucket = &self.layout.buckets[b];
                    let buf = &mut self.grads[bucket.offset..bucket.offset + bucket.padded];
                    dp.comm.all_reduce(&dp.group, buf, ReduceOp::Sum)?;
                }
            }
            return Ok(());
        }
        if bs.is_empty() {
            return Ok(());
        }
        let parts = self.layout.parts;
        let pieces: usize = bs.iter().map(|&b| self.layout.buckets[b].piece).sum();
        // Rank k's chunk: its piece of every bucket, in order.
        let mut send = vec![0f32; pieces * parts];
        self.note_comm(4 * (send.len() + pieces));
        let mut at = 0;
        for &b in bs {
            let bk = &self.layout.buckets[b];
            if let Some(local) = self.staging.remove(&b) {
                for k in 0..parts {
                    send[k * pieces + at..k * pieces + at + bk.piece]
                        .copy_from_slice(&local[k * bk.piece..(k + 1) * bk.piece]);
                }
            }
            at += bk.piece;
        }
        let mine = match (&self.dp, parts > 1) {
            (Some(dp), true) => {
                let mut piece = vec![0f32; pieces];
                dp.comm
                    .reduce_scatter(&dp.group, &send, &mut piece, ReduceOp::Sum)?;
                piece
            }
            _ => send,
        };
        let mut at = 0;
        for &b in bs {
            let bk = &self.layout.buckets[b];
            let piece = &mine[at..at + bk.piece];
            let range = bk.part_offset..bk.part_offset + bk.piece;
            match self.swap.as_ref().and_then(|s| s.grads.as_ref()) {
                Some(g) => g.update_range(range, |o, d| {
                    d.iter_mut().zip(&piece[o..]).for_each(|(d, s)| *d += s)
                })?,
                None => self.grads[range]
                    .iter_mut()
                    .zip(piece)
                    .for_each(|(d, s)| *d += s),
            }
            at += bk.piece;
        }
        Ok(())
    }

    /// This rank's piece of bucket `b`'s reduced gradients.
    fn grad_piece(&self, b: usize) -> &[f32] {
        let bk = &self.layout.buckets[b];
        let start = if self.stage >= 2 {
            bk.part_offset
        } else {
            bk.offset + self.layout.rank * bk.piece
        };
        &self.grads[start..start + bk.piece]
    }

    /// Global L2 norm of the summed gradients times `scale`: tensor-parallel replicas count once,
    /// partitions are summed over the data-parallel group. Infinite or NaN on overflow.
    pub fn grad_norm(&mut self, scale: f64) -> Result<f64> {
        let mut sq = 0f64;
        if self.device.is_some() {
            sq = self.device_grad_norm_sq()?;
        }
        let swapped = self.swap.as_ref().and_then(|s| s.grads.as_ref());
        let mut tmp = Vec::new();
        let host = self.device.is_none();
        for s in self.segments.iter().filter(|s| s.counts_in_norm && host) {
            let g = match swapped {
                Some(sw) => {
                    let at = self.layout.buckets[s.bucket].part_offset + s.piece_offset;
                    tmp.resize(s.len, 0.0);
                    sw.read_range(at..at + s.len, &mut tmp)?;
                    &tmp[..]
                }
                None => &self.grad_piece(s.bucket)[s.piece_offset..s.piece_offset + s.len],
            };
            sq += crate::fast_math::sum_squares(g);
        }
        let mut buf = [sq];
        if self.layout.parts > 1 {
            if let Some(dp) = &self.dp {
                dp.all_reduce(&mut buf, ReduceOp::Sum)?;
            }
        }
        for g in [&self.tp, &self.pp].into_iter().flatten() {
            g.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        Ok(buf[0].sqrt() * scale)
    }

    /// One AdamW step at learning rate `lr` with every summed gradient multiplied by `grad_scale`,
    /// then the updated partitions all-gathered into every rank's parameters.
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        if self.swap.is_some() {
            return self.step_swapped(lr, grad_scale);
        }
        if self.device.is_some() {
            return self.device_step(lr, grad_scale);
        }
        // Unpartitioned fp32 parameters are updated where they live: no copy out and back.
        let in_place = self.master.is_none() && self.stage3.is_none() && self.layout.parts == 1;
        for b in 0..self.layout.buckets.len() {
            if in_place && self.step_bucket_in_place(b, lr, grad_scale)? {
                continue;
            }
            let bk = self.layout.buckets[b].clone();
            let mut piece = match &self.master {
                Some(m) => m[bk.part_offset..bk.part_offset + bk.piece].to_vec(),
                None => {
                    let mut v = vec![0f32; bk.piece];
                    for r in self.layout.runs.iter().filter(|r| r.bucket == b) {
                        with_f32(self.params[r.param].tensor(), |p| {
                            v[r.piece_offset..r.piece_offset + r.len]
                                .copy_from_slice(&p[r.param_offset..r.param_offset + r.len])
                        })?;
                    }
                    v
                }
            };
            let start = if self.stage >= 2 {
                bk.part_offset
            } else {
                bk.offset + self.layout.rank * bk.piece
            };
            for s in self.segments.iter().filter(|s| s.bucket == b) {
                let (lo, hi) = (s.piece_offset, s.piece_offset + s.len);
                let (plo, phi) = (bk.part_offset + lo, bk.part_offset + hi);
                let consts = self.adam_consts(lr, grad_scale, s.decay);
                adam_step(
                    &mut piece[lo..hi],
                    &self.grads[start + lo..start + hi],
                    &mut self.exp_avg[plo..phi],
                    &mut self.exp_avg_sq[plo..phi],
                    &consts,
                );
            }
            if let Some(m) = &mut self.master {
                m[bk.part_offset..bk.part_offset + bk.piece].copy_from_slice(&piece);
            }
            // Stage 3 keeps parameters partitioned (gathered around each use); its persistent
            // small ones are made whole below.
            if self.stage3.is_none() {
                self.write_bucket(&bk, piece)?;
            }
        }
        self.gather_persistent()
    }

    /// AdamW's settings for one step over a stretch that decays or not.
    pub(super) fn adam_consts(&self, lr: f64, grad_scale: f64, decay: bool) -> AdamStep {
        let c = self.config;
        AdamStep {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: if decay { c.weight_decay as f32 } else { 0.0 },
            adam_w_mode: c.adam_w_mode,
            step: self.step,
            grad_scale: grad_scale as f32,
        }
    }

    /// Bucket `b`'s AdamW step applied to its parameters' own storage (one partition, fp32 CPU
    /// tensors, no master copy); false, with nothing done, where a parameter is not such a
    /// tensor. Runs are whole parameters here, at their offsets in the bucket.
    fn step_bucket_in_place(&mut self, b: usize, lr: f64, grad_scale: f64) -> Result<bool> {
        let bk = &self.layout.buckets[b];
        let (gstart, mstart) = (bk.offset, bk.part_offset);
        let runs: Vec<_> = self.layout.runs.iter().filter(|r| r.bucket == b).collect();
        let fits = runs.iter().all(|r| {
            let t = self.params[r.param].tensor();
            t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
        });
        if !fits {
            return Ok(false);
        }
        for r in runs {
            let p = &self.params[r.param];
            let consts = self.adam_consts(lr, grad_scale, p.meta.weight_decay);
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

    /// All-gathers bucket `bk`'s updated pieces (this rank's is `piece`) into its parameters.
    fn write_bucket(&self, bk: &super::partition::Bucket, piece: Vec<f32>) -> Result<()> {
        let full = match (&self.dp, self.layout.parts > 1) {
            (Some(dp), true) => {
                let mut full = vec![0f32; bk.padded];
                dp.comm.all_gather(&dp.group, &piece, &mut full)?;
                full
            }
            _ => piece,
        };
        for &p in &bk.params {
            let fp = &self.layout.params[p];
            write_var(&self.params[p].var, &full[fp.offset..fp.offset + fp.numel])?;
        }
        Ok(())
    }

    /// The partition ranges `[lo, hi)` of the update segments and whether they decay.
    pub(super) fn segments_ranges(&self) -> Vec<(usize, usize, bool)> {
        self.segments
            .iter()
            .map(|s| {
                let at = self.layout.buckets[s.bucket].part_offset + s.piece_offset;
                (at, at + s.len, s.decay)
            })
            .collect()
    }

    /// Stage 3 after a step: the persistent (whole) parameters get their updated values.
    pub(super) fn gather_persistent(&self) -> Result<()> {
        let Some(s3) = &self.stage3 else {
            return Ok(());
        };
        for bk in &self.layout.buckets {
            if !bk.params.iter().any(|&p| s3.is_persistent(p)) {
                continue;
            }
            let mut piece = vec![0f32; bk.piece];
            self.read_master(bk.part_offset..bk.part_offset + bk.piece, &mut piece)?;
            self.write_bucket(bk, piece)?;
        }
        Ok(())
    }

    /// This rank's optimizer state, run by run: the parameter, the offset of the run within the
    /// parameter (flattened local tensor), and Adam's m, v and the fp32 master values of the run.
    pub fn state_runs(&self) -> Result<Vec<OptimizerRun<'_>>> {
        use std::borrow::Cow;
        self.layout
            .runs
            .iter()
            .map(|r| {
                let at = self.layout.buckets[r.bucket].part_offset + r.piece_offset;
                let read = |b: &super::swap_tensor::SwappedBuffer| -> Result<Cow<'_, [f32]>> {
                    let mut v = vec![0f32; r.len];
                    b.read_range(at..at + r.len, &mut v)?;
                    Ok(Cow::Owned(v))
                };
                if self.device.is_some() {
                    let (m, v, master) = self.device_run_state(r.bucket, r.piece_offset, r.len)?;
                    return Ok(OptimizerRun {
                        param: &self.params[r.param],
                        offset: r.param_offset,
                        exp_avg: Cow::Owned(m),
                        exp_avg_sq: Cow::Owned(v),
                        master: master.map(Cow::Owned),
                    });
                }
                let (exp_avg, exp_avg_sq) = match &self.swap {
                    Some(s) => (read(&s.m)?, read(&s.v)?),
                    None => (
                        Cow::Borrowed(&self.exp_avg[at..at + r.len]),
                        Cow::Borrowed(&self.exp_avg_sq[at..at + r.len]),
                    ),
                };
                let master = match (
                    &self.master,
                    self.swap.as_ref().and_then(|s| s.master.as_ref()),
                ) {
                    (_, Some(b)) => Some(read(b)?),
                    (Some(m), None) => Some(Cow::Borrowed(&m[at..at + r.len])),
                    (None, None) => None,
                };
                Ok(OptimizerRun {
                    param: &self.params[r.param],
                    offset: r.param_offset,
                    exp_avg,
                    exp_avg_sq,
                    master,
                })
            })
            .collect()
    }

    /// Restores the optimizer state: `state(param)` gives the whole local (m, v) of a parameter,
    /// flattened, or None to leave it at zero; `step` is the number of updates taken. The fp32
    /// master copy (half parameters) is re-read from the parameters, which must be loaded first.
    pub fn load_state(
        &mut self,
        step: u64,
        mut state: impl FnMut(&Param) -> Result<Option<AdamState>>,
    ) -> Result<()> {
        if self.device.is_some() {
            // Through host memory (a checkpoint is read there anyway), then back.
            self.device_download()?;
            self.load_state(step, state)?;
            return self.use_device_states();
        }
        let mut cache: HashMap<usize, Option<AdamState>> = HashMap::new();
        for r in &self.layout.runs {
            let p = &self.params[r.param];
            if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(r.param) {
                let s = state(p)?;
                if let Some((m, v)) = &s {
                    let n = p.tensor().elem_count();
                    if m.len() != n || v.len() != n {
                        bail!(
                            "optimizer state of `{}`: {} / {} values for {n} elements",
                            p.meta.name,
                            m.len(),
                            v.len()
                        )
                    }
                }
                e.insert(s);
            }
            let at = self.layout.buckets[r.bucket].part_offset + r.piece_offset;
            let src = r.param_offset..r.param_offset + r.len;
            if let Some(Some((m, v))) = cache.get(&r.param) {
                match &self.swap {
                    Some(s) => {
                        s.m.update_range(at..at + r.len, |o, d| {
                            d.copy_from_slice(&m[src.start + o..src.start + o + d.len()])
                        })?;
                        s.v.update_range(at..at + r.len, |o, d| {
                            d.copy_from_slice(&v[src.start + o..src.start + o + d.len()])
                        })?;
                    }
                    None => {
                        self.exp_avg[at..at + r.len].copy_from_slice(&m[src.clone()]);
                        self.exp_avg_sq[at..at + r.len].copy_from_slice(&v[src.clone()]);
                    }
                }
            }
            if let (Some(master), None) = (&mut self.master, &self.stage3) {
                with_f32(p.tensor(), |v| {
                    master[at..at + r.len].copy_from_slice(&v[src])
                })?;
            }
        }
        self.step = step;
        Ok(())
    }

    pub(super) fn grads_len(&self) -> usize {
        self.grads.len()
    }

    pub(super) fn moments_len(&self) -> usize {
        self.exp_avg.len() + self.exp_avg_sq.len()
    }

    /// Clears the gradient buffers for the next accumulation.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.device_zero_grad();
        super::flat::fill_zero(&mut self.grads);
        self.staging.clear();
        if let Some(g) = self.swap.as_ref().and_then(|s| s.grads.as_ref()) {
            g.zero()?;
        }
        Ok(())
    }

    /// Measured model-state bytes held by this rank: parameter tensors, the gradient buffer, and
    /// Adam's moments plus the fp32 master copy where parameters are not fp32.
    pub fn state_bytes(&self) -> StateBytes {
        if self.stage3.is_some() {
            return super::stage3::state_bytes(self);
        }
        if let Some(b) = self.device_state_bytes() {
            return b;
        }
        let parameters = self
            .params
            .iter()
            .map(|p| (p.tensor().elem_count() * p.tensor().dtype().size_in_bytes()) as u64)
            .sum();
        let opt = self.exp_avg.len()
            + self.exp_avg_sq.len()
            + self.master.as_ref().map_or(0, |m| m.len());
        StateBytes {
            parameters,
            gradients: 4 * self.grads.len() as u64,
            optimizer: 4 * opt as u64,
            buffers: 0,
        }
    }

    /// DeepSpeed's formula for the layout this optimizer uses (Ψ = local parameter count, N = the
    /// data-parallel size): P·Ψ + G·Ψ (/N at stage 2) + K·Ψ (/N at stages 1 and 2), with P the
    /// parameter dtype's size, G = 4 (fp32 gradient buffers) and K = 8 (Adam's m and v) + 4 when an
    /// fp32 master copy is kept.
    pub fn formula_bytes(&self) -> StateBytes {
        if self.stage3.is_some() {
            return super::stage3::formula_bytes(self);
        }
        let psi: f64 = self
            .params
            .iter()
            .map(|p| p.tensor().elem_count() as f64)
            .sum();
        let p_size = self
            .params
            .first()
            .map_or(4, |p| p.tensor().dtype().size_in_bytes()) as f64;
        let n = self.dp.as_ref().map_or(1, |g| g.size()) as f64;
        let has_master =
            self.master.is_some() || self.device.as_ref().is_some_and(|d| d.master.is_some());
        let k = if has_master { 12.0 } else { 8.0 };
        let g_div = if self.stage >= 2 { n } else { 1.0 };
        let k_div = if self.stage >= 1 { n } else { 1.0 };
        StateBytes {
            parameters: (p_size * psi) as u64,
            gradients: (4.0 * psi / g_div) as u64,
            optimizer: (k * psi / k_div) as u64,
            buffers: 0,
        }
    }
}

/// Runs of this rank's partition with one weight-decay and grad-norm setting; `counts(param)` says
/// whether a parameter counts in the gradient norm on this rank.
fn build_segments(
    layout: &FlatLayout,
    params: &[Param],
    counts: impl Fn(&Param) -> bool,
) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for r in &layout.runs {
        let p = &params[r.param];
        let (decay, counts_in_norm) = (p.meta.weight_decay, counts(p));
        match segments.last_mut() {
            Some(s)
                if s.bucket == r.bucket
                    && s.piece_offset + s.len == r.piece_offset
                    && s.decay == decay
                    && s.counts_in_norm == counts_in_norm =>
            {
                s.len += r.len
            }
            _ => segments.push(Segment {
                bucket: r.bucket,
                piece_offset: r.piece_offset,
                len: r.len,
                decay,
                counts_in_norm,
            }),
        }
    }
    segments
}

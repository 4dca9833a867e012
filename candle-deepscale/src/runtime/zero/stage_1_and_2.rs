//! The ZeRO optimizer (DeepSpeed's `stage_1_and_2.py` `DeepSpeedZeroOptimizer`, and the
//! optimizer half of `stage3.py`), over flat fp32 buffers.
//!
//! Stage 0 keeps every gradient and all optimizer state on every rank and all-reduces gradients;
//! stage 1 partitions the optimizer state (each rank updates its piece of every bucket, then the
//! updated pieces are all-gathered); stage 2 also partitions the gradients: each bucket is
//! reduce-scattered as soon as backward has produced it, so a rank never holds the whole gradient.
//! Stage 3 partitions the parameters too: the [`ParamCoordinator`] gathers and releases them
//! around each layer. Parameters are updated in place in their own tensors (fp32) or, for
//! fp16/bf16 parameters, in an fp32 master copy of the rank's partition that is written back
//! rounded.
//!
//! Where the gradient buffers, Adam's moments and the master pieces live is the state backend's
//! business ([`ZeroStates`]): host memory ([`HostStates`](super::states::HostStates)), NVMe swap
//! files ([`NvmeStates`](super::offload::NvmeStates), ZeRO-Infinity) or the parameters' device
//! ([`DeviceStates`](super::device::DeviceStates)). This file is the flow every backend shares.
use super::device::DeviceStates;
use super::offload::NvmeStates;
use super::partition::FlatLayout;
use super::stage3::{take_partitions, ParamCoordinator, Stage3Config};
use super::states::{HostStates, ZeroStates};
use crate::comm::{ProcessGroup, ReduceOp};
use crate::layers::module::Layer;
use crate::layers::parameter::{Param, Partition};
use crate::ops::adam::AdamStep;
use crate::runtime::adamw::AdamWConfig;
use candle_core::{bail, DType, Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A stretch of a rank's piece with one weight-decay and grad-norm setting.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub bucket: usize,
    pub piece_offset: usize,
    pub len: usize,
    pub decay: bool,
    pub counts_in_norm: bool,
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

/// What every state backend reads: the stage, where each parameter sits in the flat buffers,
/// this rank's update segments, the data-parallel group, Adam's settings and step count.
pub struct ZeroCore {
    pub(crate) stage: u8,
    pub(crate) layout: FlatLayout,
    pub(crate) params: Vec<Param>,
    pub(crate) segments: Vec<Segment>,
    pub(crate) dp: Option<ProcessGroup>,
    pub(crate) config: AdamWConfig,
    pub(crate) step: u64,
    /// DeepSpeed's `overlap_comm`: gradient reductions are started and finished later (between
    /// layers, and before the gradients are read) instead of waited for.
    pub(crate) overlap_comm: bool,
    /// DeepSpeed's `allgather_bucket_size`: at most this many elements (all ranks' together) per
    /// all-gather of the updated parameters at stages 1 and 2.
    pub(crate) allgather_bucket_size: usize,
    /// Peak bytes of communication staging since last read.
    peak_comm: AtomicU64,
    /// The most gradient reductions in flight at once (`overlap_comm`).
    peak_in_flight: AtomicU64,
}

impl ZeroCore {
    /// Records `bytes` of communication staging in use now.
    pub(crate) fn note_comm(&self, bytes: usize) {
        self.peak_comm.fetch_max(bytes as u64, Ordering::Relaxed);
    }

    /// Records `n` gradient reductions in flight now.
    pub(crate) fn note_in_flight(&self, n: usize) {
        self.peak_in_flight.fetch_max(n as u64, Ordering::Relaxed);
    }

    /// Whether stage 2/3's reduce-scatters are started rather than waited for (there are peers).
    pub(crate) fn overlaps(&self) -> bool {
        self.overlap_comm && self.dp.is_some() && self.layout.parts > 1
    }

    /// Whether gradients are partitioned (stage 2 and 3) rather than kept whole.
    pub(crate) fn partitioned_grads(&self) -> bool {
        self.stage >= 2
    }

    /// Elements of the gradient buffer: this rank's partition (stages 2, 3) or the whole padded
    /// flat buffer (stages 0, 1).
    pub(crate) fn grad_len(&self) -> usize {
        if self.partitioned_grads() {
            self.layout.partition_len
        } else {
            self.layout.full_len
        }
    }

    /// Where this rank's piece of bucket `b` starts in the gradient buffer.
    pub(crate) fn grad_piece_offset(&self, b: usize) -> usize {
        let bk = &self.layout.buckets[b];
        if self.partitioned_grads() {
            bk.part_offset
        } else {
            bk.offset + self.layout.rank * bk.piece
        }
    }

    /// AdamW's settings for one step over a stretch that decays or not.
    pub(crate) fn adam_consts(&self, lr: f64, grad_scale: f64, decay: bool) -> AdamStep {
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

    /// This rank's update segments in bucket `b`.
    pub(crate) fn segments_of(&self, b: usize) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.bucket == b)
    }

    /// The partition ranges `[lo, hi)` of the update segments and whether they decay.
    pub(crate) fn segments_ranges(&self) -> Vec<(usize, usize, bool)> {
        self.segments
            .iter()
            .map(|s| {
                let at = self.layout.buckets[s.bucket].part_offset + s.piece_offset;
                (at, at + s.len, s.decay)
            })
            .collect()
    }
}

/// DeepSpeed's default `allgather_bucket_size`.
pub const DEFAULT_ALLGATHER_BUCKET_SIZE: usize = 500_000_000;

/// The ZeRO optimizer of one rank (see the module docs).
pub struct ZeroOptimizer {
    pub(super) core: ZeroCore,
    index: HashMap<TensorId, usize>,
    pub(super) states: Box<dyn ZeroStates>,
    /// Stage 3: which parameters are gathered, and the knobs that decide it.
    pub(super) stage3: Option<ParamCoordinator>,
    tp: Option<ProcessGroup>,
    /// The pipeline group (stages of this data/tensor coordinate), for the gradient norm.
    pp: Option<ProcessGroup>,
}

impl ZeroOptimizer {
    /// The optimizer of the distinct parameters of `layers`, partitioned over `dp` at `stage`
    /// (0, 1, 2 or 3), with gradient buckets of about `bucket_elems` elements (stage 3: one per
    /// parameter, each partitioned on its own as `zero.Init` does). `tp` is the tensor-parallel
    /// group, consulted by the gradient norm. States live in host memory, or in NVMe swap files
    /// when `stage3.offload` says so (stage 3).
    pub fn new(
        layers: &[&dyn Layer],
        stage: u8,
        bucket_elems: usize,
        config: AdamWConfig,
        dp: Option<ProcessGroup>,
        tp: Option<ProcessGroup>,
        stage3: Stage3Config,
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
                let i = *index.entry(p.tensor().id()).or_insert_with(|| {
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
        let layout_bucket = if stage == 3 { 1 } else { bucket_elems };
        let layout = FlatLayout::new(&layer_params, &numels, layout_bucket, parts, rank);
        let tp_rank = tp.as_ref().map_or(0, |g| g.rank);
        // Split parameters count on every tensor-parallel rank; replicated ones once (rank 0).
        let segments = build_segments(&layout, &params, |p| {
            matches!(p.meta.partition, Partition::Split { .. }) || tp_rank == 0
        });
        // The fp32 pieces this rank updates, where parameters are not updated in place: stage
        // 3's partitions, or a master copy of half-precision parameters.
        let master = if stage == 3 {
            Some(take_partitions(&layout, &params)?)
        } else if params.iter().all(|p| p.tensor().dtype() == DType::F32) {
            None
        } else {
            Some(HostStates::master_from_params(&layout, &params)?)
        };
        let offload = stage3
            .offload
            .clone()
            .filter(|o| o.optimizer_nvme.is_some() || o.param_nvme.is_some());
        let coordinator = if stage == 3 {
            Some(ParamCoordinator::new(stage3, &params, layer_params)?)
        } else {
            None
        };
        let core = ZeroCore {
            stage,
            layout,
            params,
            segments,
            dp,
            config,
            step: 0,
            overlap_comm: false,
            allgather_bucket_size: DEFAULT_ALLGATHER_BUCKET_SIZE,
            peak_comm: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        };
        let states: Box<dyn ZeroStates> = match offload {
            Some(_) if stage != 3 => bail!(
                "not supported: NVMe offload at ZeRO stage {stage}, because swapping is built \
                 for stage 3 (as in DeepSpeed, offload to nvme needs stage 3)"
            ),
            Some(o) => {
                // Swap folders per global rank (tensor-parallel peers share a data-parallel rank).
                let global = core
                    .dp
                    .as_ref()
                    .or(tp.as_ref())
                    .map_or(0, |g| g.comm.rank());
                // DeepSpeed's stage 3 holds up to `reduce_bucket_size` gradient elements while
                // reducing; the final ones stay in memory for the step within that (per piece).
                Box::new(NvmeStates::new(
                    &o,
                    &core,
                    global,
                    master.unwrap_or_default(),
                    bucket_elems.div_ceil(parts),
                )?)
            }
            None => Box::new(HostStates::new(&core, master)),
        };
        Ok(Self {
            core,
            index,
            states,
            stage3: coordinator,
            tp,
            pp: None,
        })
    }

    /// Keeps the flat buffers and AdamW on the parameters' device (automatic for GPU
    /// parameters; on the CPU it runs the GPU's code path). Stages 0-3 without NVMe offload;
    /// Adam's state moves over, gradients do not (call it between steps).
    pub fn use_device_states(&mut self) -> Result<()> {
        if self.states.kind() == "device" {
            return Ok(());
        }
        if self.states.kind() == "nvme" {
            bail!("device-resident ZeRO states exclude NVMe offload (it swaps host buffers)")
        }
        if let Some(d) = DeviceStates::new(&self.core, self.states.as_ref())? {
            self.states = Box::new(d);
        }
        Ok(())
    }

    /// Pipeline stage: the gradient norm also sums over `pp` (the other stages), and parameters for
    /// which `duplicate(param)` holds (a tied weight's copy on the last stage) do not count.
    pub fn set_pipeline(
        &mut self,
        pp: ProcessGroup,
        duplicate: impl Fn(&Param) -> bool,
    ) -> Result<()> {
        let tp_rank = self.tp.as_ref().map_or(0, |g| g.rank);
        self.core.segments = build_segments(&self.core.layout, &self.core.params, |p| {
            (matches!(p.meta.partition, Partition::Split { .. }) || tp_rank == 0) && !duplicate(p)
        });
        self.pp = Some(pp).filter(|g| g.size() > 1);
        self.states.segments_changed(&self.core)
    }

    /// Sums parameter `i`'s reduced gradient over `group` (stages 0 and 1, which keep every
    /// gradient): weights tied across pipeline stages.
    pub fn all_reduce_param_grad(&mut self, i: usize, group: &ProcessGroup) -> Result<()> {
        if self.core.partitioned_grads() {
            bail!("ZeRO-2 keeps only this rank's gradient partition")
        }
        self.finish_reductions()?;
        self.states.all_reduce_param_grad(&self.core, i, group)
    }

    /// DeepSpeed's `overlap_comm`: reductions of complete gradient buckets are started and left
    /// in flight while backward goes on ([`Self::progress`] between layers adds in what has
    /// finished); off, each is waited for. The same sums either way.
    pub fn set_overlap_comm(&mut self, on: bool) {
        self.core.overlap_comm = on;
    }

    /// DeepSpeed's `allgather_bucket_size` (elements per all-gather of the updated parameters,
    /// all ranks' together; default 5e8): an upper bound — the gather also runs in slices small
    /// enough to stay in cache.
    pub fn set_allgather_bucket_size(&mut self, elements: usize) {
        self.core.allgather_bucket_size = elements.max(1);
    }

    pub fn overlap_comm(&self) -> bool {
        self.core.overlap_comm
    }

    /// The most gradient reductions that were in flight at once so far (0 without
    /// `overlap_comm` or peers).
    pub fn peak_reductions_in_flight(&self) -> u64 {
        self.core.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Moves the gradient reductions in flight on and adds in those that finished (the engine
    /// calls it between layers).
    pub fn progress(&mut self) -> Result<()> {
        self.states.settle(&self.core, false)
    }

    /// Waits for every gradient reduction in flight and adds it in: the gradients are complete.
    pub fn finish_reductions(&mut self) -> Result<()> {
        self.states.settle(&self.core, true)
    }

    pub fn stage(&self) -> u8 {
        self.core.stage
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.core.layout
    }

    /// The distinct parameters, in flat-buffer order of first appearance in the layers.
    pub fn params(&self) -> &[Param] {
        &self.core.params
    }

    /// Adam's settings.
    pub fn config(&self) -> AdamWConfig {
        self.core.config
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.core.step
    }

    /// Where the states live: `host`, `nvme` or `device`.
    pub fn states_kind(&self) -> &'static str {
        self.states.kind()
    }

    /// Adds a local gradient of the parameter `param` (a tensor of the layers) to the buffers.
    pub fn accumulate(&mut self, param: &Tensor, grad: &Tensor) -> Result<()> {
        let Some(&i) = self.index.get(&param.id()) else {
            bail!("gradient for a tensor that is not a parameter of the engine's layers")
        };
        let numel = self.core.layout.params[i].numel;
        if grad.elem_count() != numel {
            bail!(
                "gradient of `{}` has {} elements, the parameter {numel}",
                self.core.params[i].meta.name,
                grad.elem_count(),
            )
        }
        self.states.accumulate(&self.core, i, grad)
    }

    /// The peak of communication staging since the last call.
    pub fn take_peak_comm_bytes(&self) -> u64 {
        self.core.peak_comm.swap(0, Ordering::Relaxed)
    }

    /// Bucket `b`'s local gradients are complete for this micro-batch: stage 2 reduce-scatters them
    /// into the partition; stages 0 and 1 all-reduce them at the accumulation boundary (`last`).
    pub fn reduce_bucket(&mut self, b: usize, last: bool) -> Result<()> {
        self.reduce_buckets(&[b], last)
    }

    /// [`Self::reduce_bucket`] for several buckets completed together (a layer's parameters at
    /// ZeRO-3): one reduce-scatter over the ranks' pieces of all of them.
    pub fn reduce_buckets(&mut self, bs: &[usize], last: bool) -> Result<()> {
        self.states.reduce(&self.core, bs, last)
    }

    /// Global L2 norm of the summed gradients times `scale`: tensor-parallel replicas count once,
    /// partitions are summed over the data-parallel group. Infinite or NaN on overflow.
    pub fn grad_norm(&mut self, scale: f64) -> Result<f64> {
        self.finish_reductions()?;
        let mut buf = [self.states.grad_norm_sq(&self.core)?];
        if self.core.layout.parts > 1 {
            if let Some(dp) = &self.core.dp {
                dp.all_reduce(&mut buf, ReduceOp::Sum)?;
            }
        }
        for g in [&self.tp, &self.pp].into_iter().flatten() {
            g.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        Ok(buf[0].sqrt() * scale)
    }

    /// One AdamW step at learning rate `lr` with every summed gradient multiplied by `grad_scale`,
    /// then the updated partitions all-gathered into every rank's parameters (stage 3: only the
    /// persistent ones; the rest are gathered around their next use).
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.finish_reductions()?;
        self.core.step += 1;
        let wb: Vec<bool> = (0..self.core.layout.buckets.len())
            .map(|b| self.writes_back(b))
            .collect();
        let write_back = |b: usize| wb[b];
        let ahead = self.gather_ahead();
        self.states
            .step_and_gather(&self.core, lr, grad_scale, &write_back, &ahead)?;
        if let Some(s3) = &self.stage3 {
            s3.mark_gathered(&ahead)?;
        }
        Ok(())
    }

    /// This rank's optimizer state, run by run: the parameter, the offset of the run within the
    /// parameter (flattened local tensor), and Adam's m, v and the fp32 master values of the run.
    pub fn state_runs(&self) -> Result<Vec<OptimizerRun<'_>>> {
        self.core
            .layout
            .runs
            .iter()
            .map(|r| {
                let (exp_avg, exp_avg_sq, master) = self.states.run_state(&self.core, r)?;
                Ok(OptimizerRun {
                    param: &self.core.params[r.param],
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
        let mut per_param: Vec<Option<AdamState>> = vec![None; self.core.params.len()];
        let mut asked = vec![false; self.core.params.len()];
        for r in &self.core.layout.runs {
            if std::mem::replace(&mut asked[r.param], true) {
                continue;
            }
            let p = &self.core.params[r.param];
            if let Some((m, v)) = state(p)? {
                let n = p.tensor().elem_count();
                if m.len() != n || v.len() != n {
                    bail!(
                        "optimizer state of `{}`: {} / {} values for {n} elements",
                        p.meta.name,
                        m.len(),
                        v.len()
                    )
                }
                per_param[r.param] = Some((m, v));
            }
        }
        self.states.load(&self.core, &per_param)?;
        self.core.step = step;
        Ok(())
    }

    /// Clears the gradient buffers for the next accumulation.
    pub fn zero_grad(&mut self) -> Result<()> {
        // Every started reduction completes, even when its result is dropped (a skipped step):
        // the peers are in it too.
        self.finish_reductions()?;
        self.states.zero_grad()
    }

    /// Measured model-state bytes held by this rank: parameter tensors, the gradient buffer, and
    /// Adam's moments plus the fp32 master copy where parameters are not fp32. At stage 3 the
    /// parameters are the fp32 partition plus the tensors resident now (persistent or gathered).
    pub fn state_bytes(&self) -> StateBytes {
        let held = self.states.bytes(&self.core);
        let params = &self.core.params;
        if self.stage3.is_some() {
            let resident: usize = params
                .iter()
                .map(|p| {
                    crate::layers::storage::resident_len(p.tensor())
                        * p.tensor().dtype().size_in_bytes()
                })
                .sum();
            return StateBytes {
                parameters: resident as u64 + held.master,
                gradients: held.gradients,
                optimizer: held.moments,
                buffers: held.buffers,
            };
        }
        let parameters = params
            .iter()
            .map(|p| (p.tensor().elem_count() * p.tensor().dtype().size_in_bytes()) as u64)
            .sum();
        StateBytes {
            parameters,
            gradients: held.gradients,
            optimizer: held.moments + held.master,
            buffers: held.buffers,
        }
    }

    /// DeepSpeed's formula for the layout this optimizer uses (Ψ = local parameter count, N = the
    /// data-parallel size): P·Ψ + G·Ψ (/N at stage 2) + K·Ψ (/N at stages 1 and 2), with P the
    /// parameter dtype's size, G = 4 (fp32 gradient buffers) and K = 8 (Adam's m and v) + 4 when an
    /// fp32 master copy is kept. Stage 3: 16Ψ/N (4Ψ/N fp32 parameters — the partition; plus the
    /// persistent ones, whole on every rank in their dtype —, 4Ψ/N gradients, 8Ψ/N moments; for
    /// fp16 DeepSpeed splits the same 16 bytes as 2 + 2 + 12).
    pub fn formula_bytes(&self) -> StateBytes {
        let params = &self.core.params;
        let psi: f64 = params.iter().map(|p| p.tensor().elem_count() as f64).sum();
        let p_size = params
            .first()
            .map_or(4, |p| p.tensor().dtype().size_in_bytes()) as f64;
        let n = self.core.layout.parts as f64;
        if let Some(s3) = &self.stage3 {
            let persistent = s3.persistent_elems() as f64;
            return StateBytes {
                parameters: (4.0 * psi / n + p_size * persistent) as u64,
                gradients: (4.0 * psi / n) as u64,
                optimizer: (8.0 * psi / n) as u64,
                buffers: 0,
            };
        }
        let n = self.core.dp.as_ref().map_or(1, |g| g.size()) as f64;
        let k = if self.states.has_master() { 12.0 } else { 8.0 };
        let g_div = if self.core.stage >= 2 { n } else { 1.0 };
        let k_div = if self.core.stage >= 1 { n } else { 1.0 };
        StateBytes {
            parameters: (p_size * psi) as u64,
            gradients: (4.0 * psi / g_div) as u64,
            optimizer: (k * psi / k_div) as u64,
            buffers: 0,
        }
    }

    /// One line: the layout and its measured model state against the formula (`dp` ranks).
    pub fn describe_memory(&self, dp: usize) -> String {
        let (m, f) = (self.state_bytes(), self.formula_bytes());
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let dtype = self
            .core
            .params
            .first()
            .map_or(DType::F32, |p| p.tensor().dtype());
        let layout = if self.core.stage == 3 {
            "parameters partitioned as fp32 pieces, gathered per layer, K = 8"
        } else if dtype == DType::F32 {
            "fp32 parameters updated in place, K = 8"
        } else {
            "half parameters with an fp32 master copy, K = 12"
        };
        format!(
            "model state per rank (ZeRO-{}, dp {dp}, {layout}): measured {:.2} MiB (parameters {:.2}, \
             gradients {:.2}, optimizer {:.2}, swap buffers {:.2}) vs formula {:.2} MiB ({:+.2}%)",
            self.core.stage,
            mib(m.total()),
            mib(m.parameters),
            mib(m.gradients),
            mib(m.optimizer),
            mib(m.buffers),
            mib(f.total()),
            100.0 * (m.total() as f64 / f.total().max(1) as f64 - 1.0)
        ) + &match self.offload_io_path() {
            Some(io) => format!(
                "; the rest is offloaded to NVMe through {io} (the formula counts states in memory)"
            ),
            None => String::new(),
        }
    }

    /// Stage 3: makes layer `l`'s parameters whole (no-op at other stages), prefetching the next
    /// layers in the direction of the pass (`backward`: towards layer 0).
    pub fn fetch_layer(&self, l: usize, backward: bool) -> Result<()> {
        let Some(s3) = &self.stage3 else {
            return Ok(());
        };
        s3.fetch_layer(l, backward, &self.core.params, &|todo| {
            self.states.gather(&self.core, todo)
        })?;
        // Offloaded pieces of the next gather are read while this layer runs.
        if self.states.swap_io().is_some() {
            let next = s3.next_gather(l, backward)?;
            self.states.read_ahead(&self.core, &next)?;
        }
        Ok(())
    }

    /// Stage 3: layer `l` is done for now; its parameters are freed unless they are used again
    /// within `stage3_max_reuse_distance` elements.
    pub fn release_layer(&self, l: usize, backward: bool) -> Result<()> {
        match &self.stage3 {
            Some(s3) => s3.release_layer(l, backward, &self.core.params),
            None => Ok(()),
        }
    }

    /// Stage 3: frees every gathered parameter (after a pass, and before the optimizer step
    /// changes the partitions they were gathered from).
    pub fn release_all(&self) -> Result<()> {
        match &self.stage3 {
            Some(s3) => s3.release_all(&self.core.params),
            None => Ok(()),
        }
    }

    /// DeepSpeed's `GatheredParameters`: every parameter whole while `f` runs (every
    /// data-parallel rank must call it), released after — tensors that share a parameter's
    /// storage are empty then, so `f` copies what it keeps. Other stages just run `f`.
    pub fn gathered<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(s3) = &self.stage3 else { return f() };
        s3.gathered(
            &self.core.params,
            &|todo| self.states.gather(&self.core, todo),
            f,
        )
    }

    /// Stage 3 (or None): gathered elements resident now, the peak, and all-gathered so far.
    pub fn stage3_stats(&self) -> Option<(usize, usize, u64)> {
        self.stage3.as_ref().map(|s| s.live_stats())
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

impl ZeroOptimizer {
    /// Stage 3: whether bucket `b`'s updated pieces are all-gathered into its parameters by the
    /// step (a persistent parameter); other stages: every bucket.
    pub(super) fn writes_back(&self, b: usize) -> bool {
        match &self.stage3 {
            Some(s3) => self.core.layout.buckets[b]
                .params
                .iter()
                .any(|&p| s3.is_persistent(p)),
            None => true,
        }
    }

    /// NVMe: the parameters of the next forward's first gather, taken from the step's updated
    /// pieces rather than read back from the swap file right after they were written.
    pub(super) fn gather_ahead(&self) -> Vec<usize> {
        match &self.stage3 {
            Some(s3) if self.states.pieces_swapped() => s3.first_gather(),
            _ => Vec::new(),
        }
    }

    // What the NVMe swapper did, for benchmarks and tests.

    /// NVMe offload: partition elements updated during backward so far (see
    /// [`Self::arm_step`]).
    pub fn offload_stepped_in_backward(&self) -> u64 {
        self.states.stepped_in_backward()
    }
    /// NVMe offload: (bytes read, bytes written) by the swapper so far.
    pub fn offload_io_bytes(&self) -> Option<(u64, u64)> {
        // Counted as issued, by swap file: writes still in flight count.
        self.states.swap_io().map(|_| {
            self.states
                .swap_io_by_buffer()
                .iter()
                .fold((0, 0), |(r, w), b| (r + b.1, w + b.2))
        })
    }

    /// NVMe offload: (swap file name, bytes read, bytes written) of each swapped buffer so far
    /// (empty without offload).
    pub fn offload_io_by_buffer(&self) -> Vec<(String, u64, u64)> {
        self.states.swap_io_by_buffer()
    }

    /// NVMe offload: blocks of the step's states read early (into the buffers `buffer_count`
    /// gives beyond the working set) so far.
    pub fn offload_reads_early(&self) -> Option<u64> {
        self.states.swap_io().map(|s| s.reads_early())
    }

    /// NVMe offload: blocks of parameter pieces read ahead of ZeRO-3's gathers so far.
    pub fn offload_reads_ahead(&self) -> Option<u64> {
        self.states.swap_io().map(|s| s.reads_ahead())
    }

    /// NVMe offload: the I/O engine and mode (`io_uring, O_DIRECT`, `threads, buffered`, ...).
    pub fn offload_io_path(&self) -> Option<String> {
        self.states.swap_io().map(|s| s.io_path())
    }

    /// NVMe offload: whether swap files use O_DIRECT.
    pub fn offload_direct(&self) -> Option<bool> {
        self.states.swap_io().map(|s| s.direct())
    }
}

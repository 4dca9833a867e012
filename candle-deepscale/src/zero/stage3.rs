//! ZeRO stage 3 (DeepSpeed's `stage3.py` and `partitioned_param_coordinator.py`): parameters are
//! partitioned too. Each parameter is flattened, padded to a multiple of N and cut into N pieces
//! (one bucket per parameter in the flat layout, so a piece is known at construction, as with
//! `zero.Init`); rank r keeps piece r in fp32 (the optimizer updates it in place). A parameter
//! tensor keeps its shape, but its storage is released: the engine gathers a layer's parameters
//! (one all-gather) just before the layer runs — forward, recompute or backward — and releases
//! them after, unless they are used again within `stage3_max_reuse_distance` elements; upcoming
//! layers are prefetched up to `stage3_prefetch_bucket_size` elements, and no more than
//! `stage3_max_live_parameters` gathered elements stay resident. Parameters smaller than
//! `stage3_param_persistence_threshold` stay whole on every rank. Gradients are reduce-scattered
//! per layer as soon as backward has finished with it: one collective over the pieces of all
//! the parameters it completes (stage 2's path).
use super::flat::with_f32;
use super::partition::FlatLayout;
use super::stage_1_and_2::{StateBytes, ZeroOptimizer};
use crate::parameter::Param;
use candle_core::{bail, CpuStorage, Layout, Result, Var};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// DeepSpeed's stage-3 knobs (element counts), and NVMe offload (ZeRO-Infinity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage3Config {
    pub prefetch_bucket_size: usize,
    pub max_live_parameters: usize,
    pub max_reuse_distance: usize,
    pub param_persistence_threshold: usize,
    pub offload: Option<super::offload::OffloadSettings>,
}

impl Default for Stage3Config {
    /// DeepSpeed's defaults.
    fn default() -> Self {
        Self {
            prefetch_bucket_size: 50_000_000,
            max_live_parameters: 1_000_000_000,
            max_reuse_distance: 1_000_000_000,
            param_persistence_threshold: 100_000,
            offload: None,
        }
    }
}

/// Puts `data` (f32 values, converted to the parameter's dtype) into the CPU storage of `var`,
/// dropping what was there. The tensor's shape is untouched: an empty storage is a released
/// parameter.
struct Swap(Mutex<Option<Vec<f32>>>);

impl candle_core::InplaceOp1 for Swap {
    fn name(&self) -> &'static str {
        "zero3-swap"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        let data = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("zero3-swap lock".into()))?
            .take()
            .unwrap_or_default();
        match storage {
            CpuStorage::F32(v) => *v = data,
            CpuStorage::F16(v) => *v = data.iter().map(|x| half::f16::from_f32(*x)).collect(),
            CpuStorage::BF16(v) => *v = data.iter().map(|x| half::bf16::from_f32(*x)).collect(),
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 CPU tensors"),
        }
        Ok(())
    }

    /// On a GPU the gathered values are uploaded (ZeRO-3 keeps its pieces in host memory); a
    /// released parameter keeps a one-element allocation.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let mut data = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("zero3-swap lock".into()))?
            .take()
            .unwrap_or_default();
        if data.is_empty() {
            data.push(0.0);
        }
        let dev = storage.device.clone();
        let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            candle_core::Error::Msg(format!("zero3-swap upload: {e:?}"))
        };
        let stream = dev.cuda_stream();
        storage.slice = match &storage.slice {
            S::F32(_) => S::F32(stream.clone_htod(&data).map_err(err)?),
            S::F16(_) => {
                let h: Vec<half::f16> = data.iter().map(|x| half::f16::from_f32(*x)).collect();
                S::F16(stream.clone_htod(&h).map_err(err)?)
            }
            S::BF16(_) => {
                let h: Vec<half::bf16> = data.iter().map(|x| half::bf16::from_f32(*x)).collect();
                S::BF16(stream.clone_htod(&h).map_err(err)?)
            }
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 tensors"),
        };
        Ok(())
    }
}

/// Replaces the storage of a parameter with a copy of the elements of another tensor of its
/// dtype (device-resident ZeRO-3: the gathered values never leave the device).
struct SwapIn;

impl candle_core::InplaceOp2 for SwapIn {
    fn name(&self) -> &'static str {
        "zero3-swap-in"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        _: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let Some((a, b)) = sl.contiguous_offsets() else {
            bail!("zero3-swap-in: the gathered tensor is not contiguous")
        };
        *dst = match src {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
            _ => bail!("ZeRO-3 parameters are fp32, fp16 or bf16 tensors"),
        };
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        _: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let mut out = src.device().zeros_impl(sl.shape(), src.dtype())?;
        src.copy_strided_src(&mut out, 0, sl)?;
        *dst = out;
        Ok(())
    }
}

/// Makes `var` whole with the values of `t` (its shape; converted to its dtype).
pub(super) fn set_storage_tensor(var: &Var, t: &candle_core::Tensor) -> Result<()> {
    let t = t.to_dtype(var.dtype())?;
    var.as_tensor().inplace_op2(&t, &SwapIn)
}

fn set_storage(var: &Var, data: Vec<f32>) -> Result<()> {
    var.as_tensor().inplace_op1(&Swap(Mutex::new(Some(data))))
}

/// Frees the storage of `var` (its shape stays): the parameter must be gathered before use.
pub fn release_var(var: &Var) -> Result<()> {
    set_storage(var, Vec::new())
}

/// Elements resident in the storage of `t` (0 for a released parameter).
pub fn resident_len(t: &candle_core::Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        candle_core::Storage::Cpu(CpuStorage::F16(v)) => v.len(),
        candle_core::Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(c) => {
            use candle_core::cuda_backend::CudaStorageSlice as S;
            let n = match &c.slice {
                S::F32(v) => v.len(),
                S::F16(v) => v.len(),
                S::BF16(v) => v.len(),
                _ => t.elem_count(),
            };
            // Released: the one-element placeholder.
            if n < t.elem_count() {
                0
            } else {
                t.elem_count()
            }
        }
        _ => t.elem_count(),
    }
}

fn is_released(p: &Param) -> bool {
    resident_len(p.tensor()) < p.tensor().elem_count()
}

/// Stage 3's fp32 partition of every parameter in `layout` order: the pieces built by a
/// ZeRO-3 [`crate::parameter::ParamBuilder`] (taken, so they are not held twice), or cut from
/// whole tensors.
pub(super) fn take_partitions(layout: &FlatLayout, params: &[Param]) -> Result<Vec<f32>> {
    let mut master = vec![0f32; layout.partition_len];
    for r in &layout.runs {
        let b = &layout.buckets[r.bucket];
        let at = b.part_offset + r.piece_offset;
        let p = &params[r.param];
        match &p.partitioned {
            Some(slot) => {
                let guard = slot
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("partition lock".into()))?;
                let Some(piece) = guard.as_ref() else {
                    bail!(
                        "parameter `{}`: its ZeRO-3 piece was already taken by another engine",
                        p.meta.name
                    )
                };
                if piece.len() != b.piece {
                    bail!(
                        "parameter `{}` was built for another data-parallel size ({} elements per \
                         rank, the engine's layout has {})",
                        p.meta.name,
                        piece.len(),
                        b.piece
                    )
                }
                master[at..at + r.len]
                    .copy_from_slice(&piece[r.piece_offset..r.piece_offset + r.len]);
            }
            None => with_f32(p.tensor(), |v| {
                master[at..at + r.len].copy_from_slice(&v[r.param_offset..r.param_offset + r.len])
            })?,
        }
    }
    for p in params {
        if let Some(slot) = &p.partitioned {
            if let Ok(mut g) = slot.lock() {
                g.take();
            }
        }
    }
    Ok(master)
}

#[derive(Debug, Default)]
struct Live {
    gathered: Vec<bool>,
    in_use: Vec<u32>,
    /// Gathered elements resident now, and the most at any time.
    elems: usize,
    peak: usize,
    /// Elements all-gathered so far.
    gathered_total: u64,
}

/// Which parameters are gathered (stage 3), decided the same way on every rank.
#[derive(Debug)]
pub struct Stage3 {
    pub config: Stage3Config,
    persistent: Vec<bool>,
    numel: Vec<usize>,
    /// Parameters of each layer (indices into the optimizer's parameters).
    layer_params: Vec<Vec<usize>>,
    live: Mutex<Live>,
}

impl Stage3 {
    /// Parameters of at least the persistence threshold are released now (a model built whole is
    /// partitioned when the engine starts).
    pub(super) fn new(
        config: Stage3Config,
        params: &[Param],
        layer_params: Vec<Vec<usize>>,
    ) -> Result<Self> {
        let numel: Vec<usize> = params.iter().map(|p| p.tensor().elem_count()).collect();
        let persistent: Vec<bool> = numel
            .iter()
            .map(|&n| n < config.param_persistence_threshold.max(1))
            .collect();
        for (p, &keep) in params.iter().zip(&persistent) {
            if keep && is_released(p) {
                bail!(
                    "parameter `{}` is below stage3_param_persistence_threshold {} but was built \
                     partitioned (build with the engine's threshold)",
                    p.meta.name,
                    config.param_persistence_threshold
                )
            }
            if !keep && !is_released(p) {
                release_var(&p.var)?;
            }
        }
        let n = params.len();
        Ok(Self {
            config,
            persistent,
            numel,
            layer_params,
            live: Mutex::new(Live {
                gathered: vec![false; n],
                in_use: vec![0; n],
                ..Live::default()
            }),
        })
    }

    pub fn is_persistent(&self, p: usize) -> bool {
        self.persistent[p]
    }

    fn live(&self) -> Result<std::sync::MutexGuard<'_, Live>> {
        self.live
            .lock()
            .map_err(|_| candle_core::Error::Msg("ZeRO-3 state lock poisoned".into()))
    }

    /// Elements held by persistent parameters (whole on every rank).
    pub fn persistent_elems(&self) -> usize {
        self.numel
            .iter()
            .zip(&self.persistent)
            .filter(|(_, &k)| k)
            .map(|(n, _)| n)
            .sum()
    }

    /// (gathered elements resident now, the peak, elements all-gathered so far).
    pub fn live_stats(&self) -> (usize, usize, u64) {
        self.live()
            .map(|l| (l.elems, l.peak, l.gathered_total))
            .unwrap_or((0, 0, 0))
    }

    fn layer_elems(&self, l: usize) -> usize {
        self.layer_params.get(l).map_or(0, |ps| {
            ps.iter()
                .filter(|&&p| !self.persistent[p])
                .map(|&p| self.numel[p])
                .sum()
        })
    }
}

/// All-gathers the pieces of `todo` (parameter indices) into their tensors.
fn gather_params(zero: &ZeroOptimizer, todo: &[usize]) -> Result<()> {
    if todo.is_empty() {
        return Ok(());
    }
    if zero.device.is_some() {
        return zero.device_gather(todo);
    }
    let layout = &zero.layout;
    let pieces: Vec<(usize, usize, usize)> = todo
        .iter()
        .map(|&p| {
            let b = &layout.buckets[layout.params[p].bucket];
            (p, b.part_offset, b.piece)
        })
        .collect();
    let send_len: usize = pieces.iter().map(|x| x.2).sum();
    let mut send = vec![0f32; send_len];
    let mut at = 0;
    for &(_, off, piece) in &pieces {
        zero.read_master(off..off + piece, &mut send[at..at + piece])?;
        at += piece;
    }
    let parts = layout.parts;
    zero.note_comm(4 * send_len * (parts + 1));
    let recv = match (&zero.dp, parts > 1) {
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
        let numel = zero.params[p].tensor().elem_count();
        let mut full = Vec::with_capacity(piece * parts);
        for k in 0..parts {
            let at = k * send_len + within;
            full.extend_from_slice(&recv[at..at + piece]);
        }
        full.truncate(numel);
        set_storage(&zero.params[p].var, full)?;
        within += piece;
    }
    Ok(())
}

impl ZeroOptimizer {
    fn s3(&self) -> Option<&Stage3> {
        self.stage3.as_ref()
    }

    /// Stage 3: makes layer `l`'s parameters whole (no-op at other stages), prefetching the next
    /// layers in the direction of the pass (`backward`: towards layer 0).
    pub fn fetch_layer(&self, l: usize, backward: bool) -> Result<()> {
        let Some(s3) = self.s3() else { return Ok(()) };
        let mut live = s3.live()?;
        let mut todo: Vec<usize> = Vec::new();
        let want = |p: usize, live: &Live, todo: &mut Vec<usize>| {
            if !s3.persistent[p] && !live.gathered[p] && !todo.contains(&p) {
                todo.push(p);
            }
        };
        for &p in s3.layer_params.get(l).into_iter().flatten() {
            want(p, &live, &mut todo);
        }
        // Prefetch: the next layers' parameters, up to the bucket size and the live cap.
        let mut budget = s3.config.prefetch_bucket_size;
        let mut next = l;
        loop {
            let n = if backward {
                next.checked_sub(1)
            } else {
                Some(next + 1)
            };
            let Some(n) = n.filter(|&n| n < s3.layer_params.len()) else {
                break;
            };
            let e = s3.layer_elems(n);
            let needed: usize = todo.iter().map(|&p| s3.numel[p]).sum();
            if e > budget || live.elems + needed + e > s3.config.max_live_parameters {
                break;
            }
            budget -= e;
            for &p in &s3.layer_params[n] {
                want(p, &live, &mut todo);
            }
            next = n;
        }
        gather_params(self, &todo)?;
        for &p in &todo {
            live.gathered[p] = true;
            live.elems += s3.numel[p];
            live.gathered_total += s3.numel[p] as u64;
        }
        for &p in s3.layer_params.get(l).into_iter().flatten() {
            live.in_use[p] += 1;
        }
        live.peak = live.peak.max(live.elems);
        drop(live);
        self.enforce_live_cap()
    }

    /// Stage 3: layer `l` is done for now; its parameters are freed unless they are used again
    /// within `stage3_max_reuse_distance` elements.
    pub fn release_layer(&self, l: usize, backward: bool) -> Result<()> {
        let Some(s3) = self.s3() else { return Ok(()) };
        let n_layers = s3.layer_params.len();
        let mut live = s3.live()?;
        for &p in s3.layer_params.get(l).into_iter().flatten() {
            live.in_use[p] = live.in_use[p].saturating_sub(1);
            if s3.persistent[p] || live.in_use[p] > 0 || !live.gathered[p] {
                continue;
            }
            // Elements gathered between now and the parameter's next use in this pass.
            let distance = if backward {
                // Used again by an earlier layer (a tied weight) before the pass ends?
                (0..l)
                    .rev()
                    .find(|&m| s3.layer_params[m].contains(&p))
                    .map(|m| (m + 1..l).map(|k| s3.layer_elems(k)).sum::<usize>())
            } else {
                let later = (l + 1..n_layers).find(|&m| s3.layer_params[m].contains(&p));
                Some(match later {
                    Some(m) => (l + 1..m).map(|k| s3.layer_elems(k)).sum(),
                    // Next used by its own backward, after the rest of forward and backward.
                    None => 2 * (l + 1..n_layers).map(|k| s3.layer_elems(k)).sum::<usize>(),
                })
            };
            let keep = distance.is_some_and(|d| d <= s3.config.max_reuse_distance)
                && live.elems <= s3.config.max_live_parameters;
            if !keep {
                release_var(&self.params[p].var)?;
                live.gathered[p] = false;
                live.elems -= s3.numel[p];
            }
        }
        Ok(())
    }

    /// Frees gathered parameters not in use while more than `stage3_max_live_parameters`
    /// elements are resident.
    fn enforce_live_cap(&self) -> Result<()> {
        let Some(s3) = self.s3() else { return Ok(()) };
        let mut live = s3.live()?;
        for p in 0..self.params.len() {
            if live.elems <= s3.config.max_live_parameters {
                break;
            }
            if live.gathered[p] && live.in_use[p] == 0 && !s3.persistent[p] {
                release_var(&self.params[p].var)?;
                live.gathered[p] = false;
                live.elems -= s3.numel[p];
            }
        }
        Ok(())
    }

    /// Stage 3: frees every gathered parameter (after a pass, and before the optimizer step
    /// changes the partitions they were gathered from).
    pub fn release_all(&self) -> Result<()> {
        let Some(s3) = self.s3() else { return Ok(()) };
        let mut live = s3.live()?;
        for p in 0..self.params.len() {
            if live.gathered[p] {
                release_var(&self.params[p].var)?;
                live.gathered[p] = false;
            }
            live.in_use[p] = 0;
        }
        live.elems = 0;
        Ok(())
    }

    /// DeepSpeed's `GatheredParameters`: every parameter whole while `f` runs (every
    /// data-parallel rank must call it), released after — tensors that share a parameter's
    /// storage are empty then, so `f` copies what it keeps.
    pub fn gathered<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(s3) = self.s3() else { return f() };
        let all: Vec<usize> = (0..self.params.len())
            .filter(|&p| !s3.persistent[p])
            .collect();
        self.release_all()?;
        gather_params(self, &all)?;
        {
            let mut live = s3.live()?;
            for &p in &all {
                live.gathered[p] = true;
                live.in_use[p] = 1;
                live.elems += s3.numel[p];
            }
            live.peak = live.peak.max(live.elems);
        }
        let out = f();
        self.release_all()?;
        out
    }

    /// Stage 3 (or None): gathered elements resident now, the peak, and all-gathered so far.
    pub fn stage3_stats(&self) -> Option<(usize, usize, u64)> {
        self.s3().map(|s| s.live_stats())
    }
}

/// Measured stage-3 model state: the fp32 partition (parameters), persistent and currently
/// gathered tensors, the gradient partition and Adam's moments.
pub(super) fn state_bytes(z: &ZeroOptimizer) -> StateBytes {
    if let Some(b) = z.device_state_bytes() {
        return b;
    }
    let resident: usize = z
        .params
        .iter()
        .map(|p| resident_len(p.tensor()) * p.tensor().dtype().size_in_bytes())
        .sum();
    let master = z.master.as_ref().map_or(0, |m| m.len());
    let (swap_params, swap_grads, swap_optim, buffers) = z.swap_resident();
    StateBytes {
        parameters: (4 * master + resident) as u64 + swap_params,
        gradients: 4 * z.grads_len() as u64 + swap_grads,
        optimizer: 4 * z.moments_len() as u64 + swap_optim,
        buffers,
    }
}

/// DeepSpeed's stage-3 formula, 16Ψ/N: 4Ψ/N fp32 parameters (the partition; plus the persistent
/// ones, whole on every rank in their dtype), 4Ψ/N gradients, 8Ψ/N for Adam's moments. (For
/// fp16 DeepSpeed splits the same 16 bytes as 2 + 2 + 12; here gradients are fp32 and the fp32
/// partition is the master.)
pub(super) fn formula_bytes(z: &ZeroOptimizer) -> StateBytes {
    let psi: f64 = z
        .params
        .iter()
        .map(|p| p.tensor().elem_count() as f64)
        .sum();
    let n = z.layout.parts as f64;
    let persistent = z.stage3.as_ref().map_or(0, |s| s.persistent_elems()) as f64;
    let p_size = z
        .params
        .first()
        .map_or(4, |p| p.tensor().dtype().size_in_bytes()) as f64;
    StateBytes {
        parameters: (4.0 * psi / n + p_size * persistent) as u64,
        gradients: (4.0 * psi / n) as u64,
        optimizer: (8.0 * psi / n) as u64,
        buffers: 0,
    }
}

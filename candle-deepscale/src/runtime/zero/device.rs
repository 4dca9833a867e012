//! ZeRO's states as tensors on the parameters' device (a GPU): the gradients, Adam's moments and
//! the fp32 master pieces stay in device memory, buckets are reduced with the communicator's
//! device collectives (NCCL), and AdamW runs as tensor ops over each bucket's piece. Only the
//! gradient norm's scalar and the loss-scale overflow check reach the host, as in DeepSpeed.
//!
//! The layout (buckets, pieces, runs) is [`FlatLayout`](super::FlatLayout)'s, so checkpoints and
//! the host path see the same partition; on a CPU this path gives the host path's results to
//! rounding (tested), which is how the GPU's arithmetic is checked on machines without one.
use super::partition::Run;
use super::stage_1_and_2::{AdamState, ZeroCore};
use super::states::{load_runs, read_params_into, HeldBytes, RunState, ZeroStates};
use crate::comm::{ProcessGroup, ReduceOp};
use crate::layers::storage::set_storage_tensor;
use candle_core::{bail, DType, Device, Result, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;

pub(crate) struct DeviceStates {
    device: Device,
    /// Local gradients of the running accumulation, per bucket and parameter (flattened f32).
    staged: HashMap<usize, HashMap<usize, Tensor>>,
    /// Stages 0/1: the bucket's whole padded gradient; stages 2/3: this rank's piece (None: zero).
    grads: Vec<Option<Tensor>>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// fp32 pieces when parameters are half precision (and stage 3's partition).
    master: Option<Vec<Tensor>>,
    /// Per piece: 1 where the element decays, 0 elsewhere.
    decay: Vec<Tensor>,
    /// Per piece: 1 where the element counts in the gradient norm.
    norm: Vec<Tensor>,
}

impl DeviceStates {
    /// The states of `from` (Adam's moments and master pieces; not the gradients) moved to the
    /// parameters' device. None without parameters.
    pub fn new(z: &ZeroCore, from: &dyn ZeroStates) -> Result<Option<Self>> {
        let Some(device) = z.params.first().map(|p| p.tensor().device().clone()) else {
            return Ok(None);
        };
        let nb = z.layout.buckets.len();
        let n = z.layout.partition_len;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut master = from.has_master().then(|| vec![0f32; n]);
        for r in &z.layout.runs {
            let at = z.layout.buckets[r.bucket].part_offset + r.piece_offset;
            let (rm, rv, rmaster) = from.run_state(z, r)?;
            m[at..at + r.len].copy_from_slice(&rm);
            v[at..at + r.len].copy_from_slice(&rv);
            if let (Some(dst), Some(src)) = (master.as_mut(), rmaster) {
                dst[at..at + r.len].copy_from_slice(&src);
            }
        }
        let upload = |v: &[f32], b: usize| -> Result<Tensor> {
            let bk = &z.layout.buckets[b];
            let s = bk.part_offset;
            Tensor::from_slice(&v[s..s + bk.piece], bk.piece, &device)
        };
        let mut st = Self {
            device: device.clone(),
            staged: HashMap::new(),
            grads: vec![None; nb],
            exp_avg: (0..nb).map(|b| upload(&m, b)).collect::<Result<_>>()?,
            exp_avg_sq: (0..nb).map(|b| upload(&v, b)).collect::<Result<_>>()?,
            master: master
                .map(|h| (0..nb).map(|b| upload(&h, b)).collect::<Result<Vec<_>>>())
                .transpose()?,
            decay: Vec::new(),
            norm: Vec::new(),
        };
        st.segments_changed(z)?;
        Ok(Some(st))
    }

    /// Bucket `b`'s piece masks: where elements decay, where they count in the norm.
    fn masks(&self, z: &ZeroCore, b: usize) -> Result<(Tensor, Tensor)> {
        let piece = z.layout.buckets[b].piece;
        let (mut d, mut n) = (vec![0f32; piece], vec![0f32; piece]);
        for s in z.segments_of(b) {
            let r = s.piece_offset..s.piece_offset + s.len;
            d[r.clone()].fill(if s.decay { 1.0 } else { 0.0 });
            n[r].fill(if s.counts_in_norm { 1.0 } else { 0.0 });
        }
        Ok((
            Tensor::from_vec(d, piece, &self.device)?,
            Tensor::from_vec(n, piece, &self.device)?,
        ))
    }

    /// Bucket `b`'s staged local gradients as one padded flat tensor (None: nothing staged).
    fn flat(&mut self, z: &ZeroCore, b: usize) -> Result<Option<Tensor>> {
        let Some(mut staged) = self.staged.remove(&b) else {
            return Ok(None);
        };
        let bk = &z.layout.buckets[b];
        let mut parts = Vec::new();
        let mut at = 0;
        for &p in &bk.params {
            let fp = &z.layout.params[p];
            if fp.offset > at {
                parts.push(Tensor::zeros(fp.offset - at, DType::F32, &self.device)?);
            }
            parts.push(match staged.remove(&p) {
                Some(g) => g,
                None => Tensor::zeros(fp.numel, DType::F32, &self.device)?,
            });
            at = fp.offset + fp.numel;
        }
        if bk.padded > at {
            parts.push(Tensor::zeros(bk.padded - at, DType::F32, &self.device)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    fn add_grad(&mut self, b: usize, g: Tensor) -> Result<()> {
        self.grads[b] = Some(match self.grads[b].take() {
            Some(prev) => (prev + g)?,
            None => g,
        });
        Ok(())
    }

    /// This rank's piece of bucket `b`'s reduced gradient (None: zero).
    fn grad_piece(&self, z: &ZeroCore, b: usize) -> Result<Option<Tensor>> {
        let bk = &z.layout.buckets[b];
        Ok(match &self.grads[b] {
            Some(g) if !z.partitioned_grads() => {
                Some(g.narrow(0, z.layout.rank * bk.piece, bk.piece)?)
            }
            Some(g) => Some(g.clone()),
            None => None,
        })
    }

    /// Flushes gradients staged but never reduced (a bucket no backward reported).
    fn flush(&mut self, z: &ZeroCore) -> Result<()> {
        let pending: Vec<usize> = self.staged.keys().copied().collect();
        if !pending.is_empty() {
            self.reduce(z, &pending, true)?;
        }
        Ok(())
    }

    /// The fp32 values of this rank's piece of bucket `b`: the master copy, or read from the
    /// (fp32) parameters.
    fn piece(&self, z: &ZeroCore, b: usize) -> Result<Tensor> {
        if let Some(m) = &self.master {
            return Ok(m[b].clone());
        }
        let bk = &z.layout.buckets[b];
        let mut parts = Vec::new();
        let mut at = 0;
        for r in z.layout.runs.iter().filter(|r| r.bucket == b) {
            if r.piece_offset > at {
                parts.push(Tensor::zeros(
                    r.piece_offset - at,
                    DType::F32,
                    &self.device,
                )?);
            }
            let p = z.params[r.param].tensor().flatten_all()?;
            parts.push(p.narrow(0, r.param_offset, r.len)?.to_dtype(DType::F32)?);
            at = r.piece_offset + r.len;
        }
        if bk.piece > at {
            parts.push(Tensor::zeros(bk.piece - at, DType::F32, &self.device)?);
        }
        Tensor::cat(&parts, 0)
    }

    /// All-gathers bucket `b`'s updated pieces (this rank's is `piece`) into its parameters.
    fn write_bucket(&self, z: &ZeroCore, b: usize, piece: &Tensor) -> Result<()> {
        let full = match (&z.dp, z.layout.parts > 1) {
            (Some(dp), true) => dp.comm.all_gather_tensor(&dp.group, piece)?.flatten_all()?,
            _ => piece.clone(),
        };
        for &p in &z.layout.buckets[b].params {
            let fp = &z.layout.params[p];
            let var = &z.params[p].var;
            let v = full
                .narrow(0, fp.offset, fp.numel)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            var.set(&v)?;
        }
        Ok(())
    }
}

impl ZeroStates for DeviceStates {
    fn kind(&self) -> &'static str {
        "device"
    }

    fn accumulate(&mut self, z: &ZeroCore, i: usize, grad: &Tensor) -> Result<()> {
        let b = z.layout.params[i].bucket;
        let g = grad.flatten_all()?.to_dtype(DType::F32)?;
        let slot = self.staged.entry(b).or_default();
        let g = match slot.remove(&i) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        slot.insert(i, g);
        Ok(())
    }

    fn reduce(&mut self, z: &ZeroCore, bs: &[usize], last: bool) -> Result<()> {
        if !z.partitioned_grads() {
            if !last {
                return Ok(()); // gradients keep accumulating in the staged tensors
            }
            for &b in bs {
                if let Some(flat) = self.flat(z, b)? {
                    self.add_grad(b, flat)?;
                }
                if let Some(dp) = &z.dp {
                    if let Some(g) = self.grads[b].take() {
                        self.grads[b] =
                            Some(dp.comm.all_reduce_tensor(&dp.group, &g, ReduceOp::Sum)?);
                    }
                }
            }
            return Ok(());
        }
        if bs.is_empty() {
            return Ok(());
        }
        let parts = z.layout.parts;
        // Rank k's chunk: its piece of every bucket, in order (one reduce-scatter for all).
        let mut cols = Vec::with_capacity(bs.len());
        for &b in bs {
            let bk = &z.layout.buckets[b];
            let flat = match self.flat(z, b)? {
                Some(f) => f,
                None => Tensor::zeros(bk.padded, DType::F32, &self.device)?,
            };
            cols.push(flat.reshape((parts, bk.piece))?);
        }
        let send = Tensor::cat(&cols, 1)?;
        let pieces = send.dim(1)?;
        z.note_comm(4 * (send.elem_count() + pieces));
        let mine = match (&z.dp, parts > 1) {
            (Some(dp), true) => dp
                .comm
                .reduce_scatter_tensor(&dp.group, &send, ReduceOp::Sum)?
                .flatten_all()?,
            _ => send.flatten_all()?,
        };
        let mut at = 0;
        for &b in bs {
            let piece = z.layout.buckets[b].piece;
            self.add_grad(b, mine.narrow(0, at, piece)?)?;
            at += piece;
        }
        Ok(())
    }

    fn grad_norm_sq(&mut self, z: &ZeroCore) -> Result<f64> {
        self.flush(z)?;
        let mut total: Option<Tensor> = None;
        for b in 0..z.layout.buckets.len() {
            let Some(g) = self.grad_piece(z, b)? else {
                continue;
            };
            // f64 as the host path sums, so clipping sees the same norm.
            let g = g.to_dtype(DType::F64)?;
            let sq = (g.sqr()? * self.norm[b].to_dtype(DType::F64)?)?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        match total {
            Some(t) => t.to_dtype(DType::F64)?.to_scalar::<f64>(),
            None => Ok(0.0),
        }
    }

    fn step(
        &mut self,
        z: &ZeroCore,
        lr: f64,
        grad_scale: f64,
        write_back: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        self.flush(z)?;
        let c = z.config;
        // The fused CPU kernel's constants, rounded to f32 where it rounds them, so both paths
        // compute the same f32 operations in the same order.
        let f = |x: f64| x as f32 as f64;
        let (b1, b2, lr32, wd) = (f(c.beta1), f(c.beta2), f(lr), f(c.weight_decay));
        let t = z.step as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let step_size = f(lr32 / bc1);
        let inv_sqrt_bc2 = f(1.0 / bc2.sqrt());
        let (one_b1, one_b2) = (f((1.0 - b1 as f32) as f64), f((1.0 - b2 as f32) as f64));
        for b in 0..z.layout.buckets.len() {
            let p = self.piece(z, b)?;
            let g = match self.grad_piece(z, b)? {
                Some(g) => g.affine(f(grad_scale), 0.0)?,
                None => p.zeros_like()?,
            };
            let wd = (&self.decay[b] * wd)?;
            // AdamW decays the weights; Adam with L2 adds the decay to the gradient.
            let g = if c.adam_w_mode { g } else { (g + (&p * &wd)?)? };
            let m = (self.exp_avg[b].affine(b1, 0.0)? + g.affine(one_b1, 0.0)?)?;
            let v = (self.exp_avg_sq[b].affine(b2, 0.0)? + (g.affine(one_b2, 0.0)? * &g)?)?;
            let denom = v.sqrt()?.affine(inv_sqrt_bc2, f(c.eps))?;
            let p = if c.adam_w_mode {
                (&p * wd.affine(-lr32, 1.0)?)?
            } else {
                p
            };
            let p = (p - (m.affine(step_size, 0.0)? / denom)?)?;
            self.exp_avg[b] = m;
            self.exp_avg_sq[b] = v;
            if let Some(mst) = self.master.as_mut() {
                mst[b] = p.clone();
            }
            if write_back(b) {
                self.write_bucket(z, b, &p)?;
            }
        }
        Ok(())
    }

    /// Stage 3: all-gathers the pieces of parameters `todo` into their tensors, in device memory.
    fn gather(&self, z: &ZeroCore, todo: &[usize]) -> Result<()> {
        if todo.is_empty() {
            return Ok(());
        }
        let Some(master) = &self.master else {
            bail!("ZeRO-3 without a partition")
        };
        let buckets: Vec<usize> = todo.iter().map(|&p| z.layout.params[p].bucket).collect();
        let send = Tensor::cat(&buckets.iter().map(|&b| &master[b]).collect::<Vec<_>>(), 0)?;
        let parts = z.layout.parts;
        z.note_comm(4 * send.elem_count() * (parts + 1));
        // Row k: rank k's piece of every parameter in `todo`, in order.
        let recv = match (&z.dp, parts > 1) {
            (Some(dp), true) => dp.comm.all_gather_tensor(&dp.group, &send)?,
            _ => send.unsqueeze(0)?,
        };
        let mut within = 0;
        for (&p, &b) in todo.iter().zip(&buckets) {
            let piece = z.layout.buckets[b].piece;
            let var = &z.params[p].var;
            let full = recv
                .narrow(1, within, piece)?
                .flatten_all()?
                .narrow(0, 0, var.elem_count())?
                .reshape(var.shape())?;
            set_storage_tensor(var, &full)?;
            within += piece;
        }
        Ok(())
    }

    /// Sums parameter `i`'s reduced gradient over `group` (tied weights across pipeline stages).
    fn all_reduce_param_grad(
        &mut self,
        z: &ZeroCore,
        i: usize,
        group: &ProcessGroup,
    ) -> Result<()> {
        self.flush(z)?;
        let fp = z.layout.params[i].clone();
        let Some(g) = self.grads[fp.bucket].take() else {
            return Ok(());
        };
        let mine = g.narrow(0, fp.offset, fp.numel)?;
        let summed = group
            .comm
            .all_reduce_tensor(&group.group, &mine, ReduceOp::Sum)?;
        let n = g.dim(0)?;
        let mut parts = Vec::new();
        if fp.offset > 0 {
            parts.push(g.narrow(0, 0, fp.offset)?);
        }
        parts.push(summed);
        if fp.offset + fp.numel < n {
            parts.push(g.narrow(0, fp.offset + fp.numel, n - fp.offset - fp.numel)?);
        }
        self.grads[fp.bucket] = Some(Tensor::cat(&parts, 0)?);
        Ok(())
    }

    fn run_state<'a>(&'a self, _z: &ZeroCore, r: &Run) -> Result<RunState<'a>> {
        let read = |t: &Tensor| -> Result<Cow<'a, [f32]>> {
            Ok(Cow::Owned(
                t.narrow(0, r.piece_offset, r.len)?.to_vec1::<f32>()?,
            ))
        };
        Ok((
            read(&self.exp_avg[r.bucket])?,
            read(&self.exp_avg_sq[r.bucket])?,
            self.master
                .as_ref()
                .map(|m| read(&m[r.bucket]))
                .transpose()?,
        ))
    }

    /// Through host memory (a checkpoint is read there anyway), then back to the device.
    fn load(&mut self, z: &ZeroCore, state: &[Option<AdamState>]) -> Result<()> {
        let n = z.layout.partition_len;
        let download = |ts: &[Tensor]| -> Result<Vec<f32>> {
            let mut v = Vec::with_capacity(n);
            for t in ts {
                v.extend(t.to_vec1::<f32>()?);
            }
            Ok(v)
        };
        let (mut m, mut v) = (download(&self.exp_avg)?, download(&self.exp_avg_sq)?);
        load_runs(z, state, |range, sm, sv| {
            m[range.clone()].copy_from_slice(sm);
            v[range].copy_from_slice(sv);
            Ok(())
        })?;
        let upload = |h: &[f32], b: usize| -> Result<Tensor> {
            let bk = &z.layout.buckets[b];
            Tensor::from_slice(
                &h[bk.part_offset..bk.part_offset + bk.piece],
                bk.piece,
                &self.device,
            )
        };
        let nb = z.layout.buckets.len();
        self.exp_avg = (0..nb).map(|b| upload(&m, b)).collect::<Result<_>>()?;
        self.exp_avg_sq = (0..nb).map(|b| upload(&v, b)).collect::<Result<_>>()?;
        // A master copy of half parameters is re-read from them (stage 3's is the partition).
        if self.master.is_some() && z.stage != 3 {
            let mut h = vec![0f32; n];
            read_params_into(&z.layout, &z.params, &mut h)?;
            self.master = Some((0..nb).map(|b| upload(&h, b)).collect::<Result<_>>()?);
        }
        self.staged.clear();
        self.grads.iter_mut().for_each(|g| *g = None);
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.staged.clear();
        self.grads.iter_mut().for_each(|g| *g = None);
        Ok(())
    }

    /// Gradient buffers are whole once reduced: counted at the layout's size as the host path.
    fn bytes(&self, z: &ZeroCore) -> HeldBytes {
        let bytes = |ts: &[Tensor]| ts.iter().map(|t| 4 * t.elem_count() as u64).sum::<u64>();
        HeldBytes {
            gradients: 4 * z.grad_len() as u64,
            moments: bytes(&self.exp_avg) + bytes(&self.exp_avg_sq),
            master: self.master.as_deref().map_or(0, bytes),
            buffers: 0,
        }
    }

    fn has_master(&self) -> bool {
        self.master.is_some()
    }

    /// Rebuilds the masks (a pipeline's duplicate tied weight no longer counts in the norm).
    fn segments_changed(&mut self, z: &ZeroCore) -> Result<()> {
        let masks = (0..z.layout.buckets.len())
            .map(|b| self.masks(z, b))
            .collect::<Result<Vec<_>>>()?;
        (self.decay, self.norm) = masks.into_iter().unzip();
        Ok(())
    }
}

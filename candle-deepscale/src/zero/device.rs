//! ZeRO stages 0-2 with their flat buffers as tensors on the parameters' device (a GPU): the
//! gradients, Adam's moments and the fp32 master pieces stay in device memory, buckets are
//! reduced with the communicator's device collectives (NCCL), and AdamW runs as tensor ops over
//! each bucket's piece. Only the gradient norm's scalar and the loss-scale overflow check reach
//! the host, as in DeepSpeed.
//!
//! The layout (buckets, pieces, runs) is [`FlatLayout`](super::FlatLayout)'s, so checkpoints and
//! the host path see the same partition; on a CPU this path gives the host path's results to
//! rounding (tested), which is how the GPU's arithmetic is checked on machines without one.
use super::stage_1_and_2::{StateBytes, ZeroOptimizer};
use crate::comm::{ProcessGroup, ReduceOp};
use candle_core::{bail, DType, Device, Result, Tensor};
use std::collections::HashMap;

/// Adam's m and v, and the fp32 master values, of one run (host copies).
pub(super) type RunState = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

pub(super) struct DeviceState {
    device: Device,
    /// Local gradients of the running accumulation, per bucket and parameter (flattened f32).
    staged: HashMap<usize, HashMap<usize, Tensor>>,
    /// Stages 0/1: the bucket's whole padded gradient; stage 2: this rank's piece (None: zero).
    grads: Vec<Option<Tensor>>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// fp32 pieces when parameters are half precision.
    pub(super) master: Option<Vec<Tensor>>,
    /// Per piece: 1 where the element decays, 0 elsewhere.
    decay: Vec<Tensor>,
    /// Per piece: 1 where the element counts in the gradient norm.
    norm: Vec<Tensor>,
}

impl ZeroOptimizer {
    /// Keeps the flat buffers and AdamW on the parameters' device (automatic for GPU
    /// parameters; on the CPU it runs the GPU's code path). Stages 0-2 without offload.
    pub fn use_device_states(&mut self) -> Result<()> {
        if self.device.is_some() {
            return Ok(());
        }
        if self.swap.is_some() {
            bail!("device-resident ZeRO states exclude NVMe offload (it swaps host buffers)")
        }
        let Some(device) = self.params.first().map(|p| p.tensor().device().clone()) else {
            return Ok(());
        };
        let nb = self.layout.buckets.len();
        let upload = |v: &[f32], b: usize| -> Result<Tensor> {
            let bk = &self.layout.buckets[b];
            let s = bk.part_offset;
            Tensor::from_slice(&v[s..s + bk.piece], bk.piece, &device)
        };
        let mut exp_avg = Vec::with_capacity(nb);
        let mut exp_avg_sq = Vec::with_capacity(nb);
        let mut master = self.master.as_ref().map(|_| Vec::with_capacity(nb));
        let mut decay = Vec::with_capacity(nb);
        let mut norm = Vec::with_capacity(nb);
        for b in 0..nb {
            exp_avg.push(upload(&self.exp_avg, b)?);
            exp_avg_sq.push(upload(&self.exp_avg_sq, b)?);
            if let (Some(m), Some(host)) = (master.as_mut(), self.master.as_ref()) {
                m.push(upload(host, b)?);
            }
            let (d, n) = self.masks(b, &device)?;
            decay.push(d);
            norm.push(n);
        }
        self.grads = Vec::new();
        self.exp_avg = Vec::new();
        self.exp_avg_sq = Vec::new();
        self.master = None;
        self.device = Some(DeviceState {
            device,
            staged: HashMap::new(),
            grads: vec![None; nb],
            exp_avg,
            exp_avg_sq,
            master,
            decay,
            norm,
        });
        Ok(())
    }

    /// Bucket `b`'s piece masks: where elements decay, where they count in the norm.
    fn masks(&self, b: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let piece = self.layout.buckets[b].piece;
        let (mut d, mut n) = (vec![0f32; piece], vec![0f32; piece]);
        for s in self.segments_of(b) {
            d[s.0..s.0 + s.1].fill(if s.2 { 1.0 } else { 0.0 });
            n[s.0..s.0 + s.1].fill(if s.3 { 1.0 } else { 0.0 });
        }
        Ok((
            Tensor::from_vec(d, piece, device)?,
            Tensor::from_vec(n, piece, device)?,
        ))
    }

    /// Rebuilds the masks after the segments changed (a pipeline's duplicate tied weight).
    pub(super) fn refresh_device_masks(&mut self) -> Result<()> {
        let Some(device) = self.device.as_ref().map(|d| d.device.clone()) else {
            return Ok(());
        };
        for b in 0..self.layout.buckets.len() {
            let (d, n) = self.masks(b, &device)?;
            let st = self.device.as_mut().expect("device states");
            st.decay[b] = d;
            st.norm[b] = n;
        }
        Ok(())
    }

    pub(super) fn device_accumulate(&mut self, i: usize, grad: &Tensor) -> Result<()> {
        let b = self.layout.params[i].bucket;
        let Some(d) = self.device.as_mut() else {
            bail!("no device states")
        };
        let g = grad.flatten_all()?.to_dtype(DType::F32)?;
        let slot = d.staged.entry(b).or_default();
        let g = match slot.remove(&i) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        slot.insert(i, g);
        Ok(())
    }

    /// Bucket `b`'s staged local gradients as one padded flat tensor (zeros where none).
    fn device_flat(&mut self, b: usize) -> Result<Option<Tensor>> {
        let Some(d) = self.device.as_mut() else {
            bail!("no device states")
        };
        let Some(mut staged) = d.staged.remove(&b) else {
            return Ok(None);
        };
        let bk = &self.layout.buckets[b];
        let mut parts = Vec::new();
        let mut at = 0;
        for &p in &bk.params {
            let fp = &self.layout.params[p];
            if fp.offset > at {
                parts.push(Tensor::zeros(fp.offset - at, DType::F32, &d.device)?);
            }
            parts.push(match staged.remove(&p) {
                Some(g) => g,
                None => Tensor::zeros(fp.numel, DType::F32, &d.device)?,
            });
            at = fp.offset + fp.numel;
        }
        if bk.padded > at {
            parts.push(Tensor::zeros(bk.padded - at, DType::F32, &d.device)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    fn add_grad(&mut self, b: usize, g: Tensor) -> Result<()> {
        let Some(d) = self.device.as_mut() else {
            bail!("no device states")
        };
        d.grads[b] = Some(match d.grads[b].take() {
            Some(prev) => (prev + g)?,
            None => g,
        });
        Ok(())
    }

    pub(super) fn device_reduce(&mut self, bs: &[usize], last: bool) -> Result<()> {
        if self.stage < 2 {
            if !last {
                return Ok(()); // gradients keep accumulating in the staged tensors
            }
            for &b in bs {
                if let Some(flat) = self.device_flat(b)? {
                    self.add_grad(b, flat)?;
                }
                if let (Some(dp), Some(d)) = (&self.dp, self.device.as_mut()) {
                    if let Some(g) = d.grads[b].take() {
                        d.grads[b] =
                            Some(dp.comm.all_reduce_tensor(&dp.group, &g, ReduceOp::Sum)?);
                    }
                }
            }
            return Ok(());
        }
        if bs.is_empty() {
            return Ok(());
        }
        let parts = self.layout.parts;
        let device = match &self.device {
            Some(d) => d.device.clone(),
            None => bail!("no device states"),
        };
        // Rank k's chunk: its piece of every bucket, in order (one reduce-scatter for all).
        let mut cols = Vec::with_capacity(bs.len());
        for &b in bs {
            let bk = self.layout.buckets[b].clone();
            let flat = match self.device_flat(b)? {
                Some(f) => f,
                None => Tensor::zeros(bk.padded, DType::F32, &device)?,
            };
            cols.push(flat.reshape((parts, bk.piece))?);
        }
        let send = Tensor::cat(&cols, 1)?;
        let pieces = send.dim(1)?;
        self.note_comm(4 * (send.elem_count() + pieces));
        let mine = match (&self.dp, parts > 1) {
            (Some(dp), true) => dp
                .comm
                .reduce_scatter_tensor(&dp.group, &send, ReduceOp::Sum)?
                .flatten_all()?,
            _ => send.flatten_all()?,
        };
        let mut at = 0;
        for &b in bs {
            let piece = self.layout.buckets[b].piece;
            self.add_grad(b, mine.narrow(0, at, piece)?)?;
            at += piece;
        }
        Ok(())
    }

    /// This rank's piece of bucket `b`'s reduced gradient (None: zero).
    fn device_grad_piece(&self, b: usize) -> Result<Option<Tensor>> {
        let Some(d) = &self.device else {
            bail!("no device states")
        };
        let bk = &self.layout.buckets[b];
        Ok(match &d.grads[b] {
            Some(g) if self.stage < 2 => {
                Some(g.narrow(0, self.layout.rank * bk.piece, bk.piece)?)
            }
            Some(g) => Some(g.clone()),
            None => None,
        })
    }

    /// Flushes gradients staged but never reduced (a bucket no backward reported).
    fn device_flush(&mut self) -> Result<()> {
        let pending: Vec<usize> = match &self.device {
            Some(d) => d.staged.keys().copied().collect(),
            None => return Ok(()),
        };
        if !pending.is_empty() {
            self.device_reduce(&pending, true)?;
        }
        Ok(())
    }

    pub(super) fn device_grad_norm_sq(&mut self) -> Result<f64> {
        self.device_flush()?;
        let mut total: Option<Tensor> = None;
        for b in 0..self.layout.buckets.len() {
            let Some(g) = self.device_grad_piece(b)? else {
                continue;
            };
            let Some(d) = &self.device else {
                bail!("no device states")
            };
            // f64 as the host path sums, so clipping sees the same norm.
            let g = g.to_dtype(DType::F64)?;
            let sq = (g.sqr()? * d.norm[b].to_dtype(DType::F64)?)?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        match total {
            Some(t) => Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => Ok(0.0),
        }
    }

    /// The fp32 values of this rank's piece of bucket `b`: the master copy, or read from the
    /// (fp32) parameters.
    fn device_piece(&self, b: usize) -> Result<Tensor> {
        let Some(d) = &self.device else {
            bail!("no device states")
        };
        if let Some(m) = &d.master {
            return Ok(m[b].clone());
        }
        let bk = &self.layout.buckets[b];
        let mut parts = Vec::new();
        let mut at = 0;
        for r in self.layout.runs.iter().filter(|r| r.bucket == b) {
            if r.piece_offset > at {
                parts.push(Tensor::zeros(r.piece_offset - at, DType::F32, &d.device)?);
            }
            let p = self.params[r.param].tensor().flatten_all()?;
            parts.push(p.narrow(0, r.param_offset, r.len)?.to_dtype(DType::F32)?);
            at = r.piece_offset + r.len;
        }
        if bk.piece > at {
            parts.push(Tensor::zeros(bk.piece - at, DType::F32, &d.device)?);
        }
        Tensor::cat(&parts, 0)
    }

    pub(super) fn device_step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.device_flush()?;
        let c = self.config;
        // The fused CPU kernel's constants, rounded to f32 where it rounds them, so both paths
        // compute the same f32 operations in the same order.
        let f = |x: f64| x as f32 as f64;
        let (b1, b2, lr32, wd) = (f(c.beta1), f(c.beta2), f(lr), f(c.weight_decay));
        let t = self.step as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let step_size = f(lr32 / bc1);
        let inv_sqrt_bc2 = f(1.0 / bc2.sqrt());
        let (one_b1, one_b2) = (f((1.0 - b1 as f32) as f64), f((1.0 - b2 as f32) as f64));
        for b in 0..self.layout.buckets.len() {
            let p = self.device_piece(b)?;
            let Some(d) = &self.device else {
                bail!("no device states")
            };
            let g = match self.device_grad_piece(b)? {
                Some(g) => g.affine(f(grad_scale), 0.0)?,
                None => p.zeros_like()?,
            };
            let wd = (&d.decay[b] * wd)?;
            // AdamW decays the weights; Adam with L2 adds the decay to the gradient.
            let g = if c.adam_w_mode { g } else { (g + (&p * &wd)?)? };
            let m = (d.exp_avg[b].affine(b1, 0.0)? + g.affine(one_b1, 0.0)?)?;
            let v = (d.exp_avg_sq[b].affine(b2, 0.0)? + (g.affine(one_b2, 0.0)? * &g)?)?;
            let denom = v.sqrt()?.affine(inv_sqrt_bc2, f(c.eps))?;
            let p = if c.adam_w_mode {
                (&p * wd.affine(-lr32, 1.0)?)?
            } else {
                p
            };
            let p = (p - (m.affine(step_size, 0.0)? / denom)?)?;
            let d = self.device.as_mut().expect("device states");
            d.exp_avg[b] = m;
            d.exp_avg_sq[b] = v;
            if let Some(mst) = d.master.as_mut() {
                mst[b] = p.clone();
            }
            // Stage 3 gathers parameters from the pieces around each use; its persistent
            // (whole) ones take the update now.
            let write = match &self.stage3 {
                Some(s3) => self.layout.buckets[b]
                    .params
                    .iter()
                    .any(|&i| s3.is_persistent(i)),
                None => true,
            };
            if write {
                self.device_write_bucket(b, &p)?;
            }
        }
        Ok(())
    }

    /// Stage 3: all-gathers the pieces of parameters `todo` into their tensors, in device memory.
    pub(super) fn device_gather(&self, todo: &[usize]) -> Result<()> {
        let Some(d) = &self.device else {
            bail!("no device states")
        };
        let Some(master) = &d.master else {
            bail!("ZeRO-3 without a partition")
        };
        let buckets: Vec<usize> = todo.iter().map(|&p| self.layout.params[p].bucket).collect();
        let send = Tensor::cat(&buckets.iter().map(|&b| &master[b]).collect::<Vec<_>>(), 0)?;
        let parts = self.layout.parts;
        self.note_comm(4 * send.elem_count() * (parts + 1));
        // Row k: rank k's piece of every parameter in `todo`, in order.
        let recv = match (&self.dp, parts > 1) {
            (Some(dp), true) => dp.comm.all_gather_tensor(&dp.group, &send)?,
            _ => send.unsqueeze(0)?,
        };
        let mut within = 0;
        for (&p, &b) in todo.iter().zip(&buckets) {
            let piece = self.layout.buckets[b].piece;
            let var = &self.params[p].var;
            let full = recv
                .narrow(1, within, piece)?
                .flatten_all()?
                .narrow(0, 0, var.elem_count())?
                .reshape(var.shape())?;
            super::stage3::set_storage_tensor(var, &full)?;
            within += piece;
        }
        Ok(())
    }

    /// All-gathers bucket `b`'s updated pieces (this rank's is `piece`) into its parameters.
    fn device_write_bucket(&self, b: usize, piece: &Tensor) -> Result<()> {
        let full = match (&self.dp, self.layout.parts > 1) {
            (Some(dp), true) => dp.comm.all_gather_tensor(&dp.group, piece)?.flatten_all()?,
            _ => piece.clone(),
        };
        for &p in &self.layout.buckets[b].params {
            let fp = &self.layout.params[p];
            let var = &self.params[p].var;
            let v = full
                .narrow(0, fp.offset, fp.numel)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            var.set(&v)?;
        }
        Ok(())
    }

    pub(super) fn device_zero_grad(&mut self) {
        if let Some(d) = self.device.as_mut() {
            d.staged.clear();
            d.grads.iter_mut().for_each(|g| *g = None);
        }
    }

    /// Sums parameter `i`'s reduced gradient over `group` (tied weights across pipeline stages).
    pub(super) fn device_all_reduce_param_grad(
        &mut self,
        i: usize,
        group: &ProcessGroup,
    ) -> Result<()> {
        if self.stage >= 2 {
            bail!("ZeRO-2 keeps only this rank's gradient partition")
        }
        self.device_flush()?;
        let fp = self.layout.params[i].clone();
        let Some(d) = self.device.as_mut() else {
            bail!("no device states")
        };
        let Some(g) = d.grads[fp.bucket].take() else {
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
        d.grads[fp.bucket] = Some(Tensor::cat(&parts, 0)?);
        Ok(())
    }

    /// Host copies of the moments (and master) of `len` elements at `piece_offset` of bucket `b`.
    pub(super) fn device_run_state(
        &self,
        b: usize,
        piece_offset: usize,
        len: usize,
    ) -> Result<RunState> {
        let Some(d) = &self.device else {
            bail!("no device states")
        };
        let read = |t: &Tensor| t.narrow(0, piece_offset, len)?.to_vec1::<f32>();
        Ok((
            read(&d.exp_avg[b])?,
            read(&d.exp_avg_sq[b])?,
            d.master.as_ref().map(|m| read(&m[b])).transpose()?,
        ))
    }

    /// Host staging for `load_state`: the device states as host vectors (taken back by
    /// [`Self::device_upload`]).
    pub(super) fn device_download(&mut self) -> Result<()> {
        let Some(d) = self.device.take() else {
            return Ok(());
        };
        let cat = |ts: &[Tensor]| -> Result<Vec<f32>> {
            let mut v = Vec::with_capacity(self.layout.partition_len);
            for t in ts {
                v.extend(t.to_vec1::<f32>()?);
            }
            Ok(v)
        };
        self.exp_avg = cat(&d.exp_avg)?;
        self.exp_avg_sq = cat(&d.exp_avg_sq)?;
        self.master = d.master.as_deref().map(cat).transpose()?;
        self.grads = vec![
            0f32;
            if self.stage >= 2 {
                self.layout.partition_len
            } else {
                self.layout.full_len
            }
        ];
        Ok(())
    }

    pub(super) fn device_state_bytes(&self) -> Option<StateBytes> {
        let d = self.device.as_ref()?;
        let bytes = |ts: &[Tensor]| ts.iter().map(|t| 4 * t.elem_count() as u64).sum::<u64>();
        if self.stage3.is_some() {
            // The fp32 pieces are the parameters; gathered tensors count while resident.
            let resident: u64 = self
                .params
                .iter()
                .map(|p| {
                    (super::stage3::resident_len(p.tensor()) * p.tensor().dtype().size_in_bytes())
                        as u64
                })
                .sum();
            return Some(StateBytes {
                parameters: resident + d.master.as_deref().map_or(0, bytes),
                gradients: 4 * self.layout.partition_len as u64,
                optimizer: bytes(&d.exp_avg) + bytes(&d.exp_avg_sq),
                buffers: 0,
            });
        }
        let parameters = self
            .params
            .iter()
            .map(|p| (p.tensor().elem_count() * p.tensor().dtype().size_in_bytes()) as u64)
            .sum();
        // Gradient buffers are whole once reduced: count the layout's size as the host path does.
        let gradients = 4 * if self.stage >= 2 {
            self.layout.partition_len
        } else {
            self.layout.full_len
        } as u64;
        Some(StateBytes {
            parameters,
            gradients,
            optimizer: bytes(&d.exp_avg)
                + bytes(&d.exp_avg_sq)
                + d.master.as_deref().map_or(0, bytes),
            buffers: 0,
        })
    }
}

//! Softmax cross entropy over the padded vocabulary (Megatron's `vocab_parallel_cross_entropy`
//! on one rank), with the padding columns excluded: the fused kernel and its composed reference.
use candle_core::{DType, Result, Tensor, D};

/// The LM head's logits `x w^T` (`x [.., hidden]`, `w [padded_vocab, hidden]`), remembered (on
/// this thread, until the next call) so that the cross entropy of exactly these logits computes
/// the gradients of `x` and `w` itself, a block of vocabulary columns at a time: the logits'
/// gradient (`[tokens x vocab]`, 206 MB at GPT-2 124M) never exists whole, and each block is
/// consumed by the two GEMMs while it is still in cache. For training forwards (the loss always
/// follows); anything else is a plain linear.
pub fn lm_head_logits(x: &Tensor, w: &Tensor, training: bool) -> Result<Tensor> {
    lm_head_logits_with_bias(x, w, None, training)
}

/// [`lm_head_logits`] with a bias over the vocabulary (`x w^T + b`: BERT's masked-LM decoder);
/// in training the cross entropy computes the bias's gradient with the others, block by block.
pub fn lm_head_logits_with_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    training: bool,
) -> Result<Tensor> {
    // x [.., hidden] as one 2-D product.
    let mut dims = x.dims().to_vec();
    let hidden = dims.last().copied().unwrap_or(1);
    let rows = x.elem_count() / hidden.max(1);
    let logits = crate::ops::matmul::linear(&x.reshape((rows, hidden))?, w, bias)?;
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    let logits = logits.reshape(dims)?;
    if training && crate::ops::fused() && fused::head_applies(x, w, bias) {
        fused::remember_head(&logits, x, w, bias);
    }
    Ok(logits)
}

/// Per-position cross entropy, flattened to `[tokens]`, in f32. On the CPU with f32 logits one
/// fused kernel (see [`fused`]); elsewhere [`token_losses_reference`].
pub fn token_losses(logits: &Tensor, labels: &Tensor, vocab_size: usize) -> Result<Tensor> {
    if crate::ops::half_on_cpu(&[logits]).is_some() {
        return token_losses(&logits.to_dtype(DType::F32)?, labels, vocab_size);
    }
    if crate::ops::fused() && logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return fused::token_losses(logits, labels, vocab_size);
    }
    token_losses_reference(logits, labels, vocab_size)
}

/// [`token_losses`] as a composition of candle ops (the reference the fused kernel is tested
/// against, and the path on other devices).
pub fn token_losses_reference(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
) -> Result<Tensor> {
    let padded = logits.dim(D::Minus1)?;
    if vocab_size > padded {
        candle_core::bail!("cross entropy: vocab_size {vocab_size} exceeds logits width {padded}");
    }
    let logits = logits.narrow(D::Minus1, 0, vocab_size)?;
    let logits = logits.reshape(((), vocab_size))?.to_dtype(DType::F32)?;
    let labels = labels.flatten_all()?;
    if labels.dim(0)? != logits.dim(0)? {
        candle_core::bail!(
            "cross entropy: {} labels for {} logit rows",
            labels.dim(0)?,
            logits.dim(0)?
        );
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let target = shifted.gather(&labels.unsqueeze(1)?, 1)?;
    lse.sub(&target)?.squeeze(1)
}

/// Softmax cross entropy over the padded-vocabulary logits as one CPU kernel each way (Megatron
/// fuses the same): forward one pass per row for max and sum of exp (the log-sum-exp kept for
/// backward), backward one pass writing `softmax - onehot` (zero in the padding), where the
/// composed ops make about fifteen passes over the `[tokens x vocab]` logits, the largest tensor
/// of a step.
pub mod fused {
    use crate::ops::fast_math::{contiguous_f32, exp, vectorized};
    use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
    use rayon::prelude::*;
    use std::sync::Mutex;

    fn slices<'a>(
        ls: &'a CpuStorage,
        ll: &Layout,
        ys: &'a CpuStorage,
        yl: &Layout,
    ) -> Result<(&'a [f32], &'a [u32])> {
        let x = match (ls, ll.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => bail!("fused cross entropy: logits must be contiguous f32"),
        };
        let y = match (ys, yl.contiguous_offsets()) {
            (CpuStorage::U32(v), Some((a, b))) => &v[a..b],
            _ => bail!("fused cross entropy: labels must be contiguous u32"),
        };
        Ok((x, y))
    }

    #[inline(always)]
    fn row_lse(x: &[f32]) -> f32 {
        let m = crate::ops::fast_math::max(x);
        m + crate::ops::fast_math::sum_map(x, |v| exp(v - m)).ln()
    }

    #[inline(always)]
    fn row_grad(d: &mut [f32], x: &[f32], lse: f32, g: f32) {
        for (d, &v) in d.iter_mut().zip(x) {
            *d = g * exp(v - lse);
        }
    }

    /// `d = g softmax(x)` given the row's log-sum-exp, compiled for the CPU's vector extensions.
    fn softmax_row(d: &mut [f32], x: &[f32], lse: f32, g: f32) {
        vectorized(
            #[inline(always)]
            || row_grad(d, x, lse, g),
        )
    }

    /// The baseline, AVX2 and AVX-512 copies of the row passes give the same bits.
    #[test]
    fn every_vector_copy_gives_the_same_bits() {
        let (x, _) = crate::ops::fast_math::bits_rows();
        let runs = crate::ops::fast_math::on_each_copy(
            #[inline(always)]
            || {
                let lse = row_lse(&x);
                let mut d = vec![0f32; x.len()];
                row_grad(&mut d, &x, lse, 0.25);
                (lse.to_bits(), crate::ops::fast_math::bits(&d))
            },
        );
        assert!(runs.iter().all(|r| *r == runs[0]), "{} copies", runs.len());
    }

    /// Losses of rows `[tokens, padded]` against labels; keeps each row's log-sum-exp. With
    /// `given` (a block of a vocabulary-parallel row: see [`block_token_losses`]) the losses
    /// and log-sum-exps are the caller's, reduced over every rank's block.
    struct CrossEntropy {
        vocab: usize,
        lse: Mutex<Vec<f32>>,
        given: Option<Vec<f32>>,
    }

    impl CrossEntropy {
        fn new(vocab: usize) -> Self {
            Self {
                vocab,
                lse: Mutex::new(Vec::new()),
                given: None,
            }
        }
    }

    impl CustomOp2 for CrossEntropy {
        fn name(&self) -> &'static str {
            "fused-cross-entropy"
        }

        fn cpu_fwd(
            &self,
            ls: &CpuStorage,
            ll: &Layout,
            ys: &CpuStorage,
            yl: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (x, y) = slices(ls, ll, ys, yl)?;
            let padded = ll.dims()[1];
            let v = self.vocab;
            if let Some(loss) = &self.given {
                if loss.len() != y.len() || x.len() != y.len() * padded {
                    bail!("vocabulary-parallel cross entropy: rows do not match")
                }
                return Ok((CpuStorage::F32(loss.clone()), Shape::from(y.len())));
            }
            if let Some(bad) = y.iter().find(|&&l| l as usize >= v) {
                bail!("cross entropy: label {bad} is outside the vocabulary of {v}")
            }
            let lse: Vec<f32> = x
                .par_chunks(padded)
                .map(|row| {
                    vectorized(
                        #[inline(always)]
                        || row_lse(&row[..v]),
                    )
                })
                .collect();
            let loss: Vec<f32> = lse
                .iter()
                .zip(y)
                .enumerate()
                .map(|(i, (l, &t))| l - x[i * padded + t as usize])
                .collect();
            if let Ok(mut keep) = self.lse.lock() {
                *keep = lse;
            }
            Ok((CpuStorage::F32(loss), Shape::from(y.len())))
        }

        fn bwd(
            &self,
            logits: &Tensor,
            labels: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let lse = self
                .lse
                .lock()
                .map_err(|_| candle_core::Error::Msg("fused cross entropy: lock".into()))?
                .clone();
            let op = CrossEntropyGrad {
                vocab: self.vocab,
                lse,
            };
            let g = logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &op)?;
            Ok((Some(g), None))
        }
    }

    /// `grad * (softmax - onehot)` over the real vocabulary, zero in the padding.
    struct CrossEntropyGrad {
        vocab: usize,
        lse: Vec<f32>,
    }

    impl CustomOp3 for CrossEntropyGrad {
        fn name(&self) -> &'static str {
            "fused-cross-entropy-grad"
        }

        fn cpu_fwd(
            &self,
            ls: &CpuStorage,
            ll: &Layout,
            ys: &CpuStorage,
            yl: &Layout,
            gs: &CpuStorage,
            gl: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (x, y) = slices(ls, ll, ys, yl)?;
            let g = match (gs, gl.contiguous_offsets()) {
                (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
                _ => bail!("fused cross entropy: the gradient must be contiguous f32"),
            };
            let padded = ll.dims()[1];
            if g.len() != y.len() || self.lse.len() != y.len() {
                bail!("fused cross entropy backward: rows do not match")
            }
            let v = self.vocab;
            let mut d = vec![0f32; x.len()];
            d.par_chunks_mut(padded)
                .zip(x.par_chunks(padded))
                .enumerate()
                .for_each(|(i, (dr, xr))| {
                    let (dr, xr) = (&mut dr[..v], &xr[..v]);
                    softmax_row(dr, xr, self.lse[i], g[i]);
                    // A label of another rank's block (`u32::MAX`) has no column here.
                    if let Some(d) = dr.get_mut(y[i] as usize) {
                        *d -= g[i];
                    }
                });
            Ok((CpuStorage::F32(d), ll.shape().clone()))
        }
    }

    /// [`super::token_losses`] as the fused kernel.
    pub fn token_losses(logits: &Tensor, labels: &Tensor, vocab_size: usize) -> Result<Tensor> {
        let padded = logits.dim(D::Minus1)?;
        if vocab_size > padded {
            bail!("cross entropy: vocab_size {vocab_size} exceeds logits width {padded}");
        }
        apply(logits, labels, CrossEntropy::new(vocab_size))
    }

    /// Megatron's vocabulary-parallel cross entropy on this rank's block of the vocabulary:
    /// `logits [.., local]`, of which the first `valid` columns are real (the rest padding);
    /// `labels` index into the block (`u32::MAX`: the label is another rank's column); `lse`
    /// and `loss` are each row's log-sum-exp and loss over the whole vocabulary (what
    /// [`block_row_max`] and [`block_row_sums`] gave, reduced over the ranks). The losses are
    /// `loss`; backward is `g (softmax - onehot)` on this block, zero in the padding (local, as
    /// Megatron's is), through the LM head when these are its logits.
    pub fn block_token_losses(
        logits: &Tensor,
        labels: &[u32],
        valid: usize,
        lse: Vec<f32>,
        loss: Vec<f32>,
    ) -> Result<Tensor> {
        let local = logits.dim(D::Minus1)?;
        if valid > local || lse.len() != labels.len() || loss.len() != labels.len() {
            bail!(
                "vocabulary-parallel cross entropy: {valid} real columns of {local}, {} labels, {} row statistics",
                labels.len(),
                lse.len().min(loss.len())
            );
        }
        let labels = Tensor::from_slice(labels, labels.len(), logits.device())?;
        let ce = CrossEntropy {
            vocab: valid,
            lse: Mutex::new(lse),
            given: Some(loss),
        };
        apply(logits, &labels, ce)
    }

    /// Rows of `logits [.., local]` and their first `valid` columns as `f` sees them.
    fn block_rows<R: Send>(
        logits: &Tensor,
        valid: usize,
        f: impl Fn(usize, &[f32]) -> R + Sync + Send,
    ) -> Result<Vec<R>> {
        let local = logits.dim(D::Minus1)?;
        let logits = logits.reshape(((), local))?.contiguous()?;
        crate::ops::fast_math::with_f32_slices(&[&logits], OP_BLOCK, &["logits"], |x| {
            x[0].par_chunks(local.max(1))
                .enumerate()
                .map(|(i, row)| f(i, &row[..valid.min(row.len())]))
                .collect()
        })
    }

    const OP_BLOCK: &str = "vocabulary-parallel cross entropy";

    /// Each row's largest logit among the block's first `valid` columns (-inf where none).
    pub fn block_row_max(logits: &Tensor, valid: usize) -> Result<Vec<f32>> {
        block_rows(logits, valid, |_, row| {
            vectorized(
                #[inline(always)]
                || crate::ops::fast_math::max(row),
            )
        })
    }

    /// Each row's `sum exp(x - max)` over the block's first `valid` columns, and its label's
    /// `x - max` (0 where the label, `u32::MAX`, is another rank's); `max` is the row maximum
    /// over every block.
    pub fn block_row_sums(
        logits: &Tensor,
        valid: usize,
        max: &[f32],
        labels: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = logits.elem_count() / logits.dim(D::Minus1)?.max(1);
        if max.len() != rows || labels.len() != rows {
            bail!(
                "{OP_BLOCK}: {rows} rows, {} maxima, {} labels",
                max.len(),
                labels.len()
            );
        }
        let pairs = block_rows(logits, valid, |i, row| {
            let m = max[i];
            let sum = vectorized(
                #[inline(always)]
                || crate::ops::fast_math::sum_map(row, |v| exp(v - m)),
            );
            let target = row.get(labels[i] as usize).map_or(0.0, |&x| x - m);
            (sum, target)
        })?;
        Ok(pairs.into_iter().unzip())
    }

    /// The fused cross entropy `ce` of `logits` (through the LM head when they are its last
    /// remembered logits).
    fn apply(logits: &Tensor, labels: &Tensor, ce: CrossEntropy) -> Result<Tensor> {
        let padded = logits.dim(D::Minus1)?;
        let head = take_head(logits);
        let logits = logits.reshape(((), padded))?.contiguous()?;
        let labels = labels
            .flatten_all()?
            .to_dtype(candle_core::DType::U32)?
            .contiguous()?;
        if labels.dim(0)? != logits.dim(0)? {
            bail!(
                "cross entropy: {} labels for {} logit rows",
                labels.dim(0)?,
                logits.dim(0)?
            );
        }
        if let Some((x, w, bias)) = head {
            let x = x.reshape(((), x.dim(D::Minus1)?))?;
            let mut op = LmHead {
                ce,
                labels: labels.clone(),
                precision: crate::ops::matmul::float32_matmul_precision(),
                biased: None,
            };
            return match bias {
                // The logits enter detached: their gradient goes straight to x and w.
                None => logits.detach().apply_op3(&x, &w, op),
                // Three inputs at most: x, w and the bias; the op holds the logits.
                Some(b) => {
                    op.biased = Some(logits.detach());
                    x.apply_op3(&w, &b, op)
                }
            };
        }
        logits.apply_op2(&labels, ce)
    }

    thread_local! {
        /// The last LM head's logits (by id) and their `x`, `w` (see `lm_head_logits`).
        static HEAD: std::cell::RefCell<Option<Head>> = const { std::cell::RefCell::new(None) };
    }

    /// A remembered LM head: its logits' id, `x`, `w` and the bias, if any.
    type Head = (candle_core::TensorId, Tensor, Tensor, Option<Tensor>);

    /// CPU f32 operands with the hidden size as their last dimension (a bias: one per row of
    /// `w`).
    pub(super) fn head_applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
        x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && w.dtype() == candle_core::DType::F32
            && w.rank() == 2
            && x.dim(D::Minus1).ok() == Some(w.dims()[1])
            && bias
                .is_none_or(|b| b.dtype() == candle_core::DType::F32 && b.dims() == [w.dims()[0]])
    }

    pub(super) fn remember_head(logits: &Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) {
        let head = (logits.id(), x.clone(), w.clone(), bias.cloned());
        HEAD.with(|h| *h.borrow_mut() = Some(head));
    }

    thread_local! {
        /// Backwards of the fused LM head run on this thread (so tests can tell it ran).
        pub(crate) static HEAD_BACKWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// `x`, `w` and the bias of `logits` when they are the last remembered LM head's (taken:
    /// used once).
    fn take_head(logits: &Tensor) -> Option<(Tensor, Tensor, Option<Tensor>)> {
        HEAD.with(|h| {
            let mut h = h.borrow_mut();
            match h.take() {
                Some((id, x, w, b)) if id == logits.id() => Some((x, w, b)),
                other => {
                    *h = other;
                    None
                }
            }
        })
    }

    /// Cross entropy of the detached logits `x w^T`, differentiated into `x` and `w`: backward
    /// walks the vocabulary in column blocks; each block's `g (softmax - onehot)` feeds
    /// `dx += dlogits_block w_block` and `dw_block = dlogits_block^T x` while it is in cache.
    const OP: &str = "fused LM head cross entropy";

    struct LmHead {
        ce: CrossEntropy,
        /// `[tokens]` u32 (checked against the vocabulary by the forward).
        labels: Tensor,
        precision: crate::ops::matmul::Precision,
        /// With a bias the op's inputs are `x`, `w`, `b` and it holds the (detached) logits
        /// here; without, its inputs are the logits, `x`, `w`.
        biased: Option<Tensor>,
    }

    impl CustomOp3 for LmHead {
        fn name(&self) -> &'static str {
            "fused-lm-head-cross-entropy"
        }

        fn cpu_fwd(
            &self,
            ls: &CpuStorage,
            ll: &Layout,
            _xs: &CpuStorage,
            _xl: &Layout,
            _ws: &CpuStorage,
            _wl: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (ys, yl) = self.labels.storage_and_layout();
            let candle_core::Storage::Cpu(ys) = &*ys else {
                bail!("fused LM head cross entropy: labels must be on the CPU")
            };
            match &self.biased {
                None => self.ce.cpu_fwd(ls, ll, ys, yl),
                Some(logits) => {
                    let (ls, ll) = logits.storage_and_layout();
                    let candle_core::Storage::Cpu(ls) = &*ls else {
                        bail!("fused LM head cross entropy: logits must be on the CPU")
                    };
                    self.ce.cpu_fwd(ls, ll, ys, yl)
                }
            }
        }

        fn bwd(
            &self,
            a: &Tensor,
            b: &Tensor,
            c: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            match &self.biased {
                None => {
                    let (dx, dw, _) = self.grads(a, b, c, grad, false)?;
                    Ok((None, Some(dx), Some(dw)))
                }
                Some(logits) => {
                    let (dx, dw, db) = self.grads(logits, a, b, grad, true)?;
                    Ok((Some(dx), Some(dw), db))
                }
            }
        }
    }

    impl LmHead {
        /// The gradients of `x`, `w` and (`bias`) the bias, from the logits.
        fn grads(
            &self,
            logits: &Tensor,
            x: &Tensor,
            w: &Tensor,
            grad: &Tensor,
            bias: bool,
        ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
            let lse = self
                .ce
                .lse
                .lock()
                .map_err(|_| candle_core::Error::Msg("fused LM head: lock".into()))?
                .clone();
            let (logits, x, w, grad) = (
                logits.contiguous()?,
                x.contiguous()?,
                w.contiguous()?,
                grad.contiguous()?,
            );
            let (n, h) = x.dims2()?;
            let padded = w.dim(0)?;
            let vocab = self.ce.vocab;
            if logits.dims2()? != (n, padded) || lse.len() != n {
                bail!("fused LM head cross entropy backward: shapes do not match")
            }
            let (ls, ll) = logits.storage_and_layout();
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            fn cpu(s: &candle_core::Storage) -> Result<&CpuStorage> {
                match s {
                    candle_core::Storage::Cpu(c) => Ok(c),
                    _ => bail!("fused LM head cross entropy: tensors must be on the CPU"),
                }
            }
            let lv = contiguous_f32(cpu(&ls)?, ll, OP, "logits")?;
            let xv = contiguous_f32(cpu(&xs)?, xl, OP, "x")?;
            let wv = contiguous_f32(cpu(&ws)?, wl, OP, "w")?;
            let gv = contiguous_f32(cpu(&gs)?, gl, OP, "the gradient")?;
            let labels: Vec<u32> = self.labels.to_vec1()?;
            let mut dx = vec![0f32; n * h];
            let mut dw = vec![0f32; padded * h];
            let mut db = vec![0f32; if bias { padded } else { 0 }];
            // About 16 MB of logits' gradient per block (in L3), at least 256 columns.
            let block = ((4usize << 20) / n.max(1))
                .clamp(256, 8192)
                .next_multiple_of(16);
            let mut dl = vec![0f32; n * block.min(vocab)];
            let mut v0 = 0;
            while v0 < vocab {
                let vb = block.min(vocab - v0);
                let dl = &mut dl[..n * vb];
                dl.par_chunks_mut(vb).enumerate().for_each(|(i, d)| {
                    let row = &lv[i * padded + v0..i * padded + v0 + vb];
                    softmax_row(d, row, lse[i], gv[i]);
                    let t = labels[i] as usize;
                    if (v0..v0 + vb).contains(&t) {
                        d[t - v0] -= gv[i];
                    }
                });
                let mat = |ptr: *const f32, rs: usize, cs: usize| crate::ops::bf16_gemm::Mat {
                    ptr,
                    rs: rs as isize,
                    cs: cs as isize,
                };
                // SAFETY: dl is n x vb, the w block vb x h (rows v0.., contiguous), x n x h;
                // dx holds n * h (accumulated), dw's block vb * h.
                unsafe {
                    crate::ops::matmul::gemm(
                        self.precision,
                        (n, h, vb),
                        dx.as_mut_ptr(),
                        mat(dl.as_ptr(), vb, 1),
                        mat(wv[v0 * h..].as_ptr(), h, 1),
                        true,
                        v0 > 0,
                    );
                    crate::ops::matmul::gemm(
                        self.precision,
                        (vb, h, n),
                        dw[v0 * h..].as_mut_ptr(),
                        mat(dl.as_ptr(), 1, vb),
                        mat(xv.as_ptr(), h, 1),
                        true,
                        false,
                    );
                }
                if bias {
                    // The bias's gradient: the block's column sums, rows in order.
                    let dl = &*dl;
                    db[v0..v0 + vb]
                        .par_chunks_mut(256)
                        .enumerate()
                        .for_each(|(c, out)| {
                            for row in dl.chunks_exact(vb) {
                                let row = &row[c * 256..c * 256 + out.len()];
                                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                            }
                        });
                }
                v0 += vb;
            }
            drop((ls, xs, ws, gs));
            HEAD_BACKWARDS.with(|c| c.set(c.get() + 1));
            let dev = x.device();
            let db = match bias {
                true => Some(Tensor::from_vec(db, padded, dev)?),
                false => None,
            };
            Ok((
                Tensor::from_vec(dx, (n, h), dev)?,
                Tensor::from_vec(dw, (padded, h), dev)?,
                db,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest absolute element.
    fn top(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused kernel's losses and logit gradients equal the composed ops', with padding
    /// columns (which get no gradient) and logits large enough to need the max shift.
    #[test]
    fn fused_equals_the_composed_ops() {
        let (rows, vocab, padded) = (13, 50, 64);
        let mut v = vec![0f32; rows * padded];
        crate::ops::random::fill_normal(&mut v, 4, 0, 1.0);
        let v: Vec<f32> = v.iter().map(|x| x * 20.0).collect();
        let x = Var::from_vec(v, (rows, padded), &Device::Cpu).unwrap();
        let labels = Tensor::from_vec(
            (0..rows as u32)
                .map(|i| (i * 7) % vocab as u32)
                .collect::<Vec<_>>(),
            rows,
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::arange(1f32, 1.0 + rows as f32, &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let l = if fused {
                super::fused::token_losses(x.as_tensor(), &labels, vocab).unwrap()
            } else {
                token_losses_reference(x.as_tensor(), &labels, vocab).unwrap()
            };
            let g = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (l, g.get(x.as_tensor()).unwrap().clone())
        };
        let ((l1, g1), (l0, g0)) = (run(true), run(false));
        let d = |a: &Tensor, b: &Tensor| top(&(a - b).unwrap());
        assert!(d(&l1, &l0) < 1e-4, "losses {}", d(&l1, &l0));
        let scale = top(&g0);
        assert!(
            d(&g1, &g0) < 1e-5 * scale,
            "gradients {} of {scale}",
            d(&g1, &g0)
        );
        let pad = g1.narrow(1, vocab, padded - vocab).unwrap();
        assert_eq!(
            pad.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    /// The fused LM head (logits remembered by `lm_head_logits`, gradients of x and w computed
    /// in vocabulary blocks) against the linear + cross entropy it replaces: same losses, same
    /// gradients of x and w, with a vocabulary spanning several blocks, padding rows of w
    /// without gradient, per-token weights (a loss mask) and the remembered head used once.
    #[test]
    fn fused_lm_head_equals_linear_then_cross_entropy() {
        let (b, t, h, vocab, padded) = (2, 9, 24, 600, 640);
        let mut xv = vec![0f32; b * t * h];
        crate::ops::random::fill_normal(&mut xv, 5, 0, 1.0);
        let mut wv = vec![0f32; padded * h];
        crate::ops::random::fill_normal(&mut wv, 6, 0, 0.5);
        let labels = Tensor::from_vec(
            (0..(b * t) as u32)
                .map(|i| (i * 67 + 3) % vocab as u32)
                .collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::from_vec(
            (0..b * t)
                .map(|i| {
                    if i % 4 == 3 {
                        0f32
                    } else {
                        1.0 + i as f32 * 0.1
                    }
                })
                .collect::<Vec<_>>(),
            b * t,
            &Device::Cpu,
        )
        .unwrap();
        let mut bv = vec![0f32; padded];
        crate::ops::random::fill_normal(&mut bv, 7, 0, 0.5);
        // Without a bias (GPT-2's head) and with one (BERT's masked-LM decoder).
        for with_bias in [false, true] {
            let run = |fused: bool| {
                let x = Var::from_vec(xv.clone(), (b, t, h), &Device::Cpu).unwrap();
                let w = Var::from_vec(wv.clone(), (padded, h), &Device::Cpu).unwrap();
                let bias = Var::from_vec(bv.clone(), padded, &Device::Cpu).unwrap();
                let bias = with_bias.then_some(bias.as_tensor());
                let logits =
                    lm_head_logits_with_bias(x.as_tensor(), w.as_tensor(), bias, fused).unwrap();
                let l = token_losses(&logits, &labels, vocab).unwrap();
                let total = (&l * &mask).unwrap().sum_all().unwrap();
                let g = total.backward().unwrap();
                let gx = g.get(x.as_tensor()).unwrap().clone();
                let gw = g.get(w.as_tensor()).unwrap().clone();
                let gb = bias.map(|b| g.get(b).unwrap().clone());
                (l, gx, gw, gb)
            };
            let d = |a: &Tensor, b: &Tensor| top(&(a - b).unwrap());
            let count = || fused::HEAD_BACKWARDS.with(|c| c.get());
            let before = count();
            let (l1, gx1, gw1, gb1) = run(true);
            assert_eq!(count(), before + 1, "the fused LM head did not run");
            let (l0, gx0, gw0, gb0) = run(false);
            assert_eq!(count(), before + 1, "the plain path ran the fused LM head");
            assert!(d(&l1, &l0) < 1e-5, "losses {}", d(&l1, &l0));
            for (what, g1, g0) in [("dx", &gx1, &gx0), ("dw", &gw1, &gw0)] {
                let (diff, scale) = (d(g1, g0), top(g0));
                assert!(
                    diff < 1e-5 * scale,
                    "{what} {diff} of {scale} (bias {with_bias})"
                );
            }
            assert_eq!(top(&gw1.narrow(0, vocab, padded - vocab).unwrap()), 0.0);
            if let (Some(gb1), Some(gb0)) = (&gb1, &gb0) {
                let (diff, scale) = (d(gb1, gb0), top(gb0));
                assert!(diff < 1e-5 * scale, "db {diff} of {scale}");
                assert_eq!(top(&gb1.narrow(0, vocab, padded - vocab).unwrap()), 0.0);
            }
            assert_eq!(gb1.is_some(), with_bias);
        }
        let d = |a: &Tensor, b: &Tensor| top(&(a - b).unwrap());
        // Used once: a second cross entropy of the same logits runs the plain kernel.
        let x = Var::from_vec(xv.clone(), (b, t, h), &Device::Cpu).unwrap();
        let w = Var::from_vec(wv.clone(), (padded, h), &Device::Cpu).unwrap();
        let logits = lm_head_logits(x.as_tensor(), w.as_tensor(), true).unwrap();
        let a = token_losses(&logits, &labels, vocab).unwrap();
        let again = token_losses(&logits, &labels, vocab).unwrap();
        assert!(d(&a, &again) < 1e-6);
    }

    #[test]
    fn a_label_outside_the_vocabulary_is_an_error() {
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32, 6], &Device::Cpu).unwrap();
        let e = super::fused::token_losses(&x, &y, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 6"), "{e}");
    }
}

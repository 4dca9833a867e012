//! Language-model cross entropy with vocabulary padding masked out.
use candle_core::{DType, Result, Tensor, D};

/// Mean cross entropy of `logits [.., padded_vocab]` against `labels [..]` (u32), counting only
/// positions whose `loss_mask` is non-zero (all when `None`). Columns at and beyond `vocab_size`
/// are padding and are excluded, which equals masking them to -inf.
pub fn lm_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    loss_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let per_token = token_losses(logits, labels, vocab_size)?;
    match loss_mask {
        None => per_token.mean_all(),
        Some(m) => {
            let m = m.flatten_all()?.to_dtype(DType::F32)?;
            let total = m.sum_all()?;
            per_token.mul(&m)?.sum_all()? / total.to_scalar::<f32>()?.max(1.0) as f64
        }
    }
}

/// Per-position cross entropy, flattened to `[tokens]`, in f32. On the CPU with f32 logits one
/// fused kernel (see [`fused`]); elsewhere [`token_losses_reference`].
pub fn token_losses(logits: &Tensor, labels: &Tensor, vocab_size: usize) -> Result<Tensor> {
    if fused::enabled() && logits.device().is_cpu() && logits.dtype() == DType::F32 {
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
    use crate::fast_math::exp;
    use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
    use rayon::prelude::*;
    use std::sync::Mutex;

    static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

    /// Switches the fused kernel on or off process-wide (on by default).
    pub fn set_enabled(on: bool) {
        ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn enabled() -> bool {
        ENABLED.load(std::sync::atomic::Ordering::Relaxed)
    }

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
        let m = crate::fast_math::max(x);
        m + crate::fast_math::sum_map(x, |v| exp(v - m)).ln()
    }

    #[inline(always)]
    fn row_grad(d: &mut [f32], x: &[f32], lse: f32, g: f32) {
        for (d, &v) in d.iter_mut().zip(x) {
            *d = g * exp(v - lse);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_lse_avx2(x: &[f32]) -> f32 {
        row_lse(x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_grad_avx2(d: &mut [f32], x: &[f32], lse: f32, g: f32) {
        row_grad(d, x, lse, g)
    }

    /// Losses of rows `[tokens, padded]` against labels; keeps each row's log-sum-exp.
    struct CrossEntropy {
        vocab: usize,
        lse: Mutex<Vec<f32>>,
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
            if let Some(bad) = y.iter().find(|&&l| l as usize >= v) {
                bail!("cross entropy: label {bad} is outside the vocabulary of {v}")
            }
            let fast = crate::fast_math::has_avx2_fma();
            let lse: Vec<f32> = x
                .par_chunks(padded)
                .map(|row| {
                    let row = &row[..v];
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                        return unsafe { row_lse_avx2(row) };
                    }
                    let _ = fast;
                    row_lse(row)
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
            let fast = crate::fast_math::has_avx2_fma();
            let mut d = vec![0f32; x.len()];
            d.par_chunks_mut(padded)
                .zip(x.par_chunks(padded))
                .enumerate()
                .for_each(|(i, (dr, xr))| {
                    let (dr, xr) = (&mut dr[..v], &xr[..v]);
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: as in the forward.
                        unsafe { row_grad_avx2(dr, xr, self.lse[i], g[i]) };
                        dr[y[i] as usize] -= g[i];
                        return;
                    }
                    let _ = fast;
                    row_grad(dr, xr, self.lse[i], g[i]);
                    dr[y[i] as usize] -= g[i];
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
        logits.apply_op2(
            &labels,
            CrossEntropy {
                vocab: vocab_size,
                lse: Mutex::new(Vec::new()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused kernel's losses and logit gradients equal the composed ops', with padding
    /// columns (which get no gradient) and logits large enough to need the max shift.
    #[test]
    fn fused_equals_the_composed_ops() {
        let (rows, vocab, padded) = (13, 50, 64);
        let mut v = vec![0f32; rows * padded];
        crate::random::fill_normal(&mut v, 4, 0, 1.0);
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
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(d(&l1, &l0) < 1e-4, "losses {}", d(&l1, &l0));
        let scale = g0
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
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

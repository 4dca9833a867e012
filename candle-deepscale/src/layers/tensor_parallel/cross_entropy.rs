//! Cross entropy over vocabulary-parallel logits (Megatron `mpu/cross_entropy.py`): all-reduce MAX
//! of the local max, all-reduce SUM of the target logit and of sum(exp); the backward is local
//! (softmax - onehot), through the reduce mapping's identity backward.
use super::mappings::reduce_from_tp;
use super::TensorParallel;
use crate::comm::ReduceOp;
use candle_core::{DType, Result, Tensor, D};

/// Per-token losses `[tokens]` of local logits `[.., V/tp]` (this rank's vocabulary block) against
/// global `labels`. Columns at or beyond `vocab_size` are padding, masked to -inf.
pub fn vocab_parallel_token_losses(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    tp: Option<&TensorParallel>,
) -> Result<Tensor> {
    let Some(tp) = tp.filter(|t| t.size() > 1) else {
        return crate::ops::cross_entropy::token_losses(logits, labels, vocab_size);
    };
    if crate::ops::half_on_cpu(&[logits]).is_some() {
        // As at tp 1: half-precision logits on the CPU enter the fused kernel widened.
        let wide = logits.to_dtype(DType::F32)?;
        return vocab_parallel_token_losses(&wide, labels, vocab_size, Some(tp));
    }
    if crate::ops::fused() && logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return fused_token_losses(logits, labels, vocab_size, tp);
    }
    composed_token_losses(logits, labels, vocab_size, tp)
}

/// [`vocab_parallel_token_losses`] as candle ops (Megatron's code step by step): the path on
/// other devices and dtypes, and the reference the fused one is tested against.
fn composed_token_losses(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    tp: &TensorParallel,
) -> Result<Tensor> {
    let local = logits.dim(D::Minus1)?;
    let start = tp.rank * local;
    let logits = logits.reshape(((), local))?.to_dtype(DType::F32)?;
    let dev = logits.device().clone();
    let logits = if start + local > vocab_size {
        let bias: Vec<f32> = (start..start + local)
            .map(|c| {
                if c >= vocab_size {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        logits.broadcast_add(&Tensor::from_vec(bias, local, &dev)?)?
    } else {
        logits
    };
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let max = tp.comm.all_reduce_tensor(&tp.group, &max, ReduceOp::Max)?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum_exp = reduce_from_tp(&shifted.exp()?.sum_keepdim(D::Minus1)?, Some(tp))?;
    let n = labels.elem_count();
    let (idx, mask) =
        super::layers::local_rows(&labels.flatten_all()?, start as u32, local as u32)?;
    let (idx, mask) = (idx.reshape((n, 1))?, mask.reshape((n, 1))?);
    // Select, not multiply: a shard of pure padding holds -inf, and -inf * 0 is NaN.
    let picked = shifted.gather(&idx, 1)?;
    let target = mask.where_cond(&picked, &picked.zeros_like()?)?;
    let target = reduce_from_tp(&target, Some(tp))?;
    sum_exp.log()?.sub(&target)?.squeeze(1)
}

/// [`vocab_parallel_token_losses`] through the fused CPU kernel: this rank's block is read
/// twice (its rows' maxima, then their sums of exp and the labels' logits), each row's
/// statistics all-reduced over the group, and backward writes `softmax - onehot` once — where
/// the composed ops above keep several `[tokens x vocab / tp]` intermediates and their
/// gradients (the largest tensors of a step), or, for the LM head's own logits, computes the
/// head's gradients a block of columns at a time without them (see `ops::cross_entropy`).
fn fused_token_losses(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    tp: &TensorParallel,
) -> Result<Tensor> {
    use crate::ops::cross_entropy::fused::{block_row_max, block_row_sums, block_token_losses};
    let local = logits.dim(D::Minus1)?;
    let start = tp.rank * local;
    let valid = vocab_size.saturating_sub(start).min(local);
    let labels: Vec<u32> = labels.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let rows = logits.elem_count() / local.max(1);
    if labels.len() != rows {
        candle_core::bail!(
            "cross entropy: {} labels for {rows} logit rows",
            labels.len()
        )
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= vocab_size) {
        candle_core::bail!("cross entropy: label {bad} is outside the vocabulary of {vocab_size}")
    }
    let mut max = block_row_max(logits, valid)?;
    tp.all_reduce(&mut max, ReduceOp::Max)?;
    // Labels as columns of this block (`u32::MAX`: another rank's).
    let mine: Vec<u32> = labels
        .iter()
        .map(|&l| match (l as usize).checked_sub(start) {
            Some(c) if c < valid => c as u32,
            _ => u32::MAX,
        })
        .collect();
    let (sums, targets) = block_row_sums(logits, valid, &max, &mine)?;
    // One all-reduce for both: [sums.., targets..] (the label's logit is on one rank, 0 elsewhere).
    let mut both = [sums, targets].concat();
    tp.all_reduce(&mut both, ReduceOp::Sum)?;
    let (sums, targets) = both.split_at(rows);
    let lse: Vec<f32> = max.iter().zip(sums).map(|(m, s)| m + s.ln()).collect();
    let loss: Vec<f32> = sums.iter().zip(targets).map(|(s, t)| s.ln() - t).collect();
    block_token_losses(logits, &mine, valid, lse, loss)
}

/// Mean of [`vocab_parallel_token_losses`].
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    tp: Option<&TensorParallel>,
) -> Result<Tensor> {
    vocab_parallel_token_losses(logits, labels, vocab_size, tp)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Communicator, InProcessWorld};
    use candle_core::{Device, Var};
    use std::sync::Arc;
    use std::time::Duration;

    /// Runs `f(tp group)` on `n` in-process ranks; their results in rank order.
    fn on_ranks<R: Send + 'static>(
        n: usize,
        f: impl Fn(TensorParallel) -> Result<R> + Send + Sync + 'static,
    ) -> Vec<R> {
        InProcessWorld::run(n, Duration::from_secs(30), move |comm| {
            let comm: Arc<dyn Communicator> = comm;
            f(TensorParallel::new(comm, (0..n).collect())?)
        })
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Random logits `[rows, padded]` (the whole vocabulary, padding included) and labels.
    fn inputs(rows: usize, padded: usize, vocab: usize) -> (Vec<f32>, Vec<u32>) {
        let logits = (0..rows * padded)
            .map(|i| ((i * 7919 % 1013) as f32 / 101.0).sin() * 4.0)
            .collect();
        // The first and last real columns among them (the last is in a partly padded block).
        let labels = (0..rows)
            .map(|r| match r % 3 {
                0 => 0,
                1 => vocab as u32 - 1,
                _ => (r * 31 % vocab) as u32,
            })
            .collect();
        (logits, labels)
    }

    /// The fused kernel equals Megatron's composed ops — losses and the logits' gradients — at
    /// tp 3 (the last block partly padding) and tp 4 (the last block all padding).
    #[test]
    fn fused_equals_the_composed_ops() {
        for (tp, padded, vocab) in [(3usize, 24usize, 21usize), (4, 32, 23)] {
            let rows = 7;
            let (all, labels) = inputs(rows, padded, vocab);
            let results = on_ranks(tp, move |g| {
                let local = padded / tp;
                let block: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        all[r * padded + g.rank * local..r * padded + (g.rank + 1) * local].to_vec()
                    })
                    .collect();
                let y = Tensor::from_slice(&labels, rows, &Device::Cpu)?;
                let weights = Tensor::arange(1f32, rows as f32 + 1.0, &Device::Cpu)?;
                let mut out = Vec::new();
                for fused in [true, false] {
                    let x = Var::from_vec(block.clone(), (rows, local), &Device::Cpu)?;
                    let loss = match fused {
                        true => fused_token_losses(x.as_tensor(), &y, vocab, &g)?,
                        false => composed_token_losses(x.as_tensor(), &y, vocab, &g)?,
                    };
                    let grads = loss.mul(&weights)?.sum_all()?.backward()?;
                    let dx = grads.get(x.as_tensor()).cloned();
                    let dx = dx.ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
                    out.push((loss, dx));
                }
                Ok(out)
            });
            for (rank, r) in results.iter().enumerate() {
                let (fused, composed) = (&r[0], &r[1]);
                assert!(
                    max_diff(&fused.0, &composed.0) < 1e-5,
                    "tp {tp} rank {rank} losses"
                );
                assert!(
                    max_diff(&fused.1, &composed.1) < 1e-6,
                    "tp {tp} rank {rank} grads"
                );
                // The same losses on every rank.
                assert_eq!(max_diff(&fused.0, &results[0][0].0), 0.0);
            }
            // The padding columns of the last block get no gradient.
            let last = &results[tp - 1][0].1;
            let pad_from = vocab.saturating_sub((tp - 1) * (padded / tp));
            let pad = last.narrow(1, pad_from, padded / tp - pad_from).unwrap();
            assert_eq!(max_diff(&pad, &pad.zeros_like().unwrap()), 0.0);
        }
    }

    /// With the LM head's logits (a training forward's `lm_head_logits`) the fused cross
    /// entropy differentiates into the head's input and this rank's block of the weight
    /// directly, equal to the linear and the composed ops.
    #[test]
    fn the_lm_head_block_differentiates_into_its_input_and_weight() {
        let (tp, padded, vocab, rows, hidden) = (2usize, 16usize, 13usize, 5usize, 8usize);
        let (x_all, labels) = inputs(rows, hidden, hidden);
        let (w_all, _) = inputs(padded, hidden, hidden);
        let labels: Vec<u32> = labels.iter().map(|&l| (l * 5 + 1) % vocab as u32).collect();
        let results = on_ranks(tp, move |g| {
            let local = padded / tp;
            let y = Tensor::from_slice(&labels, rows, &Device::Cpu)?;
            let w_block = w_all[g.rank * local * hidden..(g.rank + 1) * local * hidden].to_vec();
            let mut out = Vec::new();
            for fused in [true, false] {
                let x = Var::from_vec(x_all.clone(), (rows, hidden), &Device::Cpu)?;
                let w = Var::from_vec(w_block.clone(), (local, hidden), &Device::Cpu)?;
                let before = crate::ops::cross_entropy::fused::HEAD_BACKWARDS.with(|c| c.get());
                let loss = match fused {
                    true => {
                        let logits = crate::ops::cross_entropy::lm_head_logits(
                            x.as_tensor(),
                            w.as_tensor(),
                            true,
                        )?;
                        fused_token_losses(&logits, &y, vocab, &g)?
                    }
                    false => {
                        let logits = x.as_tensor().matmul(&w.as_tensor().t()?)?;
                        composed_token_losses(&logits, &y, vocab, &g)?
                    }
                };
                let grads = loss.sum_all()?.backward()?;
                let ran = crate::ops::cross_entropy::fused::HEAD_BACKWARDS.with(|c| c.get());
                let get = |v: &Var| {
                    let g = grads.get(v.as_tensor()).cloned();
                    g.ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
                };
                out.push((loss, get(&x)?, get(&w)?, ran - before));
            }
            Ok(out)
        });
        for (rank, r) in results.iter().enumerate() {
            let (fused, composed) = (&r[0], &r[1]);
            assert_eq!(fused.3, 1, "rank {rank}: the fused LM head's backward ran");
            assert!(max_diff(&fused.0, &composed.0) < 1e-5, "rank {rank} losses");
            assert!(max_diff(&fused.1, &composed.1) < 1e-5, "rank {rank} dx");
            assert!(max_diff(&fused.2, &composed.2) < 1e-5, "rank {rank} dw");
        }
    }

    /// bf16 logits (a bf16 model on the CPU) enter the fused kernel widened to f32, as at tp 1:
    /// the composed ops' losses and a bf16 gradient.
    #[test]
    fn half_precision_logits_give_the_composed_losses_and_a_half_gradient() {
        let (tp, padded, vocab, rows) = (2usize, 16usize, 11usize, 6usize);
        let (all, labels) = inputs(rows, padded, vocab);
        let results = on_ranks(tp, move |g| {
            let local = padded / tp;
            let block: Vec<f32> = (0..rows)
                .flat_map(|r| all[r * padded + g.rank * local..][..local].to_vec())
                .collect();
            let y = Tensor::from_slice(&labels, rows, &Device::Cpu)?;
            let x = Var::from_tensor(
                &Tensor::from_vec(block, (rows, local), &Device::Cpu)?.to_dtype(DType::BF16)?,
            )?;
            let fused = vocab_parallel_token_losses(x.as_tensor(), &y, vocab, Some(&g))?;
            let composed = composed_token_losses(x.as_tensor(), &y, vocab, &g)?;
            let grads = fused.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).map(|t| t.dtype());
            Ok((fused, composed, dx))
        });
        for (rank, (fused, composed, dx)) in results.iter().enumerate() {
            assert!(max_diff(fused, composed) < 1e-5, "rank {rank}");
            assert_eq!(*dx, Some(DType::BF16), "rank {rank}");
        }
    }

    #[test]
    fn a_label_outside_the_vocabulary_is_an_error() {
        let errs = on_ranks(2, |g| {
            let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
            let y = Tensor::new(&[1u32, 7], &Device::Cpu)?;
            Ok(fused_token_losses(&x, &y, 6, &g).unwrap_err().to_string())
        });
        for e in errs {
            assert!(e.contains("label 7 is outside the vocabulary of 6"), "{e}");
        }
    }
}

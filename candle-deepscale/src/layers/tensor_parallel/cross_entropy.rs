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

/// Mean of [`vocab_parallel_token_losses`].
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    vocab_size: usize,
    tp: Option<&TensorParallel>,
) -> Result<Tensor> {
    vocab_parallel_token_losses(logits, labels, vocab_size, tp)?.mean_all()
}

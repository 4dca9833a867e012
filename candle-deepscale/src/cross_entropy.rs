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

/// Per-position cross entropy, flattened to `[tokens]`, in f32.
pub fn token_losses(logits: &Tensor, labels: &Tensor, vocab_size: usize) -> Result<Tensor> {
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

//! Language-model losses for model authors: cross entropy over the padded vocabulary (padding
//! excluded) and the LM head whose logits the fused cross entropy differentiates itself.
pub use crate::ops::cross_entropy::{
    lm_head_logits, lm_head_logits_with_bias, token_losses, token_losses_reference,
};
use candle_core::{DType, Result, Tensor};

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

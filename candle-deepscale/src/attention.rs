//! Scaled dot-product self-attention over Megatron's fused QKV projection, written with
//! differentiable ops (candle's `sdpa` has no CPU version and its softmax no backward).
use crate::module::ForwardCtx;
use crate::nn;
use candle_core::{DType, Device, Result, Tensor};

/// What masks the scores.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// Query i (absolute position offset + i) sees keys at or before it (GPT).
    Causal,
    /// An additive bias broadcastable to `[b, heads, t, keys]` (BERT's padding mask).
    Bias(&'a Tensor),
}

/// Dropout of the attention probabilities: rate and stream key.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDropout {
    pub p: f64,
    pub key: u64,
}

/// Additive causal mask `[t, total]` for queries at positions `offset..offset + t`.
pub fn causal_mask(
    t: usize,
    total: usize,
    offset: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (t, total), dev)?.to_dtype(dtype)
}

/// Attention of `qkv [b, t, heads * 3 * head_dim]` (rows per head as `[3, head_dim]`), continuing the
/// `past` keys/values when given. Returns the context `[b, t, heads * head_dim]` and this call's full
/// keys/values (for a KV cache).
pub fn self_attention(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    past: Option<&(Tensor, Tensor)>,
    mask: Mask,
    dropout: AttentionDropout,
    ctx: &ForwardCtx,
) -> Result<(Tensor, (Tensor, Tensor))> {
    let (b, t, _) = qkv.dims3()?;
    let qkv = qkv.reshape((b, t, heads, 3, head_dim))?;
    let part = |i: usize| -> Result<Tensor> {
        qkv.narrow(3, i, 1)?
            .squeeze(3)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let (k, v) = match past {
        Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        None => (k, v),
    };
    let raw = crate::matmul::matmul(&q, &k.t()?)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let fused = match mask {
        Mask::Causal => crate::fused_softmax::scaled_upper_triang_masked_softmax(&raw, scale)?,
        Mask::Bias(_) => None,
    };
    let probs = match fused {
        Some(p) => p,
        None => nn::softmax_last_dim(&masked(&(raw * scale)?, t, mask)?)?,
    };
    let probs = nn::dropout(&probs, dropout.p, ctx, dropout.key)?;
    let y = crate::matmul::matmul(&probs, &v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * head_dim))?;
    Ok((y, (k, v)))
}

/// Causal attention without a KV cache (training, evaluation): the fused CPU kernel
/// ([`crate::fused_attention`]) where it applies, else [`self_attention`]'s composed ops.
pub fn causal_self_attention(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    dropout: AttentionDropout,
    ctx: &ForwardCtx,
) -> Result<Tensor> {
    let p = ctx.train.then_some((dropout.p, dropout.key));
    if let Some(y) = crate::fused_attention::causal_attention(qkv, heads, head_dim, p)? {
        return Ok(y);
    }
    Ok(self_attention(qkv, heads, head_dim, None, Mask::Causal, dropout, ctx)?.0)
}

/// Scaled scores with the mask added (the composed path).
fn masked(scores: &Tensor, t: usize, mask: Mask) -> Result<Tensor> {
    Ok(match mask {
        Mask::Causal => {
            let total = scores.dim(candle_core::D::Minus1)?;
            scores.broadcast_add(&causal_mask(
                t,
                total,
                total - t,
                scores.device(),
                scores.dtype(),
            )?)?
        }
        Mask::Bias(bias) => scores.broadcast_add(bias)?,
    })
}

//! Scaled dot-product self-attention over Megatron's fused QKV projection, written with
//! differentiable ops (candle's `sdpa` has no CPU version and its softmax no backward).
use crate::layers::dropout;
use crate::layers::module::ForwardCtx;
pub use crate::ops::softmax::causal_mask;
use crate::ops::softmax::softmax_last_dim;
use candle_core::{Result, Tensor};

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
    let raw = crate::ops::matmul::matmul(&q, &k.t()?)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let fused = match mask {
        Mask::Causal => crate::ops::softmax::scaled_upper_triang_masked_softmax(&raw, scale)?,
        Mask::Bias(_) => None,
    };
    let probs = match fused {
        Some(p) => p,
        None => softmax_last_dim(&masked(&(raw * scale)?, t, mask)?)?,
    };
    let probs = dropout::dropout(&probs, dropout.p, ctx, dropout.key)?;
    let y = crate::ops::matmul::matmul(&probs, &v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * head_dim))?;
    Ok((y, (k, v)))
}

/// Causal attention without a KV cache (training, evaluation): the fused CPU kernel
/// ([`crate::ops::attention`]) where it applies, else [`self_attention`]'s composed ops.
pub fn causal_self_attention(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    dropout: AttentionDropout,
    ctx: &ForwardCtx,
) -> Result<Tensor> {
    let p = ctx.train.then_some((dropout.p, dropout.key));
    if let Some(y) = crate::ops::attention::causal_attention(qkv, heads, head_dim, p)? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{causal_attention_in_tiles, Tile, TILE};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff")
    }

    /// Output and gradient equal the composed attention (`self_attention` with the fused kernels
    /// off), with and without dropout, odd sizes included: in one tile, in several row blocks
    /// of whole rows, and in tiles of several keys (the online softmax; shorter last blocks
    /// and tiles included).
    #[test]
    fn equals_the_composed_attention_forward_and_backward() -> Result<()> {
        let tile = |rows, keys| Tile { rows, keys };
        for (b, t, heads, d, p, tile) in [
            (2, 7, 3, 4, 0.0, TILE),
            (1, 33, 2, 8, 0.0, TILE),
            (2, 16, 2, 4, 0.3, TILE),
            (1, 33, 2, 8, 0.0, tile(8, 33)),
            (2, 16, 2, 4, 0.3, tile(5, 16)),
            (1, 33, 2, 8, 0.0, tile(8, 8)),
            (1, 33, 2, 8, 0.0, tile(4, 12)),
            (2, 16, 2, 4, 0.3, tile(5, 10)),
            (1, 200, 2, 8, 0.1, TILE),
            (1, 900, 1, 8, 0.1, TILE),
        ] {
            let qkv = Var::randn(0f32, 1., (b, t, heads * 3 * d), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1., (b, t, heads * d), &Device::Cpu)?;
            let ctx = ForwardCtx::train(5, 1, 0);
            let key = ctx.site_key("attention");
            let fused =
                causal_attention_in_tiles(&qkv, heads, d, Some((p, key)), tile)?.expect("applies");
            // The composed reference (its softmax kernel and products are tested on their own).
            let composed = self_attention(
                &qkv,
                heads,
                d,
                None,
                Mask::Causal,
                AttentionDropout { p, key },
                &ctx,
            )?
            .0;
            assert!(
                max_diff(&fused, &composed) < 1e-5,
                "forward b{b} t{t} p{p} {tile:?}"
            );
            let g1 = (fused * &w)?.sum_all()?.backward()?;
            let g2 = (composed * &w)?.sum_all()?.backward()?;
            let (g1, g2) = (g1.get(&qkv).expect("grad"), g2.get(&qkv).expect("grad"));
            assert!(max_diff(g1, g2) < 1e-4, "backward b{b} t{t} p{p} {tile:?}");
        }
        Ok(())
    }
}

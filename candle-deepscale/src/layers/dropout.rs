//! Dropout with reproducible masks: drawn from the counter-based stream of a key, so every
//! layout (and a recomputing backward) draws the same mask as the 1-rank run.
use crate::layers::module::ForwardCtx;
use crate::ops::random;
use candle_core::{Result, Tensor};

/// Dropout with a reproducible mask drawn from the counter-based stream `key`.
pub fn dropout(x: &Tensor, p: f64, ctx: &ForwardCtx, key: u64) -> Result<Tensor> {
    if !ctx.train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let mut mask = vec![0f32; x.elem_count()];
    random::fill_dropout_mask(&mut mask, key, p);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

//! Token (and position) embedding tables, looked up with the fused kernel's backward.
use crate::layers::parameter::{Init, Param, ParamBuilder, ParamOpts};
use candle_core::{Result, Tensor};

/// Token embedding table `[rows, dim]`.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Param,
}

impl Embedding {
    pub fn new(
        pb: &ParamBuilder,
        rows: usize,
        dim: usize,
        std: f64,
        opts: ParamOpts,
    ) -> Result<Self> {
        Ok(Self {
            weight: pb.get(&[rows, dim], "weight", Init::Normal { std }, opts)?,
        })
    }

    /// Looks up ids of any shape; returns `[..ids.shape, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        embedding(self.weight.tensor(), ids)
    }
}

/// Rows `ids` (any shape, u32) of `table [rows, dim]`: `[..ids.shape, dim]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    crate::ops::embedding::embedding(table, &ids.flatten_all()?)?.reshape(shape)
}

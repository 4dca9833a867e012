//! Layer normalisation with a real backward (candle-nn's `LayerNorm::forward` records none on
//! contiguous inputs in 0.11, so parameters upstream of it would silently get no gradient).
use crate::layers::parameter::{Init, Param, ParamBuilder, ParamOpts};
use candle_core::{Result, Tensor};

pub use crate::ops::layer_norm::{layer_norm, layer_norm_reference};

/// Layer normalisation over the last dimension; weight and bias are in the no-decay group.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        let opts = ParamOpts {
            no_weight_decay: true,
            ..Default::default()
        };
        Ok(Self {
            weight: pb.get(&[dim], "weight", Init::Ones, opts.clone())?,
            bias: pb.get(&[dim], "bias", Init::Zeros, opts)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.tensor(), self.bias.tensor(), self.eps)
    }

    pub fn parameters(&self) -> Vec<&Param> {
        vec![&self.weight, &self.bias]
    }
}

//! Linear layers in PyTorch/Megatron's layout (weight `[out, in]`), through the matmul op that
//! writes outputs once and computes the weight's gradient in the weight's order.
use crate::layers::parameter::{Init, Param, ParamBuilder, ParamOpts, Partition};
use candle_core::{Result, Tensor};

/// `y = x W^T + b`, weight `[out, in]` (PyTorch/Megatron layout).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
}

impl Linear {
    pub fn new(
        pb: &ParamBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init_std: f64,
    ) -> Result<Self> {
        let (weight, bias) = linear_params(pb, in_dim, out_dim, bias, init_std, None, None)?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(
            x,
            self.weight.tensor(),
            self.bias.as_ref().map(|b| b.tensor()),
        )
    }

    pub fn parameters(&self) -> Vec<&Param> {
        std::iter::once(&self.weight)
            .chain(self.bias.as_ref())
            .collect()
    }
}

/// A linear layer's weight `[out, in]` (normal init) and optional zero bias `[out]` (no weight
/// decay), each with its tensor-parallel partition.
pub fn linear_params(
    pb: &ParamBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    init_std: f64,
    weight_partition: Option<Partition>,
    bias_partition: Option<Partition>,
) -> Result<(Param, Option<Param>)> {
    let weight = pb.get(
        &[out_dim, in_dim],
        "weight",
        Init::Normal { std: init_std },
        ParamOpts {
            partition: weight_partition,
            ..Default::default()
        },
    )?;
    let opts = ParamOpts {
        partition: bias_partition,
        no_weight_decay: true,
        ..Default::default()
    };
    let bias = if bias {
        Some(pb.get(&[out_dim], "bias", Init::Zeros, opts)?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// `x W^T + b` for `x` of any rank >= 2, as one 2-D GEMM.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    let x = x.reshape((rows, in_dim))?;
    let y = crate::ops::matmul::linear(&x, w, b)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// `x + bias` over the last dimension with a row-sum backward (position embeddings, the bias of a
/// row-parallel linear after its reduction).
pub use crate::ops::matmul::add_bias;

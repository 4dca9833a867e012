//! Building blocks with real backward passes.
//!
//! candle's fused `LayerNorm::forward` and `softmax_last_dim` record no backward, so parameters
//! upstream of them silently get no gradient; these are written with differentiable ops.
use crate::module::ForwardCtx;
use crate::parameter::{Init, Param, ParamBuilder, ParamOpts, Partition};
use crate::random;
use candle_core::{DType, Result, Tensor, D};

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
    let y = crate::matmul::linear(&x, w, b)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// Layer normalisation over the last dimension.
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

/// Differentiable layer norm (computed in f32 for half inputs).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = crate::fused_layer_norm::fused_layer_norm(x, w, b, eps)? {
        return Ok(y);
    }
    layer_norm_reference(x, w, b, eps)
}

/// [`layer_norm`] composed of candle ops (half precision, other devices; the fused kernel's
/// reference in tests).
pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = if dtype == DType::F32 || dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// Differentiable softmax over the last dimension (max subtracted without a gradient path).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

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

pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    crate::fused_embedding::embedding(table, &ids.flatten_all()?)?.reshape(shape)
}

//! Tensor-parallel layers (Megatron `mpu/layers.py`). With no tensor-parallel group (or a group of
//! one) they are plain layers and cost nothing extra.
use super::mappings::{copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp};
use super::TensorParallel;
use crate::layers::embedding::embedding;
use crate::layers::linear::{linear, linear_params};
use crate::layers::parameter::{Init, Param, ParamBuilder, ParamOpts, Partition};
use candle_core::{DType, Result, Tensor};

/// `Y = X A + b` with `A` split by output columns: weight `[out/tp, in]`, bias `[out/tp]`.
#[derive(Clone, Debug)]
pub struct ColumnParallelLinear {
    pub weight: Param,
    pub bias: Option<Param>,
    gather_output: bool,
    tp: Option<TensorParallel>,
}

impl ColumnParallelLinear {
    pub fn new(
        pb: &ParamBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init_std: f64,
        gather_output: bool,
    ) -> Result<Self> {
        let split = Some(Partition::Split { dim: 0, stride: 1 });
        let (weight, bias) = linear_params(pb, in_dim, out_dim, bias, init_std, split, split)?;
        Ok(Self {
            weight,
            bias,
            gather_output,
            tp: pb.tp().cloned(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = copy_to_tp(x, self.tp.as_ref())?;
        let y = linear(
            &x,
            self.weight.tensor(),
            self.bias.as_ref().map(|b| b.tensor()),
        )?;
        if self.gather_output {
            gather_from_tp(&y, self.tp.as_ref())
        } else {
            Ok(y)
        }
    }

    /// `gelu(X A + b)` with the bias added inside the fused GeLU kernel (Megatron's
    /// `skip_bias_add` + `bias_gelu`); the MLP's first projection.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let x = copy_to_tp(x, self.tp.as_ref())?;
        let y = linear(&x, self.weight.tensor(), None)?;
        let y = crate::ops::bias_gelu::bias_gelu(&y, self.bias.as_ref().map(|b| b.tensor()))?;
        if self.gather_output {
            gather_from_tp(&y, self.tp.as_ref())
        } else {
            Ok(y)
        }
    }

    pub fn parameters(&self) -> Vec<&Param> {
        std::iter::once(&self.weight)
            .chain(self.bias.as_ref())
            .collect()
    }
}

/// `Y = X A + b` with `A` split by input rows: weight `[out, in/tp]`, bias replicated.
#[derive(Clone, Debug)]
pub struct RowParallelLinear {
    pub weight: Param,
    pub bias: Option<Param>,
    input_is_parallel: bool,
    tp: Option<TensorParallel>,
}

impl RowParallelLinear {
    pub fn new(
        pb: &ParamBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init_std: f64,
        input_is_parallel: bool,
    ) -> Result<Self> {
        // Split by input columns; the bias is added after the reduction, so it is replicated.
        let split = Some(Partition::Split { dim: 1, stride: 1 });
        let (weight, bias) = linear_params(pb, in_dim, out_dim, bias, init_std, split, None)?;
        Ok(Self {
            weight,
            bias,
            input_is_parallel,
            tp: pb.tp().cloned(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.input_is_parallel {
            x.clone()
        } else {
            scatter_to_tp(x, self.tp.as_ref())?
        };
        let bias = self.bias.as_ref().map(|b| b.tensor());
        if self.tp.as_ref().is_none_or(|t| t.size() == 1) {
            // Nothing to reduce: the bias is the GEMM's starting value.
            return linear(&x, self.weight.tensor(), bias);
        }
        let y = reduce_from_tp(&linear(&x, self.weight.tensor(), None)?, self.tp.as_ref())?;
        match bias {
            Some(b) => crate::ops::matmul::add_bias(&y, b),
            None => Ok(y),
        }
    }

    pub fn parameters(&self) -> Vec<&Param> {
        std::iter::once(&self.weight)
            .chain(self.bias.as_ref())
            .collect()
    }
}

/// Embedding split by vocabulary rows: rank r holds rows `[r V/tp, (r+1) V/tp)`; ids outside are
/// looked up as zero rows and the partial results are all-reduced.
#[derive(Clone, Debug)]
pub struct VocabParallelEmbedding {
    pub weight: Param,
    tp: Option<TensorParallel>,
}

impl VocabParallelEmbedding {
    pub fn new(
        pb: &ParamBuilder,
        rows: usize,
        dim: usize,
        std: f64,
        opts: ParamOpts,
    ) -> Result<Self> {
        let opts = ParamOpts {
            partition: Some(Partition::Split { dim: 0, stride: 1 }),
            ..opts
        };
        Ok(Self {
            weight: pb.get(&[rows, dim], "weight", Init::Normal { std }, opts)?,
            tp: pb.tp().cloned(),
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.weight.tensor();
        let Some(tp) = self.tp.as_ref().filter(|t| t.size() > 1) else {
            return embedding(table, ids);
        };
        let local = table.dim(0)?;
        // An id past every rank's rows would be a zero row on all of them: refuse it as the
        // unsplit table does (one reduction; ids are small next to the activations).
        let rows = local * tp.size();
        let top = if ids.elem_count() == 0 {
            0
        } else {
            ids.to_dtype(DType::U32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<u32>()?
        };
        if top as usize >= rows {
            candle_core::bail!(
                "embedding: id {top} is outside the table of {rows} rows (split over {} ranks)",
                tp.size()
            )
        }
        let start = (tp.rank * local) as u32;
        // Ids of this rank's rows, shifted to local rows (row 0, masked out, elsewhere); tensor
        // ops so the ids stay on their device.
        let (local_ids, inside) = local_rows(ids, start, local as u32)?;
        let mask = inside
            .to_dtype(table.dtype())?
            .unsqueeze(candle_core::D::Minus1)?;
        let e = embedding(table, &local_ids)?.broadcast_mul(&mask)?;
        reduce_from_tp(&e, Some(tp))
    }

    /// This rank's first vocabulary row.
    pub fn vocab_start(&self) -> usize {
        let (_, rank) = super::size_rank(self.tp.as_ref());
        rank * self.weight.tensor().dims()[0]
    }
}

/// For vocabulary rows `start..start + len` held by this rank: the ids as local rows (0 where
/// outside) and a u8 mask of the ids inside.
pub(crate) fn local_rows(ids: &Tensor, start: u32, len: u32) -> Result<(Tensor, Tensor)> {
    let ids = ids.to_dtype(DType::U32)?;
    let inside = ids.ge(start)?.mul(&ids.lt(start + len)?)?;
    let floor = Tensor::new(start, ids.device())?.broadcast_as(ids.shape())?;
    let local = inside
        .where_cond(&ids, &floor)?
        .broadcast_sub(&Tensor::new(start, ids.device())?)?;
    Ok((local, inside))
}

//! Embedding lookup as a CPU op with its own backward. candle's `index_select` backward builds
//! the table's gradient as a zero tensor and then `index_add`s into a copy of it: two passes over
//! the `[vocab x hidden]` table (154 MB at GPT-2 124M) for a gradient with a few thousand
//! non-zero rows. Here backward zeroes one buffer and adds the rows in. Other devices and dtypes
//! take candle's ops.
use crate::ops::fast_math::with_f32_slices;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows `ids [n]` (u32) of `table [rows, dim]`: `[n, dim]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let fused = super::fused()
        && table.device().is_cpu()
        && table.dtype() == DType::F32
        && table.rank() == 2
        && ids.dtype() == DType::U32
        && ids.rank() == 1;
    if !fused {
        return table.embedding(ids);
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)
}

struct Embedding;

fn ids_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("embedding: ids must be contiguous u32"),
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let table = crate::ops::fast_math::contiguous_f32(ts, tl, "embedding", "the table")?;
        let ids = ids_of(is, il)?;
        let (rows, dim) = (tl.dims()[0], tl.dims()[1]);
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
            bail!("embedding: id {id} at position {i} is outside the table of {rows} rows")
        }
        let mut out = vec![0f32; ids.len() * dim];
        out.par_chunks_mut(dim.max(1))
            .zip(ids.par_iter())
            .for_each(|(o, &id)| o.copy_from_slice(&table[id as usize * dim..][..dim]));
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), dim))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, dim) = table.dims2()?;
        let ids: Vec<u32> = ids.to_vec1()?;
        let grad = grad.contiguous()?;
        if grad.dims() != [ids.len(), dim] {
            bail!(
                "embedding backward: gradient {:?} for {} ids of width {dim}",
                grad.dims(),
                ids.len()
            )
        }
        let mut d = vec![0f32; rows * dim];
        with_f32_slices(&[&grad], "embedding backward", &["the gradient"], |g| {
            // In id order, one thread: repeated ids add in the same order every run.
            for (&id, gr) in ids.iter().zip(g[0].chunks_exact(dim.max(1))) {
                let row = &mut d[id as usize * dim..][..dim];
                row.iter_mut().zip(gr).for_each(|(a, b)| *a += b);
            }
        })?;
        Ok((
            Some(Tensor::from_vec(d, (rows, dim), table.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candles_embedding_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let table = Var::randn(0f32, 1.0, (11, 6), &dev)?;
        // Repeated ids: their gradients add up.
        let ids = Tensor::new(&[3u32, 0, 10, 3, 7, 3], &dev)?;
        let w = Tensor::randn(0f32, 1.0, (6, 6), &dev)?;
        let loss = |e: &Tensor| e.mul(&w)?.sum_all();
        let reference = table.embedding(&ids)?;
        let g_ref = loss(&reference)?.backward()?;
        let fused = embedding(table.as_tensor(), &ids)?;
        let g = loss(&fused)?.backward()?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert_eq!(max_diff(&fused, &reference)?, 0.0);
        let (a, b) = (
            g.get(table.as_tensor()).expect("fused gradient"),
            g_ref.get(table.as_tensor()).expect("reference gradient"),
        );
        assert!(max_diff(a, b)? < 1e-6);
        // Rows no id points at get exactly zero.
        assert_eq!(a.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn an_id_outside_the_table_is_an_error_naming_it() {
        let dev = Device::Cpu;
        let table = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        let ids = Tensor::new(&[1u32, 4], &dev).unwrap();
        let e = embedding(&table, &ids).unwrap_err().to_string();
        assert!(
            e.contains("id 4 at position 1") && e.contains("4 rows"),
            "{e}"
        );
    }
}

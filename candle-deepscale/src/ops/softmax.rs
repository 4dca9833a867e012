//! Megatron's `ScaledUpperTriangMaskedSoftmax` as one CPU kernel each way: the attention scores
//! scaled, causally masked and softmaxed in one pass per row (where candle's ops scale, add a mask
//! tensor and take five passes for the softmax), and the backward `scale * y * (g - sum(g * y))`
//! in one pass from the saved probabilities. Masked entries are exactly zero, as with -inf.
use crate::ops::fast_math::{contiguous_f32, exp, vectorized};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Softmax over keys `0..=last` of `scale * x`, zero beyond.
#[inline(always)]
fn fwd_row(y: &mut [f32], x: &[f32], last: usize, scale: f32) {
    let (live, dead) = y.split_at_mut(last + 1);
    let xs = &x[..last + 1];
    // max(scale * x) = scale * max(x) for the positive scales attention uses.
    let m = crate::ops::fast_math::max(xs) * scale;
    let s = crate::ops::fast_math::map_sum(live, xs, |v| exp(v * scale - m));
    let inv = 1.0 / s;
    live.iter_mut().for_each(|y| *y *= inv);
    dead.iter_mut().for_each(|y| *y = 0.0);
}

#[inline(always)]
fn bwd_row(d: &mut [f32], y: &[f32], g: &[f32], scale: f32) {
    let dot = crate::ops::fast_math::sum_map2(y, g, |y, g| y * g);
    for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
        *d = scale * y * (g - dot);
    }
}

/// Scores `[.., t, total]` for queries at positions `total - t ..`.
struct UpperTriang {
    scale: f32,
}

impl CustomOp1 for UpperTriang {
    fn name(&self) -> &'static str {
        "scaled-upper-triang-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fused softmax", "the scores")?;
        let dims = l.dims();
        if dims.len() < 2 {
            bail!("fused softmax: scores {dims:?} need query and key dimensions")
        }
        let (t, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if t > total || total == 0 {
            bail!("fused softmax: {t} queries over {total} keys")
        }
        let offset = total - t;
        let mut y = vec![0f32; x.len()];
        let scale = self.scale;
        y.par_chunks_mut(total)
            .zip(x.par_chunks(total))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let last = offset + r % t;
                vectorized(
                    #[inline(always)]
                    || fwd_row(yr, xr, last, scale),
                )
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// `scale * y * (g - sum(g * y))` per row (masked entries have y = 0, so they get 0).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(ys, yl, "fused softmax", "the probabilities")?;
        let g = contiguous_f32(gs, gl, "fused softmax", "the gradient")?;
        let n = *yl.dims().last().unwrap_or(&1);
        if g.len() != y.len() || n == 0 {
            bail!("fused softmax backward: shapes do not match")
        }
        let mut d = vec![0f32; y.len()];
        let scale = self.scale;
        d.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(dr, (yr, gr))| {
                vectorized(
                    #[inline(always)]
                    || bwd_row(dr, yr, gr, scale),
                )
            });
        Ok((CpuStorage::F32(d), yl.shape().clone()))
    }
}

/// `softmax(scale * x)` with keys after each query masked (queries are the last `t` of `total`
/// positions), fused on the CPU for f32; None where the caller should compose the ops.
pub fn scaled_upper_triang_masked_softmax(x: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !super::fused() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(UpperTriang {
        scale: scale as f32,
    })?))
}

/// Differentiable softmax over the last dimension composed of candle ops (the max subtracted
/// without a gradient path): candle-nn's `softmax_last_dim` records no backward in 0.11.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    use candle_core::D;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Additive causal mask `[t, total]` for queries at positions `offset..offset + t`: the
/// composed reference of [`scaled_upper_triang_masked_softmax`]'s masking.
pub fn causal_mask(
    t: usize,
    total: usize,
    offset: usize,
    dev: &candle_core::Device,
    dtype: candle_core::DType,
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    use crate::ops::fast_math::{bits, bits_rows};

    /// The baseline, AVX2 and AVX-512 copies give the same bits, both ways.
    #[test]
    fn every_vector_copy_gives_the_same_bits() {
        let (x, g) = bits_rows();
        let runs = crate::ops::fast_math::on_each_copy(
            #[inline(always)]
            || {
                let (mut y, mut d) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                fwd_row(&mut y, &x, 1000, 0.125);
                bwd_row(&mut d, &y, &g, 0.125);
                (bits(&y), bits(&d))
            },
        );
        assert!(runs.iter().all(|r| *r == runs[0]), "{} copies", runs.len());
    }

    /// Probabilities and gradients equal scale, mask and softmax composed, for a fresh sequence
    /// and for queries continuing a cache (t < total).
    #[test]
    fn equals_the_composed_ops() {
        for (t, total) in [(7, 7), (3, 9)] {
            let n = 2 * 3 * t * total;
            let mut v = vec![0f32; n];
            crate::ops::random::fill_normal(&mut v, 9, 0, 3.0);
            let x = Var::from_vec(v, (2, 3, t, total), &Device::Cpu).unwrap();
            let mut w = vec![0f32; n];
            crate::ops::random::fill_normal(&mut w, 10, 0, 1.0);
            let w = Tensor::from_vec(w, (2, 3, t, total), &Device::Cpu).unwrap();
            let scale = 0.3;
            let run = |fused: bool| {
                let y = if fused {
                    scaled_upper_triang_masked_softmax(x.as_tensor(), scale)
                        .unwrap()
                        .unwrap()
                } else {
                    let s = (x.as_tensor() * scale).unwrap();
                    let m = causal_mask(t, total, total - t, &Device::Cpu, DType::F32).unwrap();
                    softmax_last_dim(&s.broadcast_add(&m).unwrap()).unwrap()
                };
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let ((y1, g1), (y0, g0)) = (run(true), run(false));
            let d = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(d(&y1, &y0) < 1e-6, "t {t}: probabilities {}", d(&y1, &y0));
            assert!(d(&g1, &g0) < 1e-6, "t {t}: gradients {}", d(&g1, &g0));
        }
    }
}

//! LayerNorm as one fused CPU kernel with its own backward (Apex's `FusedLayerNorm` idea): two
//! passes over each row forward and two backward, where the composition of candle ops takes about
//! ten of each. Rows run in parallel on rayon; the statistics are recomputed in backward rather
//! than kept (they cost one pass over a row, keeping them would cost memory per token).
use crate::ops::fast_math::{sum_f64, sum_map, sum_map2, vectorized};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct FusedLayerNorm {
    eps: f32,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("fused layer norm: {what} is not contiguous"),
        _ => bail!("fused layer norm: {what} must be f32"),
    }
}

/// Mean and 1/sqrt(var + eps) of one row (two passes, in f64 for the sums).
#[inline(always)]
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = sum_f64(row, |v| v) / n;
    let var = sum_f64(row, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "the input")?;
        let (w, b) = (
            contiguous_f32(ws, wl, "the weight")?,
            contiguous_f32(bs, bl, "the bias")?,
        );
        let h = w.len();
        if h == 0 || b.len() != h || !x.len().is_multiple_of(h) {
            bail!(
                "fused layer norm: input {:?} against weight {} and bias {}",
                xl.dims(),
                h,
                b.len()
            )
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(yr, xr)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let (mean, rstd) = stats(xr, self.eps);
                        for j in 0..h {
                            yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let (xc, wc, gc) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let eps = self.eps;
        let mut dx = vec![0f32; x.elem_count()];
        // dx per row; dw and db summed over fixed blocks of rows, then the blocks in order, so
        // the result does not depend on how rayon splits the work (runs stay bit-identical).
        const BLOCK: usize = 32;
        let partials: Vec<(Vec<f32>, Vec<f32>)> = crate::ops::fast_math::with_f32_slices(
            &[&xc, &wc, &gc],
            "fused layer norm backward",
            &["the input", "the weight", "the gradient"],
            |s| {
                let (xv, wv, gv) = (s[0], s[1], s[2]);
                dx.par_chunks_mut(h * BLOCK)
                    .zip(xv.par_chunks(h * BLOCK).zip(gv.par_chunks(h * BLOCK)))
                    .map(|(dxb, (xb, gb))| {
                        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                        // Rows' x-hat and g * w in scratch, so every loop is element-wise or a lane
                        // reduction (both vectorise).
                        let (mut xhat, mut gw) = (vec![0f32; h], vec![0f32; h]);
                        vectorized(
                            #[inline(always)]
                            || {
                                for (dxr, (xr, gr)) in
                                    dxb.chunks_mut(h).zip(xb.chunks(h).zip(gb.chunks(h)))
                                {
                                    let (mean, rstd) = stats(xr, eps);
                                    for j in 0..h {
                                        xhat[j] = (xr[j] - mean) * rstd;
                                        gw[j] = gr[j] * wv[j];
                                        dw[j] += gr[j] * xhat[j];
                                        db[j] += gr[j];
                                    }
                                    let m1 = sum_map(&gw, |g| g) / h as f32;
                                    let m2 = sum_map2(&gw, &xhat, |g, x| g * x) / h as f32;
                                    for j in 0..h {
                                        dxr[j] = rstd * (gw[j] - m1 - xhat[j] * m2);
                                    }
                                }
                            },
                        );
                        (dw, db)
                    })
                    .collect()
            },
        )?;
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// LayerNorm over the last dimension of the f32 CPU tensor `x` with weight `w` and bias `b`
/// (f32), with a real backward. None when the inputs are not f32 on the CPU (callers fall back).
pub fn fused_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    use candle_core::DType::F32;
    if !super::fused()
        || !x.device().is_cpu()
        || x.dtype() != F32
        || w.dtype() != F32
        || b.dtype() != F32
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(Some(x.apply_op3(
        w,
        b,
        FusedLayerNorm { eps: eps as f32 },
    )?))
}

/// Differentiable layer norm over the last dimension: the fused kernel on CPU f32, else
/// [`layer_norm_reference`] (computed in f32 for half inputs).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(dt) = super::half_on_cpu(&[x, w, b]) {
        let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        return layer_norm(&f(x)?, &f(w)?, &f(b)?, eps)?.to_dtype(dt);
    }
    if let Some(y) = fused_layer_norm(x, w, b, eps)? {
        return Ok(y);
    }
    layer_norm_reference(x, w, b, eps)
}

/// [`layer_norm`] composed of candle ops (half precision, other devices; the fused kernel's
/// reference in tests).
pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    use candle_core::{DType, D};
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v = vec![0f32; n];
        crate::ops::random::fill_normal(&mut v, seed, 0, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .affine(scale as f64, shift as f64)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward and the three gradients equal the composed-op reference.
    #[test]
    fn equals_the_reference_forward_and_backward() {
        let (x, w, b) = (
            Var::from_tensor(&rand(&[3, 5, 64], 1, 2.0, 0.5)).unwrap(),
            Var::from_tensor(&rand(&[64], 2, 0.3, 1.0)).unwrap(),
            Var::from_tensor(&rand(&[64], 3, 0.1, 0.0)).unwrap(),
        );
        let g = rand(&[3, 5, 64], 4, 1.0, 0.0);
        let fused = fused_layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let reference = layer_norm_reference(&x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-5);
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, r) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            let d = max_diff(a, r);
            assert!(d < 1e-4, "d{name}: {d}");
        }
    }

    /// The backward against central finite differences of the forward.
    #[test]
    fn backward_matches_finite_differences() {
        let x0: Vec<f64> = vec![0.3, -1.2, 0.8, 2.0, -0.4];
        let w: Vec<f32> = vec![1.1, 0.7, -0.5, 1.3, 0.9];
        let b: Vec<f32> = vec![0.1, -0.2, 0.0, 0.3, 0.05];
        let g: Vec<f32> = vec![0.5, -1.0, 0.25, 0.8, -0.3];
        let (wt, bt) = (
            Tensor::new(w.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(b.as_slice(), &Device::Cpu).unwrap(),
        );
        let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
        let loss = |x: &[f64]| -> f64 {
            let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let xt = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
            let y = fused_layer_norm(&xt, &wt, &bt, 1e-5).unwrap().unwrap();
            (y * &gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let xs: Vec<f32> = x0.iter().map(|&v| v as f32).collect();
        let xv = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
        let y = fused_layer_norm(&xv, &wt, &bt, 1e-5).unwrap().unwrap();
        let grads = (y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads.get(&xv).unwrap().to_vec1().unwrap();
        let h = 1e-3;
        for i in 0..x0.len() {
            let (mut p, mut m) = (x0.clone(), x0.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h);
            assert!(
                (fd - dx[i] as f64).abs() < 2e-3,
                "dx[{i}]: {} vs {fd}",
                dx[i]
            );
        }
    }
}

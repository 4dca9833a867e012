//! Bias + GeLU (tanh approximation, GPT-2's) as one CPU kernel with its own backward, as
//! Megatron's `fused_bias_gelu`: forward one pass over the MLP's 4h activations where candle adds
//! the bias and applies GeLU in two, backward one pass (plus the bias gradient's row sum) where
//! candle's GeLU backward takes about ten, with libm `tanh`/`powf` per element. Here tanh comes
//! from a vectorised exp (Cephes' polynomial, relative error ~2e-7), compiled for AVX-512 or AVX2+FMA
//! where the CPU has them. Other devices and dtypes take the composed ops.
use crate::ops::fast_math::{contiguous_f32, tanh, vectorized};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

const K0: f32 = 0.797_884_6; // sqrt(2 / pi)
const K1: f32 = 0.044_715;

#[inline(always)]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + tanh(K0 * (v + K1 * v * v * v)))
}

#[inline(always)]
fn gelu_grad(v: f32) -> f32 {
    let t = tanh(K0 * (v + K1 * v * v * v));
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * v * v)
}

#[inline(always)]
fn fwd_row(y: &mut [f32], x: &[f32], b: &[f32]) {
    for ((y, x), b) in y.iter_mut().zip(x).zip(b) {
        *y = gelu(x + b);
    }
}

#[inline(always)]
fn bwd_row(dx: &mut [f32], x: &[f32], b: &[f32], g: &[f32]) {
    for (((d, x), b), g) in dx.iter_mut().zip(x).zip(b).zip(g) {
        *d = g * gelu_grad(x + b);
    }
}

struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "fused bias gelu", "the input")?;
        let b = contiguous_f32(bs, bl, "fused bias gelu", "the bias")?;
        let n = b.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            bail!("fused bias gelu: input {:?} against bias {n}", xl.dims())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(yr, xr)| {
                vectorized(
                    #[inline(always)]
                    || fwd_row(yr, xr, b),
                )
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluGrad)?;
        let n = b.elem_count();
        let db = crate::ops::matmul::sum_rows(&dx, n)?;
        Ok((Some(dx), Some(db)))
    }
}

/// `grad * gelu'(x + b)`, elementwise.
struct BiasGeluGrad;

impl CustomOp3 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "fused bias gelu", "the input")?;
        let b = contiguous_f32(bs, bl, "fused bias gelu", "the bias")?;
        let g = contiguous_f32(gs, gl, "fused bias gelu", "the gradient")?;
        let n = b.len();
        if g.len() != x.len() || n == 0 || !x.len().is_multiple_of(n) {
            bail!("fused bias gelu backward: shapes do not match")
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(dr, (xr, gr))| {
                vectorized(
                    #[inline(always)]
                    || bwd_row(dr, xr, b, gr),
                )
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `gelu(x + bias)` (tanh approximation) over the last dimension of `x`, differentiable in both.
pub fn bias_gelu(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::DType::F32;
    let mut all = vec![x];
    all.extend(bias);
    if let Some(dt) = super::half_on_cpu(&all) {
        let b = bias.map(|b| b.to_dtype(F32)).transpose()?;
        return bias_gelu(&x.to_dtype(F32)?, b.as_ref())?.to_dtype(dt);
    }
    let fused = super::fused()
        && x.device().is_cpu()
        && x.dtype() == F32
        && bias.is_none_or(|b| b.dtype() == F32 && b.rank() == 1);
    if !fused {
        return match bias {
            Some(b) => x.broadcast_add(b)?.gelu(),
            None => x.gelu(),
        };
    }
    let zeros;
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(x.dim(D::Minus1)?, F32, x.device())?;
            &zeros
        }
    };
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasGelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::ops::fast_math::{bits, bits_rows};

    /// The baseline, AVX2 and AVX-512 copies give the same bits, both ways.
    #[test]
    fn every_vector_copy_gives_the_same_bits() {
        let (x, g) = bits_rows();
        let b: Vec<f32> = g.iter().map(|v| v * 0.5).collect();
        let runs = crate::ops::fast_math::on_each_copy(
            #[inline(always)]
            || {
                let (mut y, mut d) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                fwd_row(&mut y, &x, &b);
                bwd_row(&mut d, &x, &b, &g);
                (bits(&y), bits(&d))
            },
        );
        assert!(runs.iter().all(|r| *r == runs[0]), "{} copies", runs.len());
    }

    fn rand(shape: &[usize], seed: u64, scale: f32) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let mut v = vec![0f32; n];
        crate::ops::random::fill_normal(&mut v, seed, 0, 1.0);
        v.iter().map(|x| x * scale).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values and gradients (input and bias) equal the composed candle ops, over inputs from
    /// tiny to saturating (|x| up to ~12).
    #[test]
    fn equals_the_composed_ops() {
        let (rows, n) = (37, 96);
        let x = Var::from_vec(rand(&[rows, n], 1, 4.0), (rows, n), &Device::Cpu).unwrap();
        let b = Var::from_vec(rand(&[n], 2, 1.0), n, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(rand(&[rows, n], 3, 1.0), (rows, n), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                bias_gelu(x.as_tensor(), Some(b.as_tensor())).unwrap()
            } else {
                x.as_tensor()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
                    .gelu()
                    .unwrap()
            };
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(b.as_tensor()).unwrap().clone(),
            )
        };
        let (y1, gx1, gb1) = run(true);
        let (y0, gx0, gb0) = run(false);
        assert!(max_diff(&y1, &y0) < 2e-6, "values {}", max_diff(&y1, &y0));
        // candle's GeLU backward rounds its constants to 6 digits (0.797885, 0.0356774, ...).
        assert!(max_diff(&gx1, &gx0) < 1e-5, "dx {}", max_diff(&gx1, &gx0));
        assert!(max_diff(&gb1, &gb0) < 2e-5, "db {}", max_diff(&gb1, &gb0));
    }

    /// The backward is the derivative: central finite differences in f64 of the forward.
    #[test]
    fn gradient_matches_finite_differences() {
        for v in [-9.0f32, -3.1, -1.0, -0.2, 0.0, 1e-3, 0.4, 1.7, 5.0] {
            let h = 1e-3f64;
            let f = |v: f64| {
                let t = ((K0 as f64) * (v + (K1 as f64) * v * v * v)).tanh();
                0.5 * v * (1.0 + t)
            };
            let fd = (f(v as f64 + h) - f(v as f64 - h)) / (2.0 * h);
            assert!(
                (gelu_grad(v) as f64 - fd).abs() < 1e-5,
                "gelu'({v}) = {} vs {fd}",
                gelu_grad(v)
            );
            assert!((gelu(v) as f64 - f(v as f64)).abs() < 2e-6 * (1.0 + v.abs() as f64));
        }
    }
}

//! Causal self-attention as one CPU op with its own backward, per (batch, head): `S = Q K^T`,
//! Megatron's scaled causal softmax, attention dropout, `O = P V`. Q, K and V are read in place
//! from the QKV projection's output (`[b, t, heads, 3, head_dim]`) and O is written in
//! `[b, t, heads * head_dim]`, so none of the composed path's narrow / transpose / contiguous
//! copies run, nor their backward (candle pads a narrow's gradient with zeros and adds the three).
//! Like FlashAttention, only the rows' log-sum-exps are kept for backward, which recomputes each
//! head's probabilities (one more `t x t x d` product): no `[b, heads, t, t]` tensor lives between
//! forward and backward, and the score scratch exists per thread for one causal block of one
//! head at a time (`ROW_BLOCK x t`: linear in the sequence length, never the `t x t` square). The products go through [`crate::ops::matmul`] at the process's matmul precision.
//!
//! Causal blocks: rows are taken `ROW_BLOCK` at a time and a block's products stop at its last
//! row's column (the masked upper triangle is never computed), which at sequence length 1024
//! skips about 45% of attention's flops (at 256, a third). Such a block's scores are stored
//! with its own row length (`Block::width`).
use crate::ops::bf16_gemm::{Mat, OutPtr as Ptr};
use crate::ops::fast_math::{contiguous_f32, exp, max, sum_map, sum_map2, vectorized};
use crate::ops::matmul::{float32_matmul_precision, gemm_into, Precision};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Causal attention of `qkv [b, t, heads * 3 * head_dim]` (rows per head as `[3, head_dim]`)
/// into `[b, t, heads * head_dim]`, with dropout `(p, key)` on the probabilities drawn exactly as
/// `nn::dropout` draws them over `[b, heads, t, t]`. `None` where the fused kernel does not apply
/// (not CPU f32, switched off, or p >= 1): the caller composes the ops instead.
pub fn causal_attention(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    dropout: Option<(f64, u64)>,
) -> Result<Option<Tensor>> {
    causal_attention_in_blocks(qkv, heads, head_dim, dropout, ROW_BLOCK)
}

/// Query rows per causal block: a multiple of the GEMM kernels' row tiles (6, 8, 12).
pub const ROW_BLOCK: usize = 96;

/// [`causal_attention`] with `block` query rows per causal block; a block of at least the sequence
/// length computes the whole `t x t` square (masked), as the kernel did before blocking — for
/// `deepscale bench attention` and the tests.
pub fn causal_attention_in_blocks(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    dropout: Option<(f64, u64)>,
    block: usize,
) -> Result<Option<Tensor>> {
    if let Some(dt) = super::half_on_cpu(&[qkv]) {
        let wide = qkv.to_dtype(candle_core::DType::F32)?;
        let out = causal_attention_in_blocks(&wide, heads, head_dim, dropout, block)?;
        return out.map(|o| o.to_dtype(dt)).transpose();
    }
    let dropout = dropout.filter(|(p, _)| *p > 0.0);
    if !super::fused()
        || !qkv.device().is_cpu()
        || qkv.dtype() != candle_core::DType::F32
        || dropout.is_some_and(|(p, _)| p >= 1.0)
        || qkv.rank() != 3
        || qkv.dim(2)? != heads * 3 * head_dim
    {
        return Ok(None);
    }
    // Q K^T and P V over the whole square, as the profiler counts scaled_dot_product_attention.
    let (b, t) = (qkv.dim(0)?, qkv.dim(1)?);
    super::flops::add((2 * b * heads * t * t * head_dim) as u64);
    let op = Attention {
        heads,
        d: head_dim,
        dropout,
        precision: float32_matmul_precision(),
        block: block.max(1),
        lse: Mutex::new(Vec::new()),
    };
    Ok(Some(qkv.contiguous()?.apply_op1(op)?))
}

struct Attention {
    heads: usize,
    d: usize,
    dropout: Option<(f64, u64)>,
    precision: Precision,
    block: usize,
    /// Row log-sum-exps of the scaled scores, `[b, heads, t]`, from the last forward.
    lse: Mutex<Vec<f32>>,
}

/// Shapes and the per-(batch, head) views.
#[derive(Clone, Copy)]
struct Geometry {
    t: usize,
    heads: usize,
    d: usize,
    scale: f32,
    dropout: Option<(f64, u64)>,
    precision: Precision,
    block: usize,
}

/// Query rows `[r0, r1)` of a causal block: they attend to keys `[0, r1)`, so the block's scores
/// are `(r1 - r0) x r1`, stored row-major in a per-thread scratch of the largest block's size.
#[derive(Clone, Copy)]
struct Block {
    r0: usize,
    r1: usize,
}

impl Block {
    fn rows(&self) -> usize {
        self.r1 - self.r0
    }

    fn width(&self) -> usize {
        self.r1
    }

    fn len(&self) -> usize {
        self.rows() * self.r1
    }

    /// Row `r` (absolute) of the block's scores `p`: live columns `[0, r]`, then the masked
    /// rest of the block's width.
    fn row<'a>(&self, p: &'a mut [f32], r: usize) -> &'a mut [f32] {
        let at = (r - self.r0) * self.r1;
        &mut p[at..at + self.r1]
    }
}

/// `m` from row `r0` on.
fn from_row(m: Mat, r0: usize) -> Mat {
    Mat {
        ptr: m.ptr.wrapping_offset(r0 as isize * m.rs),
        ..m
    }
}

impl Geometry {
    /// The causal blocks of a head, top to bottom.
    fn blocks(&self) -> Vec<Block> {
        (0..self.t)
            .step_by(self.block)
            .map(|r0| Block {
                r0,
                r1: (r0 + self.block).min(self.t),
            })
            .collect()
    }

    /// Q (`which` 0), K (1) or V (2) of head `bh` as a `t x d` matrix inside `qkv`.
    fn qkv(&self, qkv: &[f32], bh: usize, which: usize) -> Mat {
        let (b, h) = (bh / self.heads, bh % self.heads);
        let w = self.heads * 3 * self.d;
        Mat {
            ptr: qkv[b * self.t * w + (h * 3 + which) * self.d..].as_ptr(),
            rs: w as isize,
            cs: 1,
        }
    }

    /// Offset of head `bh`'s block in a `[b, t, heads * d]` tensor.
    fn out_offset(&self, bh: usize) -> usize {
        let (b, h) = (bh / self.heads, bh % self.heads);
        b * self.t * self.heads * self.d + h * self.d
    }

    /// Dropout multiplier of probability (r, c) of head `bh` (`nn::dropout`'s element order).
    fn keep(&self, bh: usize, r: usize, c: usize) -> f32 {
        match self.dropout {
            None => 1.0,
            Some((p, key)) => {
                let i = ((bh * self.t + r) * self.t + c) as u64;
                if crate::ops::random::uniform(key, i) > p {
                    (1.0 / (1.0 - p)) as f32
                } else {
                    0.0
                }
            }
        }
    }

    /// The largest block's scores (`block x t`): the per-thread scratch.
    fn scratch_len(&self) -> usize {
        self.block.min(self.t) * self.t
    }

    /// Block `blk`'s `A B^T` (both `t x d`) into `out`: rows `[r0, r1)` of A against B's rows
    /// `[0, r1)`, `rows x r1` row-major.
    fn block_of(&self, a: Mat, b: Mat, blk: &Block, out: &mut [f32]) {
        // SAFETY: callers pass t x d views; out holds the block.
        unsafe {
            gemm_into(
                self.precision,
                (blk.rows(), blk.width(), self.d),
                out.as_mut_ptr(),
                from_row(a, blk.r0),
                b.t(),
            )
        };
    }

    /// Rows `[r0, r1)` of `out` (`t x d`) = the block `m` times X's rows `[0, r1)`.
    fn block_times(&self, m: &[f32], blk: &Block, x: Mat, out: &mut [f32]) {
        // SAFETY: the block reads X's rows [0, r1) and writes out's rows [r0, r1).
        unsafe {
            gemm_into(
                self.precision,
                (blk.rows(), self.d, blk.width()),
                out[blk.r0 * self.d..].as_mut_ptr(),
                mat(m, blk.width()),
                x,
            )
        };
    }

    /// Rows `[0, r1)` of `out` (`t x d`) = (or `+=` when `accumulate`) the block `m` transposed
    /// times Y's rows `[r0, r1)`.
    fn block_t_times(&self, m: &[f32], blk: &Block, y: Mat, out: &mut [f32], accumulate: bool) {
        // SAFETY: the block reads Y's rows [r0, r1) and writes out's rows [0, r1).
        unsafe {
            crate::ops::matmul::gemm(
                self.precision,
                (blk.width(), self.d, blk.rows()),
                out.as_mut_ptr(),
                mat(m, blk.width()).t(),
                from_row(y, blk.r0),
                false,
                accumulate,
            )
        };
    }
}

fn mat(v: &[f32], rs: usize) -> Mat {
    Mat {
        ptr: v.as_ptr(),
        rs: rs as isize,
        cs: 1,
    }
}

/// Copies a contiguous `t x d` block into head `bh`'s strided place (row stride `stride`).
fn scatter(dst: Ptr, offset: usize, stride: usize, src: &[f32], d: usize) {
    for (r, row) in src.chunks(d).enumerate() {
        // SAFETY: every (head, row) owns a distinct d-wide slot of the destination.
        unsafe {
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst.get().add(offset + r * stride), d)
        };
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l, "fused attention", "qkv")?;
        let (b, t, _) = l.shape().dims3()?;
        let (heads, d) = (self.heads, self.d);
        let g = Geometry {
            t,
            heads,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            dropout: self.dropout,
            precision: self.precision,
            block: self.block,
        };
        let mut out = vec![0f32; b * t * heads * d];
        let mut lse = vec![0f32; b * heads * t];
        let dst = Ptr(out.as_mut_ptr());
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse)| {
            // One block's scores at a time: the scratch is `block x t`, never the square.
            let mut scratch = vec![0f32; g.scratch_len()];
            let mut o = vec![0f32; t * d];
            let (q, k, v) = (g.qkv(qkv, bh, 0), g.qkv(qkv, bh, 1), g.qkv(qkv, bh, 2));
            for blk in g.blocks() {
                let p = &mut scratch[..blk.len()];
                g.block_of(q, k, &blk, p);
                vectorized(
                    #[inline(always)]
                    || {
                        for (r, lse) in (blk.r0..blk.r1).zip(&mut lse[blk.r0..blk.r1]) {
                            let (live, masked) = blk.row(p, r).split_at_mut(r + 1);
                            // The scale is positive: max(scale * s) = scale * max(s).
                            let m = max(live) * g.scale;
                            live.iter_mut().for_each(|v| *v = exp(*v * g.scale - m));
                            let sum = sum_map(live, |v| v);
                            *lse = m + sum.ln();
                            let inv = 1.0 / sum;
                            if g.dropout.is_some() {
                                for (c, v) in live.iter_mut().enumerate() {
                                    *v *= inv * g.keep(bh, r, c);
                                }
                            } else {
                                live.iter_mut().for_each(|v| *v *= inv);
                            }
                            masked.fill(0.0);
                        }
                    },
                );
                g.block_times(p, &blk, v, &mut o);
            }
            scatter(dst, g.out_offset(bh), heads * d, &o, d);
        });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: lock".into()))? = lse;
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: lock".into()))?
            .clone();
        let op = AttentionGrad {
            heads: self.heads,
            d: self.d,
            dropout: self.dropout,
            precision: self.precision,
            block: self.block,
            lse,
        };
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

struct AttentionGrad {
    heads: usize,
    d: usize,
    dropout: Option<(f64, u64)>,
    precision: Precision,
    block: usize,
    lse: Vec<f32>,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fused-causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s1, l1, "fused attention backward", "qkv")?;
        let dout = contiguous_f32(s2, l2, "fused attention backward", "the gradient")?;
        let (b, t, w) = l1.shape().dims3()?;
        let (heads, d) = (self.heads, self.d);
        if dout.len() != b * t * heads * d || self.lse.len() != b * heads * t {
            bail!("fused attention backward: the gradient or saved state does not match qkv")
        }
        let g = Geometry {
            t,
            heads,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            dropout: self.dropout,
            precision: self.precision,
            block: self.block,
        };
        let mut dqkv = vec![0f32; b * t * w];
        let dst = Ptr(dqkv.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|bh| {
            let lse = &self.lse[bh * t..(bh + 1) * t];
            let o = g.out_offset(bh);
            let dout_h = Mat {
                ptr: dout[o..].as_ptr(),
                rs: (heads * d) as isize,
                cs: 1,
            };
            let (q, k, v) = (g.qkv(qkv, bh, 0), g.qkv(qkv, bh, 1), g.qkv(qkv, bh, 2));
            let n = g.scratch_len();
            let (mut p, mut pd, mut ds) = (vec![0f32; n], Vec::new(), vec![0f32; n]);
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
            // Bottom block first: it covers every key row, so it writes dK and dV and the
            // blocks above add to their rows.
            for (i, blk) in g.blocks().iter().rev().enumerate() {
                let p = &mut p[..blk.len()];
                // P (before dropout) recomputed from the saved log-sum-exps.
                g.block_of(q, k, blk, p);
                vectorized(
                    #[inline(always)]
                    || {
                        for (r, lse) in (blk.r0..blk.r1).zip(&lse[blk.r0..blk.r1]) {
                            let (live, masked) = blk.row(p, r).split_at_mut(r + 1);
                            live.iter_mut().for_each(|v| *v = exp(*v * g.scale - lse));
                            masked.fill(0.0);
                        }
                    },
                );
                // dV += Pd^T dO, with Pd the probabilities as used (dropped out).
                if g.dropout.is_some() {
                    pd.clear();
                    pd.extend_from_slice(p);
                    for r in blk.r0..blk.r1 {
                        for (c, x) in blk.row(&mut pd, r).iter_mut().enumerate() {
                            *x *= g.keep(bh, r, c);
                        }
                    }
                    g.block_t_times(&pd, blk, dout_h, &mut dv, i > 0);
                } else {
                    g.block_t_times(p, blk, dout_h, &mut dv, i > 0);
                }
                // dP = (dO V^T) * dropout mask, then dS = P (dP - rowsum(dP P)) * scale.
                let ds = &mut ds[..blk.len()];
                g.block_of(dout_h, v, blk, ds);
                vectorized(
                    #[inline(always)]
                    || {
                        for r in blk.r0..blk.r1 {
                            let at = (r - blk.r0) * blk.width();
                            let prow = &p[at..at + blk.width()];
                            let (live, masked) = blk.row(ds, r).split_at_mut(r + 1);
                            if g.dropout.is_some() {
                                for (c, x) in live.iter_mut().enumerate() {
                                    *x *= g.keep(bh, r, c);
                                }
                            }
                            let dot = sum_map2(live, prow, |d, p| d * p);
                            for (x, pv) in live.iter_mut().zip(prow) {
                                *x = pv * (*x - dot) * g.scale;
                            }
                            masked.fill(0.0);
                        }
                    },
                );
                // dQ (this block's rows) = dS K, dK += dS^T Q
                g.block_times(ds, blk, k, &mut dq);
                g.block_t_times(ds, blk, q, &mut dk, i > 0);
            }
            let row0 = (bh / heads) * t * w + (bh % heads) * 3 * d;
            scatter(dst, row0, w, &dq, d);
            scatter(dst, row0 + d, w, &dk, d);
            scatter(dst, row0 + 2 * d, w, &dv, d);
        });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against central finite differences of a scalar function of the output (causal blocks of
    /// two rows).
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let (b, t, heads, d) = (1, 5, 2, 3);
        let x: Vec<f64> = (0..b * t * heads * 3 * d)
            .map(|i| ((i * 37 % 23) as f64 / 23.0) - 0.5)
            .collect();
        let w: Vec<f32> = (0..b * t * heads * d)
            .map(|i| ((i * 11 % 7) as f32 / 7.0) - 0.4)
            .collect();
        let w = Tensor::from_vec(w, (b, t, heads * d), &Device::Cpu)?;
        let f = |x: &[f64]| -> Result<f64> {
            let q = Tensor::from_vec(
                x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                (b, t, heads * 3 * d),
                &Device::Cpu,
            )?;
            let y = causal_attention_in_blocks(&q, heads, d, None, 2)?.expect("applies");
            Ok((y * &w)?.sum_all()?.to_scalar::<f32>()? as f64)
        };
        let v = Var::from_tensor(&Tensor::from_vec(
            x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (b, t, heads * 3 * d),
            &Device::Cpu,
        )?)?;
        let y = causal_attention_in_blocks(&v, heads, d, None, 2)?.expect("applies");
        let grads = (y * &w)?.sum_all()?.backward()?;
        let g = grads
            .get(&v)
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let h = 1e-2;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (f(&xp)? - f(&xm)?) / (2.0 * h);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "element {i}: finite difference {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }
}

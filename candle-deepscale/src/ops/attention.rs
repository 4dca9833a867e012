//! Causal self-attention as one CPU op with its own backward, per (batch, head): `S = Q K^T`,
//! Megatron's scaled causal softmax, attention dropout, `O = P V`. Q, K and V are read in place
//! from the QKV projection's output (`[b, t, heads, 3, head_dim]`) and O is written in
//! `[b, t, heads * head_dim]`, so none of the composed path's narrow / transpose / contiguous
//! copies run, nor their backward (candle pads a narrow's gradient with zeros and adds the three).
//!
//! FlashAttention's tiling: the scores exist one tile at a time (`ROW_BLOCK` query rows against
//! `KEY_BLOCK` keys, per thread), the softmax runs online over a row block's key tiles (a running
//! max and sum rescale the partial output), and only the rows' log-sum-exps are kept for
//! backward, which recomputes each tile's probabilities from them and takes the softmax's
//! `rowsum(dP * P)` as `rowsum(dO * O)` (FlashAttention-2). So attention's memory does not grow
//! with `t x t` anywhere: the scratch is a tile whatever the sequence length, and between
//! forward and backward only `[b, heads, t]` log-sum-exps live. The products go through
//! [`crate::ops::matmul`] at the process's matmul precision.
//!
//! Causal tiles: a row block's key tiles stop at its last row's column (the masked upper
//! triangle is never computed), which at sequence length 1024 skips about 45% of attention's
//! flops (at 256, a third). Key tiles are a whole number of row blocks and start at multiples
//! of their width, so every row of a tile has at least one live key (the online max is finite).
use crate::ops::bf16_gemm::{Mat, OutPtr as Ptr};
use crate::ops::fast_math::{contiguous_f32, exp, max, sum_map, sum_map2, vectorized};
use crate::ops::matmul::{float32_matmul_precision, gemm, Precision};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
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
    causal_attention_in_tiles(qkv, heads, head_dim, dropout, TILE)
}

/// Query rows per tile: a multiple of the GEMM kernels' row tiles (6, 8, 12).
pub const ROW_BLOCK: usize = 96;
/// Keys per tile: 4 row blocks (a 96 x 384 tile of scores is 144 KB, in L2 with its operands).
pub const KEY_BLOCK: usize = 384;
/// The kernel's tile.
pub const TILE: Tile = Tile {
    rows: ROW_BLOCK,
    keys: KEY_BLOCK,
};

/// A tile of scores: `rows` queries against `keys` keys (`keys` is rounded up to a whole number
/// of `rows`). `keys >= t` is one key tile per row block (the softmax over whole rows, as the
/// kernel did before tiling keys); `rows >= t` the whole `t x t` square, masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub rows: usize,
    pub keys: usize,
}

impl Tile {
    /// The tile the kernel runs: at least one row, keys rounded up to whole row blocks.
    pub fn normalized(self) -> Tile {
        let rows = self.rows.max(1);
        Tile {
            rows,
            keys: self.keys.max(1).div_ceil(rows) * rows,
        }
    }

    /// Floats of the per-thread score scratch at sequence length `t`.
    pub fn scratch_len(self, t: usize) -> usize {
        let n = self.normalized();
        n.rows.min(t) * n.keys.min(t)
    }
}

/// [`causal_attention`] in tiles of `tile` — for `deepscale bench attention` and the tests.
pub fn causal_attention_in_tiles(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    dropout: Option<(f64, u64)>,
    tile: Tile,
) -> Result<Option<Tensor>> {
    if let Some(dt) = super::half_on_cpu(&[qkv]) {
        let wide = qkv.to_dtype(candle_core::DType::F32)?;
        let out = causal_attention_in_tiles(&wide, heads, head_dim, dropout, tile)?;
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
    let tile = tile.normalized();
    let op = Attention {
        g: Geometry {
            t,
            heads,
            d: head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            dropout,
            precision: float32_matmul_precision(),
            rows: tile.rows,
            keys: tile.keys,
        },
        lse: Mutex::new(Vec::new()),
    };
    Ok(Some(qkv.contiguous()?.apply_op1(op)?))
}

struct Attention {
    g: Geometry,
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
    /// Query rows per tile.
    rows: usize,
    /// Keys per tile: a multiple of `rows`.
    keys: usize,
}

/// A tile in place: query rows `[r0, r1)` against keys `[c0, c1)`, `(r1 - r0) x (c1 - c0)`
/// scores row-major in a per-thread scratch of the largest tile's size.
#[derive(Clone, Copy)]
struct TileAt {
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

impl TileAt {
    fn rows(&self) -> usize {
        self.r1 - self.r0
    }

    fn width(&self) -> usize {
        self.c1 - self.c0
    }

    fn len(&self) -> usize {
        self.rows() * self.width()
    }

    /// Row `r` (absolute) of the tile's scores `p`, split into its live columns (keys up to
    /// `r`; never empty, see the module's note) and the masked rest.
    fn row<'a>(&self, p: &'a mut [f32], r: usize) -> (&'a mut [f32], &'a mut [f32]) {
        let at = (r - self.r0) * self.width();
        let live = (r + 1).min(self.c1) - self.c0;
        p[at..at + self.width()].split_at_mut(live)
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
    /// The row blocks of a head, top to bottom, each as its key tiles left to right.
    fn row_blocks(&self) -> impl Iterator<Item = Vec<TileAt>> + '_ {
        (0..self.t).step_by(self.rows).map(|r0| {
            let r1 = (r0 + self.rows).min(self.t);
            (0..r1)
                .step_by(self.keys)
                .map(|c0| TileAt {
                    r0,
                    r1,
                    c0,
                    c1: (c0 + self.keys).min(r1),
                })
                .collect()
        })
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

    /// Head `bh` of a `[b, t, heads * d]` tensor as a `t x d` matrix.
    fn head(&self, x: &[f32], bh: usize) -> Mat {
        Mat {
            ptr: x[self.out_offset(bh)..].as_ptr(),
            rs: (self.heads * self.d) as isize,
            cs: 1,
        }
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

    /// The largest tile's scores: the per-thread scratch.
    fn scratch_len(&self) -> usize {
        Tile {
            rows: self.rows,
            keys: self.keys,
        }
        .scratch_len(self.t)
    }

    /// The tile of `A B^T` (both `t x d`): A's rows `[r0, r1)` against B's rows `[c0, c1)`.
    fn tile_of(&self, a: Mat, b: Mat, tile: &TileAt, out: &mut [f32]) {
        // SAFETY: callers pass t x d views; out holds the tile.
        unsafe {
            gemm(
                self.precision,
                (tile.rows(), tile.width(), self.d),
                out.as_mut_ptr(),
                from_row(a, tile.r0),
                from_row(b, tile.c0).t(),
                false,
                false,
            )
        };
    }

    /// Rows `[r0, r1)` of `out` (`t x d`) = (or `+=` when `add`) the tile `m` times X's rows
    /// `[c0, c1)`.
    fn tile_times(&self, m: &[f32], tile: &TileAt, x: Mat, out: &mut [f32], add: bool) {
        // SAFETY: reads X's rows [c0, c1), writes out's rows [r0, r1).
        unsafe {
            gemm(
                self.precision,
                (tile.rows(), self.d, tile.width()),
                out[tile.r0 * self.d..].as_mut_ptr(),
                mat(m, tile.width()),
                from_row(x, tile.c0),
                false,
                add,
            )
        };
    }

    /// Rows `[c0, c1)` of `out` (`t x d`) `+=` the tile `m` transposed times Y's rows `[r0, r1)`.
    fn tile_t_times(&self, m: &[f32], tile: &TileAt, y: Mat, out: &mut [f32]) {
        // SAFETY: reads Y's rows [r0, r1), writes out's rows [c0, c1).
        unsafe {
            gemm(
                self.precision,
                (tile.width(), self.d, tile.rows()),
                out[tile.c0 * self.d..].as_mut_ptr(),
                mat(m, tile.width()).t(),
                from_row(y, tile.r0),
                false,
                true,
            )
        };
    }

    /// One row block of head `bh` forward: the online softmax over its key tiles into rows
    /// `[r0, r1)` of `o` (`t x d`) and their log-sum-exps into `lse` (the head's `t`). `run`
    /// holds each row's running max (of the scaled scores) and sum of exponentials; the first
    /// tile sets them.
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &self,
        bh: usize,
        (q, k, v): (Mat, Mat, Mat),
        tiles: &[TileAt],
        scratch: &mut [f32],
        (run_max, run_sum): (&mut [f32], &mut [f32]),
        o: &mut [f32],
        lse: &mut [f32],
    ) {
        let (d, scale) = (self.d, self.scale);
        for (j, tile) in tiles.iter().enumerate() {
            let p = &mut scratch[..tile.len()];
            self.tile_of(q, k, tile, p);
            vectorized(
                #[inline(always)]
                || {
                    for r in tile.r0..tile.r1 {
                        let i = r - tile.r0;
                        let (live, masked) = tile.row(p, r);
                        // The scale is positive: max(scale * s) = scale * max(s).
                        let tile_max = max(live) * scale;
                        let new_max = if j == 0 {
                            tile_max
                        } else {
                            run_max[i].max(tile_max)
                        };
                        live.iter_mut().for_each(|x| *x = exp(*x * scale - new_max));
                        let sum = sum_map(live, |x| x);
                        if j == 0 {
                            run_sum[i] = sum;
                        } else {
                            let alpha = exp(run_max[i] - new_max);
                            run_sum[i] = run_sum[i] * alpha + sum;
                            if alpha != 1.0 {
                                o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                            }
                        }
                        run_max[i] = new_max;
                        if self.dropout.is_some() {
                            for (c, x) in live.iter_mut().enumerate() {
                                *x *= self.keep(bh, r, tile.c0 + c);
                            }
                        }
                        masked.fill(0.0);
                    }
                },
            );
            self.tile_times(p, tile, v, o, j > 0);
        }
        let Some(first) = tiles.first() else { return };
        for r in first.r0..first.r1 {
            let i = r - first.r0;
            let inv = 1.0 / run_sum[i];
            o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[r] = run_max[i] + run_sum[i].ln();
        }
    }

    /// One row block of head `bh` backward, tile by tile: `dQ` rows `[r0, r1)`, `dK` and `dV`
    /// rows `[c0, c1)` of each tile, added into the head's `t x d` gradients. `delta` is the
    /// head's `rowsum(dO * O)` (= `rowsum(dP * P)` of the softmax's backward, dropout included).
    #[allow(clippy::too_many_arguments)]
    fn backward_rows(
        &self,
        bh: usize,
        (q, k, v, dout): (Mat, Mat, Mat, Mat),
        (lse, delta): (&[f32], &[f32]),
        tiles: &[TileAt],
        (p, pd, ds): (&mut [f32], &mut Vec<f32>, &mut [f32]),
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        for tile in tiles {
            let p = &mut p[..tile.len()];
            // P (before dropout) recomputed from the saved log-sum-exps.
            self.tile_of(q, k, tile, p);
            vectorized(
                #[inline(always)]
                || {
                    for (r, &lse) in (tile.r0..tile.r1).zip(&lse[tile.r0..tile.r1]) {
                        let (live, masked) = tile.row(p, r);
                        live.iter_mut()
                            .for_each(|x| *x = exp(*x * self.scale - lse));
                        masked.fill(0.0);
                    }
                },
            );
            // dV += Pd^T dO, with Pd the probabilities as used (dropped out).
            if self.dropout.is_some() {
                pd.clear();
                pd.extend_from_slice(p);
                for r in tile.r0..tile.r1 {
                    for (c, x) in tile.row(pd, r).0.iter_mut().enumerate() {
                        *x *= self.keep(bh, r, tile.c0 + c);
                    }
                }
                self.tile_t_times(pd, tile, dout, dv);
            } else {
                self.tile_t_times(p, tile, dout, dv);
            }
            // dP = (dO V^T) * dropout mask, then dS = P (dP - delta) * scale.
            let ds = &mut ds[..tile.len()];
            self.tile_of(dout, v, tile, ds);
            vectorized(
                #[inline(always)]
                || {
                    for (r, &delta) in (tile.r0..tile.r1).zip(&delta[tile.r0..tile.r1]) {
                        let at = (r - tile.r0) * tile.width();
                        let prow = &p[at..at + tile.width()];
                        let (live, masked) = tile.row(ds, r);
                        if self.dropout.is_some() {
                            for (c, x) in live.iter_mut().enumerate() {
                                *x *= self.keep(bh, r, tile.c0 + c);
                            }
                        }
                        for (x, pv) in live.iter_mut().zip(prow) {
                            *x = pv * (*x - delta) * self.scale;
                        }
                        masked.fill(0.0);
                    }
                },
            );
            // dQ (the block's rows) += dS K, dK += dS^T Q
            self.tile_times(ds, tile, k, dq, true);
            self.tile_t_times(ds, tile, q, dk);
        }
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

fn lock_error<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("fused attention: lock".into())
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l, "fused attention", "qkv")?;
        let (b, t, w) = l.shape().dims3()?;
        let g = self.g;
        if t != g.t || w != g.heads * 3 * g.d {
            bail!(
                "fused attention: qkv {:?} is not the shape the op was built for",
                l.shape()
            )
        }
        let (heads, d) = (g.heads, g.d);
        let mut out = vec![0f32; b * t * heads * d];
        let mut lse = vec![0f32; b * heads * t];
        let dst = Ptr(out.as_mut_ptr());
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse)| {
            // One tile's scores at a time: the scratch does not depend on t.
            let mut scratch = vec![0f32; g.scratch_len()];
            let rows = g.rows.min(t);
            let (mut run_max, mut run_sum) = (vec![0f32; rows], vec![0f32; rows]);
            let mut o = vec![0f32; t * d];
            let qkv_h = (g.qkv(qkv, bh, 0), g.qkv(qkv, bh, 1), g.qkv(qkv, bh, 2));
            for tiles in g.row_blocks() {
                let run = (&mut run_max[..], &mut run_sum[..]);
                g.forward_rows(bh, qkv_h, &tiles, &mut scratch, run, &mut o, lse);
            }
            scatter(dst, g.out_offset(bh), heads * d, &o, d);
        });
        *self.lse.lock().map_err(lock_error)? = lse;
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let lse = self.lse.lock().map_err(lock_error)?.clone();
        let op = AttentionGrad { g: self.g, lse };
        Ok(Some(qkv.apply_op3_no_bwd(
            &grad.contiguous()?,
            &res.contiguous()?,
            &op,
        )?))
    }
}

struct AttentionGrad {
    g: Geometry,
    lse: Vec<f32>,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fused-causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "fused attention backward";
        let qkv = contiguous_f32(s1, l1, what, "qkv")?;
        let dout = contiguous_f32(s2, l2, what, "the gradient")?;
        let out = contiguous_f32(s3, l3, what, "the output")?;
        let (b, t, w) = l1.shape().dims3()?;
        let g = self.g;
        let (heads, d) = (g.heads, g.d);
        if t != g.t
            || w != heads * 3 * d
            || dout.len() != b * t * heads * d
            || out.len() != dout.len()
            || self.lse.len() != b * heads * t
        {
            bail!("{what}: the gradient or saved state does not match qkv")
        }
        let mut dqkv = vec![0f32; b * t * w];
        let dst = Ptr(dqkv.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|bh| {
            let lse = &self.lse[bh * t..(bh + 1) * t];
            let dout_h = g.head(dout, bh);
            let delta: Vec<f32> = (0..t)
                .map(|r| {
                    let at = g.out_offset(bh) + r * heads * d;
                    let (a, o) = (&dout[at..at + d], &out[at..at + d]);
                    vectorized(|| sum_map2(a, o, |a, o| a * o))
                })
                .collect();
            let views = (
                g.qkv(qkv, bh, 0),
                g.qkv(qkv, bh, 1),
                g.qkv(qkv, bh, 2),
                dout_h,
            );
            let n = g.scratch_len();
            let (mut p, mut pd, mut ds) = (vec![0f32; n], Vec::new(), vec![0f32; n]);
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
            for tiles in g.row_blocks() {
                g.backward_rows(
                    bh,
                    views,
                    (lse, &delta),
                    &tiles,
                    (&mut p, &mut pd, &mut ds),
                    (&mut dq, &mut dk, &mut dv),
                );
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

    /// Against central finite differences of a scalar function of the output, in tiles of
    /// one row and key, of two rows by two and four keys, and one tile of the whole square.
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        for (rows, keys) in [(1, 1), (2, 2), (2, 3), (8, 8)] {
            gradient_matches_finite_differences_in(Tile { rows, keys })?;
        }
        Ok(())
    }

    fn gradient_matches_finite_differences_in(tile: Tile) -> Result<()> {
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
            let y = causal_attention_in_tiles(&q, heads, d, None, tile)?.expect("applies");
            Ok((y * &w)?.sum_all()?.to_scalar::<f32>()? as f64)
        };
        let v = Var::from_tensor(&Tensor::from_vec(
            x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (b, t, heads * 3 * d),
            &Device::Cpu,
        )?)?;
        let y = causal_attention_in_tiles(&v, heads, d, None, tile)?.expect("applies");
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
                "{tile:?} element {i}: finite difference {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }
}

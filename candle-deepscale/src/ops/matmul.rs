//! The matrix products of a training step on the CPU: `torch.matmul` under
//! `torch.set_float32_matmul_precision`.
//!
//! candle's CPU matmul zero-fills every output before the GEMM overwrites it (a memset over
//! logits-sized buffers) and runs a batched product as one two-thread GEMM per batch item (attention's
//! `[48 x 256 x 64]` products ran at ~60 GFLOP/s against ~150 for large GEMMs). This op writes its output once, reads transposed operands through their
//! strides (the backward's `G B^T` and `A^T G` copy nothing) and spreads a batch over the threads.
//!
//! [`Precision::Bf16`] rounds the operands to bfloat16 and accumulates in fp32 (PyTorch's bf16
//! autocast numerics; parameters, activations and gradients stay fp32, so the fp32 parameters are
//! the master weights): `vdpbf16ps` where the CPU has AVX512-BF16 ([`crate::ops::bf16_gemm`]), otherwise
//! the rounded operands go through the fp32 GEMM — the same numbers, without the speed-up.
use crate::ops::bf16_gemm::{self, KernelKind, Mat, OutPtr};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// The arithmetic of fp32 matrix products (PyTorch's `float32_matmul_precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 operands and accumulation ("highest").
    Highest,
    /// bf16 operands, fp32 accumulation ("medium"; DeepSpeed's `bf16.enabled` on the CPU).
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every later fp32 product in the process (all in-process ranks).
pub fn set_float32_matmul_precision(p: Precision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
    if p == Precision::Bf16 && !bf16_gemm::available() {
        static NOTE: std::sync::Once = std::sync::Once::new();
        NOTE.call_once(|| {
            eprintln!(
                "note: bf16 matmuls: this CPU has no AVX512-BF16, so they are emulated (bf16-rounded \
                 operands through the fp32 GEMM: bf16 numerics, no speed-up)"
            )
        });
    }
}

/// Whether bf16 products run on [`bf16_gemm`]'s AVX512-BF16 kernel: where the CPU has it, unless
/// the fp32 BLAS runs AVX-512 kernels — rounding the operands to bf16 and running them there is
/// then faster (~290 against ~160 GFLOP/s on an AVX512-BF16 Xeon with BLIS's skx kernels,
/// BENCHMARKS.md session 21) with the same numerics (exact bf16 products summed in fp32).
/// `DEEPSCALE_BF16_KERNEL=on` takes the kernel wherever the CPU has it, `off` never.
pub fn bf16_kernel_in_use() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let forced = std::env::var("DEEPSCALE_BF16_KERNEL").is_ok_and(|v| v == "on");
        bf16_gemm::available() && (forced || !crate::ops::blas::active().is_some_and(|b| b.avx512))
    })
}

pub fn float32_matmul_precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => Precision::Highest,
        _ => Precision::Bf16,
    }
}

/// `a @ b` over the last two dimensions, with equal leading (batch) dimensions. CPU fp32 products
/// run this module's op (with its backward); anything else is candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(dt) = super::half_on_cpu(&[a, b]) {
        return matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?.to_dtype(dt);
    }
    super::flops::add_matmul(a.dims(), b.dims());
    if !ours(a, b) {
        return a.matmul(b);
    }
    a.apply_op2(
        b,
        MatMul {
            precision: float32_matmul_precision(),
        },
    )
}

/// Whether this module's op computes `a @ b`.
fn ours(a: &Tensor, b: &Tensor) -> bool {
    let r = a.rank();
    super::fused()
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && r >= 2
        && b.rank() == r
        && a.dims()[..r - 2] == b.dims()[..r - 2]
        && a.dims()[r - 1] == b.dims()[r - 2]
}

struct MatMul {
    precision: Precision,
}

/// `x @ w^T (+ bias)` with `w` as stored (`[out, in]`): the bias rows are the GEMM's starting
/// output (no separate broadcast add), and the weight's gradient is computed in the weight's own
/// order (`G^T x`). Through `matmul(x, w.t())` it would reach the weight as a transposed view
/// that autograd copies element by element (about 2% of a GPT-2 step).
struct Linear {
    precision: Precision,
}

/// `x @ w^T + bias` (PyTorch's `F.linear`) over the last two dimensions: `x [.., m, in]`,
/// `w [.., out, in]`, `bias [out]`. One fused op on the CPU in fp32; elsewhere candle's ops.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(bias);
    if let Some(dt) = super::half_on_cpu(&all) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let b = bias.map(f).transpose()?;
        return linear(&f(x)?, &f(w)?, b.as_ref())?.to_dtype(dt);
    }
    // x [.., m, in] @ w^T [in, out] (the unfused paths count through `matmul`).
    let fused = super::fused()
        && bias.is_none_or(|b| b.device().is_cpu() && b.dtype() == DType::F32 && b.rank() == 1)
        && ours(x, &w.t()?);
    let precision = float32_matmul_precision();
    if fused {
        let d = w.dims();
        super::flops::add_matmul(x.dims(), &[d[d.len() - 1], d[d.len() - 2]]);
    }
    match (bias, fused) {
        (Some(b), true) => x.apply_op3(w, b, Linear { precision }),
        (None, true) => x.apply_op2(w, Linear { precision }),
        (Some(b), false) => matmul(x, &w.t()?)?.broadcast_add(b),
        (None, false) => matmul(x, &w.t()?),
    }
}

impl Linear {
    fn fwd(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, "the input")?, f32s(s2, "the weight")?);
        let r = l2.dims().len();
        if r < 2 {
            bail!("linear: weight {:?} is not a matrix", l2.dims())
        }
        forward(
            self.precision,
            (x, l1),
            (w, &l2.transpose(r - 2, r - 1)?),
            bias,
        )
    }

    /// Gradients of `x` (`G w`), `w` (`G^T x`, in the weight's order) and the bias.
    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let op = |a: &Tensor, b: &Tensor| {
            a.apply_op2_no_bwd(
                b,
                &MatMul {
                    precision: self.precision,
                },
            )
        };
        let n = grad.dim(candle_core::D::Minus1)?;
        Ok((op(grad, w)?, op(&grad.t()?, x)?, sum_rows(grad, n)?))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "deepscale-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.grads(x, w, grad)?;
        Ok((Some(gx), Some(gw)))
    }
}

impl candle_core::CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "deepscale-linear-bias"
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
        let bias = crate::ops::fast_math::contiguous_f32(s3, l3, "linear", "the bias")?;
        self.fwd((s1, l1), (s2, l2), Some(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = self.grads(x, w, grad)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// Offsets of every batch item's matrix (row-major order of the leading dimensions).
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let r = l.dims().len();
    let mut offsets = vec![l.start_offset()];
    for (&d, &s) in l.dims()[..r - 2].iter().zip(&l.stride()[..r - 2]) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..d).map(move |i| o + i * s))
            .collect();
    }
    offsets
}

/// One product into `dst` (row-major, `m x n`): written whole, or added to what `dst` holds when
/// `add` (the bias rows of a fused linear).
///
/// # Safety
/// `a`, `b` must address `m x k` and `k x n` elements, `dst` `m * n` (initialised when `add`).
pub(crate) unsafe fn gemm(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    a: Mat,
    b: Mat,
    parallel: bool,
    add: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            std::ptr::write_bytes(dst, 0, m * n);
        }
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    match precision {
        Precision::Highest => fp32(m, n, k, dst, a, b, threads, add),
        Precision::Bf16 if bf16_kernel_in_use() => {
            bf16_gemm::gemm((m, n, k), dst, a, b, parallel, add, KernelKind::Avx512Bf16)
        }
        Precision::Bf16 => {
            let ((_ar, a), (_br, b)) = (rounded(a, m, k, parallel), rounded(b, k, n, parallel));
            fp32(m, n, k, dst, a, b, threads, add)
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn fp32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: Mat,
    b: Mat,
    threads: usize,
    add: bool,
) {
    if let Some(blas) =
        crate::ops::blas::active().filter(|b| !gemm_crate_is_faster(b, (m, n, k), a, threads))
    {
        if blas.sgemm((m, n, k), dst, a, b, add, threads) {
            return;
        }
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // dst = alpha dst + beta a b; alpha is ignored unless dst is read.
    gemm::gemm(
        m, n, k, dst, 1, n as isize, add, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0, 1.0, false,
        false, false, par,
    )
}

/// Products where the `gemm` crate measured faster than BLIS 0.9 here (per-shape timing on GPT-2's
/// shapes, hot caches, best of 25): single-threaded products over attention's head size (per
/// head `q k^T`, k = 64, and `p v`, n = 64: 58-97 GFLOP/s against 34-84), and weight gradients
/// `G^T x` whose transposed `G` has at most 256 rows (BLIS's small-matrix path: 69-107 against
/// 106-131 on two threads). Against a BLAS with AVX-512 kernels (the `gemm` crate runs AVX2 ones)
/// none is: GPT-2 124M at s2048 trains 4-6% faster with every product on BLIS's skx kernels
/// (BENCHMARKS.md, session 21).
fn gemm_crate_is_faster(
    blas: &crate::ops::blas::Blas,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    threads: usize,
) -> bool {
    !blas.avx512
        && ((threads <= 1 && k.min(n) <= 64) || (threads > 1 && a.rs == 1 && a.cs != 1 && m <= 256))
}

/// `x` (`rows x cols`) with every element rounded to bf16, and the matrix reading it: where `x`
/// is one dense block (row- or column-major, as activations and weights are) a straight pass
/// over its memory that keeps its strides (vectorised; attention's tiles and the LM head's blocks
/// call this per product), else a row-major copy read element by element.
unsafe fn rounded(x: Mat, rows: usize, cols: usize, parallel: bool) -> (Vec<f32>, Mat) {
    let len = rows * cols;
    let dense = (x.cs == 1 && (rows == 1 || x.rs == cols as isize))
        || (x.rs == 1 && (cols == 1 || x.cs == rows as isize));
    if dense {
        // SAFETY: a dense operand spans exactly `len` elements from its pointer.
        let src = unsafe { std::slice::from_raw_parts(x.ptr, len) };
        let mut out = vec![0f32; len];
        let round = |(d, s): (&mut [f32], &[f32])| {
            for (d, s) in d.iter_mut().zip(s) {
                *d = bf16_gemm::round_bf16(*s);
            }
        };
        if parallel && len >= 1 << 16 {
            out.par_chunks_mut(1 << 14)
                .zip(src.par_chunks(1 << 14))
                .for_each(round);
        } else {
            round((&mut out, src));
        }
        let m = Mat {
            ptr: out.as_ptr(),
            ..x
        };
        return (out, m);
    }
    let mut out = vec![0f32; len];
    let row = |(i, dst): (usize, &mut [f32])| {
        for (j, d) in dst.iter_mut().enumerate() {
            // SAFETY: i < rows, j < cols.
            *d = bf16_gemm::round_bf16(unsafe { x.at(i, j) });
        }
    };
    if parallel {
        out.par_chunks_mut(cols).enumerate().for_each(row);
    } else {
        out.chunks_mut(cols).enumerate().for_each(row);
    }
    let m = Mat {
        ptr: out.as_ptr(),
        rs: cols as isize,
        cs: 1,
    };
    (out, m)
}

/// The batched product of `a` and `b` (plus `bias` on every output row when given).
fn forward(
    precision: Precision,
    (a, l1): (&[f32], &Layout),
    (b, l2): (&[f32], &Layout),
    bias: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (ad, bd) = (l1.dims(), l2.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        bail!("matmul: shapes {ad:?} and {bd:?} do not multiply")
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    if bias.is_some_and(|b| b.len() != n) {
        bail!(
            "linear: bias of {} for {n} outputs",
            bias.map_or(0, |b| b.len())
        )
    }
    let (ao, bo) = (batch_offsets(l1), batch_offsets(l2));
    let (sa, sb) = (l1.stride(), l2.stride());
    let mat = |v: &[f32], o: usize, s: &[usize]| Mat {
        ptr: v[o..].as_ptr(),
        rs: s[r - 2] as isize,
        cs: s[r - 1] as isize,
    };
    let (batch, size) = (ao.len(), m * n);
    let mut dst: Vec<f32> = Vec::with_capacity(batch * size);
    if let Some(bias) = bias {
        for _ in 0..batch * m {
            dst.extend_from_slice(bias);
        }
    }
    let out = OutPtr(dst.as_mut_ptr());
    let one = |i: usize, parallel: bool| {
        // SAFETY: the offsets come from the layouts of storages that hold them; item i writes
        // its own m x n block of the batch * m * n capacity (initialised when there is a bias).
        unsafe {
            gemm(
                precision,
                (m, n, k),
                out.get().add(i * size),
                mat(a, ao[i], sa),
                mat(b, bo[i], sb),
                parallel,
                bias.is_some(),
            )
        }
    };
    // Items small enough to go one per thread do (attention's heads); big ones use every thread.
    if batch > 1 && m * n * k <= 1 << 24 {
        (0..batch).into_par_iter().for_each(|i| one(i, false));
    } else {
        (0..batch).for_each(|i| one(i, true));
    }
    // SAFETY: every product wrote (or added to) its whole block.
    unsafe { dst.set_len(batch * size) };
    let mut shape = ad[..r - 2].to_vec();
    shape.extend([m, n]);
    Ok((CpuStorage::F32(dst), Shape::from(shape)))
}

fn f32s<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("matmul: {what} must be f32"),
    }
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "deepscale-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            f32s(s1, "the left operand")?,
            f32s(s2, "the right operand")?,
        );
        forward(self.precision, (a, l1), (b, l2), None)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = |x: &Tensor, y: &Tensor| {
            x.apply_op2_no_bwd(
                y,
                &MatMul {
                    precision: self.precision,
                },
            )
        };
        Ok((Some(op(grad, &b.t()?)?), Some(op(&a.t()?, grad)?)))
    }
}

/// `x + bias` over the last dimension (`x [.., n]`, `bias [n]`); backward passes the gradient
/// through and sums its rows for the bias. candle's `broadcast_add` reduces that gradient with a
/// strided sum over the broadcast dimensions: 7 ms per row-parallel linear at GPT-2 124M, 3% of a
/// step over its 24. CPU f32; elsewhere candle's op.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let fused = super::fused()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && bias.rank() == 1
        && x.rank() >= 1
        && x.dim(candle_core::D::Minus1)? == bias.dim(0)?;
    if !fused {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "deepscale-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::ops::fast_math::contiguous_f32(s1, l1, "add_bias", "the input")?;
        let b = crate::ops::fast_math::contiguous_f32(s2, l2, "add_bias", "the bias")?;
        let n = b.len().max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * 64)
            .zip(x.par_chunks(n * 64))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_mut(n).zip(xb.chunks(n)) {
                    for ((y, x), b) in yr.iter_mut().zip(xr).zip(b) {
                        *y = x + b;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(sum_rows(grad, b.elem_count())?)))
    }
}

/// Sum over the rows of `x` reshaped to `[rows, n]` (the bias gradient of a linear): candle's
/// reduction over a leading dimension runs on one thread with strided reads (about 3% of a
/// GPT-2 step); here column blocks run in parallel, each adding its rows in order (so the result
/// does not depend on the thread count).
pub fn sum_rows(x: &Tensor, n: usize) -> Result<Tensor> {
    let x = x.reshape(((), n))?;
    if !(super::fused() && x.device().is_cpu() && x.dtype() == DType::F32) {
        return x.sum(0);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let v = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => bail!("sum_rows: expected contiguous f32 on the CPU"),
    };
    const BLOCK: usize = 64;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(i, acc)| {
        let (c0, w) = (i * BLOCK, acc.len());
        crate::ops::fast_math::vectorized(
            #[inline(always)]
            || {
                for row in v.chunks_exact(n) {
                    for (a, &x) in acc.iter_mut().zip(&row[c0..c0 + w]) {
                        *a += x;
                    }
                }
            },
        )
    });
    drop(storage);
    Tensor::from_vec(out, n, x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d <= tol * s.max(1.0), "max difference {d} (scale {s})");
        Ok(())
    }

    /// Values and gradients against candle's matmul: 2-D, transposed views, a 4-D batch with
    /// non-contiguous operands (attention's shapes), odd sizes.
    #[test]
    fn values_and_gradients_equal_candles_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let cases: Vec<(Vec<usize>, Vec<usize>, bool, bool)> = vec![
            (vec![37, 19], vec![19, 53], false, false),
            (vec![37, 19], vec![53, 19], false, true),
            (vec![19, 37], vec![19, 53], true, false),
            (vec![2, 3, 17, 8], vec![2, 3, 17, 8], false, true),
            (vec![4, 9, 5], vec![4, 5, 300], false, false),
            (vec![1, 1], vec![1, 1], false, false),
        ];
        for (sa, sb, ta, tb) in cases {
            let a = Var::randn(0f32, 1., sa.as_slice(), &dev)?;
            let b = Var::randn(0f32, 1., sb.as_slice(), &dev)?;
            let (x, y) = (
                if ta { a.t()? } else { a.as_tensor().clone() },
                if tb { b.t()? } else { b.as_tensor().clone() },
            );
            let w = Tensor::randn(0f32, 1., x.matmul(&y)?.shape(), &dev)?;
            let ours = matmul(&x, &y)?;
            let theirs = x.matmul(&y)?;
            close(&ours, &theirs, 1e-5)?;
            let g1 = (ours * &w)?.sum_all()?.backward()?;
            let g2 = (theirs * &w)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                close(g1.get(v).expect("grad"), g2.get(v).expect("grad"), 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn add_bias_equals_broadcast_add_both_ways() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![3usize, 5], vec![2, 70, 9], vec![1, 1]] {
            let n = *dims.last().unwrap_or(&1);
            let x = Var::randn(0f32, 1., dims.as_slice(), &dev)?;
            let b = Var::randn(0f32, 1., n, &dev)?;
            let w = Tensor::randn(0f32, 1., dims.as_slice(), &dev)?;
            let fused = add_bias(x.as_tensor(), b.as_tensor())?;
            let reference = x.as_tensor().broadcast_add(b.as_tensor())?;
            close(&fused, &reference, 0.0)?;
            let g = fused.mul(&w)?.sum_all()?.backward()?;
            let r = reference.mul(&w)?.sum_all()?.backward()?;
            for v in [&x, &b] {
                let (a, e) = (g.get(v.as_tensor()), r.get(v.as_tensor()));
                close(a.expect("fused grad"), e.expect("reference grad"), 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn sum_rows_equals_candles_sum() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n) in [(1, 1), (37, 200), (5, 64), (300, 129)] {
            let x = Tensor::randn(0f32, 1., (rows, n), &dev)?;
            close(&sum_rows(&x, n)?, &x.sum(0)?, 1e-6)?;
            let x3 = x.reshape((1, rows, n))?;
            close(&sum_rows(&x3, n)?, &x.sum(0)?, 1e-6)?;
        }
        Ok(())
    }

    /// The linear op equals `matmul(x, w.t())` + `broadcast_add`: values and all gradients (the
    /// weight's contiguous), with and without bias, in fp32 and bf16 precision, 2-D and batched.
    #[test]
    fn linear_equals_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for precision in [Precision::Highest, Precision::Bf16] {
            for (sa, sb) in [(vec![37, 19], vec![53, 19]), (vec![3, 5, 8], vec![3, 7, 8])] {
                let a = Var::randn(0f32, 1., sa.as_slice(), &dev)?;
                let w = Var::randn(0f32, 1., sb.as_slice(), &dev)?;
                let n = sb[sb.len() - 2];
                let bias = Var::randn(0f32, 1., n, &dev)?;
                let op = |x: &Tensor, y: &Tensor| x.apply_op2(y, MatMul { precision });
                for with_bias in [true, false] {
                    let (fused, composed) = if with_bias {
                        (
                            a.as_tensor()
                                .apply_op3(&w, bias.as_tensor(), Linear { precision })?,
                            op(&a, &w.t()?)?.broadcast_add(&bias)?,
                        )
                    } else {
                        (
                            a.as_tensor().apply_op2(&w, Linear { precision })?,
                            op(&a, &w.t()?)?,
                        )
                    };
                    close(&fused, &composed, 1e-5)?;
                    let g = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
                    let g1 = (fused * &g)?.sum_all()?.backward()?;
                    let g2 = (composed * &g)?.sum_all()?.backward()?;
                    let vars = if with_bias {
                        vec![&a, &w, &bias]
                    } else {
                        vec![&a, &w]
                    };
                    for v in vars {
                        close(g1.get(v).expect("grad"), g2.get(v).expect("grad"), 1e-5)?;
                    }
                    // The op hands the weight's gradient back in the weight's order.
                    let (_, gw, _) = Linear { precision }.grads(&a, &w, &g)?;
                    assert!(gw.is_contiguous() && gw.dims() == w.dims());
                }
            }
        }
        Ok(())
    }

    /// Where the AVX512-BF16 kernel is not in use (no such CPU, or an f32 BLAS with AVX-512
    /// kernels, which are faster), a bf16 product is the f32 product of the rounded operands bit
    /// for bit: the same GEMM ran.
    #[test]
    fn bf16_products_take_the_f32_gemm_where_the_kernel_is_not_in_use() -> Result<()> {
        let avx512_blas = crate::ops::blas::active().is_some_and(|b| b.avx512);
        if std::env::var_os("DEEPSCALE_BF16_KERNEL").is_none() {
            assert_eq!(bf16_kernel_in_use(), bf16_gemm::available() && !avx512_blas);
        }
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (64, 300), &dev)?;
        let b = Tensor::randn(0f32, 1., (300, 96), &dev)?;
        let r = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let bf16 = MatMul {
            precision: Precision::Bf16,
        };
        let fp32 = MatMul {
            precision: Precision::Highest,
        };
        let y = a.apply_op2(&b, bf16)?.flatten_all()?.to_vec1::<f32>()?;
        let want = r(&a)?
            .apply_op2(&r(&b)?, fp32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let same = y.iter().zip(&want).all(|(x, w)| x.to_bits() == w.to_bits());
        assert_eq!(
            same,
            !bf16_kernel_in_use(),
            "kernel in use: {}",
            bf16_kernel_in_use()
        );
        Ok(())
    }

    /// bf16 precision gives the products of the bf16-rounded operands, forward and backward, on
    /// whichever path this CPU takes.
    #[test]
    fn bf16_precision_rounds_the_operands() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 1., (33, 70), &dev)?;
        let b = Var::randn(0f32, 1., (70, 41), &dev)?;
        let w = Tensor::randn(0f32, 1., (33, 41), &dev)?;
        let op = MatMul {
            precision: Precision::Bf16,
        };
        let y = a.as_tensor().apply_op2(b.as_tensor(), op)?;
        let r = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let want = r(&a)?.matmul(&r(&b)?)?;
        close(&y, &want, 1e-5)?;
        // Not the fp32 product: the rounding is real.
        let exact = a.matmul(&b)?;
        let d = (&y - &exact)?.abs()?.flatten_all()?.max(0)?;
        assert!(d.to_scalar::<f32>()? > 1e-4);
        let g = (y * &w)?.sum_all()?.backward()?;
        close(
            g.get(&a).expect("grad"),
            &r(&w)?.matmul(&r(&b)?.t()?)?,
            1e-5,
        )?;
        close(
            g.get(&b).expect("grad"),
            &r(&a)?.t()?.matmul(&r(&w)?)?,
            1e-5,
        )?;
        Ok(())
    }

    /// The emulated bf16 path's operand copies: dense blocks (row- and column-major, one row)
    /// keep their strides, a strided window (a head's columns of a wider matrix) is copied row by
    /// row; either way element (i, j) reads as the source's, rounded.
    #[test]
    fn rounded_operands_read_as_the_rounded_source() {
        let src: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin() * 3.3).collect();
        let view = |offset: usize, rs: isize, cs: isize| Mat {
            ptr: src.as_ptr().wrapping_add(offset),
            rs,
            cs,
        };
        let views = [
            (view(0, 12, 1), 8, 12),
            (view(0, 1, 8), 8, 12),
            (view(0, 99, 1), 1, 30),
            (view(2, 12, 1), 7, 5),
            (view(1, 2, 24), 3, 4),
        ];
        for (x, rows, cols) in views {
            for parallel in [false, true] {
                // SAFETY: every view lies inside `src`.
                let (_buf, r) = unsafe { rounded(x, rows, cols, parallel) };
                let mut moved = 0;
                for i in 0..rows {
                    for j in 0..cols {
                        let (got, want) = unsafe { (r.at(i, j), x.at(i, j)) };
                        assert_eq!(got, bf16_gemm::round_bf16(want), "{x:?} ({i}, {j})");
                        moved += usize::from(got != want);
                    }
                }
                assert!(
                    moved > rows * cols / 2,
                    "{x:?}: rounding changed {moved} values"
                );
            }
        }
    }

    #[test]
    fn other_devices_and_dtypes_fall_back_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (4, 6), &dev)?.to_dtype(DType::F64)?;
        let b = Tensor::randn(0f32, 1., (6, 3), &dev)?.to_dtype(DType::F64)?;
        assert_eq!(matmul(&a, &b)?.dims(), &[4, 3]);
        // Broadcast batches are candle's too.
        let a = Tensor::randn(0f32, 1., (2, 4, 6), &dev)?;
        let b = Tensor::randn(0f32, 1., (6, 3), &dev)?;
        assert!(matmul(&a, &b).is_err() == a.matmul(&b).is_err());
        Ok(())
    }
}

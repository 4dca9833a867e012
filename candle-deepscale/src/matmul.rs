//! The matrix products of a training step on the CPU: `torch.matmul` under
//! `torch.set_float32_matmul_precision`.
//!
//! candle's CPU matmul zero-fills every output before the GEMM overwrites it (a memset over
//! logits-sized buffers) and runs a batched product as one two-thread GEMM per batch item, which
//! halves attention's speed. This op writes its output once, reads transposed operands through their
//! strides (the backward's `G B^T` and `A^T G` copy nothing) and spreads a batch over the threads.
//!
//! [`Precision::Bf16`] rounds the operands to bfloat16 and accumulates in fp32 (PyTorch's bf16
//! autocast numerics; parameters, activations and gradients stay fp32, so the fp32 parameters are
//! the master weights): `vdpbf16ps` where the CPU has AVX512-BF16 ([`crate::bf16_gemm`]), otherwise
//! the rounded operands go through the fp32 GEMM — the same numbers, without the speed-up.
use crate::bf16_gemm::{self, KernelKind, Mat};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The arithmetic of fp32 matrix products (PyTorch's `float32_matmul_precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 operands and accumulation ("highest").
    Highest,
    /// bf16 operands, fp32 accumulation ("medium"; DeepSpeed's `bf16.enabled` on the CPU).
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);
static ENABLED: AtomicBool = AtomicBool::new(true);

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

pub fn float32_matmul_precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => Precision::Highest,
        _ => Precision::Bf16,
    }
}

/// Off: candle's own matmul (`DEEPSCALE_FUSED=0`, and the benchmark's stock-candle comparison).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// `a @ b` over the last two dimensions, with equal leading (batch) dimensions. CPU fp32 products
/// run this module's op (with its backward); anything else is candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let r = a.rank();
    let ours = ENABLED.load(Ordering::Relaxed)
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && r >= 2
        && b.rank() == r
        && a.dims()[..r - 2] == b.dims()[..r - 2]
        && a.dims()[r - 1] == b.dims()[r - 2];
    if !ours {
        return a.matmul(b);
    }
    a.apply_op2(
        b,
        MatMul {
            precision: float32_matmul_precision(),
        },
    )
}

struct MatMul {
    precision: Precision,
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

/// One product into `dst` (row-major, `m x n`), written whole.
///
/// # Safety
/// `a`, `b` must address `m x k` and `k x n` elements, `dst` `m * n`.
unsafe fn gemm(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    a: Mat,
    b: Mat,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        std::ptr::write_bytes(dst, 0, m * n);
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    match precision {
        Precision::Highest => fp32(m, n, k, dst, a, b, par),
        Precision::Bf16 if bf16_gemm::available() => {
            bf16_gemm::gemm((m, n, k), dst, a, b, parallel, KernelKind::Avx512Bf16)
        }
        Precision::Bf16 => {
            let (ar, br) = (rounded(a, m, k, parallel), rounded(b, k, n, parallel));
            let a = Mat {
                ptr: ar.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            let b = Mat {
                ptr: br.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            fp32(m, n, k, dst, a, b, par)
        }
    }
}

unsafe fn fp32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: Mat,
    b: Mat,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m, n, k, dst, 1, n as isize, false, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 0.0, 1.0, false,
        false, false, par,
    )
}

/// A row-major copy of `x` (`rows x cols`) rounded to bf16 values.
unsafe fn rounded(x: Mat, rows: usize, cols: usize, parallel: bool) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
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
    out
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so closures capture the Send wrapper rather than its raw-pointer field.
    fn get(&self) -> *mut f32 {
        self.0
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
        let (a, b) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (a, b),
            _ => bail!("matmul: f32 operands expected"),
        };
        let (ad, bd) = (l1.dims(), l2.dims());
        let r = ad.len();
        if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
            bail!("matmul: shapes {ad:?} and {bd:?} do not multiply")
        }
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let (ao, bo) = (batch_offsets(l1), batch_offsets(l2));
        let (sa, sb) = (l1.stride(), l2.stride());
        let mat = |v: &[f32], o: usize, s: &[usize]| Mat {
            ptr: v[o..].as_ptr(),
            rs: s[r - 2] as isize,
            cs: s[r - 1] as isize,
        };
        let (batch, size) = (ao.len(), m * n);
        let mut dst: Vec<f32> = Vec::with_capacity(batch * size);
        let out = OutPtr(dst.as_mut_ptr());
        let one = |i: usize, parallel: bool| {
            // SAFETY: the offsets come from the layouts of storages that hold them; item i writes
            // its own m x n block of the batch * m * n capacity.
            unsafe {
                gemm(
                    self.precision,
                    (m, n, k),
                    out.get().add(i * size),
                    mat(a, ao[i], sa),
                    mat(b, bo[i], sb),
                    parallel,
                )
            }
        };
        // Items small enough to go one per thread do (attention's heads); big ones use every thread.
        if batch > 1 && m * n * k <= 1 << 24 {
            (0..batch).into_par_iter().for_each(|i| one(i, false));
        } else {
            (0..batch).for_each(|i| one(i, true));
        }
        // SAFETY: every product wrote its whole block.
        unsafe { dst.set_len(batch * size) };
        let mut shape = ad[..r - 2].to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
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

//! Branch-free `exp` and `tanh` for the fused CPU kernels: plain f32 arithmetic that the compiler
//! vectorises (AVX2 + FMA inside the kernels' `target_feature` functions), where libm's scalar
//! `expf`/`tanhf` cost a call per element. Cephes' polynomial for e^r on [-ln2/2, ln2/2]; relative
//! error about 2e-7 over the range the kernels use.

/// e^x, clamped to [-87, 88] (so it never overflows or turns denormal).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_66)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: n + 127 is an integer in [1, 254] after the clamp; adding 2^23 puts it in the low
    // mantissa bits, which shift into the exponent field. (`n as i32` is a saturating cast that
    // the compiler lowers to scalar code per lane; this stays in vector registers.)
    let biased = (n + (127.0 + 8_388_608.0)).to_bits();
    e * f32::from_bits(biased << 23)
}

/// tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits at both ends, absolute error about 1e-7.
#[inline(always)]
pub fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// Lanes of the reductions below: independent partial results the compiler keeps in vector
/// registers. A plain `iter().sum()` or `fold(max)` over f32 stays scalar (the compiler may not
/// reorder float additions), which made row reductions the slowest part of some kernels.
const LANES: usize = 16;

/// Largest element (-inf for an empty slice; NaNs are skipped).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    rest.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sum of `f(v)` over `x`, in lanes.
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    rest.iter().map(|&v| f(v)).sum::<f32>() + acc.iter().sum::<f32>()
}

/// Sum of `f(a, b)` over pairs of `a` and `b` (as long as the shorter), in lanes.
#[inline(always)]
pub fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum::<f32>() + acc.iter().sum::<f32>()
}

/// Writes `f(v)` for each `v` of `x` into `y` and returns their sum, in lanes.
#[inline(always)]
pub fn map_sum(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let n = y.len().min(x.len());
    let (y, x) = (&mut y[..n], &x[..n]);
    let mut acc = [0f32; LANES];
    let mut cy = y.chunks_exact_mut(LANES);
    let cx = x.chunks_exact(LANES);
    let rx = cx.remainder();
    for (o, i) in (&mut cy).zip(cx) {
        for j in 0..LANES {
            o[j] = f(i[j]);
            acc[j] += o[j];
        }
    }
    let mut s = 0f32;
    for (o, &i) in cy.into_remainder().iter_mut().zip(rx) {
        *o = f(i);
        s += *o;
    }
    s + acc.iter().sum::<f32>()
}

/// Sum of `x` in f64 (LayerNorm's statistics), in lanes.
#[inline(always)]
pub fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..L {
            acc[j] += f(c[j] as f64);
        }
    }
    rest.iter().map(|&v| f(v as f64)).sum::<f64>() + acc.iter().sum::<f64>()
}

/// Sum of squares of `x` in f64 (the gradient norm), over the cores in 64K-element chunks, each
/// in vectorised lanes: the scalar f64 fold it replaces could not be vectorised (a sequential
/// float sum) and took 120 ms per GPT-2 124M step, for 0.5 GB that memory delivers in 12.
pub fn sum_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    // Partials collected and summed in order: the same bits however rayon splits the work.
    let partials: Vec<f64> = x
        .par_chunks(1 << 16)
        .map(|c| {
            vectorized(
                #[inline(always)]
                || sum_f64(c, |v| v * v),
            )
        })
        .collect();
    partials.iter().sum()
}

/// Whether the CPU has AVX2 and FMA (checked once): [`vectorized`] then compiles its closure for
/// them (where it has no AVX-512).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX-512 F/DQ/BW/VL besides AVX2 and FMA (checked once), unless
/// `DEEPSCALE_AVX512=off`: [`vectorized`] then compiles its closure for 512-bit vectors.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            !std::env::var("DEEPSCALE_AVX512").is_ok_and(|v| v == "off")
                && has_avx2_fma()
                && cpu_has_avx512()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX-512 F, DQ, BW and VL (what [`vectorized`]'s AVX-512 copy and BLIS's
/// skx kernels use), whatever `DEEPSCALE_AVX512` says.
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `f` compiled for AVX2 + FMA. Safety: the CPU has them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` compiled for AVX-512 (the lanes below fill one 512-bit register). Safety: the CPU has
/// [`has_avx512`]'s features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for AVX-512 or AVX2 + FMA when the CPU has them, as is otherwise — the same
/// results bit for bit (the kernels' arithmetic is per lane and in a fixed order, and Rust never
/// fuses a multiply and an add on its own). The closure must be marked `#[inline(always)]`
/// (`vectorized(#[inline(always)] || ..)`): only when it is inlined into the `target_feature`
/// function is its code compiled with those features (a large closure left to the inliner stays
/// a separate baseline-x86-64 function, calling libm for `floor`).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has the features (checked at run time).
            return unsafe { on_avx512(f) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { on_avx2(f) };
        }
    }
    f()
}

/// `f` run as each copy [`vectorized`] can choose on this CPU (baseline, then AVX2 + FMA and
/// AVX-512 where the CPU has them), for tests that the copies give the same bits. Mark the
/// closure `#[inline(always)]`, as for [`vectorized`].
#[cfg(test)]
pub(crate) fn on_each_copy<R>(f: impl Fn() -> R) -> Vec<R> {
    #[allow(unused_mut)]
    let mut out = vec![f()];
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has the features (checked at run time).
            out.push(unsafe { on_avx2(&f) });
        }
        if has_avx512() {
            // SAFETY: as above.
            out.push(unsafe { on_avx512(&f) });
        }
    }
    out
}

/// Test rows for [`on_each_copy`]: an awkward length (1003: every copy's tail), values from -60
/// to 60, and a second row of gradients.
#[cfg(test)]
pub(crate) fn bits_rows() -> (Vec<f32>, Vec<f32>) {
    let x = (0..1003).map(|i| (i as f32 * 0.37).sin() * 60.0).collect();
    let g = (0..1003).map(|i| (i as f32 * 0.11).cos()).collect();
    (x, g)
}

/// The bit patterns of `v`, to compare results exactly.
#[cfg(test)]
pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The f32 elements a contiguous CPU storage holds under `l`, or an error naming `op` and `what`.
pub fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be contiguous f32"),
    }
}

/// `f` on the f32 elements of the CPU tensors `ts`, read where they are (no copies; a backward's
/// saved inputs are megabytes each), or an error naming `op` and the tensor (`what`, in order)
/// that is not contiguous f32 on the CPU.
pub fn with_f32_slices<R>(
    ts: &[&candle_core::Tensor],
    op: &str,
    what: &[&str],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (i, (s, l)) in guards.iter().enumerate() {
        let name = what.get(i).copied().unwrap_or("an operand");
        let candle_core::Storage::Cpu(c) = &**s else {
            candle_core::bail!("{op}: {name} must be on the CPU")
        };
        slices.push(contiguous_f32(c, l, op, name)?);
    }
    Ok(f(&slices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_equal_the_plain_ones() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32) / 3.0).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "max of {n}");
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
            let e: f64 = x.iter().map(|&v| (v as f64 - 3.0).exp()).sum();
            assert!(close(sum_map(&x, |v| exp(v - 3.0)), e), "sum_map of {n}");
            let d: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!(close(sum_map2(&x, &y, |a, b| a * b), d), "sum_map2 of {n}");
            let mut out = vec![0f32; n];
            let s = map_sum(&mut out, &x, |v| v * 2.0);
            assert!(close(s, 2.0 * x.iter().map(|&v| v as f64).sum::<f64>()));
            assert!(out.iter().zip(&x).all(|(o, v)| *o == v * 2.0));
            let q: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((sum_f64(&x, |v| v * v) - q).abs() <= 1e-9 * (1.0 + q));
        }
    }

    #[test]
    fn sum_squares_spans_chunks_and_keeps_overflow() {
        // Several 64K chunks plus a ragged end, against the f64 fold.
        let x: Vec<f32> = (0..200_003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((sum_squares(&x) - q).abs() <= 1e-9 * q);
        // Squares beyond f32's range stay finite (f64), while inf and NaN reach the sum (the
        // loss scaler's overflow check relies on it).
        assert_eq!(sum_squares(&[2f32.powi(100), 0.0]), 2f64.powi(200));
        assert!(sum_squares(&[1.0, f32::INFINITY]).is_infinite());
        assert!(sum_squares(&[f32::NAN, 1.0]).is_nan());
        assert_eq!(sum_squares(&[]), 0.0);
    }

    /// Every copy of a kernel [`vectorized`] can choose here (baseline, AVX2, AVX-512) gives the
    /// same bits.
    #[test]
    fn every_vector_copy_gives_the_same_bits() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let runs = on_each_copy(
            #[inline(always)]
            || {
                let mut y = vec![0f32; x.len()];
                let s = map_sum(&mut y, &x, |v| exp(v - 30.0));
                let t = sum_map2(&y, &x, |a, b| tanh(a * b));
                let scalars = [s.to_bits(), t.to_bits(), max(&x).to_bits()];
                (scalars, sum_f64(&x, |v| v * v).to_bits(), bits(&y))
            },
        );
        assert!(runs.iter().all(|r| *r == runs[0]), "{} copies", runs.len());
    }

    #[test]
    fn exp_and_tanh_are_accurate() {
        // Up to both clamp ends (2^n's exponent field from 2 to 254).
        for i in -870..=880 {
            let x = i as f32 * 0.1;
            let rel = (exp(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 5e-7, "exp({x}): {rel}");
            assert!(
                (tanh(x) as f64 - (x as f64).tanh()).abs() < 2e-7,
                "tanh({x})"
            );
        }
        // Beyond the clamp: finite, positive, no wrap-around of the exponent bits.
        for x in [-1e4f32, -88.5, 88.5, 1e4] {
            let e = exp(x);
            assert!(e.is_finite() && e > 0.0, "exp({x}) = {e}");
        }
        assert!(exp(-1e4) < 1e-37 && exp(1e4) > 1e38);
    }
}

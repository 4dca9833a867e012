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
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits at both ends, absolute error about 1e-7.
#[inline(always)]
pub fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// Whether the CPU has AVX2 and FMA (checked once): the fused kernels then run their
/// `target_feature` copies.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_are_accurate() {
        for i in -800..=800 {
            let x = i as f32 * 0.1;
            let rel = (exp(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 5e-7, "exp({x}): {rel}");
            assert!(
                (tanh(x) as f64 - (x as f64).tanh()).abs() < 2e-7,
                "tanh({x})"
            );
        }
    }
}

//! Counter-based random numbers: value `i` of a stream is a pure function of `(key, i)`.
//!
//! Any slice of a weight's initialisation (a tensor-parallel shard, a ZeRO-3 partition) can therefore
//! be generated on its own and is identical to the same slice of the full initialisation, and dropout
//! masks are reproducible from the seed whatever the layout.
use rayon::prelude::*;

/// SplitMix64 finaliser: a bijective, well-mixing 64-bit hash.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a stream key from a seed and a name (e.g. a parameter's logical name).
pub fn stream_key(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, then mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h ^ mix64(seed))
}

/// Combines a key with further integers (step, micro-batch, rank ...).
pub fn sub_key(key: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(key, |k, p| mix64(k ^ mix64(*p)))
}

/// Uniform in (0, 1], 53 bits.
#[inline]
pub fn uniform(key: u64, i: u64) -> f64 {
    let bits = mix64(key ^ mix64(i)) >> 11;
    (bits as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal number `i` of stream `key` (Box-Muller over two counter draws).
#[inline]
pub fn normal(key: u64, i: u64) -> f64 {
    let u1 = uniform(key, 2 * i);
    let u2 = uniform(key, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Fills `out` with `std * normal(key, offset + j)`, in parallel.
pub fn fill_normal(out: &mut [f32], key: u64, offset: u64, std: f64) {
    out.par_chunks_mut(1 << 14)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = offset + (c as u64) * (1 << 14);
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = (std * normal(key, base + j as u64)) as f32;
            }
        });
}

/// Fills `out` with a dropout keep-mask scaled by `1/(1-p)` (0 where dropped), in parallel.
/// Uniform values in `[low, high)` for stream positions `offset..offset + out.len()`.
pub fn fill_uniform(out: &mut [f32], key: u64, offset: u64, low: f64, high: f64) {
    out.par_chunks_mut(1 << 14)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = offset + (c as u64) * (1 << 14);
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = (low + (high - low) * uniform(key, base + j as u64)) as f32;
            }
        });
}

pub fn fill_dropout_mask(out: &mut [f32], key: u64, p: f64) {
    let scale = (1.0 / (1.0 - p)) as f32;
    out.par_chunks_mut(1 << 14)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c as u64) * (1 << 14);
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = if uniform(key, base + j as u64) > p {
                    scale
                } else {
                    0.0
                };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_equal_slice_of_full_stream() {
        let key = stream_key(1234, "layers.0.attention.dense.weight");
        let mut full = vec![0f32; 50_000];
        fill_normal(&mut full, key, 0, 0.02);
        let mut part = vec![0f32; 7_000];
        fill_normal(&mut part, key, 20_001, 0.02);
        assert_eq!(&full[20_001..27_001], &part[..]);
    }

    #[test]
    fn normal_moments() {
        let key = stream_key(7, "x");
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(key, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn different_names_give_different_streams() {
        assert_ne!(stream_key(1, "a"), stream_key(1, "b"));
        assert_ne!(stream_key(1, "a"), stream_key(2, "a"));
    }
}

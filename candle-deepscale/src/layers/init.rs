//! Deterministic initialisation of logical parameters.
//!
//! Values come from the counter-based generator keyed by the parameter's logical name, so a rank
//! generates exactly its block, identical to the same block of the full initialisation, without
//! materialising the rest.
use crate::layers::parameter::{Init, ParamMeta, ParamSource, Shard};
use crate::ops::random;
use candle_core::DType;
use candle_core::{Device, Result, Tensor};

/// The whole logical tensor of `meta` initialised from `seed` (f32, CPU).
pub fn full_init(meta: &ParamMeta, init: Init, seed: u64) -> Result<Tensor> {
    shard_init(meta, None, init, seed)
}

/// Block `shard` of the logical tensor (the whole tensor when `None`), f32 on the CPU.
pub fn shard_init(meta: &ParamMeta, shard: Option<Shard>, init: Init, seed: u64) -> Result<Tensor> {
    let shape = &meta.shape;
    let (dim, start, len) = match shard {
        Some(s) => {
            let (start, len) = s.range(shape[s.dim]);
            (s.dim, start, len)
        }
        None => (0, 0, shape.first().copied().unwrap_or(1)),
    };
    let mut local = shape.clone();
    if !local.is_empty() {
        local[dim] = len;
    }
    let n: usize = local.iter().product();
    let data = match init.constant() {
        Some(c) => vec![c as f32; n],
        None => {
            let key = random::stream_key(seed, &meta.name);
            let mut v = vec![0f32; n];
            if shape.is_empty() {
                fill(&mut v, init, key, 0);
            } else {
                // Element i of the logical tensor draws value i of the stream: copy, for every
                // index of the dims before `dim`, the contiguous run [start, start + len) x inner.
                let inner: usize = shape[dim + 1..].iter().product();
                let full_d = shape[dim];
                for (o, run) in v.chunks_mut(len * inner).enumerate() {
                    let offset = ((o * full_d + start) * inner) as u64;
                    fill(run, init, key, offset);
                }
            }
            v
        }
    };
    Tensor::from_vec(data, local, &Device::Cpu)
}

/// Elements `start..start + len` of the flattened block `shard` (the whole tensor when `None`),
/// generated without the rest: ZeRO-3 builds one data-parallel rank's piece of a parameter.
pub fn flat_range_init(
    meta: &ParamMeta,
    shard: Option<Shard>,
    init: Init,
    seed: u64,
    start: usize,
    len: usize,
) -> Vec<f32> {
    if let Some(c) = init.constant() {
        return vec![c as f32; len];
    }
    let key = random::stream_key(seed, &meta.name);
    let mut v = vec![0f32; len];
    let shape = &meta.shape;
    let Some(s) = shard.filter(|_| !shape.is_empty()) else {
        fill(&mut v, init, key, start as u64);
        return v;
    };
    // The block is, for each index of the dims before `s.dim`, a contiguous run of
    // `blen * inner` logical elements starting at `bstart * inner`.
    let (bstart, blen) = s.range(shape[s.dim]);
    let inner: usize = shape[s.dim + 1..].iter().product();
    let (run, full_run) = (blen * inner, shape[s.dim] * inner);
    let mut at = 0;
    while at < len {
        let local = start + at;
        let (o, within) = (local / run, local % run);
        let n = (run - within).min(len - at);
        let logical = o * full_run + bstart * inner + within;
        fill(&mut v[at..at + n], init, key, logical as u64);
        at += n;
    }
    v
}

/// Stream positions `offset..offset + out.len()` of the random `init` under `key`.
fn fill(out: &mut [f32], init: Init, key: u64, offset: u64) {
    match init {
        Init::Normal { std } => random::fill_normal(out, key, offset, std),
        Init::Randn { mean, std } => {
            random::fill_normal(out, key, offset, std);
            out.iter_mut().for_each(|x| *x += mean as f32);
        }
        Init::Uniform { low, high } => random::fill_uniform(out, key, offset, low, high),
        Init::Zeros | Init::Ones | Init::Const(_) => {
            out.fill(init.constant().unwrap_or(0.0) as f32)
        }
    }
}

/// Random initialisation from the counter-based generator in [`random`], keyed by the
/// parameter's logical name: the same seed gives the same weights whatever the layout.
pub struct RandomInit {
    pub seed: u64,
}

impl ParamSource for RandomInit {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        // This rank's block of the master weight the shared seed defines (tp=N equals tp=1),
        // generated without the rest.
        shard_init(meta, shard, init, self.seed)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn flat_range(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        init: Init,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        Ok(flat_range_init(meta, shard, init, self.seed, start, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::parameter::Partition;

    #[test]
    fn a_shard_equals_the_same_block_of_the_full_init() {
        for (dim, shape) in [
            (0usize, vec![12usize, 5]),
            (1, vec![6, 8]),
            (1, vec![3, 8, 2]),
            (0, vec![16]),
        ] {
            let meta = ParamMeta {
                name: "layers.0.mlp.dense_h_to_4h.weight".into(),
                shape: shape.clone(),
                partition: Partition::Split { dim, stride: 1 },
                tie_group: None,
                weight_decay: true,
                real_rows: None,
            };
            let full = full_init(&meta, Init::Normal { std: 0.02 }, 5).unwrap();
            for index in 0..4 {
                let s = Shard {
                    dim,
                    index,
                    count: 4,
                };
                let part = shard_init(&meta, Some(s), Init::Normal { std: 0.02 }, 5).unwrap();
                let want = s.narrow(&full).unwrap();
                let a: Vec<f32> = part.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a, b, "shape {shape:?} dim {dim} block {index}");
                // Any flat range of the block, generated alone, equals the same range.
                for (start, len) in [(0, a.len()), (1, a.len() - 1), (a.len() / 3, a.len() / 2)] {
                    let r =
                        flat_range_init(&meta, Some(s), Init::Normal { std: 0.02 }, 5, start, len);
                    assert_eq!(r, a[start..start + len].to_vec(), "range {start}+{len}");
                }
            }
        }
    }
}

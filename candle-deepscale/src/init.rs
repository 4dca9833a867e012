//! Deterministic initialisation of logical parameters.
use crate::parameter::{Init, ParamMeta};
use crate::random;
use candle_core::{Device, Result, Tensor};

/// The whole logical tensor of `meta` initialised from `seed` (f32, CPU).
pub fn full_init(meta: &ParamMeta, init: Init, seed: u64) -> Result<Tensor> {
    let n = meta.numel();
    let data = match init {
        Init::Zeros => vec![0f32; n],
        Init::Ones => vec![1f32; n],
        Init::Normal { std } => {
            let mut v = vec![0f32; n];
            random::fill_normal(&mut v, random::stream_key(seed, &meta.name), 0, std);
            v
        }
    };
    Tensor::from_vec(data, meta.shape.as_slice(), &Device::Cpu)
}

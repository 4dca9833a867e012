//! Hugging Face GPT-2 layout <-> the native (Megatron-named) layout.
//!
//! HF stores `c_attn`, `c_proj`, `c_fc` as Conv1D `[in, out]`, the QKV output as `[3, heads, head_dim]`,
//! keys with or without the `transformer.` prefix, `lm_head` tied or omitted, and `attn.bias` /
//! `attn.masked_bias` buffers that are not parameters.
use super::Config;
use crate::weights::{check_shape, swap_leading, SafetensorsFiles};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_deepscale::layers::parameter::{Init, Param, ParamMeta, ParamSource, Shard};

/// How a native tensor is derived from an HF one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transform {
    None,
    /// Conv1D `[in, out]` -> Linear `[out, in]`.
    Conv1d,
    /// Conv1D QKV weight: transpose, then rows `[3, heads, hd]` -> `[heads, 3, hd]`.
    QkvWeight,
    /// QKV bias `[3, heads, hd]` -> `[heads, 3, hd]`.
    QkvBias,
    /// Word embedding: zero rows appended up to the padded vocabulary.
    PadVocab,
}

/// Maps a native parameter name to its HF key (without prefix) and transform.
fn hf_key(native: &str) -> Option<(String, Transform)> {
    use Transform::*;
    let fixed = match native {
        "embedding.word_embeddings.weight" => Some(("wte.weight".to_string(), PadVocab)),
        "embedding.position_embeddings.weight" => Some(("wpe.weight".to_string(), None)),
        "final_layernorm.weight" => Some(("ln_f.weight".to_string(), None)),
        "final_layernorm.bias" => Some(("ln_f.bias".to_string(), None)),
        _ => Option::None,
    };
    if fixed.is_some() {
        return fixed;
    }
    let rest = native.strip_prefix("layers.")?;
    let (idx, sub) = rest.split_once('.')?;
    let (hf, tr) = match sub {
        "input_layernorm.weight" => ("ln_1.weight", None),
        "input_layernorm.bias" => ("ln_1.bias", None),
        "attention.query_key_value.weight" => ("attn.c_attn.weight", QkvWeight),
        "attention.query_key_value.bias" => ("attn.c_attn.bias", QkvBias),
        "attention.dense.weight" => ("attn.c_proj.weight", Conv1d),
        "attention.dense.bias" => ("attn.c_proj.bias", None),
        "post_attention_layernorm.weight" => ("ln_2.weight", None),
        "post_attention_layernorm.bias" => ("ln_2.bias", None),
        "mlp.dense_h_to_4h.weight" => ("mlp.c_fc.weight", Conv1d),
        "mlp.dense_h_to_4h.bias" => ("mlp.c_fc.bias", None),
        "mlp.dense_4h_to_h.weight" => ("mlp.c_proj.weight", Conv1d),
        "mlp.dense_4h_to_h.bias" => ("mlp.c_proj.bias", None),
        _ => return Option::None,
    };
    Some((format!("h.{idx}.{hf}"), tr))
}

/// Feeds native GPT-2 parameters from an HF checkpoint.
pub struct HfSource {
    files: SafetensorsFiles,
    prefix: &'static str,
    heads: usize,
}

impl HfSource {
    pub fn new(files: SafetensorsFiles, config: &Config) -> Result<Self> {
        let prefix = if files.contains("transformer.wte.weight") {
            "transformer."
        } else if files.contains("wte.weight") {
            ""
        } else {
            bail!(
                "{} is not a GPT-2 checkpoint: neither `wte.weight` nor `transformer.wte.weight` is in it",
                files.describe()
            )
        };
        files.check_layer_count(&format!("{prefix}h."), config.num_layers, "n_layer")?;
        Ok(Self {
            files,
            prefix,
            heads: config.num_attention_heads,
        })
    }
}

/// Vocabulary rows `[start, start + len)` of an HF embedding with `real` rows, zero rows past it.
pub(crate) fn load_vocab_rows(
    files: &SafetensorsFiles,
    key: &str,
    real: usize,
    start: usize,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
    let have = real.saturating_sub(start).min(len);
    let mut zeros = files.shape(key)?;
    zeros[0] = len - have;
    let mut parts = Vec::new();
    if have > 0 {
        parts.push(files.load_slice_f32(key, 0, start, have, device)?);
    }
    if have < len {
        parts.push(Tensor::zeros(zeros, DType::F32, device)?);
    }
    Tensor::cat(&parts, 0)
}

/// The rows of a fused QKV tensor (Megatron `[heads, 3, hd]` order) for heads `[h0, h0 + lh)`, read
/// from three `[3, heads, hd]`-ordered blocks with `part(i, start, len)` returning rows
/// `[start, start + len)` of block `i` as `[len, rest..]`.
pub(crate) fn qkv_heads(
    part: impl Fn(usize, usize, usize) -> Result<Tensor>,
    h0: usize,
    lh: usize,
    hd: usize,
) -> Result<Tensor> {
    let parts = (0..3)
        .map(|i| {
            let t = part(i, h0 * hd, lh * hd)?;
            let mut shape = vec![lh, 1, hd];
            shape.extend_from_slice(&t.dims()[1..]);
            t.reshape(shape)
        })
        .collect::<Result<Vec<_>>>()?;
    let t = Tensor::cat(&parts, 1)?;
    let mut shape = vec![lh * 3 * hd];
    shape.extend_from_slice(&t.dims()[3..]);
    t.reshape(shape)
}

impl ParamSource for HfSource {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        _init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let Some((key, tr)) = hf_key(&meta.name) else {
            bail!("parameter `{}` has no GPT-2 HF counterpart", meta.name)
        };
        let key = format!("{}{key}", self.prefix);
        let origin = self.files.describe();
        let f = &self.files;
        let hf_shape = f.shape(&key)?;
        let logical: Vec<usize> = match tr {
            Transform::Conv1d | Transform::QkvWeight => hf_shape.iter().rev().copied().collect(),
            Transform::PadVocab => {
                let real = meta.real_rows.unwrap_or(meta.shape[0]);
                if hf_shape.len() != 2 || hf_shape[0] != real {
                    bail!(
                        "{origin}: tensor `{key}` has shape {hf_shape:?}, but the vocabulary is {real} x {}",
                        meta.shape.get(1).copied().unwrap_or(0)
                    )
                }
                vec![meta.shape[0], hf_shape[1]]
            }
            _ => hf_shape.clone(),
        };
        check_shape(&logical, meta, &key, &origin)?;
        let hd = meta.shape[0] / 3 / self.heads.max(1);
        let t = match (tr, shard) {
            (Transform::None, s) => f.load_shard_f32(&key, s, device)?,
            (Transform::Conv1d, None) => f.load_f32(&key, device)?.t()?.contiguous()?,
            (Transform::Conv1d, Some(s)) => {
                // Native dim d is HF dim 1 - d.
                let (start, len) = s.range(meta.shape[s.dim]);
                f.load_slice_f32(&key, 1 - s.dim, start, len, device)?
                    .t()?
                    .contiguous()?
            }
            (Transform::QkvWeight, None) => {
                swap_leading(&f.load_f32(&key, device)?.t()?.contiguous()?, 3, self.heads)?
            }
            (Transform::QkvBias, None) => swap_leading(&f.load_f32(&key, device)?, 3, self.heads)?,
            (Transform::QkvWeight | Transform::QkvBias, Some(s)) => {
                let lh = self.heads / s.count;
                let h = meta.shape[0] / 3;
                let weight = tr == Transform::QkvWeight;
                qkv_heads(
                    |i, start, len| {
                        if weight {
                            f.load_slice_f32(&key, 1, i * h + start, len, device)?
                                .t()?
                                .contiguous()
                        } else {
                            f.load_slice_f32(&key, 0, i * h + start, len, device)
                        }
                    },
                    s.index * lh,
                    lh,
                    hd,
                )?
            }
            (Transform::PadVocab, s) => {
                let real = meta.real_rows.unwrap_or(meta.shape[0]);
                let (start, len) = s.map_or((0, meta.shape[0]), |s| s.range(meta.shape[0]));
                load_vocab_rows(f, &key, real, start, len, device)?
            }
        };
        t.to_dtype(dtype)
    }

    /// ZeRO-3 reads one rank's piece: only the rows of the native layout the piece covers are
    /// copied out of the mapping (for Conv1D weights, the matching columns). The fused QKV and
    /// tensor-parallel shards are read whole and cut (one parameter at a time).
    fn flat_range(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        init: Init,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let whole = |this: &Self| -> Result<Vec<f32>> {
            this.tensor(meta, shard, init, &Device::Cpu, DType::F32)?
                .flatten_all()?
                .narrow(0, start, len)?
                .to_vec1()
        };
        let Some((key, tr)) = hf_key(&meta.name) else {
            return whole(self);
        };
        if shard.is_some()
            || meta.shape.is_empty()
            || !matches!(
                tr,
                Transform::None | Transform::Conv1d | Transform::PadVocab
            )
        {
            return whole(self);
        }
        // Validates the shapes as a whole read would (cheap: headers only).
        let key = format!("{}{key}", self.prefix);
        let hf_shape = self.files.shape(&key)?;
        let expect: Vec<usize> = match tr {
            Transform::Conv1d => meta.shape.iter().rev().copied().collect(),
            Transform::PadVocab => vec![meta.real_rows.unwrap_or(meta.shape[0]), meta.shape[1]],
            _ => meta.shape.clone(),
        };
        if hf_shape != expect {
            return whole(self);
        }
        let inner: usize = meta.shape[1..].iter().product();
        let (r0, r1) = (start / inner.max(1), (start + len).div_ceil(inner.max(1)));
        let dev = Device::Cpu;
        let rows = match tr {
            Transform::Conv1d => self
                .files
                .load_slice_f32(&key, 1, r0, r1 - r0, &dev)?
                .t()?
                .contiguous()?,
            Transform::PadVocab => {
                let real = meta.real_rows.unwrap_or(meta.shape[0]);
                load_vocab_rows(&self.files, &key, real, r0, r1 - r0, &dev)?
            }
            _ => self.files.load_slice_f32(&key, 0, r0, r1 - r0, &dev)?,
        };
        rows.flatten_all()?
            .narrow(0, start - r0 * inner, len)?
            .to_vec1()
    }
}

/// The model's parameters in HF GPT-2 layout (Conv1D, QKV order, vocabulary padding stripped),
/// keys with the `transformer.` prefix when `with_prefix`.
pub fn to_hf_tensors(
    params: &[&Param],
    config: &Config,
    with_prefix: bool,
) -> Result<Vec<(String, Tensor)>> {
    let prefix = if with_prefix { "transformer." } else { "" };
    let heads = config.num_attention_heads;
    let mut out = Vec::new();
    for p in params {
        let Some((key, tr)) = hf_key(&p.meta.name) else {
            bail!("parameter `{}` has no GPT-2 HF counterpart", p.meta.name)
        };
        let t = p.tensor().to_dtype(DType::F32)?;
        let t = match tr {
            Transform::None => t,
            Transform::Conv1d => t.t()?.contiguous()?,
            Transform::QkvWeight => swap_leading(&t, heads, 3)?.t()?.contiguous()?,
            Transform::QkvBias => swap_leading(&t, heads, 3)?,
            Transform::PadVocab => t.narrow(0, 0, config.vocab_size)?.contiguous()?,
        };
        out.push((format!("{prefix}{key}"), t));
    }
    Ok(out)
}

/// Writes a Hugging Face GPT-2 folder: `config.json`, `model.safetensors` (with the
/// `transformer.` prefix), and the tokenizer as `tokenizer.json`.
pub fn save_hf_dir(
    model: &super::Gpt2,
    tokenizer: &crate::tokenizer::Tokenizer,
    dir: &std::path::Path,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| candle_core::Error::Msg(format!("cannot create {}: {e}", dir.display())))?;
    let config = serde_json::to_string_pretty(&model.config.to_hf_json())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let tensors: std::collections::HashMap<String, Tensor> =
        to_hf_tensors(&model.parameters(), &model.config, true)?
            .into_iter()
            .collect();
    // Each file whole or not at all; an earlier sharded export's index and shards go.
    let weights = dir.join("model.safetensors");
    candle_deepscale::fs::write_atomic_with(&weights, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
    })?;
    candle_deepscale::fs::remove_stale_safetensors(dir, "model", &[weights])?;
    candle_deepscale::fs::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    candle_deepscale::fs::write_atomic_with(&dir.join("tokenizer.json"), |tmp| tokenizer.save(tmp))
}

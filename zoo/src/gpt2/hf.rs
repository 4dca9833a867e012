//! Hugging Face GPT-2 layout <-> the native (Megatron-named) layout.
//!
//! HF stores `c_attn`, `c_proj`, `c_fc` as Conv1D `[in, out]`, the QKV output as `[3, heads, head_dim]`,
//! keys with or without the `transformer.` prefix, `lm_head` tied or omitted, and `attn.bias` /
//! `attn.masked_bias` buffers that are not parameters.
use super::Config;
use crate::weights::{check_shape, pad_rows, swap_leading, SafetensorsFiles};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_deepscale::parameter::{Init, Param, ParamMeta, ParamSource};

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
        Ok(Self {
            files,
            prefix,
            heads: config.num_attention_heads,
        })
    }
}

impl ParamSource for HfSource {
    fn tensor(
        &self,
        meta: &ParamMeta,
        _init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let Some((key, tr)) = hf_key(&meta.name) else {
            bail!("parameter `{}` has no GPT-2 HF counterpart", meta.name)
        };
        let key = format!("{}{key}", self.prefix);
        let t = self.files.load_f32(&key, device)?;
        let origin = self.files.describe();
        let t = match tr {
            Transform::None => t,
            Transform::Conv1d => t.t()?.contiguous()?,
            Transform::QkvWeight => {
                let t = t.t()?.contiguous()?;
                check_shape(&t, meta, &key, &origin)?;
                swap_leading(&t, 3, self.heads)?
            }
            Transform::QkvBias => {
                check_shape(&t, meta, &key, &origin)?;
                swap_leading(&t, 3, self.heads)?
            }
            Transform::PadVocab => {
                let real = meta.real_rows.unwrap_or(meta.shape[0]);
                if t.dim(0)? != real || t.rank() != 2 {
                    bail!(
                        "{origin}: tensor `{key}` has shape {:?}, but the vocabulary is {real} x {}",
                        t.dims(),
                        meta.shape.get(1).copied().unwrap_or(0)
                    )
                }
                pad_rows(&t, meta.shape[0])?
            }
        };
        check_shape(&t, meta, &key, &origin)?;
        t.to_dtype(dtype)
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
    let path = dir.join("config.json");
    std::fs::write(&path, config)
        .map_err(|e| candle_core::Error::Msg(format!("cannot write {}: {e}", path.display())))?;
    let tensors: std::collections::HashMap<String, Tensor> =
        to_hf_tensors(&model.parameters(), &model.config, true)?
            .into_iter()
            .collect();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot write {}: {e}", path.display())))?;
    tokenizer.save(&dir.join("tokenizer.json"))
}

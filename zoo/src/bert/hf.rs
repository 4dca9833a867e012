//! Hugging Face BERT layout <-> the native (Megatron-named) layout.
//!
//! HF keeps query/key/value as three Linear layers (fused here per head as `[heads, 3, head_dim]`),
//! encoder keys with or without the `bert.` prefix, and the pre-training heads under `cls.`.
use super::Config;
use crate::gpt2::hf::{load_vocab_rows, qkv_heads};
use crate::weights::{check_shape, swap_leading, SafetensorsFiles};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_deepscale::layers::parameter::{Init, Param, ParamMeta, ParamSource, Shard};

#[derive(Debug, Clone, PartialEq)]
enum Key {
    /// One HF tensor, copied; vocabulary-sized tensors padded with zero rows.
    Plain(String),
    /// query, key and value (weight or bias) fused per head.
    Qkv([String; 3]),
}

/// Maps a native name to HF key(s); encoder keys are returned without the `bert.` prefix and
/// `cls.` keys are marked by their prefix.
fn hf_key(native: &str) -> Option<Key> {
    let plain = |s: &str| Some(Key::Plain(s.to_string()));
    match native {
        "embedding.word_embeddings.weight" => return plain("embeddings.word_embeddings.weight"),
        "embedding.position_embeddings.weight" => {
            return plain("embeddings.position_embeddings.weight")
        }
        "embedding.tokentype_embeddings.weight" => {
            return plain("embeddings.token_type_embeddings.weight")
        }
        "embedding.layernorm.weight" => return plain("embeddings.LayerNorm.weight"),
        "embedding.layernorm.bias" => return plain("embeddings.LayerNorm.bias"),
        "pooler.dense.weight" => return plain("pooler.dense.weight"),
        "pooler.dense.bias" => return plain("pooler.dense.bias"),
        "lm_head.dense.weight" => return plain("cls.predictions.transform.dense.weight"),
        "lm_head.dense.bias" => return plain("cls.predictions.transform.dense.bias"),
        "lm_head.layernorm.weight" => return plain("cls.predictions.transform.LayerNorm.weight"),
        "lm_head.layernorm.bias" => return plain("cls.predictions.transform.LayerNorm.bias"),
        "lm_head.bias" => return plain("cls.predictions.bias"),
        "binary_head.weight" => return plain("cls.seq_relationship.weight"),
        "binary_head.bias" => return plain("cls.seq_relationship.bias"),
        _ => {}
    }
    let rest = native.strip_prefix("layers.")?;
    let (idx, sub) = rest.split_once('.')?;
    let l = format!("encoder.layer.{idx}");
    let (module, wb) = sub.rsplit_once('.')?;
    if module == "attention.query_key_value" {
        return Some(Key::Qkv(
            ["query", "key", "value"].map(|q| format!("{l}.attention.self.{q}.{wb}")),
        ));
    }
    let hf = match module {
        "attention.dense" => "attention.output.dense",
        "post_attention_layernorm" => "attention.output.LayerNorm",
        "mlp.dense_h_to_4h" => "intermediate.dense",
        "mlp.dense_4h_to_h" => "output.dense",
        "output_layernorm" => "output.LayerNorm",
        _ => return None,
    };
    Some(Key::Plain(format!("{l}.{hf}.{wb}")))
}

/// Feeds native BERT parameters from an HF checkpoint.
pub struct HfSource {
    files: SafetensorsFiles,
    prefix: &'static str,
    heads: usize,
}

impl HfSource {
    pub fn new(files: SafetensorsFiles, config: &Config) -> Result<Self> {
        let prefix = if files.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else if files.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            bail!(
                "{} is not a BERT checkpoint: neither `embeddings.word_embeddings.weight` nor `bert.embeddings.word_embeddings.weight` is in it",
                files.describe()
            )
        };
        if config.pre_layer_norm {
            bail!("HF BERT checkpoints are post-LayerNorm; the config asks for pre_layer_norm")
        }
        files.check_layer_count(
            &format!("{prefix}encoder.layer."),
            config.num_hidden_layers,
            "num_hidden_layers",
        )?;
        Ok(Self {
            files,
            prefix,
            heads: config.num_attention_heads,
        })
    }

    fn full(&self, key: &str) -> String {
        if key.starts_with("cls.") {
            key.to_string()
        } else {
            format!("{}{key}", self.prefix)
        }
    }

    /// Adjusts `config` to the heads the checkpoint holds (a bare `BertModel` has no `cls.*`).
    pub fn detect_heads(files: &SafetensorsFiles, config: &mut Config) {
        let prefix = if files.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        config.add_pooler = files.contains(&format!("{prefix}pooler.dense.weight"));
        config.add_lm_head = files.contains("cls.predictions.transform.dense.weight");
        config.add_binary_head = config.add_pooler && files.contains("cls.seq_relationship.weight");
    }
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
        let origin = self.files.describe();
        let f = &self.files;
        let t = match hf_key(&meta.name) {
            None => bail!("parameter `{}` has no BERT HF counterpart", meta.name),
            Some(Key::Plain(k)) => {
                let key = self.full(&k);
                let mut shape = f.shape(&key)?;
                match meta.real_rows {
                    Some(real) => {
                        if shape.first() != Some(&real) {
                            bail!("{origin}: tensor `{key}` has shape {shape:?}, but the vocabulary is {real}")
                        }
                        shape[0] = meta.shape[0];
                        check_shape(&shape, meta, &key, &origin)?;
                        let (start, len) =
                            shard.map_or((0, meta.shape[0]), |s| s.range(meta.shape[0]));
                        load_vocab_rows(f, &key, real, start, len, device)?
                    }
                    None => {
                        check_shape(&shape, meta, &key, &origin)?;
                        f.load_shard_f32(&key, shard, device)?
                    }
                }
            }
            Some(Key::Qkv(keys)) => {
                let keys: Vec<String> = keys.iter().map(|k| self.full(k)).collect();
                let mut logical = f.shape(&keys[0])?;
                for k in &keys[1..] {
                    if f.shape(k)? != logical {
                        bail!("{origin}: `{k}` and `{}` differ in shape", keys[0])
                    }
                }
                if let Some(first) = logical.first_mut() {
                    *first *= 3;
                }
                check_shape(&logical, meta, &keys[0], &origin)?;
                let hd = meta.shape[0] / 3 / self.heads;
                let (h0, lh) = match shard {
                    None => (0, self.heads),
                    Some(s) if s.dim == 0 => (s.index * self.heads / s.count, self.heads / s.count),
                    Some(s) => bail!(
                        "parameter `{}`: QKV split on dim {} is not supported",
                        meta.name,
                        s.dim
                    ),
                };
                qkv_heads(
                    |i, start, len| f.load_slice_f32(&keys[i], 0, start, len, device),
                    h0,
                    lh,
                    hd,
                )?
            }
        };
        t.to_dtype(dtype)
    }
}

/// The model's parameters in HF BERT layout (vocabulary padding stripped), encoder keys with the
/// `bert.` prefix when `with_prefix`. Post-LayerNorm models only.
pub fn to_hf_tensors(
    params: &[&Param],
    config: &Config,
    with_prefix: bool,
) -> Result<Vec<(String, Tensor)>> {
    if config.pre_layer_norm {
        bail!("HF BERT is post-LayerNorm; a pre-LayerNorm model has no HF layout")
    }
    let prefix = if with_prefix { "bert." } else { "" };
    let full = |k: &str| {
        if k.starts_with("cls.") {
            k.to_string()
        } else {
            format!("{prefix}{k}")
        }
    };
    let mut out = Vec::new();
    for p in params {
        let t = p.tensor().to_dtype(DType::F32)?;
        match hf_key(&p.meta.name) {
            None => bail!("parameter `{}` has no BERT HF counterpart", p.meta.name),
            Some(Key::Plain(k)) => {
                let t = match p.meta.real_rows {
                    Some(r) => t.narrow(0, 0, r)?.contiguous()?,
                    None => t,
                };
                if k == "cls.predictions.bias" {
                    out.push(("cls.predictions.decoder.bias".to_string(), t.clone()));
                }
                out.push((full(&k), t));
            }
            Some(Key::Qkv(keys)) => {
                let t = swap_leading(&t, config.num_attention_heads, 3)?;
                let h = config.hidden_size;
                for (i, k) in keys.iter().enumerate() {
                    out.push((full(k), t.narrow(0, i * h, h)?.contiguous()?));
                }
            }
        }
    }
    Ok(out)
}

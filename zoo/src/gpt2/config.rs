use candle_core::{bail, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// GPT-2 hyper-parameters under Megatron's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    /// MLP width; Megatron's default is 4 x hidden_size.
    pub ffn_hidden_size: usize,
    /// Training sequence length.
    pub seq_length: usize,
    pub max_position_embeddings: usize,
    /// True vocabulary size (the tokenizer's); the embedding is padded beyond it.
    pub vocab_size: usize,
    pub make_vocab_size_divisible_by: usize,
    pub layernorm_epsilon: f64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub init_method_std: f64,
}

impl Config {
    /// Every parameter's name and element count at tensor-parallel size 1 (the word embedding
    /// padded, counted once though tied), from the config alone.
    pub fn parameter_counts(&self) -> Vec<(String, usize)> {
        let (h, f) = (self.hidden_size, self.ffn_hidden_size);
        let mut v = vec![
            (
                "embedding.word_embeddings.weight".to_string(),
                self.padded_vocab_size(1) * h,
            ),
            (
                "embedding.position_embeddings.weight".to_string(),
                self.max_position_embeddings * h,
            ),
        ];
        for i in 0..self.num_layers {
            for (n, c) in [
                ("input_layernorm.weight", h),
                ("input_layernorm.bias", h),
                ("attention.query_key_value.weight", 3 * h * h),
                ("attention.query_key_value.bias", 3 * h),
                ("attention.dense.weight", h * h),
                ("attention.dense.bias", h),
                ("post_attention_layernorm.weight", h),
                ("post_attention_layernorm.bias", h),
                ("mlp.dense_h_to_4h.weight", f * h),
                ("mlp.dense_h_to_4h.bias", f),
                ("mlp.dense_4h_to_h.weight", h * f),
                ("mlp.dense_4h_to_h.bias", h),
            ] {
                v.push((format!("layers.{i}.{n}"), c));
            }
        }
        v.push(("final_layernorm.weight".into(), h));
        v.push(("final_layernorm.bias".into(), h));
        v
    }

    /// DeepSpeed's `largest_layer_params`: the most parameters any one module owns (the word
    /// embedding, a linear with its bias, a LayerNorm).
    pub fn largest_module_params(&self) -> usize {
        let (h, f) = (self.hidden_size, self.ffn_hidden_size);
        [
            self.padded_vocab_size(1) * h,
            self.max_position_embeddings * h,
            3 * h * h + 3 * h,
            h * h + h,
            f * h + f,
            h * f + h,
            2 * h,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// A config with Megatron's defaults for everything but the shape.
    pub fn new(num_layers: usize, hidden_size: usize, heads: usize, vocab_size: usize) -> Self {
        Self {
            num_layers,
            hidden_size,
            num_attention_heads: heads,
            // Saturating: an absurd hidden size is refused by `validate`, not overflowed here.
            ffn_hidden_size: hidden_size.saturating_mul(4),
            seq_length: 1024,
            max_position_embeddings: 1024,
            vocab_size,
            make_vocab_size_divisible_by: 128,
            layernorm_epsilon: 1e-5,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            init_method_std: 0.02,
        }
    }

    /// Named presets: `gpt2-tiny` (tests), `gpt2-125m`, `gpt2-345m` (the snapshot scripts' model),
    /// `gpt2-1.3b`, `gpt2-10b`, `gpt2-40b`.
    pub fn preset(name: &str) -> Result<Self> {
        let v = 50257;
        Ok(match name {
            "gpt2-tiny" => Self {
                seq_length: 64,
                max_position_embeddings: 128,
                ..Self::new(2, 64, 4, v)
            },
            "gpt2-125m" | "gpt2" => Self::new(12, 768, 12, v),
            "gpt2-345m" => Self::new(24, 1024, 16, v),
            "gpt2-1.3b" => Self::new(24, 2048, 16, v),
            "gpt2-10b" => Self::new(50, 4096, 32, v),
            "gpt2-40b" => Self::new(50, 8192, 32, v),
            other => bail!(
                "unknown GPT-2 preset `{other}`; known: gpt2-tiny, gpt2-125m, gpt2-345m, gpt2-1.3b, gpt2-10b, gpt2-40b"
            ),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Vocabulary padded to a multiple of `make_vocab_size_divisible_by * tp` (50257 -> 50304).
    pub fn padded_vocab_size(&self, tp: usize) -> usize {
        let m = self.make_vocab_size_divisible_by.max(1) * tp.max(1);
        self.vocab_size.div_ceil(m) * m
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        if self.num_layers == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0 {
            bail!("num_layers, vocab_size and max_position_embeddings must be positive")
        }
        if self.seq_length > self.max_position_embeddings {
            bail!(
                "seq_length {} exceeds max_position_embeddings {}",
                self.seq_length,
                self.max_position_embeddings
            )
        }
        if self.parameter_total().is_none() {
            bail!(
                "a model of {} layers, hidden size {}, ffn_hidden_size {}, vocabulary {} and {} \
                 positions has more parameters than this machine can count",
                self.num_layers,
                self.hidden_size,
                self.ffn_hidden_size,
                self.vocab_size,
                self.max_position_embeddings
            )
        }
        Ok(())
    }

    /// Every parameter at tensor-parallel size 1 (what [`Self::parameter_counts`] sums), or
    /// None where a count overflows (sizes no machine holds, refused by [`Self::validate`]
    /// before anything multiplies them).
    pub fn parameter_total(&self) -> Option<usize> {
        let (h, f) = (self.hidden_size, self.ffn_hidden_size);
        let m = self.make_vocab_size_divisible_by.max(1);
        let vocab = self.vocab_size.checked_next_multiple_of(m)?;
        let per_layer = crate::checked_layer_params(h, f)?;
        vocab
            .checked_add(self.max_position_embeddings)?
            .checked_mul(h)?
            .checked_add(per_layer.checked_mul(self.num_layers)?)?
            .checked_add(h.checked_mul(2)?)
    }

    /// Reads a Hugging Face GPT-2 `config.json` (n_layer, n_embd, n_head, n_positions, ...).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        let hf: HfGpt2Config = candle_deepscale::json::from_str(&text).map_err(|e| {
            Error::Msg(format!(
                "{}: not a valid GPT-2 config.json: {e}",
                path.display()
            ))
        })?;
        if let Some(act) = &hf.activation_function {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" && act != "gelu" {
                bail!(
                    "{}: activation_function `{act}` is not supported (GPT-2 uses gelu_new)",
                    path.display()
                )
            }
        }
        let n_positions = hf.n_positions.or(hf.n_ctx).unwrap_or(1024);
        let cfg = Self {
            num_layers: hf.n_layer,
            hidden_size: hf.n_embd,
            num_attention_heads: hf.n_head,
            ffn_hidden_size: hf.n_inner.unwrap_or(4 * hf.n_embd),
            seq_length: n_positions,
            max_position_embeddings: n_positions,
            vocab_size: hf.vocab_size,
            make_vocab_size_divisible_by: 128,
            layernorm_epsilon: hf.layer_norm_epsilon.unwrap_or(1e-5),
            hidden_dropout: hf.resid_pdrop.unwrap_or(0.1),
            attention_dropout: hf.attn_pdrop.unwrap_or(0.1),
            init_method_std: hf.initializer_range.unwrap_or(0.02),
        };
        cfg.validate()
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` for this model (for export).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.num_layers,
            "n_embd": self.hidden_size,
            "n_head": self.num_attention_heads,
            "n_inner": self.ffn_hidden_size,
            "n_positions": self.max_position_embeddings,
            "n_ctx": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layernorm_epsilon,
            "resid_pdrop": self.hidden_dropout,
            "embd_pdrop": self.hidden_dropout,
            "attn_pdrop": self.attention_dropout,
            "initializer_range": self.init_method_std,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        })
    }
}

#[derive(Debug, Deserialize)]
struct HfGpt2Config {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    vocab_size: usize,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_inner: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    resid_pdrop: Option<f64>,
    attn_pdrop: Option<f64>,
    initializer_range: Option<f64>,
    activation_function: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a count would overflow, `parameter_total` is None and `validate` refuses the
    /// sizes instead of wrapping them.
    #[test]
    fn sizes_whose_parameters_overflow_are_refused() {
        for c in [
            Config::new(2, 1 << 40, 1, 50257),
            Config::new(usize::MAX, 64, 1, 50257),
            Config::new(2, usize::MAX, 1, 50257),
            Config {
                max_position_embeddings: usize::MAX,
                ..Config::new(2, 64, 1, 50257)
            },
            Config::new(2, 64, 1, usize::MAX),
        ] {
            assert_eq!(c.parameter_total(), None, "{c:?}");
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("more parameters than this machine can count"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_wrong_type_in_an_hf_config_names_the_key() {
        let path = std::env::temp_dir().join(format!("gpt2-config-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"n_layer": 2, "n_embd": "768", "n_head": 12}"#).unwrap();
        let e = Config::from_hf_json(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains("not a valid GPT-2 config.json: `n_embd`: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn vocab_padding() {
        let c = Config::preset("gpt2-125m").unwrap();
        assert_eq!(c.padded_vocab_size(1), 50304);
        assert_eq!(c.padded_vocab_size(2), 50432);
        assert_eq!(c.padded_vocab_size(4), 50688);
    }

    #[test]
    fn presets_are_valid() {
        for p in [
            "gpt2-tiny",
            "gpt2-125m",
            "gpt2-345m",
            "gpt2-1.3b",
            "gpt2-10b",
            "gpt2-40b",
        ] {
            let c = Config::preset(p).unwrap();
            c.validate().unwrap();
            // `parameter_total` (what `validate` checks) is `parameter_counts`' sum.
            let sum: usize = c.parameter_counts().iter().map(|x| x.1).sum();
            assert_eq!(c.parameter_total(), Some(sum), "{p}");
        }
        let c = Config::preset("gpt2-10b").unwrap();
        assert_eq!(
            (c.num_layers, c.hidden_size, c.num_attention_heads),
            (50, 4096, 32)
        );
        assert!(Config::preset("gpt2-7b").is_err());
    }
}

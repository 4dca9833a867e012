use candle_core::{bail, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// BERT hyper-parameters under Hugging Face's names (Megatron's `num_layers` etc. as aliases), plus
/// the arrangement and which heads exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    #[serde(alias = "num_layers")]
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(alias = "ffn_hidden_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout", alias = "hidden_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout", alias = "attention_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps", alias = "layernorm_epsilon")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_std", alias = "init_method_std")]
    pub initializer_range: f64,
    /// Megatron v1.1.5 arrangement: LayerNorm before attention/MLP and a final LayerNorm.
    #[serde(default)]
    pub pre_layer_norm: bool,
    #[serde(default = "default_divisible")]
    pub make_vocab_size_divisible_by: usize,
    #[serde(default = "yes")]
    pub add_pooler: bool,
    #[serde(default = "yes")]
    pub add_lm_head: bool,
    #[serde(default = "yes")]
    pub add_binary_head: bool,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_std() -> f64 {
    0.02
}
fn default_divisible() -> usize {
    128
}
fn yes() -> bool {
    true
}

impl Config {
    /// BERT-base-like defaults for everything but the shape (post-LayerNorm, all heads).
    pub fn new(layers: usize, hidden: usize, heads: usize, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            // Saturating: an absurd hidden size is refused by `validate`, not overflowed here.
            intermediate_size: hidden.saturating_mul(4),
            hidden_act: default_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            initializer_range: 0.02,
            pre_layer_norm: false,
            make_vocab_size_divisible_by: 128,
            add_pooler: true,
            add_lm_head: true,
            add_binary_head: true,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

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
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            bail!(
                "hidden_act `{}` is not supported (gelu, gelu_new, relu)",
                self.hidden_act
            )
        }
        if self.add_binary_head && !self.add_pooler {
            bail!("the binary (next-sentence) head needs the pooler")
        }
        if self.parameter_total().is_none() {
            bail!(
                "a model of {} layers, hidden size {}, intermediate_size {}, vocabulary {} and \
                 {} positions has more parameters than this machine can count",
                self.num_hidden_layers,
                self.hidden_size,
                self.intermediate_size,
                self.vocab_size,
                self.max_position_embeddings
            )
        }
        Ok(())
    }

    /// About every parameter (the embeddings, each layer's attention, MLP and LayerNorms, the
    /// pooler and heads), or None where a count overflows: sizes no machine holds, refused by
    /// [`Self::validate`] before anything multiplies them.
    pub fn parameter_total(&self) -> Option<usize> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let tables = self
            .vocab_size
            .checked_add(self.max_position_embeddings)?
            .checked_add(self.type_vocab_size)?
            .checked_mul(h)?;
        let per_layer = crate::checked_layer_params(h, f)?;
        // The pooler and the masked-LM transform: two more h x h products and their biases.
        let heads = h
            .checked_mul(h)?
            .checked_mul(2)?
            .checked_add(self.vocab_size)?;
        tables
            .checked_add(per_layer.checked_mul(self.num_hidden_layers)?)?
            .checked_add(heads)
    }

    /// Reads an HF BERT `config.json` (unknown HF keys are ignored; ours keep their defaults).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        let cfg: Self = candle_deepscale::json::from_str(&text).map_err(|e| {
            Error::Msg(format!(
                "{}: not a valid BERT config.json: {e}",
                path.display()
            ))
        })?;
        cfg.validate()
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_whose_parameters_overflow_are_refused() {
        let base = Config::new(12, 768, 12, 30522);
        base.validate().unwrap();
        // BERT-base: about 110M parameters.
        let n = base.parameter_total().unwrap();
        assert!((105_000_000..115_000_000).contains(&n), "{n}");
        for c in [
            Config::new(2, 1 << 40, 1, 30522),
            Config::new(usize::MAX, 64, 1, 30522),
            Config {
                max_position_embeddings: usize::MAX,
                ..Config::new(2, 64, 1, 30522)
            },
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("more parameters than this machine can count"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_wrong_type_in_an_hf_config_names_the_key() {
        let path = std::env::temp_dir().join(format!("bert-config-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"hidden_size": 64, "num_attention_heads": [4]}"#).unwrap();
        let e = Config::from_hf_json(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains("not a valid BERT config.json: `num_attention_heads`: invalid type"),
            "{e}"
        );
    }
}

//! Model loading for the subcommands.
use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use zoo::gpt2::Gpt2;
use zoo::hub::{self, Arch};
use zoo::tokenizer::Tokenizer;

/// Loads a GPT-2 and its tokenizer from the model flags.
pub fn load_gpt2(m: &ModelArgs, device: &Device) -> Result<(Gpt2, Tokenizer)> {
    let dir = hub::resolve(m.hf_dir.as_deref(), m.hf_repo.as_deref())?;
    match hub::detect_arch(&dir)? {
        Arch::Gpt2 => {}
        Arch::Bert => bail!(
            "{} holds a BERT model; this command needs GPT-2",
            dir.display()
        ),
    }
    let (model, tok) = hub::load_gpt2(&dir, device)
        .with_context(|| format!("loading GPT-2 from {}", dir.display()))?;
    if tok.vocab_size() > model.config.padded_vocab_size(1) {
        bail!(
            "the tokenizer in {} has {} tokens but the model's vocabulary is {}",
            dir.display(),
            tok.vocab_size(),
            model.config.vocab_size
        )
    }
    Ok((model, tok))
}

//! Model loading for the subcommands.
use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_deepscale::tensor_parallel::TensorParallel;
use std::path::{Path, PathBuf};
use zoo::gpt2::Gpt2;
use zoo::hub::{self, Arch};
use zoo::tokenizer::Tokenizer;

/// The local folder of a GPT-2 given by the model flags (downloaded once, before ranks start).
pub fn gpt2_dir(m: &ModelArgs) -> Result<PathBuf> {
    let dir = hub::resolve(m.hf_dir.as_deref(), m.hf_repo.as_deref())?;
    match hub::detect_arch(&dir)? {
        Arch::Gpt2 => Ok(dir),
        Arch::Bert => bail!(
            "{} holds a BERT model; this command needs GPT-2",
            dir.display()
        ),
    }
}

/// Loads this rank's part of the GPT-2 in `dir` and its tokenizer.
pub fn load_gpt2(
    dir: &Path,
    device: &Device,
    tp: Option<TensorParallel>,
) -> Result<(Gpt2, Tokenizer)> {
    let (model, tok) = hub::load_gpt2_tp(dir, device, tp, |_| {})
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

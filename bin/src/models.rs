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
    if let Some(dir) = &m.load {
        if m.hf_dir.is_some() || m.hf_repo.is_some() {
            bail!(
                "give --load {} or --hf-dir/--hf-repo, not both",
                dir.display()
            )
        }
        if !candle_deepscale::checkpoint::is_checkpoint(dir) {
            bail!(
                "--load {}: not a DeepScale checkpoint (no `latest` and no manifest.json)",
                dir.display()
            )
        }
        return Ok(dir.clone());
    }
    let dir = hub::resolve(m.hf_dir.as_deref(), m.hf_repo.as_deref())?;
    match hub::detect_arch(&dir)? {
        Arch::Gpt2 => Ok(dir),
        Arch::Bert => bail!(
            "{} holds a BERT model; this command needs GPT-2",
            dir.display()
        ),
    }
}

/// Loads this rank's part of the GPT-2 in `dir` (an HF folder or a native checkpoint) and its
/// tokenizer.
pub fn load_gpt2(
    dir: &Path,
    device: &Device,
    tp: Option<TensorParallel>,
) -> Result<(Gpt2, Tokenizer)> {
    let (model, tok) = if candle_deepscale::checkpoint::is_checkpoint(dir) {
        load_native_gpt2(dir, device, tp)?
    } else {
        hub::load_gpt2_tp(dir, device, tp, |_| {})
            .with_context(|| format!("loading GPT-2 from {}", dir.display()))?
    };
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

/// A GPT-2 from a native checkpoint, at this rank's tensor-parallel slice (any saved layout).
fn load_native_gpt2(
    dir: &Path,
    device: &Device,
    tp: Option<TensorParallel>,
) -> Result<(Gpt2, Tokenizer)> {
    let ck = candle_deepscale::checkpoint::Checkpoint::open(dir)
        .with_context(|| format!("--load {}", dir.display()))?;
    let m = &ck.manifest.model;
    if m["type"] != "gpt2" {
        bail!(
            "--load {}: a {} checkpoint, not GPT-2",
            ck.dir.display(),
            m["type"]
        )
    }
    let cfg: zoo::gpt2::Config = serde_json::from_value(m["config"].clone())
        .with_context(|| format!("--load {}: model config", ck.dir.display()))?;
    let tok = Tokenizer::from_json(&ck.dir.join("tokenizer.json"))?;
    let pb = candle_deepscale::parameter::ParamBuilder::new(&ck, device, candle_core::DType::F32)
        .with_tp(tp);
    Ok((Gpt2::new(&cfg, &pb)?, tok))
}

/// This rank's pipeline stage of `model` for inference (None without a pipeline): the layers cut
/// by balanced parameter counts.
pub fn stage<'a>(
    model: &'a Gpt2,
    pipe: Option<&'a candle_deepscale::engine::PipeContext>,
) -> Result<Option<candle_deepscale::pipe::Stage<'a>>> {
    let Some(p) = pipe else {
        return Ok(None);
    };
    let layers = crate::training::stage_layers(
        model.layers(),
        Some(p),
        &candle_deepscale::pipe::PartitionMethod::Parameters,
        false,
    )?;
    Ok(Some(candle_deepscale::pipe::Stage { layers, pipe: p }))
}

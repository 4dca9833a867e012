//! Model loading for the subcommands.
use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_core::Device;
use candle_deepscale::layers::parameter::{ParamBuilder, ParamSource};
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::checkpoint::{is_checkpoint, Checkpoint};
use candle_deepscale::runtime::pipe::PipeContext;
use candle_deepscale::runtime::pipe::{PartitionMethod, Stage};
use std::path::{Path, PathBuf};
use zoo::gpt2::{Gpt2, Gpt2Lm, Gpt2Pipe};
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
        if !candle_deepscale::runtime::checkpoint::is_checkpoint(dir) {
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
    dtype: DType,
    tp: Option<TensorParallel>,
) -> Result<(Gpt2, Tokenizer)> {
    let (model, tok) = if candle_deepscale::runtime::checkpoint::is_checkpoint(dir) {
        load_native_gpt2(dir, device, dtype, tp)?
    } else {
        hub::load_gpt2_as(dir, device, dtype, tp, |_| {})
            .with_context(|| format!("loading GPT-2 from {}", dir.display()))?
    };
    check_vocab(dir, &tok, &model.config)?;
    Ok((model, tok))
}

fn check_vocab(dir: &Path, tok: &Tokenizer, cfg: &zoo::gpt2::Config) -> Result<()> {
    if tok.vocab_size() > cfg.padded_vocab_size(1) {
        bail!(
            "the tokenizer in {} has {} tokens but the model's vocabulary is {}",
            dir.display(),
            tok.vocab_size(),
            cfg.vocab_size
        )
    }
    Ok(())
}

/// A GPT-2 from a native checkpoint, at this rank's tensor-parallel slice (any saved layout).
fn load_native_gpt2(
    dir: &Path,
    device: &Device,
    dtype: DType,
    tp: Option<TensorParallel>,
) -> Result<(Gpt2, Tokenizer)> {
    let (ck, cfg, tok) = open_native_gpt2(dir)?;
    let pb = ParamBuilder::new(&ck, device, dtype).with_tp(tp);
    Ok((Gpt2::new(&cfg, &pb)?, tok))
}

/// A native GPT-2 checkpoint: the opened checkpoint, its model config and tokenizer.
fn open_native_gpt2(dir: &Path) -> Result<(Checkpoint, zoo::gpt2::Config, Tokenizer)> {
    let ck = Checkpoint::open(dir).with_context(|| format!("--load {}", dir.display()))?;
    let m = &ck.manifest.model;
    if m["type"] != "gpt2" {
        bail!(
            "--load {}: a {} checkpoint, not GPT-2",
            ck.dir.display(),
            m["type"]
        )
    }
    let cfg: zoo::gpt2::Config = candle_deepscale::json::from_value(m["config"].clone())
        .with_context(|| format!("--load {}: manifest.json's model.config", ck.dir.display()))?;
    let tok = Tokenizer::from_json(&ck.dir.join("tokenizer.json"))?;
    Ok((ck, cfg, tok))
}

/// A GPT-2 on one rank for inference: the whole model, or (pp > 1) only this rank's pipeline
/// stage, built and read from `dir` (HF folder or native checkpoint) without the other stages.
pub struct RankGpt2 {
    pub model: Box<dyn Gpt2Lm>,
    pub tok: Tokenizer,
    pipe: Option<PipeContext>,
}

impl RankGpt2 {
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        tp: Option<TensorParallel>,
        pipe: Option<PipeContext>,
        method: &PartitionMethod,
        root: bool,
    ) -> Result<Self> {
        let Some(p) = pipe.clone() else {
            let (m, tok) = load_gpt2(dir, device, dtype, tp)?;
            return Ok(Self {
                model: Box::new(m),
                tok,
                pipe,
            });
        };
        let build = |cfg: &zoo::gpt2::Config, src: &dyn ParamSource| -> Result<Gpt2Pipe> {
            let bounds = Gpt2Pipe::partition(cfg, p.stages.size(), method)?;
            if root {
                eprintln!(
                    "pipeline: {} stages, layer boundaries {bounds:?}",
                    p.stages.size()
                );
            }
            let pb = ParamBuilder::new(src, device, dtype).with_tp(tp.clone());
            Ok(Gpt2Pipe::new(
                cfg,
                &pb,
                bounds[p.stages.rank]..bounds[p.stages.rank + 1],
            )?)
        };
        let (model, tok) = if is_checkpoint(dir) {
            let (ck, cfg, tok) = open_native_gpt2(dir)?;
            (build(&cfg, &ck)?, tok)
        } else {
            let cfg = zoo::gpt2::Config::from_hf_json(&dir.join("config.json"))?;
            let tok = Tokenizer::from_dir(dir)?;
            let src =
                zoo::gpt2::hf::HfSource::new(zoo::weights::SafetensorsFiles::open_dir(dir)?, &cfg)?;
            let m = build(&cfg, &src)
                .with_context(|| format!("loading GPT-2 from {}", dir.display()))?;
            (m, tok)
        };
        check_vocab(dir, &tok, &model.config)?;
        Ok(Self {
            model: Box::new(model),
            tok,
            pipe,
        })
    }

    /// [`RankGpt2::load`] on the device of the rank `ctx`, with parameters of `dtype`.
    pub fn for_rank(
        dir: &Path,
        ctx: &crate::launch::RankCtx,
        method: &PartitionMethod,
        dtype: DType,
    ) -> Result<Self> {
        Self::load(
            dir,
            &ctx.device,
            dtype,
            ctx.tp()?,
            ctx.pipe()?,
            method,
            ctx.is_root(),
        )
    }

    /// This rank's pipeline stage (None without a pipeline).
    pub fn stage(&self) -> Option<Stage<'_>> {
        self.pipe.as_ref().map(|p| Stage {
            layers: self.model.layers(),
            pipe: p,
        })
    }
}

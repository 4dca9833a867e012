//! Where a model comes from: a local HF folder (`--hf-dir`) or the Hub (`--hf-repo NAME[@REV]`,
//! through hf-hub and its cache; `HF_HUB_OFFLINE=1` reads the cache only).
use crate::tokenizer::Tokenizer;
use crate::weights::SafetensorsFiles;
use crate::{bert, gpt2};
use candle_core::{bail, DType, Device, Error, Result};
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The model families of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Bert,
}

/// Files fetched for a model, in the order tried.
const WANTED: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
];

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

/// Resolves `NAME[@REV]` to a local folder holding its files (the hf-hub cache snapshot).
pub fn fetch_repo(spec: &str) -> Result<PathBuf> {
    let (name, rev) = match spec.split_once('@') {
        Some((n, r)) => (n, r),
        None => (spec, "main"),
    };
    if name.is_empty() {
        bail!("--hf-repo needs a repository name, got `{spec}`")
    }
    let repo = Repo::with_revision(name.to_string(), RepoType::Model, rev.to_string());
    let cache = Cache::from_env();
    if offline() {
        let cached = cache.repo(repo.clone());
        let Some(config) = cached.get("config.json") else {
            bail!(
                "HF_HUB_OFFLINE=1 and `{name}@{rev}` is not in the hf-hub cache at {} (config.json missing); run once online or use --hf-dir",
                cache.path().display()
            )
        };
        let has_weights = cached.get("model.safetensors").is_some()
            || cached.get("model.safetensors.index.json").is_some();
        if !has_weights {
            bail!(
                "HF_HUB_OFFLINE=1 and the weights of `{name}@{rev}` (model.safetensors) are not in the hf-hub cache at {}",
                cache.path().display()
            )
        }
        return Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| Error::Msg(format!("cannot start the hf-hub client: {e}")))?;
    let api_repo = api.repo(repo);
    let info = api_repo
        .info()
        .map_err(|e| Error::Msg(format!("cannot reach `{name}@{rev}` on the Hub: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut dir = None;
    let mut wanted: Vec<String> = WANTED.iter().map(|s| s.to_string()).collect();
    wanted.extend(
        files
            .iter()
            .filter(|f| f.ends_with(".safetensors") && f.starts_with("model-"))
            .cloned(),
    );
    for f in wanted.iter().filter(|f| files.contains(f)) {
        let p = api_repo
            .get(f)
            .map_err(|e| Error::Msg(format!("cannot download {f} of `{name}@{rev}`: {e}")))?;
        dir.get_or_insert(p.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    dir.ok_or_else(|| {
        Error::Msg(format!(
            "`{name}@{rev}` has none of the files a model needs (config.json, *.safetensors)"
        ))
    })
}

/// The local folder of a model given by `--hf-dir` or `--hf-repo`.
pub fn resolve(hf_dir: Option<&Path>, hf_repo: Option<&str>) -> Result<PathBuf> {
    match (hf_dir, hf_repo) {
        (Some(d), None) => {
            check_hf_dir(d, "--hf-dir")?;
            Ok(d.to_path_buf())
        }
        (None, Some(r)) => fetch_repo(r),
        (Some(_), Some(_)) => bail!("give either --hf-dir or --hf-repo, not both"),
        (None, None) => bail!("no model given: use --hf-dir DIR or --hf-repo NAME"),
    }
}

/// `dir` is an HF model folder (it has a config.json); else an error saying what it is instead
/// (missing, a native, Megatron or DeepSpeed checkpoint) and which flag reads that. `flag` names
/// the flag that gave it.
pub fn check_hf_dir(dir: &Path, flag: &str) -> Result<()> {
    let d = dir.display();
    if !dir.exists() {
        bail!("{flag} {d}: no such folder")
    }
    if !dir.is_dir() {
        bail!("{flag} {d}: not a folder (an HF model folder holds config.json and weights)")
    }
    if dir.join("config.json").is_file() {
        return Ok(());
    }
    let has = |prefix: &str| {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
    };
    // A native save folder's tags hold manifest.json; a DeepSpeed one's hold *_model_states.pt.
    let native_tag = std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.path().join("manifest.json").is_file())
    });
    let what = if dir.join("manifest.json").is_file() || native_tag {
        "a DeepScale checkpoint: read it with --load"
    } else if dir.join("latest_checkpointed_iteration.txt").is_file()
        || has("iter_")
        || has("mp_rank_")
        || dir.join("release").is_dir()
    {
        "a Megatron checkpoint: read it with convert --from megatron --input"
    } else if dir.join("latest").is_file() || has("global_step") {
        "a DeepSpeed checkpoint: read it with convert --from deepspeed --input"
    } else {
        "not an HF model folder: no config.json"
    };
    bail!("{flag} {d}: {what}")
}

fn read_config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{} is not valid JSON: {e}", path.display())))?;
    Ok((path, v))
}

/// The family of the model in `dir`, from `config.json`'s `model_type` (or its keys).
pub fn detect_arch(dir: &Path) -> Result<Arch> {
    let (path, v) = read_config_json(dir)?;
    match v.get("model_type").and_then(|t| t.as_str()) {
        Some("gpt2") | Some("megatron-gpt2") => Ok(Arch::Gpt2),
        Some("bert") | Some("megatron-bert") => Ok(Arch::Bert),
        Some(other) => bail!(
            "{}: model_type `{other}` is not supported (gpt2, bert)",
            path.display()
        ),
        None if v.get("n_layer").is_some() => Ok(Arch::Gpt2),
        None if v.get("num_hidden_layers").is_some() => Ok(Arch::Bert),
        None => bail!(
            "{}: cannot tell the model type (no `model_type`)",
            path.display()
        ),
    }
}

/// Loads an HF GPT-2 folder: model (f32 on `device`) and tokenizer.
pub fn load_gpt2(dir: &Path, device: &Device) -> Result<(gpt2::Gpt2, Tokenizer)> {
    load_gpt2_tp(dir, device, None, |_| {})
}

/// As [`load_gpt2`], as one rank of the tensor-parallel group `tp` (reading only its slices), with
/// the config adjusted before the model is built (dropout rates, ...).
pub fn load_gpt2_tp(
    dir: &Path,
    device: &Device,
    tp: Option<TensorParallel>,
    adjust: impl FnOnce(&mut gpt2::Config),
) -> Result<(gpt2::Gpt2, Tokenizer)> {
    load_gpt2_as(dir, device, DType::F32, tp, adjust)
}

/// As [`load_gpt2_tp`], with parameters of `dtype` (bf16 halves an inference model's memory;
/// the checkpoint's values are rounded once, as `model.to(torch.bfloat16)` does).
pub fn load_gpt2_as(
    dir: &Path,
    device: &Device,
    dtype: DType,
    tp: Option<TensorParallel>,
    adjust: impl FnOnce(&mut gpt2::Config),
) -> Result<(gpt2::Gpt2, Tokenizer)> {
    let mut config = gpt2::Config::from_hf_json(&dir.join("config.json"))?;
    adjust(&mut config);
    let tokenizer = Tokenizer::from_dir(dir)?;
    let source = gpt2::hf::HfSource::new(SafetensorsFiles::open_dir(dir)?, &config)?;
    let pb = ParamBuilder::new(&source, device, dtype).with_tp(tp);
    let model = gpt2::Gpt2::new(&config, &pb)?;
    Ok((model, tokenizer))
}

/// Loads an HF BERT folder: model (heads as present in the checkpoint) and tokenizer.
pub fn load_bert(dir: &Path, device: &Device) -> Result<(bert::Bert, Tokenizer)> {
    load_bert_tp(dir, device, None)
}

/// As [`load_bert`], as one rank of the tensor-parallel group `tp`.
pub fn load_bert_tp(
    dir: &Path,
    device: &Device,
    tp: Option<TensorParallel>,
) -> Result<(bert::Bert, Tokenizer)> {
    let mut config = bert::Config::from_hf_json(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let files = SafetensorsFiles::open_dir(dir)?;
    bert::hf::HfSource::detect_heads(&files, &mut config);
    let source = bert::hf::HfSource::new(files, &config)?;
    let model = bert::Bert::new(
        &config,
        &ParamBuilder::new(&source, device, DType::F32).with_tp(tp),
    )?;
    Ok((model, tokenizer))
}

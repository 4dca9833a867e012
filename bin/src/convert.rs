//! `deepscale convert`: consolidate a native checkpoint into one safetensors model (DeepSpeed's
//! zero_to_fp32 job), export a Hugging Face folder, or import an HF checkpoint as a native one at
//! any tensor-parallel size.
use crate::args::{print_json, LayoutArgs};
use crate::launch::launch;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::parameter::{Param, ParamBuilder, ParamSource};
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::checkpoint::{self, Checkpoint, SaveSpec};
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::lr_schedules::LrSchedule;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use zoo::bert::{self, Bert};
use zoo::gpt2::{self, Gpt2};
use zoo::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum From {
    Hf,
    Megatron,
    Deepspeed,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum To {
    /// One safetensors model with the logical parameter names (consolidated, padding stripped).
    Safetensors,
    /// A Hugging Face folder (config.json, safetensors in HF's names and layout, tokenizer.json).
    Hf,
    /// A native checkpoint at --model-parallel-size.
    Native,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A native checkpoint (a --save directory or a tag).
    #[arg(long)]
    pub load: Option<PathBuf>,
    /// The kind of --input.
    #[arg(long, value_enum)]
    pub from: Option<From>,
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub to: To,
    /// --from megatron|deepspeed: the GPT-2 vocab.json and merges.txt the checkpoint was trained
    /// with (default: the shipped GPT-2 files).
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// --from megatron|deepspeed: the real vocabulary size when it differs from the tokenizer's
    /// (the checkpoint's embedding holds it plus Megatron's padding).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Output file (safetensors) or directory (hf, native).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: DtypeArg,
    /// Largest safetensors file, e.g. 5GB, 500MB or bytes; larger models are sharded with an index.
    #[arg(long)]
    pub max_shard_size: Option<String>,
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[arg(long)]
    pub json: bool,
}

enum Model {
    Gpt2(Box<Gpt2>),
    Bert(Box<Bert>),
}

impl Model {
    fn params(&self) -> Vec<&Param> {
        match self {
            Model::Gpt2(m) => m.parameters(),
            Model::Bert(m) => m.parameters(),
        }
    }
}

enum Source {
    Native(Box<Checkpoint>),
    Hf(PathBuf),
    /// A Megatron or DeepSpeed .pt checkpoint, merged into logical tensors.
    Imported(Box<(zoo::gpt2::megatron::Imported, Tokenizer)>),
}

fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1u64 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num.parse().map_err(|_| {
        anyhow::anyhow!("--max-shard-size `{s}`: expected e.g. 5GB, 500MB or a byte count")
    })?;
    if n <= 0.0 {
        bail!("--max-shard-size must be positive")
    }
    Ok((n * mult as f64) as u64)
}

impl ConvertArgs {
    fn dtype(&self) -> DType {
        match self.dtype {
            DtypeArg::Fp32 => DType::F32,
            DtypeArg::Fp16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    fn source(&self) -> Result<Source> {
        match (&self.load, self.from, &self.input) {
            (Some(d), None, None) => Ok(Source::Native(Box::new(
                Checkpoint::open(d).with_context(|| format!("--load {}", d.display()))?,
            ))),
            (None, Some(From::Hf), Some(d)) => {
                zoo::hub::check_hf_dir(d, "--from hf --input")?;
                Ok(Source::Hf(d.clone()))
            }
            (None, Some(f @ (From::Megatron | From::Deepspeed)), Some(d)) => {
                let assets = crate::pretrain_gpt2::assets_dir();
                let vocab = self
                    .vocab_file
                    .clone()
                    .unwrap_or_else(|| assets.join("gpt2/gpt2-vocab.json"));
                let merges = self
                    .merge_file
                    .clone()
                    .unwrap_or_else(|| assets.join("gpt2/gpt2-merges.txt"));
                let tok = Tokenizer::gpt2_bpe(&vocab, &merges)?;
                let n = self.vocab_size.unwrap_or(tok.vocab_size());
                let imported = if f == From::Megatron {
                    zoo::gpt2::megatron::import_megatron(d, n)
                } else {
                    zoo::gpt2::megatron::import_deepspeed(d, n)
                }
                .with_context(|| format!("--from {f:?} --input {}", d.display()))?;
                eprintln!(
                    "read {}: GPT-2 {} layers, hidden {}, heads {}{}",
                    imported.description,
                    imported.config.num_layers,
                    imported.config.hidden_size,
                    imported.config.num_attention_heads,
                    imported
                        .iteration
                        .map_or(String::new(), |i| format!(", iteration {i}"))
                );
                Ok(Source::Imported(Box::new((imported, tok))))
            }
            (None, Some(_), None) => bail!("--from needs --input DIR"),
            _ => bail!("give --load DIR (native) or --from hf --input DIR"),
        }
    }
}

/// The architecture and config of a source.
enum Arch {
    Gpt2(gpt2::Config),
    Bert(bert::Config),
}

/// The model config a native checkpoint's manifest holds (`model.config`).
fn model_config<T: serde::de::DeserializeOwned>(dir: &Path, m: &serde_json::Value) -> Result<T> {
    candle_deepscale::json::from_value(m["config"].clone())
        .with_context(|| format!("{}: manifest.json's model.config", dir.display()))
}

/// Calls `f` with the source's architecture, a [`ParamSource`] over its weights and its tokenizer.
fn with_source<R>(
    src: &Source,
    f: impl FnOnce(&Arch, &dyn ParamSource, &Tokenizer) -> Result<R>,
) -> Result<R> {
    match src {
        Source::Native(ck) => {
            let m = &ck.manifest.model;
            let tok = Tokenizer::from_json(&ck.dir.join("tokenizer.json"))?;
            let arch = match m["type"].as_str() {
                Some("gpt2") => Arch::Gpt2(model_config(&ck.dir, m)?),
                Some("bert") => Arch::Bert(model_config(&ck.dir, m)?),
                other => bail!("{}: unknown model type {other:?}", ck.dir.display()),
            };
            f(&arch, ck.as_ref(), &tok)
        }
        Source::Imported(it) => f(&Arch::Gpt2(it.0.config.clone()), &it.0.tensors, &it.1),
        Source::Hf(dir) => {
            let tok = Tokenizer::from_dir(dir)?;
            let files = zoo::weights::SafetensorsFiles::open_dir(dir)?;
            match zoo::hub::detect_arch(dir)? {
                zoo::hub::Arch::Gpt2 => {
                    let config = gpt2::Config::from_hf_json(&dir.join("config.json"))?;
                    let source = gpt2::hf::HfSource::new(files, &config)?;
                    f(&Arch::Gpt2(config), &source, &tok)
                }
                zoo::hub::Arch::Bert => {
                    let mut config = bert::Config::from_hf_json(&dir.join("config.json"))?;
                    bert::hf::HfSource::detect_heads(&files, &mut config);
                    let source = bert::hf::HfSource::new(files, &config)?;
                    f(&Arch::Bert(config), &source, &tok)
                }
            }
        }
    }
}

/// This rank's model (tensor-parallel slice `tp`) and the tokenizer.
fn build(src: &Source, tp: Option<TensorParallel>) -> Result<(Model, Tokenizer)> {
    with_source(src, |arch, ps, tok| {
        let pb = ParamBuilder::new(ps, &Device::Cpu, DType::F32).with_tp(tp);
        let model = match arch {
            Arch::Gpt2(c) => Model::Gpt2(Box::new(Gpt2::new(c, &pb)?)),
            Arch::Bert(c) => Model::Bert(Box::new(Bert::new(c, &pb)?)),
        };
        Ok((model, tok.clone()))
    })
}

/// Writes `tensors` as `<stem>.safetensors`, or as numbered shards with an index when they exceed
/// `max`. Every file is written to a temporary name first and renamed in only when all are
/// complete (the index last), so a failure leaves an earlier export whole; files of an earlier
/// export of the same stem that this one does not have are then removed. Returns the files.
fn write_sharded(
    dir: &Path,
    stem: &str,
    tensors: Vec<(String, Tensor)>,
    max: Option<u64>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, t)| size(t)).sum();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (n, t) in tensors {
        if let Some(m) = max {
            if cur > 0 && cur + size(&t) > m {
                shards.push(Vec::new());
                cur = 0;
            }
        }
        cur += size(&t);
        shards.last_mut().expect("one shard").push((n, t));
    }
    let n = shards.len();
    let mut staged = Staged::default();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let name = if n == 1 {
            format!("{stem}.safetensors")
        } else {
            format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
        };
        for (k, _) in &shard {
            weight_map.insert(k.clone(), json!(name));
        }
        let map: HashMap<_, _> = shard.into_iter().collect();
        staged.write(&dir.join(&name), |tmp| {
            Ok(candle_core::safetensors::save(&map, tmp)?)
        })?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        staged.write(&dir.join(format!("{stem}.safetensors.index.json")), |tmp| {
            Ok(std::fs::write(tmp, index.to_string())?)
        })?;
    }
    let files = staged.commit()?;
    candle_deepscale::fs::remove_stale_safetensors(dir, stem, &files)?;
    Ok(files)
}

/// Files written under temporary names, renamed into place together by [`Staged::commit`];
/// dropped uncommitted, the temporaries are removed.
#[derive(Default)]
struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn write(&mut self, path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let name = path
            .file_name()
            .map_or("file".into(), |n| n.to_string_lossy());
        let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
        self.files.push((tmp.clone(), path.to_path_buf()));
        f(&tmp).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(candle_deepscale::fs::match_folder_permissions(&tmp)?)
    }

    fn commit(mut self) -> Result<Vec<PathBuf>> {
        for (tmp, path) in &self.files {
            std::fs::File::open(tmp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let files = std::mem::take(&mut self.files);
        for (tmp, path) in &files {
            std::fs::rename(tmp, path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(files.into_iter().map(|(_, p)| p).collect())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let src = a.source()?;
    let dtype = a.dtype();
    let max = a.max_shard_size.as_deref().map(parse_size).transpose()?;
    let files: Vec<PathBuf> = match a.to {
        To::Safetensors | To::Hf => {
            let (model, tok) = build(&src, None)?;
            let cast = |v: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
                v.into_iter()
                    .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.contiguous()?)))
                    .collect()
            };
            if a.to == To::Safetensors {
                // Logical names and shapes, vocabulary padding stripped.
                let tensors = model
                    .params()
                    .iter()
                    .map(|p| {
                        let t = match p.meta.real_rows {
                            Some(r) => p.tensor().narrow(0, 0, r)?,
                            None => p.tensor().clone(),
                        };
                        Ok((p.meta.name.clone(), t))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (dir, stem) = (
                    a.output.parent().unwrap_or(Path::new(".")).to_path_buf(),
                    a.output
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or("model".into()),
                );
                write_sharded(&dir, &stem, cast(tensors)?, max)?
            } else {
                let (tensors, config) = match &model {
                    Model::Gpt2(m) => (
                        gpt2::hf::to_hf_tensors(&m.parameters(), &m.config, true)?,
                        m.config.to_hf_json(),
                    ),
                    Model::Bert(m) => {
                        let mut c = serde_json::to_value(&m.config)?;
                        c["model_type"] = json!("bert");
                        c["architectures"] = json!(["BertForPreTraining"]);
                        (
                            bert::hf::to_hf_tensors(&m.parameters(), &m.config, true)?,
                            c,
                        )
                    }
                };
                let mut files = write_sharded(&a.output, "model", cast(tensors)?, max)?;
                let cfg = a.output.join("config.json");
                candle_deepscale::fs::write_atomic(
                    &cfg,
                    serde_json::to_string_pretty(&config)?.as_bytes(),
                )?;
                let tk = a.output.join("tokenizer.json");
                candle_deepscale::fs::write_atomic_with(&tk, |tmp| tok.save(tmp))?;
                files.extend([cfg, tk]);
                files
            }
        }
        To::Native => {
            if dtype != DType::F32 {
                bail!("not supported: --dtype {:?} for native checkpoints, because they keep fp32 parameters", a.dtype)
            }
            let layout = a.layout.layout()?;
            let method = a.layout.partition_method(None)?;
            let out = a.output.clone();
            launch(&layout, |ctx| {
                let pipe = ctx.pipe()?;
                let (stage, stages) = pipe
                    .as_ref()
                    .map_or((0, 1), |p| (p.stages.rank, p.stages.size()));
                with_source(&src, |arch, ps, tok| {
                    // Each pipeline stage builds and writes only its layers.
                    let pb = ParamBuilder::new(ps, &Device::Cpu, DType::F32).with_tp(ctx.tp()?);
                    let (bounds, kind, config) = match arch {
                        Arch::Gpt2(c) => (
                            zoo::gpt2::Gpt2Pipe::partition(c, stages, &method)?,
                            "gpt2",
                            serde_json::to_value(c)?,
                        ),
                        Arch::Bert(c) => (
                            zoo::bert::BertPipe::partition(c, stages, &method)?,
                            "bert",
                            serde_json::to_value(c)?,
                        ),
                    };
                    let range = bounds[stage]..bounds[stage + 1];
                    let model: std::sync::Arc<dyn candle_deepscale::Sequential> = match arch {
                        Arch::Gpt2(c) => {
                            std::sync::Arc::new(zoo::gpt2::Gpt2Pipe::new(c, &pb, range.clone())?)
                        }
                        Arch::Bert(c) => {
                            std::sync::Arc::new(zoo::bert::BertPipe::new(c, &pb, range.clone())?)
                        }
                    };
                    let mut engine =
                        Engine::new(model, EngineConfig::default(), ctx.dp()?, ctx.tp()?)?;
                    if let Some(p) = pipe.clone() {
                        engine = engine.with_pipeline(p)?;
                    }
                    if let Source::Native(ck) = &src {
                        // Native -> native keeps the counters and the optimizer state,
                        // re-partitioned.
                        ck.restore(&mut engine, true)?;
                    }
                    let (seed, schedule) = match &src {
                        Source::Native(ck) => (ck.manifest.seed, ck.manifest.lr_schedule),
                        Source::Hf(_) | Source::Imported(_) => (
                            1234,
                            LrSchedule::Constant(EngineConfig::default().optimizer.lr),
                        ),
                    };
                    let tag = checkpoint::save(
                        &engine,
                        &SaveSpec {
                            dir: &out,
                            consumed_samples: 0,
                            seed,
                            lr_schedule: schedule,
                            model: json!({"type": kind, "config": config}),
                            extra_files: vec![(
                                "tokenizer.json".into(),
                                tok.to_json()?.into_bytes(),
                            )],
                            keep_last: None,
                            first_layer: range.start,
                        },
                    )?;
                    Ok(vec![tag])
                })
            })?
            .unwrap_or_default()
        }
    };
    for f in &files {
        eprintln!("wrote {}", f.display());
    }
    if a.json {
        let layout = a.layout.layout()?;
        print_json(
            json!({"to": format!("{:?}", a.to).to_lowercase(), "output": a.output.display().to_string(),
                   "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()}),
            &layout,
        );
    }
    Ok(())
}

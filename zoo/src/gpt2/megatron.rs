//! Importers for GPT-2 checkpoints written by Megatron-LM and by DeepSpeed (the seed's snapshots):
//!
//! - Megatron: `<dir>/latest_checkpointed_iteration.txt`, `iter_XXXXXXX/` or `release/`, one
//!   `mp_rank_XX/model_optim_rng.pt` per model-parallel rank (zip or legacy torch.save), the model
//!   as nested state dicts, `args` carrying the shape, `checkpoint_version` the QKV layout.
//! - DeepSpeed: `<dir>/latest` naming a tag with `mp_rank_XX_model_states.pt` (`module`), ZeRO's
//!   `zero_pp_rank_D_mp_rank_XX_optim_states.pt` (fp32 partitions, preferred over the fp16
//!   module weights when `param_shapes` says how to cut them), or a pipeline's
//!   `layer_LL-model_XX-model_states.pt` files.
//!
//! Model-parallel partitions are merged into logical tensors under our parameter names, the fused
//! QKV reordered to our `[heads, 3, head_dim]` rows (version 2.0) from version 0
//! (`[3, heads, head_dim]`) or 1.0 (`[heads, head_dim, 3]`).
use super::Config;
use crate::torch_pickle::{self, Value};
use crate::weights::LogicalTensors;
use candle_core::{bail, DType, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A checkpoint imported into logical tensors.
pub struct Imported {
    pub config: Config,
    pub tensors: LogicalTensors,
    pub iteration: Option<u64>,
    /// What was read, for the log.
    pub description: String,
}

fn msg(s: String) -> Error {
    Error::Msg(s)
}

/// The dimension a Megatron model-parallel partition splits (None: replicated).
fn split_dim(name: &str) -> Option<usize> {
    if name == "embedding.word_embeddings.weight"
        || name.ends_with("attention.query_key_value.weight")
        || name.ends_with("attention.query_key_value.bias")
        || name.ends_with("mlp.dense_h_to_4h.weight")
        || name.ends_with("mlp.dense_h_to_4h.bias")
    {
        Some(0)
    } else if name.ends_with("attention.dense.weight") || name.ends_with("mlp.dense_4h_to_h.weight")
    {
        Some(1)
    } else {
        None
    }
}

/// Our parameter name for a Megatron / DeepSpeed key (any prefix: `model.`, `module.`,
/// `language_model.`, `transformer.`, `encoder.`), or None for what is not a parameter.
pub fn our_name(key: &str) -> Option<String> {
    let key = key.replace(".self_attention.", ".attention.");
    if key.ends_with("word_embeddings.weight") {
        return Some("embedding.word_embeddings.weight".into());
    }
    if key.ends_with("position_embeddings.weight") {
        return Some("embedding.position_embeddings.weight".into());
    }
    if let Some(at) = key.find("final_layernorm.") {
        return Some(key[at..].to_string());
    }
    let at = if key.starts_with("layers.") {
        0
    } else {
        key.find(".layers.")? + 1
    };
    Some(key[at..].to_string())
}

/// Rows of one partition's fused QKV (weight or bias) from `version`'s layout to `[np, 3, hn]`.
fn fix_qkv(t: &Tensor, version: f64, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let hn = dims[0] / 3 / heads.max(1);
    if heads * 3 * hn != dims[0] {
        bail!(
            "fused QKV of {} rows does not split into {heads} heads x 3",
            dims[0]
        )
    }
    let rest = &dims[1..];
    let with = |lead: &[usize]| -> Vec<usize> { lead.iter().chain(rest).copied().collect() };
    let out = if version < 1.0 {
        t.reshape(with(&[3, heads, hn]))?.transpose(0, 1)?
    } else if version < 2.0 {
        t.reshape(with(&[heads, hn, 3]))?.transpose(1, 2)?
    } else {
        return Ok(t.clone());
    };
    out.contiguous()?.reshape(dims)
}

/// Merges model-parallel partitions (each a name -> tensor map under our names) into logical
/// tensors, fixing the QKV layout of `version`.
fn merge(
    parts: Vec<BTreeMap<String, Tensor>>,
    version: f64,
    heads: usize,
) -> Result<LogicalTensors> {
    let mp = parts.len();
    if !heads.is_multiple_of(mp) {
        bail!("{heads} attention heads do not split over {mp} model-parallel partitions")
    }
    let mut out = HashMap::new();
    let names: Vec<String> = parts[0].keys().cloned().collect();
    for name in names {
        let mut blocks = Vec::with_capacity(mp);
        for (r, p) in parts.iter().enumerate() {
            let t = p.get(&name).ok_or_else(|| {
                msg(format!(
                    "model-parallel partition {r} lacks `{name}` (partition 0 has it)"
                ))
            })?;
            let t = t.to_dtype(DType::F32)?;
            blocks.push(if name.contains("query_key_value") {
                fix_qkv(&t, version, heads / mp)?
            } else {
                t
            });
        }
        let full = match split_dim(&name) {
            Some(d) if mp > 1 => Tensor::cat(&blocks, d)?,
            _ => blocks.swap_remove(0),
        };
        out.insert(name, full);
    }
    Ok(LogicalTensors::new(out))
}

/// The model config from Megatron's `args`, checked against the tensors.
fn config_from_args(args: Option<&Value>, vocab_size: usize, origin: &str) -> Result<Config> {
    let Some(a) = args else {
        bail!("{origin}: no `args` in the checkpoint, so the model's shape is unknown")
    };
    let get = |k: &str| -> Result<usize> {
        a.get(k)
            .and_then(|v| v.as_i64())
            .map(|v| v as usize)
            .ok_or_else(|| msg(format!("{origin}: args.{k} is missing")))
    };
    let (layers, hidden, heads) = (
        get("num_layers")?,
        get("hidden_size")?,
        get("num_attention_heads")?,
    );
    let mut c = Config::new(layers, hidden, heads, vocab_size);
    c.max_position_embeddings = get("max_position_embeddings")?;
    c.seq_length = get("seq_length").unwrap_or(c.max_position_embeddings);
    if let Ok(f) = get("ffn_hidden_size") {
        c.ffn_hidden_size = f;
    }
    if let Ok(d) = get("make_vocab_size_divisible_by") {
        c.make_vocab_size_divisible_by = d;
    }
    if let Some(e) = a.get("layernorm_epsilon").and_then(|v| v.as_f64()) {
        c.layernorm_epsilon = e;
    }
    c.validate()?;
    Ok(c)
}

/// Checks the merged tensors against the config (the embedding holds at least the vocabulary)
/// and drops the vocabulary padding rows.
fn finish(
    config: Config,
    mut tensors: LogicalTensors,
    iteration: Option<u64>,
    description: String,
) -> Result<Imported> {
    let wte = "embedding.word_embeddings.weight";
    let emb = tensors
        .get(wte)
        .ok_or_else(|| msg(format!("{description}: no word embeddings")))?
        .clone();
    let (rows, h) = emb.dims2()?;
    if h != config.hidden_size {
        bail!(
            "{description}: word embeddings are {rows} x {h}, args say hidden_size {}",
            config.hidden_size
        )
    }
    if rows < config.vocab_size {
        bail!(
            "{description}: the embedding has {rows} rows, fewer than the tokenizer's {} tokens \
             (give the checkpoint's vocabulary with --vocab-size or --vocab-file/--merge-file)",
            config.vocab_size
        )
    }
    tensors.insert(wte, emb.narrow(0, 0, config.vocab_size)?);
    let expected = 4 + 12 * config.num_layers;
    if tensors.len() != expected {
        bail!(
            "{description}: {} tensors, a {}-layer GPT-2 has {expected}",
            tensors.len(),
            config.num_layers
        )
    }
    Ok(Imported {
        config,
        tensors,
        iteration,
        description,
    })
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| msg(format!("cannot read {}: {e}", p.display())))
}

fn subdirs_with_prefix(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| msg(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn version_of(top: &Value) -> f64 {
    top.get("checkpoint_version")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0)
}

/// Imports a Megatron checkpoint: a save directory (its latest iteration or release), an
/// `iter_XXXXXXX` / `release` directory, or one `mp_rank_XX` directory's parent.
pub fn import_megatron(dir: &Path, vocab_size: usize) -> Result<Imported> {
    let tracker = dir.join("latest_checkpointed_iteration.txt");
    let tag_dir = if tracker.is_file() {
        let it = read_text(&tracker)?;
        if it == "release" {
            dir.join("release")
        } else {
            let n: u64 = it.parse().map_err(|_| {
                msg(format!(
                    "{}: `{it}` is neither an iteration nor `release`",
                    tracker.display()
                ))
            })?;
            dir.join(format!("iter_{n:07}"))
        }
    } else {
        dir.to_path_buf()
    };
    let ranks = subdirs_with_prefix(&tag_dir, "mp_rank_")?;
    if ranks.is_empty() {
        bail!(
            "{}: no mp_rank_XX directories (expected a Megatron checkpoint: \
             latest_checkpointed_iteration.txt, iter_XXXXXXX/ or release/)",
            tag_dir.display()
        )
    }
    if let Some(p) = ranks.iter().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.len() > "mp_rank_00".len())
    }) {
        bail!(
            "not supported: {} is a Megatron pipeline-parallel partition (mp_rank_XX_YYY); \
             import Megatron checkpoints saved without pipeline parallelism",
            p.display()
        )
    }
    let mut parts = Vec::new();
    let (mut config, mut version, mut iteration) = (None, 0.0, None);
    for r in &ranks {
        let file = ["model_optim_rng.pt", "model_rng.pt"]
            .iter()
            .map(|f| r.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| msg(format!("{}: no model_optim_rng.pt", r.display())))?;
        let top = torch_pickle::load(&file)?;
        let origin = file.display().to_string();
        if config.is_none() {
            config = Some(config_from_args(top.get("args"), vocab_size, &origin)?);
            version = version_of(&top);
            iteration = top
                .get("iteration")
                .and_then(|v| v.as_i64())
                .map(|v| v as u64);
            check_partitions(
                &tag_dir,
                "mp_rank_",
                "",
                &ranks,
                tp_of(top.get("args")),
                &origin,
            )?;
        }
        let model = top
            .get("model")
            .ok_or_else(|| msg(format!("{origin}: no `model` entry")))?;
        let mut part = BTreeMap::new();
        for (k, t) in model.flatten_tensors() {
            if let Some(n) = our_name(&k) {
                part.insert(n, t);
            }
        }
        parts.push(part);
    }
    let config = config.expect("at least one rank");
    let tensors = merge(parts, version, config.num_attention_heads)?;
    finish(
        config,
        tensors,
        iteration,
        format!(
            "Megatron checkpoint {} (checkpoint version {version}, {} model-parallel partitions)",
            tag_dir.display(),
            ranks.len()
        ),
    )
}

/// The tensor-parallel size a checkpoint's saved `args` name (Megatron's
/// `tensor_model_parallel_size`, or `model_parallel_size` before it).
fn tp_of(args: Option<&Value>) -> Option<usize> {
    let a = args?;
    ["tensor_model_parallel_size", "model_parallel_size"]
        .iter()
        .find_map(|k| a.get(k).and_then(|v| v.as_i64()))
        .map(|v| v as usize)
}

/// The partitions found (`found`, sorted; named `{prefix}NN{suffix}`) are exactly 00..tp-1 of the
/// tensor-parallel size the checkpoint's args give: a missing one is named, not left to surface
/// as a shape mismatch.
fn check_partitions(
    dir: &Path,
    prefix: &str,
    suffix: &str,
    found: &[PathBuf],
    tp: Option<usize>,
    origin: &str,
) -> Result<()> {
    let n = tp.unwrap_or(found.len()).max(found.len());
    for r in 0..n {
        let name = format!("{prefix}{r:02}{suffix}");
        if !found
            .iter()
            .any(|p| p.file_name().and_then(|f| f.to_str()) == Some(name.as_str()))
        {
            bail!(
                "{}: {name} is missing ({origin} says tensor_model_parallel_size {n}; found {})",
                dir.display(),
                found
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
    Ok(())
}

/// ZeRO's fp32 weights of model-parallel rank `mp`: the data-parallel partitions of each group
/// concatenated and cut by `param_shapes` (DeepSpeed's zero_to_fp32). None without them.
fn zero_fp32(
    tag: &Path,
    mp: usize,
    shapes: &Value,
    dp_world_size: Option<usize>,
) -> Result<Option<BTreeMap<String, Tensor>>> {
    let files = std::fs::read_dir(tag)
        .map_err(|e| msg(format!("cannot list {}: {e}", tag.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?.to_string();
            let rest = n.strip_prefix("zero_pp_rank_")?;
            let (d, rest) = rest.split_once("_mp_rank_")?;
            let m = rest.strip_suffix("_optim_states.pt")?;
            (m.parse::<usize>().ok()? == mp).then_some((d.parse::<usize>().ok()?, p))
        })
        .collect::<BTreeMap<usize, PathBuf>>();
    if files.is_empty() {
        return Ok(None);
    }
    let expected = dp_world_size
        .unwrap_or(0)
        .max(files.keys().max().map_or(0, |m| m + 1));
    if let Some(d) = (0..expected).find(|d| !files.contains_key(d)) {
        bail!(
            "{}: zero_pp_rank_{d}_mp_rank_{mp:02}_optim_states.pt is missing (the model states \
             say {expected} data-parallel ZeRO partitions; found {})",
            tag.display(),
            files.len()
        )
    }
    let Value::List(groups) = shapes else {
        return Ok(None);
    };
    let mut flat: Vec<Vec<Tensor>> = vec![Vec::new(); groups.len()];
    for (d, (rank, path)) in files.iter().enumerate() {
        if *rank != d {
            bail!("{}: ZeRO partition {d} is missing", tag.display())
        }
        let v = torch_pickle::load(path)?;
        let parts = v
            .get("optimizer_state_dict")
            .and_then(|o| o.get("single_partition_of_fp32_groups"))
            .ok_or_else(|| {
                msg(format!(
                    "{}: no optimizer_state_dict.single_partition_of_fp32_groups (ZeRO stage 1/2)",
                    path.display()
                ))
            })?;
        let Value::List(parts) = parts else {
            bail!("{}: fp32 groups are not a list", path.display())
        };
        if parts.len() != groups.len() {
            bail!(
                "{}: {} fp32 groups, param_shapes has {}",
                path.display(),
                parts.len(),
                groups.len()
            )
        }
        for (g, t) in parts.iter().enumerate() {
            let t = t
                .as_tensor()
                .ok_or_else(|| msg(format!("{}: group {g} is not a tensor", path.display())))?;
            flat[g].push(t.to_dtype(DType::F32)?.flatten_all()?);
        }
    }
    let mut out = BTreeMap::new();
    for (g, shapes) in groups.iter().enumerate() {
        let full = Tensor::cat(&flat[g], 0)?;
        let mut at = 0;
        for (name, shape) in shapes.as_dict().unwrap_or_default() {
            let dims: Vec<usize> = match shape {
                Value::List(d) => d
                    .iter()
                    .filter_map(|x| x.as_i64())
                    .map(|x| x as usize)
                    .collect(),
                _ => bail!("param_shapes `{name}` is not a shape"),
            };
            let n: usize = dims.iter().product();
            if at + n > full.dim(0)? {
                bail!(
                    "{}: ZeRO group {g} holds {} values, param_shapes need more at `{name}`",
                    tag.display(),
                    full.dim(0)?
                )
            }
            if let Some(ours) = our_name(name) {
                out.insert(ours, full.narrow(0, at, n)?.reshape(dims)?);
            }
            at += n;
        }
    }
    Ok(Some(out))
}

/// Imports a DeepSpeed checkpoint: a save directory (its `latest` tag) or a tag directory.
pub fn import_deepspeed(dir: &Path, vocab_size: usize) -> Result<Imported> {
    let latest = dir.join("latest");
    let tag = if latest.is_file() {
        candle_deepscale::fs::confined(dir, &read_text(&latest)?, &latest, "tag")?
    } else {
        dir.to_path_buf()
    };
    let states: Vec<PathBuf> = subdirs_with_prefix(&tag, "mp_rank_")?
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_model_states.pt"))
        .collect();
    if states.is_empty() {
        bail!(
            "{}: no mp_rank_XX_model_states.pt (expected a DeepSpeed checkpoint tag or a \
             directory with `latest`)",
            tag.display()
        )
    }
    let layer_files = subdirs_with_prefix(&tag, "layer_")?;
    let mut parts = Vec::new();
    let (mut config, mut version, mut iteration, mut fp32_used) = (None, 0.0, None, false);
    for (mp, path) in states.iter().enumerate() {
        let top = torch_pickle::load(path)?;
        let origin = path.display().to_string();
        if config.is_none() {
            config = Some(config_from_args(top.get("args"), vocab_size, &origin)?);
            // The pipeline layer files carry no version: DeepSpeed's GPT2ModelPipe is 2.0.
            version = match top.get("checkpoint_version") {
                Some(_) => version_of(&top),
                None if !layer_files.is_empty() => 2.0,
                None => 0.0,
            };
            iteration = top
                .get("iteration")
                .or_else(|| top.get("global_steps"))
                .and_then(|v| v.as_i64())
                .map(|v| v as u64);
            let tp = top
                .get("mp_world_size")
                .and_then(|v| v.as_i64())
                .map(|v| v as usize)
                .or_else(|| tp_of(top.get("args")));
            check_partitions(&tag, "mp_rank_", "_model_states.pt", &states, tp, &origin)?;
        }
        let mut part = BTreeMap::new();
        match top.get("module") {
            Some(m @ Value::Dict(_)) => {
                for (k, t) in m.flatten_tensors() {
                    if let Some(n) = our_name(&k) {
                        part.insert(n, t);
                    }
                }
                if let Some(shapes) = top.get("param_shapes") {
                    let dp = top
                        .get("dp_world_size")
                        .and_then(|v| v.as_i64())
                        .map(|v| v as usize);
                    if let Some(fp32) = zero_fp32(&tag, mp, shapes, dp)? {
                        part.extend(fp32);
                        fp32_used = true;
                    }
                }
            }
            _ => {
                // A pipeline: this partition's layer files, in layer order; transformer layers
                // are numbered in order, a file with only weight/bias is the final LayerNorm.
                let suffix = format!("-model_{mp:02}-model_states.pt");
                let mut block = 0;
                for f in layer_files
                    .iter()
                    .filter(|p| p.to_string_lossy().ends_with(&suffix))
                {
                    let sd = torch_pickle::load(f)?.flatten_tensors();
                    let keys: Vec<&str> = sd.iter().map(|(k, _)| k.as_str()).collect();
                    let is_block = keys.iter().any(|k| k.ends_with("input_layernorm.weight"));
                    let is_norm = keys.iter().all(|k| *k == "weight" || *k == "bias");
                    for (k, t) in sd.iter() {
                        let name = if is_block {
                            Some(format!(
                                "layers.{block}.{}",
                                k.replace("self_attention", "attention")
                            ))
                        } else if is_norm {
                            Some(format!("final_layernorm.{k}"))
                        } else {
                            our_name(k)
                        };
                        if let Some(n) = name {
                            part.insert(n, t.clone());
                        }
                    }
                    block += usize::from(is_block);
                }
                if part.is_empty() {
                    bail!("{origin}: no `module` and no layer_LL{suffix} files beside it",)
                }
            }
        }
        parts.push(part);
    }
    let config = config.expect("at least one rank");
    let tensors = merge(parts, version, config.num_attention_heads)?;
    finish(
        config,
        tensors,
        iteration,
        format!(
            "DeepSpeed checkpoint {} ({} model-parallel partitions{}{})",
            tag.display(),
            states.len(),
            if layer_files.is_empty() {
                ""
            } else {
                ", pipeline layer files"
            },
            if fp32_used {
                ", fp32 weights from the ZeRO partitions"
            } else {
                ""
            }
        ),
    )
}

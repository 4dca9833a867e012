//! Native checkpoints: `<save>/<tag>/` holds one safetensors file per rank and a JSON manifest;
//! `<save>/latest` names the newest complete tag and is replaced atomically only after every file
//! is written and synced (Megatron's `latest_checkpointed_iteration.txt` is written beside it).
//!
//! A rank's file holds its tensor-parallel shard of every parameter (`model/tp<r>/<name>`, written
//! by data-parallel rank 0 of each tensor-parallel group) and the stretches of Adam's state its ZeRO
//! partition owns (`optim/<exp_avg|exp_avg_sq>/tp<r>/<name>@<offset>`). The manifest carries each parameter's logical metadata, so a checkpoint
//! loads into any other layout: parameters through [`ParamSource`] (the model is built straight
//! from the checkpoint at its new tensor-parallel rank) and optimizer state through
//! [`Checkpoint::optimizer_state`].
use crate::layers::parameter::{relayout, Init, ParamMeta, ParamSource, Partition, Shard};
use crate::runtime::adamw::AdamWConfig;
use crate::runtime::engine::{Engine, EngineState};
use crate::runtime::lr_schedules::LrSchedule;
use crate::runtime::zero::AdamState;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod integrity;

pub const FORMAT: &str = "deepscale-checkpoint";
/// 2: file checksums in the manifest and save metadata in every rank file.
pub const VERSION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tag: String,
    pub iteration: u64,
    pub consumed_samples: u64,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub zero_stage: u8,
    /// Logical metadata of every parameter (the padded logical shape of the saving layout).
    pub params: Vec<ParamMeta>,
    pub engine: EngineState,
    pub optimizer: AdamWConfig,
    pub lr_schedule: LrSchedule,
    pub seed: u64,
    /// The model: `{"type": "gpt2" | "bert", "config": {...}}`.
    pub model: serde_json::Value,
    /// The rank files (and, for pipelines, the per-layer model files).
    pub files: Vec<String>,
    /// Pipelines: the stage boundaries in the layer list (stage s held `bounds[s]..bounds[s+1]`).
    #[serde(default)]
    pub pipeline_bounds: Option<Vec<usize>>,
    /// Size and CRC-32 of every file of the tag (version 2 on).
    #[serde(default)]
    pub checksums: std::collections::BTreeMap<String, integrity::FileSum>,
}

/// What one pipeline stage contributes to the manifest (written beside the files, merged by
/// global rank 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StagePart {
    layers: std::ops::Range<usize>,
    params: Vec<ParamMeta>,
    files: Vec<String>,
}

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what} {}: {e}", path.display()))
}

use crate::fs::{confined, write_atomic};

fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not every filesystem supports it.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

pub fn rank_file(tp_rank: usize, dp_rank: usize) -> String {
    format!("mp_rank_{tp_rank:02}_dp_rank_{dp_rank:03}.safetensors")
}

/// A pipeline rank's file (its optimizer state).
pub fn pipe_rank_file(stage: usize, tp_rank: usize, dp_rank: usize) -> String {
    format!("pp_rank_{stage:02}_mp_rank_{tp_rank:02}_dp_rank_{dp_rank:03}.safetensors")
}

/// A pipeline layer's weights at one tensor-parallel rank (DeepSpeed's `layer_LL-model_TT`).
pub fn layer_file(layer: usize, tp_rank: usize) -> String {
    format!("layer_{layer:02}-model_{tp_rank:02}.safetensors")
}

fn stage_part_file(stage: usize) -> String {
    format!("stage_{stage:02}.json")
}

/// Writes a rank file with its save metadata (tag, step, layout, its own name).
fn save_tensors(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    // Sorted, so a save is byte-for-byte reproducible.
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous = sorted
        .into_iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(contiguous, Some(metadata), path)
        .map_err(|e| err("cannot write", path, e))?;
    crate::fs::match_folder_permissions(path)?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| err("cannot sync", path, e))
}

/// What a save needs besides the engine.
pub struct SaveSpec<'a> {
    pub dir: &'a Path,
    pub consumed_samples: u64,
    pub seed: u64,
    pub lr_schedule: LrSchedule,
    pub model: serde_json::Value,
    /// Files copied into the tag (the tokenizer), written by rank 0.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Keep only this many newest tags (None: keep all).
    pub keep_last: Option<usize>,
    /// Pipelines: the index of this stage's first layer in the model's layer list.
    pub first_layer: usize,
}

/// Saves the engine's parameters and state as tag `global_step<iteration>`; every rank calls it.
/// Returns the tag directory.
pub fn save(engine: &Engine, spec: &SaveSpec) -> Result<PathBuf> {
    let iteration = engine.iteration();
    let tag = format!("global_step{iteration}");
    let tag_dir = spec.dir.join(&tag);
    std::fs::create_dir_all(&tag_dir).map_err(|e| err("cannot create", &tag_dir, e))?;
    let (tp_size, tp_rank) = engine.tp_group().map_or((1, 0), |g| (g.size(), g.rank));
    let (dp_size, dp_rank) = (engine.dp_size(), engine.dp_rank());
    let (stage, stages) = engine.pipe_stage();
    let layout = integrity::layout_string(tp_size, stages, dp_size, engine.optimizer().stage());
    let metadata = |file: &str| integrity::rank_file_metadata(&tag, iteration, &layout, file);
    // On a later stage the tied copy (the word embedding used for the logits) is saved by the
    // first stage, which holds the same values.
    let skip = |p: &crate::layers::parameter::Param| stage > 0 && p.meta.tie_group.is_some();
    let mut own_files = Vec::new();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let model_key = |name: &str| format!("model/tp{tp_rank}/{name}");
    let stage3 = engine.optimizer().stage() == 3;
    if stage3 {
        // ZeRO-3: no rank holds whole parameters; each writes its fp32 pieces, which the loader
        // assembles like the optimizer state.
        for run in engine.optimizer().state_runs()? {
            if let Some(values) = &run.master {
                tensors.insert(
                    format!(
                        "optim/param/tp{tp_rank}/{}@{}",
                        run.param.meta.name, run.offset
                    ),
                    Tensor::from_slice(values, values.len(), &Device::Cpu)?,
                );
            }
        }
    } else if dp_rank == 0 {
        if stages > 1 {
            // One file per layer, so a reader can take the layers it needs.
            let mut seen = std::collections::HashSet::new();
            for (i, layer) in engine.layers().iter().enumerate() {
                let mut lt = HashMap::new();
                for p in layer.parameters() {
                    if !skip(p) && seen.insert(p.meta.name.clone()) {
                        lt.insert(model_key(&p.meta.name), p.tensor().clone());
                    }
                }
                let file = layer_file(spec.first_layer + i, tp_rank);
                save_tensors(&lt, &tag_dir.join(&file), metadata(&file))?;
                own_files.push(file);
            }
        } else {
            for p in engine.optimizer().params() {
                tensors.insert(model_key(&p.meta.name), p.tensor().clone());
            }
        }
    }
    for run in engine.optimizer().state_runs()? {
        if skip(run.param) {
            continue;
        }
        let name = &run.param.meta.name;
        for (kind, values) in [("exp_avg", &run.exp_avg), ("exp_avg_sq", &run.exp_avg_sq)] {
            tensors.insert(
                format!("optim/{kind}/tp{tp_rank}/{name}@{}", run.offset),
                Tensor::from_slice(values, values.len(), &Device::Cpu)?,
            );
        }
    }
    let file = if stages > 1 {
        pipe_rank_file(stage, tp_rank, dp_rank)
    } else {
        rank_file(tp_rank, dp_rank)
    };
    save_tensors(&tensors, &tag_dir.join(&file), metadata(&file))?;
    let params = engine.optimizer().params();
    if stages > 1 && tp_rank == 0 && dp_rank == 0 {
        // This stage's share of the manifest: its parameters and the files its ranks wrote.
        let mut files: Vec<String> = (spec.first_layer..spec.first_layer + engine.layers().len())
            .flat_map(|l| (0..tp_size).map(move |t| layer_file(l, t)))
            .collect();
        files.extend(
            (0..tp_size).flat_map(|t| (0..dp_size).map(move |d| pipe_rank_file(stage, t, d))),
        );
        let part = StagePart {
            layers: spec.first_layer..spec.first_layer + engine.layers().len(),
            params: params.iter().map(|p| p.meta.clone()).collect(),
            files,
        };
        let json = serde_json::to_vec(&part).map_err(|e| err("encoding", &tag_dir, e))?;
        write_atomic(&tag_dir.join(stage_part_file(stage)), &json)?;
    }
    // Every rank's file is complete before the manifest and `latest` name the tag.
    engine.barrier()?;
    if stage == 0 && tp_rank == 0 && dp_rank == 0 {
        let (params, files, bounds) = if stages > 1 {
            let mut metas: Vec<ParamMeta> = Vec::new();
            let mut files = Vec::new();
            let mut bounds = vec![0];
            for s in 0..stages {
                let path = tag_dir.join(stage_part_file(s));
                let text =
                    std::fs::read_to_string(&path).map_err(|e| err("cannot read", &path, e))?;
                let part: StagePart =
                    crate::json::from_str(&text).map_err(|e| err("corrupt", &path, e))?;
                for m in part.params {
                    if !metas.iter().any(|x| x.name == m.name) {
                        metas.push(m);
                    }
                }
                files.extend(part.files);
                bounds.push(part.layers.end);
            }
            (metas, files, Some(bounds))
        } else {
            let files = (0..tp_size)
                .flat_map(|t| (0..dp_size).map(move |d| rank_file(t, d)))
                .collect();
            (params.iter().map(|p| p.meta.clone()).collect(), files, None)
        };
        for (name, bytes) in &spec.extra_files {
            write_atomic(&tag_dir.join(name), bytes)?;
        }
        let mut summed = files.clone();
        summed.extend(spec.extra_files.iter().map(|(n, _)| n.clone()));
        if stages > 1 {
            summed.extend((0..stages).map(stage_part_file));
        }
        let checksums = integrity::sums(&tag_dir, &summed)?;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            tag: tag.clone(),
            iteration,
            consumed_samples: spec.consumed_samples,
            tp: tp_size,
            pp: stages,
            dp: dp_size,
            zero_stage: engine.optimizer().stage(),
            params,
            engine: engine.state(),
            optimizer: engine.optimizer().config(),
            lr_schedule: spec.lr_schedule,
            seed: spec.seed,
            model: spec.model.clone(),
            files,
            pipeline_bounds: bounds,
            checksums,
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| err("encoding", &tag_dir, e))?;
        write_atomic(&tag_dir.join(MANIFEST), &json)?;
        sync_dir(&tag_dir);
        // Megatron's tracker first, `latest` (what we load) last: a crash between them leaves
        // both naming complete tags, and `open` names the disagreement instead of picking one.
        write_atomic(&spec.dir.join(TRACKER), iteration.to_string().as_bytes())?;
        write_atomic(&spec.dir.join("latest"), tag.as_bytes())?;
        sync_dir(spec.dir);
        if let Some(keep) = spec.keep_last {
            prune(spec.dir, keep.max(1), &tag)?;
        }
    }
    engine.barrier()?;
    Ok(tag_dir)
}

/// Removes all but the `keep` newest complete tags, and every partial tag (a save that died before
/// its manifest) other than `current`.
fn prune(dir: &Path, keep: usize, current: &str) -> Result<()> {
    let mut complete: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)
        .map_err(|e| err("cannot list", dir, e))?
        .filter_map(|e| e.ok())
    {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name
            .strip_prefix("global_step")
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if e.path().join(MANIFEST).is_file() {
            complete.push((n, e.path()));
        } else if name != current && e.path().is_dir() {
            std::fs::remove_dir_all(e.path())
                .map_err(|err_| err("cannot remove", &e.path(), err_))?;
        }
    }
    complete.sort();
    for (_, old) in complete.iter().rev().skip(keep) {
        std::fs::remove_dir_all(old).map_err(|e| err("cannot remove", old, e))?;
    }
    Ok(())
}

/// The manifest of tag folder `dir`, its format and version checked and every file name it
/// lists confined to the folder.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| err("cannot read", &mpath, e))?;
    let manifest: Manifest =
        crate::json::from_str(&text).map_err(|e| err("corrupt manifest", &mpath, e))?;
    if manifest.format != FORMAT || !(1..=VERSION).contains(&manifest.version) {
        bail!(
            "{}: format {} version {}, expected {FORMAT} version 1 to {VERSION}",
            mpath.display(),
            manifest.format,
            manifest.version
        )
    }
    for name in manifest.files.iter().chain(manifest.checksums.keys()) {
        confined(dir, name, &mpath, "file")?;
    }
    Ok(manifest)
}

/// The tag `latest` in save folder `root` names, confined to it, checked against Megatron's
/// tracker; None without a `latest`.
pub fn latest_tag(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join("latest");
    let Ok(tag) = std::fs::read_to_string(&latest) else {
        return Ok(None);
    };
    let dir = confined(root, &tag, &latest, "tag")?;
    check_tracker(root, &dir)?;
    Ok(Some(dir))
}

/// `latest` and Megatron's tracker in save folder `root` must name the same step when both are
/// there (a crash between their writes, or a hand edit, makes them disagree).
fn check_tracker(root: &Path, tag_dir: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(root.join(TRACKER)) else {
        return Ok(());
    };
    let tracked = text.trim();
    let tag = tag_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let step = tag.strip_prefix("global_step").unwrap_or(&tag);
    if tracked != step {
        bail!(
            "{}: `latest` names {tag} but {TRACKER} names iteration {tracked}; load one tag \
             explicitly (--load {}/global_step{tracked} or --load {})",
            root.display(),
            root.display(),
            tag_dir.display()
        )
    }
    Ok(())
}

/// Megatron's tracker file, written beside `latest`.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";

/// Optimizer keys by (kind, parameter): (tensor-parallel rank, offset, key).
type OptimKeys = HashMap<(String, String), Vec<(usize, usize, String)>>;

/// A checkpoint opened for loading.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: MmapedSafetensors,
    meta: HashMap<String, ParamMeta>,
    /// Optimizer keys by (kind, parameter): (tp rank, offset, key).
    optim: OptimKeys,
}

/// True when `dir` is a native checkpoint (a save directory with `latest`, or a tag).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("latest").is_file() || dir.join(MANIFEST).is_file()
}

impl Checkpoint {
    /// `path` is a save directory (its `latest` tag is opened) or a tag directory.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = if path.join(MANIFEST).is_file() {
            path.to_path_buf()
        } else {
            let latest = path.join("latest");
            let tag = std::fs::read_to_string(&latest).map_err(|e| {
                err(
                    "not a DeepScale checkpoint (no manifest.json, no readable latest)",
                    &latest,
                    e,
                )
            })?;
            let dir = confined(path, &tag, &latest, "tag")?;
            check_tracker(path, &dir)?;
            dir
        };
        let mpath = dir.join(MANIFEST);
        let manifest = read_manifest(&dir)?;
        let paths: Vec<PathBuf> = manifest
            .files
            .iter()
            .map(|f| confined(&dir, f, &mpath, "file"))
            .collect::<Result<_>>()?;
        for p in &paths {
            if !p.is_file() {
                bail!(
                    "checkpoint {}: missing rank file {}",
                    dir.display(),
                    p.display()
                )
            }
        }
        // Sizes, checksums, each file's own save metadata and dtypes, before anything loads.
        integrity::verify_or_explain(&dir, &manifest)?;
        // SAFETY: read-only maps of files this process does not modify while loading.
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .map_err(|e| candle_core::Error::Msg(format!("checkpoint {}: {e}", dir.display())))?;
        let mut optim = OptimKeys::new();
        for (key, _) in files.tensors() {
            // optim/<kind>/tp<rank>/<name>@<offset>
            let parsed = key.strip_prefix("optim/").and_then(|rest| {
                let (kind, rest) = rest.split_once('/')?;
                let (tp, rest) = rest.split_once('/')?;
                let tp = tp.strip_prefix("tp")?.parse::<usize>().ok()?;
                let (name, off) = rest.rsplit_once('@')?;
                Some((
                    kind.to_string(),
                    tp,
                    name.to_string(),
                    off.parse::<usize>().ok()?,
                ))
            });
            if let Some((kind, tp, name, off)) = parsed {
                optim
                    .entry((kind, name))
                    .or_default()
                    .push((tp, off, key.clone()));
            }
        }
        let meta = manifest
            .params
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect();
        Ok(Self {
            dir,
            manifest,
            files,
            meta,
            optim,
        })
    }

    fn param_meta(&self, name: &str) -> Result<&ParamMeta> {
        self.meta.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "checkpoint {} has no parameter `{name}`",
                self.dir.display()
            ))
        })
    }

    /// Concatenates per-tensor-parallel-rank blocks of `meta` into the logical tensor, real rows only.
    fn assemble(&self, meta: &ParamMeta, blocks: Vec<Tensor>) -> Result<Tensor> {
        let full = match meta.partition {
            Partition::Split { dim, .. } if blocks.len() > 1 => Tensor::cat(&blocks, dim)?,
            _ => blocks.into_iter().next().expect("one block"),
        };
        match meta.real_rows {
            Some(r) => full.narrow(0, 0, r),
            None => Ok(full),
        }
    }

    fn local_shape(&self, meta: &ParamMeta) -> Vec<usize> {
        let mut shape = meta.shape.clone();
        if let (Partition::Split { dim, .. }, tp) = (meta.partition, self.manifest.tp) {
            if tp > 1 {
                shape[dim] /= tp;
            }
        }
        shape
    }

    fn split_count(&self, meta: &ParamMeta) -> usize {
        match meta.partition {
            Partition::Split { .. } => self.manifest.tp,
            Partition::Replicated => 1,
        }
    }

    /// The logical value of parameter `name` (real vocabulary rows only), in f32.
    pub fn logical(&self, name: &str) -> Result<Tensor> {
        if self.manifest.zero_stage == 3 {
            // Saved as the ranks' fp32 pieces.
            return self.optimizer_logical("param", name)?.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "checkpoint {}: no pieces of parameter `{name}`",
                    self.dir.display()
                ))
            });
        }
        let meta = self.param_meta(name)?;
        let blocks = (0..self.split_count(meta))
            .map(|t| {
                let key = format!("model/tp{t}/{name}");
                self.files
                    .load(&key, &Device::Cpu)
                    .map_err(|e| err(&format!("tensor {key} in"), &self.dir, e))?
                    .to_dtype(DType::F32)
            })
            .collect::<Result<Vec<_>>>()?;
        self.assemble(meta, blocks)
    }

    /// The logical Adam state (`exp_avg` or `exp_avg_sq`) of `name`, real rows only; None when the
    /// checkpoint has none for it.
    pub fn optimizer_logical(&self, kind: &str, name: &str) -> Result<Option<Tensor>> {
        let meta = self.param_meta(name)?;
        let Some(entries) = self.optim.get(&(kind.to_string(), name.to_string())) else {
            return Ok(None);
        };
        let shape = self.local_shape(meta);
        let n: usize = shape.iter().product();
        let mut blocks = Vec::new();
        for t in 0..self.split_count(meta) {
            let mut flat = vec![0f32; n];
            for (_, off, key) in entries.iter().filter(|e| e.0 == t) {
                let v: Vec<f32> = self
                    .files
                    .load(key, &Device::Cpu)
                    .map_err(|e| err(&format!("tensor {key} in"), &self.dir, e))?
                    .to_vec1()?;
                if off + v.len() > n {
                    bail!(
                        "checkpoint {}: {key} runs past the parameter's {n} elements",
                        self.dir.display()
                    )
                }
                flat[*off..off + v.len()].copy_from_slice(&v);
            }
            blocks.push(Tensor::from_vec(flat, shape.as_slice(), &Device::Cpu)?);
        }
        Ok(Some(self.assemble(meta, blocks)?))
    }

    /// This rank's (m, v) of a parameter described by `meta` at `shard`, flattened; None when the
    /// checkpoint has no optimizer state for it.
    pub fn optimizer_state(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
    ) -> Result<Option<AdamState>> {
        let (Some(m), Some(v)) = (
            self.optimizer_logical("exp_avg", &meta.name)?,
            self.optimizer_logical("exp_avg_sq", &meta.name)?,
        ) else {
            return Ok(None);
        };
        let flat = |t: Tensor| -> Result<Vec<f32>> {
            relayout(t, meta, shard, &self.dir.display().to_string())?
                .flatten_all()?
                .to_vec1()
        };
        Ok(Some((flat(m)?, flat(v)?)))
    }

    /// Restores `engine` from this checkpoint: counters, loss scaler and (unless `with_optimizer`
    /// is false) Adam's state, re-partitioned for the engine's layout.
    pub fn restore(&self, engine: &mut Engine, with_optimizer: bool) -> Result<()> {
        let tp = engine.tp_group().map(|g| (g.size(), g.rank));
        let state = self.manifest.engine.clone();
        engine
            .restore(&state, |p| {
                if !with_optimizer {
                    return Ok(None);
                }
                let (size, rank) = tp.unwrap_or((1, 0));
                let shard = Shard::of(&p.meta, rank, size)?;
                self.optimizer_state(&p.meta, shard)
            })
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "restoring from checkpoint {}: {e}",
                    self.dir.display()
                ))
            })
    }
}

/// A checkpoint's parameters, by logical name, for the `VarBuilder` backend (any candle model).
impl crate::layers::var_builder::Weights for Checkpoint {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.manifest.params.iter().any(|m| m.name == name) {
            return Ok(None);
        }
        self.logical(name).map(Some)
    }

    fn describe(&self) -> String {
        format!("checkpoint {}", self.dir.display())
    }
}

impl ParamSource for Checkpoint {
    fn tensor(
        &self,
        meta: &ParamMeta,
        shard: Option<Shard>,
        _init: Init,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        relayout(
            self.logical(&meta.name)?,
            meta,
            shard,
            &self.dir.display().to_string(),
        )?
        .to_dtype(dtype)?
        .to_device(device)
    }
}

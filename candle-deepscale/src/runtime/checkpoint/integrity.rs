//! Checkpoint integrity, beyond DeepSpeed and Megatron (neither verifies what it loads): the
//! manifest records each file's size and CRC-32, every rank file carries its tag, step and layout
//! in its safetensors metadata, and every tensor must be a float tensor. [`verify`] checks a tag
//! against all of it — `--load` before any rank starts, `deepscale checkpoint verify` on its own.
use super::{Manifest, FORMAT};
use candle_core::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

/// Size and CRC-32 (IEEE, as zlib's) of one file of a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    /// Eight lowercase hex digits.
    pub crc32: String,
}

/// Reads `path` through and sums it.
pub fn file_sum(path: &Path) -> std::io::Result<FileSum> {
    let mut f = std::fs::File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        crc32: format!("{:08x}", h.finalize()),
    })
}

/// Sums of `names` inside `dir`, read in parallel.
pub fn sums(dir: &Path, names: &[String]) -> Result<BTreeMap<String, FileSum>> {
    names
        .par_iter()
        .map(|n| {
            let p = dir.join(n);
            file_sum(&p)
                .map(|s| (n.clone(), s))
                .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", p.display())))
        })
        .collect()
}

/// The safetensors metadata a rank file carries: which save (tag, step, layout) it belongs to.
pub fn rank_file_metadata(
    tag: &str,
    iteration: u64,
    layout: &str,
    file: &str,
) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("tag".to_string(), tag.to_string()),
        ("iteration".to_string(), iteration.to_string()),
        ("layout".to_string(), layout.to_string()),
        ("file".to_string(), file.to_string()),
    ])
}

/// A layout as the rank files' metadata names it.
pub fn layout_string(tp: usize, pp: usize, dp: usize, zero_stage: u8) -> String {
    format!("tp{tp} pp{pp} dp{dp} zero{zero_stage}")
}

fn layout(m: &Manifest) -> String {
    layout_string(m.tp, m.pp, m.dp, m.zero_stage)
}

/// What [`verify`] found for one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileCheck {
    pub file: String,
    pub bytes: Option<u64>,
    /// None when the file is sound.
    pub problem: Option<String>,
}

/// Checks every file of the tag in `dir` against `manifest`: present, the recorded size and
/// CRC-32 (manifests of version 2 on), its own metadata naming this tag, step and layout, and
/// float tensors only. Returns one entry per file (the manifest's files, then the others summed).
pub fn verify(dir: &Path, manifest: &Manifest) -> Vec<FileCheck> {
    let mut names: Vec<String> = manifest.files.clone();
    for n in manifest.checksums.keys() {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
        .par_iter()
        .map(|name| {
            let path = dir.join(name);
            let problem = check_file(&path, name, manifest).err();
            FileCheck {
                file: name.clone(),
                bytes: std::fs::metadata(&path).ok().map(|m| m.len()),
                problem,
            }
        })
        .collect()
}

fn check_file(path: &Path, name: &str, m: &Manifest) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err("missing".into());
    }
    if let Some(want) = m.checksums.get(name) {
        let got = file_sum(path).map_err(|e| format!("unreadable: {e}"))?;
        if got.bytes != want.bytes {
            return Err(format!(
                "{} bytes, the manifest recorded {} (truncated or replaced)",
                got.bytes, want.bytes
            ));
        }
        if got.crc32 != want.crc32 {
            return Err(format!(
                "CRC-32 {} differs from the manifest's {} (the file's bytes changed since the save)",
                got.crc32, want.crc32
            ));
        }
    } else if m.version >= 2 {
        return Err("not in the manifest's checksums".into());
    }
    if name.ends_with(".safetensors") {
        check_safetensors(path, name, m)?;
    }
    Ok(())
}

/// The header: float tensors only, and (version 2 on) metadata naming this save.
fn check_safetensors(path: &Path, name: &str, m: &Manifest) -> std::result::Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("unreadable: {e}"))?;
    // SAFETY: a read-only map of a file this process does not modify while checking it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("unreadable: {e}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| format!("not a valid safetensors file: {e:?}"))?;
    use safetensors::Dtype;
    let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (t, info) in tensors {
        if !matches!(
            info.dtype,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(format!(
                "tensor `{t}` is {:?}; a checkpoint holds float tensors only",
                info.dtype
            ));
        }
    }
    if m.version < 2 {
        return Ok(());
    }
    let md = meta.metadata().clone().unwrap_or_default();
    let field = |k: &str| md.get(k).map(String::as_str).unwrap_or("?");
    if field("format") != FORMAT {
        return Err("carries no DeepScale save metadata (not written by this save)".into());
    }
    if field("tag") != m.tag || field("iteration") != m.iteration.to_string() {
        return Err(format!(
            "belongs to {} (iteration {}), the manifest is for {} (iteration {})",
            field("tag"),
            field("iteration"),
            m.tag,
            m.iteration
        ));
    }
    if field("layout") != layout(m) || field("file") != name {
        return Err(format!(
            "was written as {} at layout {}, the manifest expects {name} at {}",
            field("file"),
            field("layout"),
            layout(m)
        ));
    }
    Ok(())
}

/// [`verify`] as an error naming every damaged file, or Ok.
pub fn verify_or_explain(dir: &Path, manifest: &Manifest) -> Result<()> {
    let bad: Vec<String> = verify(dir, manifest)
        .into_iter()
        .filter_map(|c| {
            c.problem
                .map(|p| format!("{}: {p}", dir.join(&c.file).display()))
        })
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    candle_core::bail!(
        "checkpoint {} is damaged ({} of its files):\n  {}",
        dir.display(),
        bad.len(),
        bad.join("\n  ")
    )
}

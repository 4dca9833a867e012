//! `deepscale checkpoint verify DIR`: checks a native checkpoint as `--load` does, without loading
//! it — every file's size and CRC-32 against the manifest, each rank file's own tag, step and
//! layout, float tensors only, `latest` against Megatron's tracker — and lists partial tags.
use anyhow::{bail, Result};
use candle_deepscale::runtime::checkpoint::{
    integrity, latest_tag, read_manifest, MANIFEST, VERSION,
};
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    pub command: CheckpointCommand,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Verify a save folder (every complete tag in it, and `latest`) or one tag folder; exit
    /// status 1 when anything is damaged.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A --save folder or one of its tags (global_stepN).
    pub dir: PathBuf,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CheckpointArgs) -> Result<()> {
    match a.command {
        CheckpointCommand::Verify(v) => verify(v),
    }
}

/// The tag folders to check, the partial ones (no manifest) and what `latest` names.
fn tags(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>, Option<PathBuf>)> {
    if dir.join(MANIFEST).is_file() {
        return Ok((vec![dir.to_path_buf()], vec![], None));
    }
    if !dir.is_dir() {
        bail!("{}: no such folder", dir.display())
    }
    let latest = latest_tag(dir)?;
    let (mut complete, mut partial) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().is_dir() || !name.starts_with("global_step") {
            continue;
        }
        if e.path().join(MANIFEST).is_file() {
            complete.push(e.path());
        } else {
            partial.push(e.path());
        }
    }
    let step = |p: &PathBuf| -> u64 {
        p.file_name()
            .and_then(|n| n.to_str()?.strip_prefix("global_step")?.parse().ok())
            .unwrap_or(0)
    };
    complete.sort_by_key(step);
    partial.sort_by_key(step);
    if complete.is_empty() {
        bail!(
            "{}: not a DeepScale checkpoint (no {MANIFEST}, no global_stepN/{MANIFEST})",
            dir.display()
        )
    }
    Ok((complete, partial, latest))
}

fn verify(a: VerifyArgs) -> Result<()> {
    let (complete, partial, latest) = tags(&a.dir)?;
    let mut damaged = 0usize;
    let mut report = Vec::new();
    for tag in &complete {
        let (files, problem) = match read_manifest(tag) {
            Ok(m) => {
                let checks = integrity::verify(tag, &m);
                if m.version < VERSION {
                    eprintln!(
                        "{}: manifest version {} records no checksums; sizes and dtypes checked only",
                        tag.display(),
                        m.version
                    );
                }
                (checks, None)
            }
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let bad: Vec<_> = files.iter().filter(|c| c.problem.is_some()).collect();
        let ok = problem.is_none() && bad.is_empty();
        if !ok {
            damaged += 1;
        }
        let mark = if ok { "ok" } else { "DAMAGED" };
        eprintln!("{mark:>8}  {} ({} files)", tag.display(), files.len());
        if let Some(p) = &problem {
            eprintln!("          {p}");
        }
        for c in &bad {
            eprintln!(
                "          {}: {}",
                c.file,
                c.problem.as_deref().unwrap_or("")
            );
        }
        report.push(json!({
            "tag": tag.display().to_string(),
            "ok": ok,
            "latest": latest.as_ref() == Some(tag),
            "problem": problem,
            "files": files,
        }));
    }
    for p in &partial {
        eprintln!(
            " partial  {} (no manifest: a save that did not finish; --keep-last removes it)",
            p.display()
        );
    }
    if a.json {
        println!(
            "{}",
            json!({
                "dir": a.dir.display().to_string(),
                "ok": damaged == 0,
                "tags": report,
                "partial": partial.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            })
        );
    }
    if damaged > 0 {
        bail!(
            "{}: {damaged} of {} checkpoint(s) damaged",
            a.dir.display(),
            complete.len()
        )
    }
    eprintln!(
        "{}: {} checkpoint(s) verified",
        a.dir.display(),
        complete.len()
    );
    Ok(())
}

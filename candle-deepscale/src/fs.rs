//! Files from elsewhere: names read from a file (a checkpoint's `latest`, its manifest's file
//! list, an HF index's `weight_map`, a DeepSpeed tag) stay inside the folder they were read from,
//! and files written for the user are written whole or not at all.
//!
//! Checkpoints are routinely downloaded from others; nothing in one is executable here (pickles
//! are read as data), and these rules keep its names from pointing at other files of the machine.
use candle_core::{bail, Result};
use std::path::{Component, Path, PathBuf};

/// `name`, read from `origin` (a file inside `dir`) as its `what`, as a path inside `dir`: it
/// must be relative, without `..` (or a root, or a drive), and must not leave `dir` through a
/// symbolic link. Otherwise an error naming the file, the entry and why.
pub fn confined(dir: &Path, name: &str, origin: &Path, what: &str) -> Result<PathBuf> {
    let trimmed = name.trim();
    let refuse = |why: &str| -> Result<PathBuf> {
        bail!(
            "{}: {what} `{trimmed}` {why}; a name read from a file must stay inside {}",
            origin.display(),
            dir.display()
        )
    };
    if trimmed.is_empty() {
        return refuse("is empty");
    }
    let rel = Path::new(trimmed);
    if rel.is_absolute() {
        return refuse("is an absolute path");
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return refuse("goes up with `..`"),
            Component::RootDir | Component::Prefix(_) => return refuse("is an absolute path"),
        }
    }
    let path = dir.join(rel);
    // Through a symbolic link (of the entry or a folder on its way) it may still leave `dir`.
    if let (Ok(real), Ok(root)) = (path.canonicalize(), dir.canonicalize()) {
        if !real.starts_with(&root) {
            return refuse(&format!(
                "leads to {} through a symbolic link",
                real.display()
            ));
        }
    }
    Ok(path)
}

/// Writes `bytes` to `path` whole: into a temporary file beside it, synced, then renamed over
/// it — a failure (a full disk) leaves what was at `path` untouched and removes the temporary.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(candle_core::Error::wrap)
    })
}

/// Gives `path` the read/write bits of the folder it is in (a 0755 folder: 0644): safetensors
/// writes through a private (0600) temporary file, which would leave checkpoint and export files
/// unreadable to the rest of a team sharing the folder, unlike every other file we write.
pub fn match_folder_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(m) = std::fs::metadata(dir) {
            let mode = m.permissions().mode() & 0o666;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot set the permissions of {}: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(())
}

/// [`write_atomic`] for a writer that fills the temporary path itself (a safetensors save).
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let res = write(&tmp).and_then(|_| {
        match_folder_permissions(&tmp)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&tmp)
            .map_err(candle_core::Error::wrap)?;
        f.sync_all().map_err(candle_core::Error::wrap)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(candle_core::Error::wrap)
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display())
    }
    Ok(())
}

/// After an export of `stem`'s weights into `dir` (`stem.safetensors`, or numbered shards
/// `stem-00001-of-00003.safetensors` with `stem.safetensors.index.json`), removes the files of an
/// earlier export of the same stem that are not in `written`: a stale index would otherwise send
/// loaders to the old shards, and a stale single file wins over a new index in transformers.
pub fn remove_stale_safetensors(dir: &Path, stem: &str, written: &[PathBuf]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let is_export = |name: &str| {
        if name == format!("{stem}.safetensors") || name == format!("{stem}.safetensors.index.json")
        {
            return true;
        }
        // stem-NNNNN-of-MMMMM.safetensors
        let Some(rest) = name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".safetensors"))
        else {
            return false;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        matches!(parts.as_slice(), [a, "of", b]
            if a.len() == 5 && b.len() == 5
                && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()))
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if is_export(&name) && !written.iter().any(|w| w == &path) {
            std::fs::remove_file(&path).map_err(|err| {
                candle_core::Error::Msg(format!(
                    "cannot remove the earlier export's {}: {err}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("tag")).unwrap();
        let origin = d.join("latest");
        assert_eq!(confined(d, "tag", &origin, "tag").unwrap(), d.join("tag"));
        assert_eq!(
            confined(d, " tag\n", &origin, "tag").unwrap(),
            d.join("tag")
        );
        assert!(confined(d, "a/b.safetensors", &origin, "file").is_ok());
        for bad in ["../../../etc", "/etc/passwd", "a/../../x", "", "  "] {
            let e = confined(d, bad, &origin, "tag").unwrap_err().to_string();
            assert!(e.contains("latest") && e.contains("inside"), "{bad}: {e}");
        }
        // A symbolic link inside the folder that points outside it.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("link")).unwrap();
        let e = confined(d, "link", &origin, "tag").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn an_atomic_write_that_fails_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        write_atomic(&p, b"old").unwrap();
        let e = write_atomic_with(&p, |_| bail!("disk full"));
        assert!(e.unwrap_err().to_string().contains("f.txt"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary left behind");
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }
}

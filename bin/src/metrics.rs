//! The `--metrics-file` JSON-lines writer and process memory figures.
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

/// Refuses to replace an existing metrics file unless `overwrite` (a resumed run, `resuming`,
/// continues it instead): runs stay apart.
pub fn check_target(path: &Path, overwrite: bool, resuming: bool) -> Result<()> {
    if path.exists() && !overwrite && !resuming {
        anyhow::bail!(
            "--metrics-file {} exists: give --overwrite to replace it (a run resumed with --load \
             continues its file)",
            path.display()
        )
    }
    Ok(())
}

impl MetricsWriter {
    /// A resumed run's file: the lines up to `start_iter` kept (later ones were logged after the
    /// checkpoint the run resumes from), then appended to.
    pub fn resume(path: &Path, start_iter: u64) -> Result<Self> {
        let Ok(old) = std::fs::read_to_string(path) else {
            return Self::create(path);
        };
        let kept: String = old
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["iteration"].as_u64())
                    .is_none_or(|i| i <= start_iter)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        candle_deepscale::fs::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open --metrics-file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create --metrics-file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    /// Appends one line and flushes it, so a crash loses nothing already logged.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn finish(&self) -> Result<()> {
        self.file
            .get_ref()
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

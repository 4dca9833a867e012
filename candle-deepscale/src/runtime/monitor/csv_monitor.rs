//! DeepSpeed's `csvMonitor`: one file per tag in `output_path/job_name/`, named after the tag with
//! `/` and spaces as `_`, a `step,<last part of the tag>` header, then `step,value` rows appended
//! (CRLF line ends, as Python's csv writer has them).
use super::{Event, Monitor};
use candle_core::{Error, Result};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct CsvMonitor {
    dir: PathBuf,
    /// Files this run has written its header to.
    started: HashSet<String>,
}

impl CsvMonitor {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Msg(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            started: HashSet::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Monitor for CsvMonitor {
    fn write_events(&mut self, events: &[Event]) -> Result<()> {
        for e in events {
            let header = e.tag.rsplit('/').next().unwrap_or(&e.tag);
            let name = e.tag.replace(['/', ' '], "_");
            let path = self.dir.join(format!("{name}.csv"));
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|err| Error::Msg(format!("cannot write {}: {err}", path.display())))?;
            let mut text = String::new();
            if self.started.insert(name) {
                text.push_str(&format!("step,{header}\r\n"));
            }
            text.push_str(&format!("{},{}\r\n", e.step, e.value));
            f.write_all(text.as_bytes())
                .map_err(|err| Error::Msg(format!("cannot write {}: {err}", path.display())))?;
        }
        Ok(())
    }
}

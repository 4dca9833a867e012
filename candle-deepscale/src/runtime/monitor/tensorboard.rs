//! TensorBoard event files, as `torch.utils.tensorboard.SummaryWriter` writes them: TFRecords
//! (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload) of `Event`
//! protobufs, the first carrying the file version, then one scalar `Summary` per event.
//!
//! Hand-encoded because only four protobuf fields are needed and no Rust TensorBoard writer is
//! kept up; `tests/monitors.rs` reads these files back with the `tensorboard` package's reader.
use super::{Event, Monitor};
use candle_core::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An open `events.out.tfevents.*` file.
pub struct EventFileWriter {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Msg(format!("cannot write {}: {e}", path.display()))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    varint(1 << 3 | 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(2 << 3, &mut e);
        varint(step as u64, &mut e);
    }
    body(&mut e);
    e
}

/// `Summary { value = 1: Value { tag = 1, simple_value = 2 (float) } }`.
fn scalar_summary(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(1, tag.as_bytes(), &mut v);
    varint(2 << 3 | 5, &mut v);
    v.extend_from_slice(&value.to_le_bytes());
    let mut s = Vec::new();
    bytes_field(1, &v, &mut s);
    s
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl EventFileWriter {
    /// A new event file in `dir` (created), named as TensorBoard's writers name them.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let t = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.0",
            t as u64,
            hostname(),
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = Self {
            path,
            out: std::io::BufWriter::new(file),
        };
        let first = event(t, 0, |e| bytes_field(3, b"brain.Event:2", e));
        w.write(&first)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(&record(data))
            .map_err(|e| io(&self.path, e))
    }

    /// One scalar, as `SummaryWriter.add_scalar(tag, value, step)`.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let e = event(now(), step as i64, |e| {
            bytes_field(5, &scalar_summary(tag, value as f32), e)
        });
        self.write(&e)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io(&self.path, e))
    }
}

/// DeepSpeed's `TensorBoardMonitor`: events of global rank 0 into `output_path/job_name/`.
pub struct TensorBoardMonitor {
    writer: EventFileWriter,
}

impl TensorBoardMonitor {
    pub fn new(dir: &Path) -> Result<Self> {
        Ok(Self {
            writer: EventFileWriter::create(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        self.writer.path().parent().unwrap_or(Path::new("."))
    }
}

impl Monitor for TensorBoardMonitor {
    fn write_events(&mut self, events: &[Event]) -> Result<()> {
        for e in events {
            self.writer.add_scalar(&e.tag, e.value, e.step)?;
        }
        // As DeepSpeed's write_events(flush=True): a reader sees each step as it lands.
        self.writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // TFRecord's mask spelled as TensorFlow's crc32c.h spells it.
    #[allow(clippy::manual_rotate)]
    fn masked_crc_matches_tensorflows_known_value() {
        // CRC-32C of "123456789" is 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let c: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn varints_encode_as_protobuf() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]);
    }
}

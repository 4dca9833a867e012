//! Megatron's mmap indexed dataset (`indexed_dataset.py`, `MMapIndexedDataset`): a `.bin` of token
//! ids back to back and an `.idx` describing items (sequences) and documents, byte-compatible with
//! Megatron both ways.
//!
//! `.idx`: magic `MMIDIDX\x00\x00`, u64 version 1, u8 dtype code, u64 item count N, u64 document-index
//! length D, i32 sizes[N], i64 byte pointers[N], i64 doc_idx[D] (starts at 0, ends at N), little
//! endian. Every field and offset is validated on open, so a corrupt or truncated file is an error
//! naming it, never an out-of-bounds read through the mmap. The header is 34 bytes, so the arrays
//! are unaligned: they are read element by element rather than cast.
use candle_core::{bail, Result};
use memmap2::Mmap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
const HEADER: usize = 9 + 8 + 1 + 8 + 8;

/// Element types of the `.bin` (megatron-core's codes; token data uses u16 or i32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F64,
    F32,
    U16,
}

impl DType {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => DType::U8,
            2 => DType::I8,
            3 => DType::I16,
            4 => DType::I32,
            5 => DType::I64,
            6 => DType::F64,
            7 => DType::F32,
            8 => DType::U16,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            DType::U8 => 1,
            DType::I8 => 2,
            DType::I16 => 3,
            DType::I32 => 4,
            DType::I64 => 5,
            DType::F64 => 6,
            DType::F32 => 7,
            DType::U16 => 8,
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::U16 => "uint16",
        }
    }

    /// Megatron's choice for token ids: uint16 below 65500 entries, int32 otherwise.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size < 65500 {
            DType::U16
        } else {
            DType::I32
        }
    }

    fn token(self, b: &[u8]) -> Result<u32> {
        let v: i64 = match self {
            DType::U8 => b[0] as i64,
            DType::I8 => b[0] as i8 as i64,
            DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            DType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            DType::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            DType::F32 | DType::F64 => bail!("{} data cannot hold token ids", self.name()),
        };
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("token id {v} out of range")))
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `<prefix>.idx` and `<prefix>.bin`.
pub fn paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let p = prefix.as_os_str().to_string_lossy();
    (
        PathBuf::from(format!("{p}.idx")),
        PathBuf::from(format!("{p}.bin")),
    )
}

/// True when `<prefix>.idx` and `<prefix>.bin` both exist.
pub fn exists(prefix: &Path) -> bool {
    let (i, b) = paths(prefix);
    i.is_file() && b.is_file()
}

/// A read-only, validated Megatron dataset.
pub struct MMapIndexedDataset {
    idx_path: PathBuf,
    idx: Mmap,
    bin: Mmap,
    pub dtype: DType,
    len: usize,
    doc_len: usize,
}

fn map(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: the file is opened read-only; every access below is bounds-checked against the
    // lengths validated in `open`. (Another process truncating the file while it is mapped is
    // outside what any mmap reader can guard against.)
    unsafe { Mmap::map(&f) }
        .map_err(|e| candle_core::Error::Msg(format!("cannot map {}: {e}", path.display())))
}

impl MMapIndexedDataset {
    pub fn open(prefix: &Path) -> Result<Self> {
        let (idx_path, bin_path) = paths(prefix);
        let idx = map(&idx_path)?;
        let bin = map(&bin_path)?;
        let what = idx_path.display();
        if idx.len() < HEADER {
            bail!(
                "{what}: {} bytes, shorter than the {HEADER}-byte header",
                idx.len()
            )
        }
        if &idx[..9] != MAGIC {
            bail!(
                "{what}: not a Megatron MMIDIDX index (bad magic {:?})",
                &idx[..9]
            )
        }
        let version = le_u64(&idx, 9);
        if version != 1 {
            bail!("{what}: index version {version}, expected 1")
        }
        let code = idx[17];
        let dtype = DType::from_code(code)
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: unknown dtype code {code}")))?;
        let (n, d) = (le_u64(&idx, 18), le_u64(&idx, 26));
        let expected = (n as u128) * 12 + (d as u128) * 8 + HEADER as u128;
        if expected != idx.len() as u128 {
            bail!(
                "{what}: {} bytes, but {n} items and {d} document entries need {expected} (truncated or corrupt)",
                idx.len()
            )
        }
        let ds = Self {
            idx_path: idx_path.clone(),
            idx,
            bin,
            dtype,
            len: n as usize,
            doc_len: d as usize,
        };
        let es = dtype.size() as u128;
        for i in 0..ds.len {
            let (size, ptr) = (ds.raw_size(i), ds.raw_pointer(i));
            if size < 0 || ptr < 0 || ptr as u128 + size as u128 * es > ds.bin.len() as u128 {
                bail!(
                    "{what}: item {i} (size {size}, byte pointer {ptr}) lies outside {} ({} bytes)",
                    bin_path.display(),
                    ds.bin.len()
                )
            }
        }
        let docs: Vec<i64> = (0..ds.doc_len).map(|j| ds.raw_doc(j)).collect();
        if docs.first() != Some(&0)
            || docs.last() != Some(&(ds.len as i64))
            || docs.windows(2).any(|w| w[0] > w[1])
        {
            bail!(
                "{what}: the document index must rise from 0 to the item count {}",
                ds.len
            )
        }
        Ok(ds)
    }

    fn raw_size(&self, i: usize) -> i32 {
        let at = HEADER + 4 * i;
        i32::from_le_bytes(self.idx[at..at + 4].try_into().expect("4 bytes"))
    }

    fn raw_pointer(&self, i: usize) -> i64 {
        let at = HEADER + 4 * self.len + 8 * i;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().expect("8 bytes"))
    }

    fn raw_doc(&self, j: usize) -> i64 {
        let at = HEADER + 12 * self.len + 8 * j;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().expect("8 bytes"))
    }

    pub fn path(&self) -> &Path {
        &self.idx_path
    }

    /// Number of items (sequences).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of documents.
    pub fn num_documents(&self) -> usize {
        self.doc_len.saturating_sub(1)
    }

    /// Tokens in item `i`.
    pub fn size(&self, i: usize) -> usize {
        self.raw_size(i) as usize
    }

    /// Items of document `d`: `doc_idx[d]..doc_idx[d + 1]`.
    pub fn document_items(&self, d: usize) -> Result<std::ops::Range<usize>> {
        if d >= self.num_documents() {
            bail!(
                "{}: document {d} out of range ({} documents)",
                self.idx_path.display(),
                self.num_documents()
            )
        }
        Ok(self.raw_doc(d) as usize..self.raw_doc(d + 1) as usize)
    }

    /// `len` tokens of item `i` from `offset`.
    pub fn get(&self, i: usize, offset: usize, len: usize) -> Result<Vec<u32>> {
        if i >= self.len || offset + len > self.size(i) {
            bail!(
                "{}: tokens {offset}..{} of item {i} out of range",
                self.idx_path.display(),
                offset + len
            )
        }
        let es = self.dtype.size();
        let start = self.raw_pointer(i) as usize + offset * es;
        self.bin[start..start + len * es]
            .chunks_exact(es)
            .map(|b| self.dtype.token(b))
            .collect()
    }

    /// All tokens of item `i`.
    pub fn item(&self, i: usize) -> Result<Vec<u32>> {
        self.get(i, 0, if i < self.len { self.size(i) } else { 0 })
    }
}

/// Writes a Megatron dataset: items are appended to the `.bin` as they come, documents closed with
/// `end_document`, and `finalize` writes the `.idx`. Both go to temporary names beside the
/// prefix and replace an existing dataset only when complete: a failed run (a bad input line)
/// leaves what was at the prefix untouched, and removes its temporaries.
pub struct MMapIndexedDatasetBuilder {
    prefix: PathBuf,
    /// The `.bin` being written (renamed over `<prefix>.bin` by `finalize`).
    tmp_bin: PathBuf,
    bin: std::io::BufWriter<std::fs::File>,
    dtype: DType,
    sizes: Vec<i32>,
    doc_idx: Vec<i64>,
}

impl MMapIndexedDatasetBuilder {
    pub fn create(prefix: &Path, dtype: DType) -> Result<Self> {
        if matches!(dtype, DType::F32 | DType::F64) {
            bail!("token datasets use integer dtypes, not {}", dtype.name())
        }
        let (_, bin_path) = paths(prefix);
        if let Some(dir) = bin_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                candle_core::Error::Msg(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let tmp_bin = temporary(&bin_path);
        let f = std::fs::File::create(&tmp_bin).map_err(|e| {
            candle_core::Error::Msg(format!("cannot create {}: {e}", tmp_bin.display()))
        })?;
        Ok(Self {
            prefix: prefix.to_path_buf(),
            tmp_bin,
            bin: std::io::BufWriter::new(f),
            dtype,
            sizes: Vec::new(),
            doc_idx: vec![0],
        })
    }

    pub fn add_item(&mut self, tokens: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(tokens.len() * self.dtype.size());
        for &t in tokens {
            let ok = match self.dtype {
                DType::U8 => t <= u8::MAX as u32,
                DType::I8 => t <= i8::MAX as u32,
                DType::I16 => t <= i16::MAX as u32,
                DType::U16 => t <= u16::MAX as u32,
                DType::I32 => t <= i32::MAX as u32,
                _ => true,
            };
            if !ok {
                bail!("token id {t} does not fit {}", self.dtype.name())
            }
            match self.dtype {
                DType::U8 | DType::I8 => buf.push(t as u8),
                DType::I16 | DType::U16 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
                DType::I32 => buf.extend_from_slice(&(t as i32).to_le_bytes()),
                DType::I64 => buf.extend_from_slice(&(t as i64).to_le_bytes()),
                DType::F32 | DType::F64 => unreachable!("rejected in create"),
            }
        }
        self.bin.write_all(&buf).map_err(|e| {
            candle_core::Error::Msg(format!("writing {}.bin: {e}", self.prefix.display()))
        })?;
        self.sizes.push(tokens.len() as i32);
        Ok(())
    }

    pub fn end_document(&mut self) {
        self.doc_idx.push(self.sizes.len() as i64);
    }

    /// Flushes the `.bin` and writes the `.idx`.
    pub fn finalize(mut self) -> Result<()> {
        let prefix = self.prefix.clone();
        let err = |e: std::io::Error| {
            candle_core::Error::Msg(format!("writing {}: {e}", prefix.display()))
        };
        self.bin.flush().map_err(err)?;
        if self.doc_idx.last() != Some(&(self.sizes.len() as i64)) {
            self.end_document();
        }
        let mut out = Vec::with_capacity(HEADER + 12 * self.sizes.len() + 8 * self.doc_idx.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(self.dtype.code());
        out.extend_from_slice(&(self.sizes.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.doc_idx.len() as u64).to_le_bytes());
        for s in &self.sizes {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let mut ptr = 0i64;
        for s in &self.sizes {
            out.extend_from_slice(&ptr.to_le_bytes());
            ptr += *s as i64 * self.dtype.size() as i64;
        }
        for d in &self.doc_idx {
            out.extend_from_slice(&d.to_le_bytes());
        }
        let (idx_path, bin_path) = paths(&self.prefix);
        self.bin.get_ref().sync_all().map_err(err)?;
        // The .bin first, then the .idx: a reader opening the pair in between sees the old index
        // over a longer or shorter .bin and refuses it (pointers are checked against the size).
        std::fs::rename(&self.tmp_bin, &bin_path).map_err(|e| {
            candle_core::Error::Msg(format!("cannot write {}: {e}", bin_path.display()))
        })?;
        candle_deepscale::fs::write_atomic(&idx_path, &out)
    }
}

/// A temporary name beside `path` for this process.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

impl Drop for MMapIndexedDatasetBuilder {
    /// Not finalized (an error on the way): the temporary `.bin` goes, the old dataset stays.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp_bin);
    }
}

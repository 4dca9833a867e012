//! Megatron's GPT-2 dataset (`gpt2_dataset.py`) over mmap indexed data: documents split by weights
//! (`949,50,1`), a shuffled document order repeated over as many epochs as the requested samples
//! need, a sample index of (document position, offset) pairs cutting samples of seq+1 tokens that
//! overlap by one, and a shuffled sample order; cached next to the data as `.npy` files. Blending
//! of weighted prefixes follows Megatron's `BlendableDataset` (the sample whose dataset is most
//! behind its weight comes next).
//!
//! The shuffles use this crate's seeded generator, not NumPy's Mersenne Twister, so the order
//! differs from Megatron's for the same seed (deterministic all the same).
use crate::indexed_dataset::MMapIndexedDataset;
use candle_core::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Megatron's `get_train_valid_test_split_`: document ranges for `949,50,1`-style weights.
pub fn split_ranges(size: usize, split: &str) -> Result<[Range<usize>; 3]> {
    let mut w: Vec<f64> = split
        .split([',', '/'])
        .map(|s| {
            s.trim().parse::<f64>().map_err(|_| {
                candle_core::Error::Msg(format!("--split `{split}`: `{s}` is not a number"))
            })
        })
        .collect::<Result<_>>()?;
    w.resize(3, 0.0);
    w.truncate(3);
    let total: f64 = w.iter().sum();
    if total <= 0.0 || w.iter().any(|x| *x < 0.0) {
        bail!("--split `{split}` needs non-negative weights with a positive sum")
    }
    let mut idx = vec![0i64];
    for x in &w {
        let last = *idx.last().expect("non-empty");
        idx.push(last + (x / total * size as f64).round() as i64);
    }
    let diff = idx[3] - size as i64;
    for v in idx.iter_mut().skip(1) {
        *v -= diff;
    }
    let r = |a: i64, b: i64| a.max(0) as usize..b.max(0) as usize;
    Ok([r(idx[0], idx[1]), r(idx[1], idx[2]), r(idx[2], idx[3])])
}

/// Minimal `.npy` (format 1.0) for 1-D and 2-D little-endian integer arrays.
mod npy {
    use candle_core::{bail, Result};
    use std::path::Path;

    pub fn write_i64(path: &Path, data: &[i64], shape: &[usize]) -> Result<()> {
        let dims = match shape {
            [n] => format!("({n},)"),
            [a, b] => format!("({a}, {b})"),
            _ => bail!("npy: shape {shape:?}"),
        };
        let mut header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': {dims}, }}");
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + data.len() * 8);
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        // Written whole then renamed, so a concurrent reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, out)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| candle_core::Error::Msg(format!("writing {}: {e}", path.display())))
    }

    pub fn read_i64(path: &Path) -> Result<Vec<i64>> {
        let b = std::fs::read(path)
            .map_err(|e| candle_core::Error::Msg(format!("reading {}: {e}", path.display())))?;
        if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
            bail!("{}: not a .npy file", path.display())
        }
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        let header = std::str::from_utf8(b.get(10..10 + hl).unwrap_or_default()).unwrap_or("");
        if !header.contains("'descr': '<i8'") || header.contains("'fortran_order': True") {
            bail!(
                "{}: expected a C-order int64 array, header {header:?}",
                path.display()
            )
        }
        let body = &b[10 + hl..];
        if body.len() % 8 != 0 {
            bail!("{}: truncated", path.display())
        }
        Ok(body
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// One split of a GPT-2 dataset: `len()` samples of `seq_length + 1` tokens.
pub struct GptDataset {
    data: Arc<MMapIndexedDataset>,
    seq_length: usize,
    doc_idx: Vec<i64>,
    /// (position in doc_idx, offset) per sample boundary: samples + 1 entries.
    sample_idx: Vec<(i64, i64)>,
    shuffle_idx: Vec<i64>,
}

impl GptDataset {
    /// The `name` split (`train`, `valid`, `test`) over `documents`, with at least `num_samples`
    /// samples, cached next to `prefix`.
    pub fn new(
        data: Arc<MMapIndexedDataset>,
        prefix: &Path,
        name: &str,
        documents: Range<usize>,
        num_samples: usize,
        seq_length: usize,
        seed: u64,
    ) -> Result<Self> {
        if documents.is_empty() {
            bail!("{}: the {name} split has no documents", prefix.display())
        }
        // Megatron's dataset holds one item per document (pretrain data is not sentence split).
        let doc_size = |d: usize| -> Result<i64> {
            Ok(data.document_items(d)?.map(|i| data.size(i) as i64).sum())
        };
        let sizes: Vec<i64> = documents.clone().map(doc_size).collect::<Result<_>>()?;
        let tokens_per_epoch: i64 = sizes.iter().sum();
        if tokens_per_epoch <= seq_length as i64 {
            bail!(
                "{}: the {name} split has {tokens_per_epoch} tokens, too few for one sample of {} tokens",
                prefix.display(),
                seq_length + 1
            )
        }
        let mut epochs = 1i64;
        while (epochs * tokens_per_epoch - 1) / (seq_length as i64) < num_samples as i64 {
            epochs += 1;
        }
        let base = format!(
            "{}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s",
            prefix.display()
        );
        let files = ["doc_idx", "sample_idx", "shuffle_idx"]
            .map(|k| PathBuf::from(format!("{base}_{k}.npy")));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut doc_idx: Vec<i64> = (0..epochs)
            .flat_map(|_| documents.clone().map(|d| d as i64))
            .collect();
        doc_idx.shuffle(&mut rng);
        let size_of = |d: i64| sizes[d as usize - documents.start];
        // Megatron's build_sample_idx: walk the documents, each sample seq+1 tokens, the next
        // starting on the last token of the previous.
        let total = ((epochs * tokens_per_epoch - 1) / seq_length as i64) as usize;
        let mut sample_idx = Vec::with_capacity(total + 1);
        let (mut pos, mut offset) = (0usize, 0i64);
        sample_idx.push((0, 0));
        while sample_idx.len() <= total {
            let mut remaining = seq_length as i64 + 1;
            while remaining != 0 {
                let len = size_of(doc_idx[pos]) - offset;
                remaining -= len;
                if remaining <= 0 {
                    offset += remaining + len - 1;
                    remaining = 0;
                } else {
                    pos += 1;
                    offset = 0;
                }
            }
            sample_idx.push((pos as i64, offset));
        }
        let mut shuffle_idx: Vec<i64> = (0..total as i64).collect();
        shuffle_idx.shuffle(&mut rng);
        // The index is always built here (it is cheap next to training: two shuffles and one
        // walk over the documents) and the cache files only mirror it, as Megatron writes them:
        // a damaged or foreign cache can never change the samples. Files that differ are
        // rewritten.
        let flat: Vec<i64> = sample_idx.iter().flat_map(|(a, b)| [*a, *b]).collect();
        let arrays: [(&[i64], Vec<usize>); 3] = [
            (&doc_idx, vec![doc_idx.len()]),
            (&flat, vec![sample_idx.len(), 2]),
            (&shuffle_idx, vec![shuffle_idx.len()]),
        ];
        for (file, (data, shape)) in files.iter().zip(arrays) {
            match npy::read_i64(file) {
                Ok(cached) if cached == data => {}
                Ok(_) | Err(_) if file.is_file() => {
                    eprintln!(
                        "warning: rewriting the stale index cache {}",
                        file.display()
                    );
                    npy::write_i64(file, data, &shape)?;
                }
                _ => npy::write_i64(file, data, &shape)?,
            }
        }
        Ok(Self {
            data,
            seq_length,
            doc_idx,
            sample_idx,
            shuffle_idx,
        })
    }

    pub fn len(&self) -> usize {
        self.shuffle_idx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shuffle_idx.is_empty()
    }

    pub fn seq_length(&self) -> usize {
        self.seq_length
    }

    /// The shuffled document order over all epochs.
    pub fn doc_order(&self) -> &[i64] {
        &self.doc_idx
    }

    fn doc_tokens(&self, doc: i64, offset: usize, len: Option<usize>) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for item in self.data.document_items(doc as usize)? {
            out.extend(self.data.item(item)?);
        }
        let end = len.map_or(out.len(), |l| (offset + l).min(out.len()));
        Ok(out[offset.min(end)..end].to_vec())
    }

    /// Sample `i` (after shuffling): `seq_length + 1` tokens.
    pub fn sample(&self, i: usize) -> Result<Vec<u32>> {
        if i >= self.len() {
            bail!("sample {i} out of range ({} samples)", self.len())
        }
        self.raw_sample(self.shuffle_idx[i] as usize)
    }

    /// Sample number `s` in index order (before shuffling): sample s + 1 starts on its last token.
    pub fn raw_sample(&self, s: usize) -> Result<Vec<u32>> {
        if s + 1 >= self.sample_idx.len() {
            bail!("sample {s} out of range ({} samples)", self.len())
        }
        let i = s;
        let ((f, fo), (l, lo)) = (self.sample_idx[s], self.sample_idx[s + 1]);
        let (f, l) = (f as usize, l as usize);
        let out = if f == l {
            self.doc_tokens(self.doc_idx[f], fo as usize, Some((lo - fo + 1) as usize))?
        } else {
            let mut v = self.doc_tokens(self.doc_idx[f], fo as usize, None)?;
            for p in f + 1..l {
                v.extend(self.doc_tokens(self.doc_idx[p], 0, None)?);
            }
            v.extend(self.doc_tokens(self.doc_idx[l], 0, Some(lo as usize + 1))?);
            v
        };
        if out.len() != self.seq_length + 1 {
            bail!(
                "sample {i}: {} tokens, expected {}",
                out.len(),
                self.seq_length + 1
            )
        }
        Ok(out)
    }
}

/// Weighted blend of datasets (Megatron's `BlendableDataset`).
pub struct BlendedDataset {
    datasets: Vec<GptDataset>,
    index: Vec<(usize, usize)>,
}

impl BlendedDataset {
    /// `size` samples drawn from `datasets` in proportion to `weights`.
    pub fn new(datasets: Vec<GptDataset>, weights: &[f64], size: usize) -> Result<Self> {
        let total: f64 = weights.iter().sum();
        if datasets.len() != weights.len() || total <= 0.0 {
            bail!("blending needs one positive weight per dataset")
        }
        let w: Vec<f64> = weights.iter().map(|x| x / total).collect();
        let mut current = vec![0usize; w.len()];
        let mut index = Vec::with_capacity(size);
        for i in 0..size {
            let at = (i as f64).max(1.0);
            let d = (0..w.len())
                .max_by(|&a, &b| {
                    (w[a] * at - current[a] as f64)
                        .partial_cmp(&(w[b] * at - current[b] as f64))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(b.cmp(&a))
                })
                .expect("non-empty");
            index.push((d, current[d] % datasets[d].len().max(1)));
            current[d] += 1;
        }
        Ok(Self { datasets, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Which dataset sample `i` comes from, and its index there.
    pub fn source(&self, i: usize) -> (usize, usize) {
        self.index[i]
    }

    pub fn sample(&self, i: usize) -> Result<Vec<u32>> {
        let Some(&(d, j)) = self.index.get(i) else {
            bail!("sample {i} out of range ({} samples)", self.len())
        };
        self.datasets[d].sample(j)
    }
}

/// The train, valid and test datasets of `--data-path` prefixes (with blending weights), split by
/// `split` over each prefix's documents, with `samples[k]` samples each (Megatron's
/// `build_train_valid_test_datasets`). A split with no documents gives `None`.
pub fn build_train_valid_test(
    prefixes: &[(f64, PathBuf)],
    split: &str,
    samples: [usize; 3],
    seq_length: usize,
    seed: u64,
) -> Result<[Option<BlendedDataset>; 3]> {
    let names = ["train", "valid", "test"];
    let mut per_split: [Vec<(GptDataset, f64)>; 3] = Default::default();
    let total: f64 = prefixes.iter().map(|(w, _)| w).sum();
    for (w, prefix) in prefixes {
        let data = Arc::new(MMapIndexedDataset::open(prefix)?);
        let ranges = split_ranges(data.num_documents(), split)?;
        for (k, range) in ranges.into_iter().enumerate() {
            if range.is_empty() || samples[k] == 0 {
                continue;
            }
            // Megatron asks each blended part for 0.5% more than its share.
            let n = if prefixes.len() == 1 {
                samples[k]
            } else {
                ((samples[k] as f64 * w / total) * 1.005).ceil() as usize
            };
            let ds = GptDataset::new(data.clone(), prefix, names[k], range, n, seq_length, seed)?;
            per_split[k].push((ds, *w));
        }
    }
    let mut out: [Option<BlendedDataset>; 3] = Default::default();
    for (k, parts) in per_split.into_iter().enumerate() {
        if parts.is_empty() {
            continue;
        }
        let (ds, w): (Vec<GptDataset>, Vec<f64>) = parts.into_iter().unzip();
        let size = if ds.len() == 1 {
            ds[0].len()
        } else {
            samples[k]
        };
        out[k] = Some(BlendedDataset::new(ds, &w, size)?);
    }
    Ok(out)
}

/// `--data-path` values: one prefix, or `W1 P1 W2 P2 ...` weighted prefixes.
pub fn parse_data_path(values: &[String]) -> Result<Vec<(f64, PathBuf)>> {
    match values {
        [] => bail!("--data-path needs a value"),
        [one] => Ok(vec![(1.0, PathBuf::from(one))]),
        _ if values.len().is_multiple_of(2) => values
            .chunks(2)
            .map(|c| {
                let w = c[0].parse::<f64>().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "--data-path: expected `WEIGHT PREFIX` pairs, `{}` is not a weight",
                        c[0]
                    ))
                })?;
                if w <= 0.0 {
                    bail!("--data-path: weight {w} must be positive")
                }
                Ok((w, PathBuf::from(&c[1])))
            })
            .collect(),
        _ => bail!(
            "--data-path: expected one prefix or `WEIGHT PREFIX` pairs, got {} values",
            values.len()
        ),
    }
}

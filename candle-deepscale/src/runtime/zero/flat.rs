//! Copies between candle tensors and flat fp32 buffers without detours through new tensors.
//!
//! `Var::from_tensor` copies, so a parameter cannot be a view into a ZeRO buffer: gradients are
//! copied in and updated parameters written back in place (`Tensor::inplace_op1`) on CPU; other
//! devices take the copy path.
use super::partition::Bucket;
use super::stage_1_and_2::ZeroCore;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, Var};

/// Calls `f` with the elements of `t` (flattened) as f32, borrowing CPU f32 storage when it is
/// contiguous and converting otherwise.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((s, e))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[s..e]));
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// Elements per rayon task in the flat-buffer passes (big enough to amortise the task).
const CHUNK: usize = 1 << 16;

/// `dst[i] += src[i]` for the flattened elements of `t` (over the cores: the embedding's and the
/// LM head's gradients are tens of MB).
pub fn add_into(t: &Tensor, dst: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    with_f32(t, |src| {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s))
    })
}

/// Zeroes `v` over the cores.
pub fn fill_zero(v: &mut [f32]) {
    use rayon::prelude::*;
    v.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
}

struct Write<'a> {
    src: &'a [f32],
    /// Where `src` starts among the tensor's elements.
    offset: usize,
}

impl candle_core::InplaceOp1 for Write<'_> {
    fn name(&self) -> &'static str {
        "zero-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((s, e)) = layout.contiguous_offsets() else {
            candle_core::bail!("zero-write: parameter storage is not contiguous")
        };
        if self.offset + self.src.len() > e - s {
            candle_core::bail!(
                "zero-write: {} values at {} for {} elements",
                self.src.len(),
                self.offset,
                e - s
            )
        }
        let (s, e) = (s + self.offset, s + self.offset + self.src.len());
        match storage {
            CpuStorage::F32(v) => v[s..e].copy_from_slice(self.src),
            CpuStorage::F16(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = half::f16::from_f32(*x)),
            CpuStorage::BF16(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = half::bf16::from_f32(*x)),
            CpuStorage::F64(v) => v[s..e]
                .iter_mut()
                .zip(self.src)
                .for_each(|(d, x)| *d = *x as f64),
            _ => candle_core::bail!("zero-write: parameters must be floating point"),
        }
        Ok(())
    }
}

struct Update<F> {
    f: std::cell::RefCell<F>,
}

impl<F: FnMut(&mut [f32])> candle_core::InplaceOp1 for Update<F> {
    fn name(&self) -> &'static str {
        "zero-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((s, e))) => {
                (self.f.borrow_mut())(&mut v[s..e]);
                Ok(())
            }
            _ => candle_core::bail!("zero-update: the parameter is not a contiguous f32 tensor"),
        }
    }
}

/// Runs `f` on the elements of the contiguous f32 CPU tensor `t`, in place.
pub fn update_f32(t: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    t.inplace_op1(&Update {
        f: std::cell::RefCell::new(f),
    })
}

/// Overwrites elements `offset..offset + src.len()` of the parameter `var` (flattened) with
/// `src` (as f32, converted to the parameter's dtype). A contiguous CPU tensor only.
pub fn write_var_range(var: &Var, offset: usize, src: &[f32]) -> Result<()> {
    let t = var.as_tensor();
    if !(t.device().is_cpu() && t.is_contiguous()) {
        candle_core::bail!("zero-write: a range of a parameter that is not a contiguous CPU tensor")
    }
    t.inplace_op1(&Write { src, offset })
}

/// Overwrites the parameter `var` with `src` (its flattened elements, as f32).
pub fn write_var(var: &Var, src: &[f32]) -> Result<()> {
    let t = var.as_tensor();
    if t.elem_count() != src.len() {
        candle_core::bail!(
            "zero-write: {} values for {} elements",
            src.len(),
            t.elem_count()
        )
    }
    if t.device().is_cpu() && t.is_contiguous() {
        return write_var_range(var, 0, src);
    }
    let new = Tensor::from_slice(src, t.shape(), t.device())?.to_dtype(t.dtype())?;
    var.set(&new)
}

/// Elements of each rank's piece all-gathered at a time by the update's write-back (1 MiB of
/// f32: the gathered slices of two to eight ranks stay in L2/L3 while they are written out).
const GATHER_SLICE: usize = 256 << 10;

/// This rank's updated piece of a bucket, for the write-back's all-gather.
pub(crate) enum UpdatedPiece {
    /// The updated values, partition-ordered (padding included).
    Values(Vec<f32>),
    /// Updated where they live, in the parameters' own storage (the in-place step): the
    /// all-gather reads them from there and writes only the other ranks' pieces.
    InParams,
}

impl ZeroCore {
    /// All-gathers bucket `bk`'s updated pieces (this rank's is `piece`) into its parameters.
    pub(crate) fn write_bucket(&self, bk: &Bucket, piece: UpdatedPiece) -> Result<()> {
        let in_host_memory = bk.params.iter().all(|&p| {
            let t = self.params[p].tensor();
            t.device().is_cpu() && t.is_contiguous()
        });
        if let (Some(dp), true, true) = (&self.dp, self.layout.parts > 1, in_host_memory) {
            // A slice of every piece at a time: each gathered slice goes into the parameters
            // while in cache, and no buffer the size of the bucket is allocated and zeroed.
            let (parts, me) = (self.layout.parts, self.layout.rank);
            let slice = GATHER_SLICE
                .min(self.allgather_bucket_size / parts)
                .min(bk.piece)
                .max(1);
            let mut recv = vec![0f32; slice * parts];
            let mut own = match &piece {
                UpdatedPiece::Values(_) => Vec::new(),
                UpdatedPiece::InParams => vec![0f32; slice],
            };
            let mut at = 0;
            while at < bk.piece {
                let len = slice.min(bk.piece - at);
                let recv = &mut recv[..len * parts];
                let send = match &piece {
                    UpdatedPiece::Values(v) => &v[at..at + len],
                    UpdatedPiece::InParams => {
                        self.read_piece(bk, at, &mut own[..len])?;
                        &own[..len]
                    }
                };
                dp.comm.all_gather(&dp.group, send, recv)?;
                for (k, vals) in recv.chunks(len).enumerate() {
                    if k != me || matches!(piece, UpdatedPiece::Values(_)) {
                        self.write_flat(bk, k * bk.piece + at, vals)?;
                    }
                }
                at += len;
            }
            return Ok(());
        }
        let piece = match piece {
            UpdatedPiece::Values(v) => v,
            UpdatedPiece::InParams if self.layout.parts <= 1 || self.dp.is_none() => return Ok(()),
            UpdatedPiece::InParams => {
                let mut v = vec![0f32; bk.piece];
                self.read_piece(bk, 0, &mut v)?;
                v
            }
        };
        let full = match (&self.dp, self.layout.parts > 1) {
            (Some(dp), true) => {
                let mut full = vec![0f32; bk.padded];
                dp.comm.all_gather(&dp.group, &piece, &mut full)?;
                full
            }
            _ => piece,
        };
        for &p in &bk.params {
            let fp = &self.layout.params[p];
            write_var(&self.params[p].var, &full[fp.offset..fp.offset + fp.numel])?;
        }
        Ok(())
    }

    /// Elements `at..at + out.len()` of this rank's piece of bucket `bk`, read from the
    /// parameters (padding reads as zero).
    fn read_piece(&self, bk: &Bucket, at: usize, out: &mut [f32]) -> Result<()> {
        out.fill(0.0);
        let base = self.layout.rank * bk.piece + at;
        let end = base + out.len();
        for &p in &bk.params {
            let fp = &self.layout.params[p];
            let (lo, hi) = (fp.offset.max(base), (fp.offset + fp.numel).min(end));
            if lo < hi {
                with_f32(self.params[p].tensor(), |v| {
                    out[lo - base..hi - base].copy_from_slice(&v[lo - fp.offset..hi - fp.offset])
                })?;
            }
        }
        Ok(())
    }

    /// Writes `vals`, elements `at..` of bucket `bk`'s flat (padded) order, into the parameters
    /// they belong to; padding is skipped.
    fn write_flat(&self, bk: &Bucket, at: usize, vals: &[f32]) -> Result<()> {
        let end = at + vals.len();
        for &p in &bk.params {
            let fp = &self.layout.params[p];
            let (lo, hi) = (fp.offset.max(at), (fp.offset + fp.numel).min(end));
            if lo < hi {
                write_var_range(&self.params[p].var, lo - fp.offset, &vals[lo - at..hi - at])?;
            }
        }
        Ok(())
    }
}

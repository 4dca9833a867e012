//! The fp32 parameter pieces' swap file (`offload_param {device: nvme}`; DeepSpeed's
//! `swap_tensor/partitioned_param_swapper.py`) when the parameters are whole in memory anyway:
//! where the step runs during backward and keeps every updated piece for the next forward's
//! gather (see `NvmeStates::pieces_in_memory`), the update takes a piece's values from its
//! gathered parameter, and the file's blocks are written whole from the updated pieces without
//! being read — a third of the step's reads.
use super::offload::Flat;
use super::stage_1_and_2::ZeroCore;
use candle_core::{bail, DType, Result};
use std::ops::Range;

/// Elements `within` of this rank's piece of bucket `b` (stage 3: one parameter) from the
/// parameter's gathered fp32 tensor, if it is gathered now (None: released, or not fp32).
pub(super) fn gathered_piece(
    z: &ZeroCore,
    b: usize,
    within: Range<usize>,
) -> Result<Option<Vec<f32>>> {
    let bk = &z.layout.buckets[b];
    let [p] = bk.params[..] else {
        return Ok(None);
    };
    let t = z.params[p].tensor();
    if t.dtype() != DType::F32 || crate::layers::storage::resident_len(t) != t.elem_count() {
        return Ok(None);
    }
    // The piece's elements in the parameter; past its end, the bucket's padding (zeros).
    let start = bk.piece * z.layout.rank + within.start - z.layout.params[p].offset;
    let numel = t.elem_count();
    super::flat::with_f32(t, |v| {
        let mut out = vec![0f32; within.len()];
        if start < numel {
            let n = within.len().min(numel - start);
            out[..n].copy_from_slice(&v[start..start + n]);
        }
        out
    })
    .map(Some)
}

/// Writes the pieces of the buckets `unwritten` flags (updated without their write) that lie
/// in `blocks` into `master` from their updated values `pieces` (bucket, piece): each block
/// they cover entirely, without reading it — during backward as soon as its buckets are all
/// updated (the writes go on behind the layers still to come); `at_end` (the step's end), the
/// rest too. `written` marks the blocks written this step (cleared at the end).
pub(super) fn write_pieces(
    z: &ZeroCore,
    master: &Flat,
    unwritten: &[bool],
    written: &mut [bool],
    pieces: &[(usize, Vec<f32>)],
    blocks: Range<usize>,
    at_end: bool,
) -> Result<()> {
    let Some(master) = master.swapped().filter(|_| !blocks.is_empty()) else {
        return Ok(());
    };
    let span = master.block_range(blocks.start).start..master.block_range(blocks.end - 1).end;
    let mut ranges: Vec<(Range<usize>, &[f32])> = Vec::new();
    for (b, bk) in z.layout.buckets.iter().enumerate() {
        let r = bk.part_offset..bk.part_offset + bk.piece;
        if !unwritten[b] || r.end <= span.start || span.end <= r.start {
            continue;
        }
        match pieces.iter().find(|w| w.0 == b) {
            Some((_, v)) => ranges.push((r, v)),
            None if at_end => {
                bail!("ZeRO-3 NVMe: bucket {b}'s updated piece was not kept for its write")
            }
            None => {}
        }
    }
    let mut block = Vec::new();
    for blk in blocks {
        if written[blk] {
            continue;
        }
        let br = master.block_range(blk);
        let inside: Vec<&(Range<usize>, &[f32])> = ranges
            .iter()
            .filter(|p| p.0.start < br.end && br.start < p.0.end)
            .collect();
        let covered: usize = inside
            .iter()
            .map(|p| p.0.end.min(br.end) - p.0.start.max(br.start))
            .sum();
        if covered == br.len() {
            block.resize(br.len(), 0.0);
            for (r, v) in inside {
                let (lo, hi) = (r.start.max(br.start), r.end.min(br.end));
                block[lo - br.start..hi - br.start].copy_from_slice(&v[lo - r.start..hi - r.start]);
            }
            master.overwrite_block(blk, &block)?;
            // Done with: written behind now rather than left to evict another block.
            master.write_block(blk)?;
            written[blk] = true;
        } else if at_end {
            for (r, v) in inside {
                let (lo, hi) = (r.start.max(br.start), r.end.min(br.end));
                master.update_range(lo..hi, |o, d| {
                    d.copy_from_slice(&v[lo - r.start + o..lo - r.start + o + d.len()])
                })?;
            }
        }
    }
    if at_end {
        written.iter_mut().for_each(|w| *w = false);
    }
    debug_assert_eq!(written.len(), master.blocks());
    Ok(())
}

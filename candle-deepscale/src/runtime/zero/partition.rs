//! Where every parameter lives in ZeRO's flat fp32 buffers, and which part a data-parallel rank owns.
//!
//! Parameters are laid out in the order their gradients become final during the per-layer backward
//! (last layer first; a tied parameter at the earliest layer that uses it) and cut into buckets of
//! about `reduce_bucket_size` elements. Each bucket is padded to a multiple of N (the data-parallel
//! size) and split into N equal pieces; rank r owns piece r of every bucket. A bucket is therefore
//! reduce-scattered with equal chunks the moment its last layer's backward ends, and with one bucket
//! this is exactly DeepSpeed's single flat buffer padded to a multiple of N.

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatParam {
    pub bucket: usize,
    /// Offset within its bucket.
    pub offset: usize,
    pub numel: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Offset of the bucket in the whole (padded) flat buffer.
    pub offset: usize,
    /// Elements of real parameters.
    pub len: usize,
    /// `len` rounded up to a multiple of the number of parts.
    pub padded: usize,
    /// `padded / parts`: the piece each rank owns.
    pub piece: usize,
    /// Offset of this rank's piece within the rank's partition.
    pub part_offset: usize,
    /// Its gradients are final once backward has finished this layer.
    pub ready_after_layer: usize,
    /// Parameters in the bucket, in layout order.
    pub params: Vec<usize>,
}

/// A contiguous stretch of one parameter inside this rank's piece of a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub param: usize,
    pub bucket: usize,
    /// Offset within the parameter (flattened).
    pub param_offset: usize,
    /// Offset within the rank's piece of the bucket.
    pub piece_offset: usize,
    pub len: usize,
}

#[derive(Debug, Clone)]
pub struct FlatLayout {
    pub params: Vec<FlatParam>,
    pub buckets: Vec<Bucket>,
    /// Number of partitions (the data-parallel size; 1 when every rank holds everything).
    pub parts: usize,
    pub rank: usize,
    /// This rank's runs, bucket by bucket.
    pub runs: Vec<Run>,
    /// Length of this rank's partition (sum of its pieces).
    pub partition_len: usize,
    /// Length of the whole padded flat buffer.
    pub full_len: usize,
}

impl FlatLayout {
    /// `layer_params[l]` lists the parameters (indices into `numels`) layer `l` uses; a parameter
    /// used by several layers is placed at the first of them.
    pub fn new(
        layer_params: &[Vec<usize>],
        numels: &[usize],
        bucket_elems: usize,
        parts: usize,
        rank: usize,
    ) -> Self {
        let parts = parts.max(1);
        let bucket_elems = bucket_elems.max(1);
        let mut first_use = vec![usize::MAX; numels.len()];
        for (l, ps) in layer_params.iter().enumerate() {
            for &p in ps {
                first_use[p] = first_use[p].min(l);
            }
        }
        let mut params = vec![
            FlatParam {
                bucket: 0,
                offset: 0,
                numel: 0
            };
            numels.len()
        ];
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut open: Option<Bucket> = None;
        for l in (0..layer_params.len()).rev() {
            for &p in &layer_params[l] {
                if first_use[p] != l || open.as_ref().is_some_and(|b| b.params.contains(&p)) {
                    continue;
                }
                let b = open.get_or_insert_with(|| Bucket {
                    offset: 0,
                    len: 0,
                    padded: 0,
                    piece: 0,
                    part_offset: 0,
                    ready_after_layer: l,
                    params: Vec::new(),
                });
                params[p] = FlatParam {
                    bucket: buckets.len(),
                    offset: b.len,
                    numel: numels[p],
                };
                b.len += numels[p];
                b.ready_after_layer = l;
                b.params.push(p);
                if b.len >= bucket_elems {
                    buckets.extend(open.take());
                }
            }
        }
        buckets.extend(open.take());
        let (mut offset, mut part_offset) = (0, 0);
        for b in &mut buckets {
            b.padded = b.len.div_ceil(parts) * parts;
            b.piece = b.padded / parts;
            b.offset = offset;
            b.part_offset = part_offset;
            offset += b.padded;
            part_offset += b.piece;
        }
        let mut runs = Vec::new();
        for (bi, b) in buckets.iter().enumerate() {
            let (lo, hi) = (rank * b.piece, (rank + 1) * b.piece);
            for &p in &b.params {
                let fp = &params[p];
                let (s, e) = (fp.offset.max(lo), (fp.offset + fp.numel).min(hi));
                if s < e {
                    runs.push(Run {
                        param: p,
                        bucket: bi,
                        param_offset: s - fp.offset,
                        piece_offset: s - lo,
                        len: e - s,
                    });
                }
            }
        }
        Self {
            params,
            buckets,
            parts,
            rank,
            runs,
            partition_len: part_offset,
            full_len: offset,
        }
    }

    /// Buckets whose gradients are final once backward has finished layer `layer`.
    pub fn ready_after(&self, layer: usize) -> impl Iterator<Item = usize> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.ready_after_layer == layer)
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_backward_order_and_pieces_cover_every_element_once() {
        // Layer 0 and layer 3 share parameter 0 (a tied embedding).
        let layers = vec![vec![0, 1], vec![2, 3], vec![4], vec![5, 0]];
        let numels = [10, 3, 7, 5, 9, 4];
        for parts in [1, 2, 3, 4] {
            let mut seen = vec![vec![0u8; 0]; numels.len()];
            for (p, n) in numels.iter().enumerate() {
                seen[p] = vec![0; *n];
            }
            let mut total = 0;
            for rank in 0..parts {
                let l = FlatLayout::new(&layers, &numels, 8, parts, rank);
                // Backward order: parameter 5 (layer 3) first, the tied 0 with layer 0's bucket.
                assert_eq!(l.buckets[0].params[0], 5);
                assert_eq!(l.buckets.last().unwrap().ready_after_layer, 0);
                let tied = &l.buckets[l.params[0].bucket];
                assert!(tied.params.contains(&0) && tied.ready_after_layer == 0);
                for b in &l.buckets {
                    assert_eq!(b.padded % parts, 0);
                    assert!(b.padded - b.len < parts);
                }
                for r in &l.runs {
                    for i in 0..r.len {
                        seen[r.param][r.param_offset + i] += 1;
                    }
                    assert!(r.piece_offset + r.len <= l.buckets[r.bucket].piece);
                }
                total += l.partition_len;
                assert_eq!(l.full_len, l.partition_len * parts);
            }
            assert!(seen.iter().flatten().all(|&c| c == 1), "parts {parts}");
            assert!(total >= numels.iter().sum::<usize>());
        }
    }
}

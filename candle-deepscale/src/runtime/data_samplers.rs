//! Which samples a data-parallel rank reads (Megatron's `MegatronPretrainingSampler`,
//! `data/data_samplers.py`): the global batch of an iteration is the next `train_batch_size`
//! samples in the one-rank order, and data-parallel rank `r` takes its `micro x accumulation`
//! consecutive ones — so every layout trains on the same samples in the same iterations, and a run
//! resumed at iteration `i` continues at sample `i x train_batch_size`.
use crate::runtime::config::BatchSizes;
use std::ops::Range;

/// The samples of each micro-batch of one data-parallel rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PretrainingSampler {
    pub micro_batch: usize,
    pub accumulation: usize,
    pub dp_size: usize,
    pub dp_rank: usize,
}

impl PretrainingSampler {
    /// The sampler of rank `dp_rank` of `dp_size` for `batch` (micro-batch, accumulation).
    pub fn new(batch: &BatchSizes, dp_size: usize, dp_rank: usize) -> Self {
        Self {
            micro_batch: batch.micro_batch,
            accumulation: batch.accumulation,
            dp_size: dp_size.max(1),
            dp_rank,
        }
    }

    /// Samples in one iteration's global batch.
    pub fn global_batch(&self) -> usize {
        self.micro_batch * self.accumulation * self.dp_size
    }

    /// Samples consumed before iteration `iteration` (1-based) starts.
    pub fn consumed_before(&self, iteration: u64) -> u64 {
        iteration.saturating_sub(1) * self.global_batch() as u64
    }

    /// The samples of this rank's micro-batch `m` of iteration `iteration` (1-based), as indices
    /// in the one-rank order.
    pub fn micro_batch(&self, iteration: u64, m: usize) -> Range<usize> {
        let start = self.consumed_before(iteration) as usize
            + self.dp_rank * self.micro_batch * self.accumulation
            + m * self.micro_batch;
        start..start + self.micro_batch
    }

    /// This rank's `i`-th evaluation micro-batch (the ranks interleave micro-batch by
    /// micro-batch).
    pub fn eval_micro_batch(&self, i: usize) -> Range<usize> {
        let start = (i * self.dp_size + self.dp_rank) * self.micro_batch;
        start..start + self.micro_batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank's micro-batches of an iteration together are exactly that iteration's global
    /// batch of the one-rank run, at any data-parallel size.
    #[test]
    fn the_ranks_cover_the_one_rank_order_exactly_once() {
        for (micro, gas, dp) in [(4, 1, 1), (2, 2, 2), (1, 4, 4), (3, 2, 2)] {
            let batch = BatchSizes {
                train_batch_size: micro * gas * dp,
                micro_batch: micro,
                accumulation: gas,
            };
            for iteration in 1..4u64 {
                let mut seen: Vec<usize> = (0..dp)
                    .flat_map(|r| {
                        let s = PretrainingSampler::new(&batch, dp, r);
                        (0..gas).flat_map(move |m| s.micro_batch(iteration, m))
                    })
                    .collect();
                seen.sort();
                let g = micro * gas * dp;
                let want: Vec<usize> =
                    ((iteration as usize - 1) * g..iteration as usize * g).collect();
                assert_eq!(seen, want, "micro {micro} gas {gas} dp {dp}");
            }
        }
    }
}

//! DeepSpeed's `offload_optimizer` / `offload_param` settings (`runtime/zero/offload_config.py`)
//! as ZeRO-3's NVMe offload takes them, and the swap pool they size.
use super::swap_tensor::{slot_bytes, AioSettings};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What to swap and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffloadSettings {
    /// `offload_optimizer.nvme_path`: Adam's moments and the gradients go to NVMe.
    pub optimizer_nvme: Option<PathBuf>,
    /// `offload_param.nvme_path`: the parameter pieces go to NVMe.
    pub param_nvme: Option<PathBuf>,
    /// Elements per swap block (`sub_group_size`).
    pub sub_group_size: usize,
    /// Aligned buffers in the pool (`buffer_count`, at least enough for the working set).
    pub buffer_count: usize,
    /// Blocks of each swapped buffer kept resident (from `max_in_cpu`, at least 1).
    pub resident_blocks: usize,
    pub aio_block_size: usize,
    pub aio_queue_depth: usize,
    pub aio_thread_count: usize,
}

impl Default for OffloadSettings {
    fn default() -> Self {
        let a = AioSettings::default();
        Self {
            optimizer_nvme: None,
            param_nvme: None,
            sub_group_size: 1_000_000_000,
            buffer_count: 4,
            resident_blocks: 1,
            aio_block_size: a.block_size,
            aio_queue_depth: a.queue_depth,
            aio_thread_count: a.thread_count,
        }
    }
}

/// The largest swap block, in elements (64 MiB of fp32): DeepSpeed's default `sub_group_size`
/// (1e9) would make each of the pool's buffers a whole partition — several times the states
/// being offloaded — while I/O gains nothing from requests beyond tens of MiB.
pub const MAX_SWAP_BLOCK: usize = 1 << 24;

impl OffloadSettings {
    /// The swap pool of a rank whose partition has `len` elements: (buffers, those of the
    /// working set, elements per block: `sub_group_size`, at most [`MAX_SWAP_BLOCK`]). Each
    /// swapped kind keeps its resident blocks plus one write behind and, when there is a next
    /// tile, one read ahead; `buffer_count` above that reads the step's tiles early.
    pub fn pool(&self, len: usize) -> (usize, usize, usize) {
        let block = self.sub_group_size.min(MAX_SWAP_BLOCK).clamp(1, len.max(1));
        let kinds =
            2 + usize::from(self.optimizer_nvme.is_some()) + usize::from(self.param_nvme.is_some());
        let ahead = usize::from(len.div_ceil(block) > 1);
        let working = kinds * (self.resident_blocks.max(1) + 1 + ahead);
        (self.buffer_count.max(working), working, block)
    }

    /// Bytes of that pool.
    pub fn pool_bytes(&self, len: usize) -> u64 {
        let (count, _, block) = self.pool(len);
        (count * slot_bytes(block)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_sub_group_size_up_to_the_largest_block() {
        let nvme = OffloadSettings {
            optimizer_nvme: Some("/nvme".into()),
            param_nvme: Some("/nvme".into()),
            ..Default::default()
        };
        // DeepSpeed's default sub_group_size on a 1e9-element partition: 64 MiB blocks, 4
        // swapped kinds x (resident, write behind, read ahead).
        assert_eq!(nvme.pool(1_000_000_000), (12, 12, MAX_SWAP_BLOCK));
        // A partition of one tile needs no read ahead.
        assert_eq!(nvme.pool(1000), (8, 8, 1000));
        let small = OffloadSettings {
            sub_group_size: 4096,
            buffer_count: 30,
            ..nvme.clone()
        };
        assert_eq!(small.pool(1_000_000), (30, 12, 4096));
        assert_eq!(small.pool_bytes(1_000_000), 30 * slot_bytes(4096) as u64);
        // Moments only (no optimizer or parameter files): 2 kinds.
        let moments = OffloadSettings {
            optimizer_nvme: None,
            param_nvme: None,
            ..small
        };
        assert_eq!(moments.pool(1_000_000), (30, 6, 4096));
    }
}

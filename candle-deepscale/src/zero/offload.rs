//! ZeRO-3 offload to NVMe (ZeRO-Infinity): `offload_optimizer {device: nvme}` keeps Adam's
//! moments and the gradient partition in swap files, `offload_param {device: nvme}` the fp32
//! parameter pieces; the optimizer step walks the partition in `sub_group_size` tiles, reading
//! the next tile ahead and writing the last behind. `device: cpu` is where this engine keeps
//! model states anyway (host memory), so it changes nothing here.
use super::stage_1_and_2::ZeroOptimizer;
use super::swap_tensor::{slot_bytes, AioSettings, BufferPool, IoThreads, SwappedBuffer};
use crate::cpu_adam::adam_step;
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

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

/// A rank's swapped buffers.
pub(super) struct Swapped {
    pub m: SwappedBuffer,
    pub v: SwappedBuffer,
    pub grads: Option<SwappedBuffer>,
    pub master: Option<SwappedBuffer>,
    pool: Arc<BufferPool>,
    io: Arc<IoThreads>,
}

impl Swapped {
    /// Buffers for a partition of `len` elements of global rank `rank` (its own folder);
    /// `master` (the fp32 pieces) is written out when the parameters are offloaded.
    pub fn new(s: &OffloadSettings, len: usize, rank: usize, master: &[f32]) -> Result<Self> {
        let block = s.sub_group_size.clamp(1, len.max(1));
        let kinds =
            2 + usize::from(s.optimizer_nvme.is_some()) + usize::from(s.param_nvme.is_some());
        // Each kind keeps its resident blocks plus one write behind and, when there is a next
        // tile, one read ahead.
        let ahead = usize::from(len.div_ceil(block) > 1);
        let count = s
            .buffer_count
            .max(kinds * (s.resident_blocks.max(1) + 1 + ahead));
        let pool = BufferPool::new(count, slot_bytes(block));
        let io = IoThreads::with_aio(s.aio_queue_depth, s.aio_thread_count);
        let dir = |p: &PathBuf| p.join("zero_stage_3").join(format!("rank{rank}"));
        let Some(opt_dir) = s.optimizer_nvme.as_ref().or(s.param_nvme.as_ref()) else {
            bail!("offload without an nvme_path")
        };
        let mk = |d: &PathBuf, name: &str| {
            SwappedBuffer::new(
                &dir(d),
                name,
                len,
                block,
                s.resident_blocks,
                pool.clone(),
                io.clone(),
            )
        };
        let (m, v) = (mk(opt_dir, "exp_avg")?, mk(opt_dir, "exp_avg_sq")?);
        let grads = s
            .optimizer_nvme
            .as_ref()
            .map(|d| mk(d, "gradients"))
            .transpose()?;
        let master = match &s.param_nvme {
            Some(d) => {
                let b = mk(d, "fp32_params")?;
                b.update_range(0..len, |o, c| c.copy_from_slice(&master[o..o + c.len()]))?;
                b.flush()?;
                Some(b)
            }
            None => None,
        };
        Ok(Self {
            m,
            v,
            grads,
            master,
            pool,
            io,
        })
    }

    pub fn flush(&self) -> Result<()> {
        for b in [
            Some(&self.m),
            Some(&self.v),
            self.grads.as_ref(),
            self.master.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            b.flush()?;
        }
        Ok(())
    }

    /// (bytes read, bytes written) so far.
    pub fn io_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.io.stats.read.load(Relaxed),
            self.io.stats.written.load(Relaxed),
        )
    }

    pub fn pool_bytes(&self) -> u64 {
        self.pool.bytes()
    }

    /// Whether the files are opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.m.direct
    }

    /// How the swapper does I/O: `io_uring` or `threads`, with or without O_DIRECT.
    pub fn io_path(&self) -> String {
        format!(
            "{}, {}",
            self.io.backend,
            if self.direct() {
                "O_DIRECT"
            } else {
                "buffered"
            }
        )
    }
}

impl ZeroOptimizer {
    /// This rank's fp32 pieces `range` (stage 3), from memory or the swap file.
    pub(super) fn read_master(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        if let Some(m) = self.swap.as_ref().and_then(|s| s.master.as_ref()) {
            return m.read_range(range, out);
        }
        let Some(master) = &self.master else {
            bail!("ZeRO-3 without a partition")
        };
        out.copy_from_slice(&master[range]);
        Ok(())
    }

    /// Resident bytes of swapped state: (parameters, gradients, optimizer, pool buffers). The
    /// resident blocks live in the pool, which is counted once, as buffers.
    pub(super) fn swap_resident(&self) -> (u64, u64, u64, u64) {
        match &self.swap {
            Some(s) => (0, 0, 0, s.pool_bytes()),
            None => (0, 0, 0, 0),
        }
    }

    /// NVMe offload: (bytes read, bytes written) by the swapper so far.
    pub fn offload_io_bytes(&self) -> Option<(u64, u64)> {
        self.swap.as_ref().map(|s| s.io_bytes())
    }

    /// NVMe offload: the I/O engine and mode (`io_uring, O_DIRECT`, `threads, buffered`, ...).
    pub fn offload_io_path(&self) -> Option<String> {
        self.swap.as_ref().map(|s| s.io_path())
    }

    /// NVMe offload: whether swap files use O_DIRECT.
    pub fn offload_direct(&self) -> Option<bool> {
        self.swap.as_ref().map(|s| s.direct())
    }

    /// The AdamW step over swapped buffers, one `sub_group_size` tile at a time: the next tile
    /// is read ahead while this one is updated, and written behind.
    pub(super) fn step_swapped(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        let consts = [false, true].map(|decay| self.adam_consts(lr, grad_scale, decay));
        let swap = self.swap.as_ref().expect("swapped");
        // Partition ranges of the segments (weight decay differs between them).
        let segs = self.segments_ranges();
        let blocks = swap.m.blocks();
        let mut grads_tile = Vec::new();
        let mut params_tile = Vec::new();
        for b in 0..blocks {
            for buf in [
                Some(&swap.m),
                Some(&swap.v),
                swap.grads.as_ref(),
                swap.master.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                buf.prefetch(b + 1)?;
            }
            let r = swap.m.block_range(b);
            grads_tile.resize(r.len(), 0.0);
            match &swap.grads {
                Some(g) => g.read_range(r.clone(), &mut grads_tile)?,
                None => grads_tile.copy_from_slice(&self.grads[r.clone()]),
            }
            params_tile.resize(r.len(), 0.0);
            self.read_master(r.clone(), &mut params_tile)?;
            let (mut m, mut v) = (vec![0f32; r.len()], vec![0f32; r.len()]);
            swap.m.read_range(r.clone(), &mut m)?;
            swap.v.read_range(r.clone(), &mut v)?;
            for &(lo, hi, decay) in &segs {
                let (lo, hi) = (lo.max(r.start), hi.min(r.end));
                if lo >= hi {
                    continue;
                }
                let (a, z) = (lo - r.start, hi - r.start);
                adam_step(
                    &mut params_tile[a..z],
                    &grads_tile[a..z],
                    &mut m[a..z],
                    &mut v[a..z],
                    &consts[usize::from(decay)],
                );
            }
            // The tiles are resident: these writes touch memory, written behind later.
            swap.m
                .update_range(r.clone(), |o, t| t.copy_from_slice(&m[o..o + t.len()]))?;
            swap.v
                .update_range(r.clone(), |o, t| t.copy_from_slice(&v[o..o + t.len()]))?;
            match (&swap.master, &mut self.master) {
                (Some(mb), _) => mb.update_range(r.clone(), |o, p| {
                    p.copy_from_slice(&params_tile[o..o + p.len()])
                })?,
                (None, Some(m)) => m[r.clone()].copy_from_slice(&params_tile),
                (None, None) => bail!("ZeRO-3 without a partition"),
            }
        }
        swap.flush()?;
        self.gather_persistent()
    }
}

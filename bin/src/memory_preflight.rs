//! Before any rank allocates: this run's bytes (model states per ZeRO stage and offload,
//! activations at this micro-batch, communication buckets) against what the process may use
//! (`ulimit -v`, the cgroup limit, MemAvailable). A run that cannot fit is refused with the
//! estimate and the layouts that would fit, instead of an allocator abort or the OOM killer
//! minutes in. `DEEPSCALE_NO_MEMORY_CHECK=1` skips the check.
use crate::args::Layout;
use anyhow::{bail, Result};
use candle_deepscale::runtime::engine::EngineConfig;
use candle_deepscale::runtime::meters::{memory_limit, MemoryLimit};
use candle_deepscale::runtime::zero::estimate::engine_bytes;

/// A transformer's shape, as the estimate needs it.
#[derive(Debug, Clone)]
pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub seq: usize,
    /// The padded vocabulary (the logits' width).
    pub vocab: usize,
    /// Every parameter (tensor-parallel size 1).
    pub params: u64,
    /// The largest module's parameters (ZeRO-3 gathers one at a time).
    pub largest: u64,
}

impl Shape {
    /// A GPT-2 configuration's shape at sequence length `seq`, tensor-parallel size `tp` (the
    /// configuration validated first: its counts must not overflow).
    pub fn gpt2(cfg: &zoo::gpt2::Config, seq: usize, tp: usize) -> Result<Self> {
        cfg.validate()?;
        Ok(Shape {
            layers: cfg.num_layers,
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            seq,
            vocab: cfg.padded_vocab_size(tp),
            params: cfg.parameter_total().unwrap_or(usize::MAX) as u64,
            largest: cfg.largest_module_params() as u64,
        })
    }
}

/// One rank's estimate, by category.
#[derive(Debug, Clone, Copy)]
struct Need {
    parameters: u64,
    gradients: u64,
    optimizer: u64,
    activations: u64,
    buffers: u64,
    /// NVMe offload's pool of swap buffers (`buffer_count` blocks of `sub_group_size`).
    swap: u64,
}

impl Need {
    fn total(&self) -> u64 {
        // Saturating: absurd flags make absurd estimates, refused, never an overflow.
        [
            self.parameters,
            self.gradients,
            self.optimizer,
            self.activations,
            self.buffers,
            self.swap,
        ]
        .iter()
        .fold(0u64, |t, &b| t.saturating_add(b))
    }
}

/// What one rank needs at `stage` and micro-batch `micro`.
fn need(
    s: &Shape,
    l: &Layout,
    e: &EngineConfig,
    stage: u8,
    micro: usize,
    dtype_bytes: u64,
    ckpt: Option<usize>,
) -> Need {
    let (tp, pp, dp) = (l.tp as u64, l.pp as u64, l.dp as u64);
    let psi = s.params / (tp * pp).max(1);
    let live = if stage == 3 { s.largest / tp.max(1) } else { 0 };
    let st = engine_bytes(stage, psi, dp, dtype_bytes, 0, live);
    let (mut parameters, mut gradients, mut optimizer) =
        (st.parameters, st.gradients, st.optimizer);
    let mut swap = 0;
    if let Some(o) = e.stage3.offload.as_ref().filter(|_| stage == 3) {
        // Swapped to NVMe: only the resident blocks and the pool stay, with the final
        // gradients kept for the step (up to reduce_bucket_size / dp) and the updated fp32
        // pieces of the next forward's first gather (up to the prefetch bucket / dp).
        let per_rank = |elems: usize| 4 * (elems as u64).min(psi).div_ceil(dp.max(1));
        if o.optimizer_nvme.is_some() {
            gradients = per_rank(e.reduce_bucket_size);
            optimizer = 0;
        }
        // The swap buffers: `buffer_count` blocks of `sub_group_size` (at least the working set).
        swap = o.pool_bytes(psi.div_ceil(dp.max(1)) as usize);
        if o.param_nvme.is_some() {
            parameters = live * dtype_bytes + per_rank(e.stage3.prefetch_bucket_size);
        }
    }
    // Megatron's activation memory per layer, s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at 16-bit
    // (Korthikanti et al. 2022), scaled to this run's element size; with activation
    // checkpointing each layer keeps its input and one layer is live at a time.
    let (sq, b, h, a) = (s.seq as f64, micro as f64, s.hidden as f64, s.heads as f64);
    let t = tp as f64;
    let per_layer =
        sq * b * h * (10.0 + 24.0 / t + 5.0 * a * sq / (h * t)) * dtype_bytes as f64 / 2.0;
    let layers = s.layers.div_ceil(pp as usize) as f64;
    let kept = match ckpt {
        Some(k) => layers * sq * b * h * dtype_bytes as f64 + per_layer * k.max(1) as f64,
        None => layers * per_layer,
    };
    // A pipeline's first stage holds up to pp micro-batches in flight.
    let in_flight = if pp > 1 {
        pp.min(e.gradient_accumulation_steps as u64) as f64
    } else {
        1.0
    };
    // The logits and their gradient, in fp32 (the fused cross entropy keeps no softmax).
    let logits = 2.0 * b * sq * (s.vocab as f64 / t) * 4.0;
    let activations = (kept * in_flight + logits) as u64;
    let buffers = if stage > 0 {
        2 * 4 * (e.reduce_bucket_size as u64).min(psi)
    } else {
        0
    };
    Need {
        parameters,
        gradients,
        optimizer,
        activations,
        buffers,
        swap,
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Refuses a run whose estimate exceeds what this process may use; `ranks_here` is the number
/// of ranks this process holds (in-process ranks), `checkpointing` whether activations are
/// checkpointed.
pub fn check(
    s: &Shape,
    l: &Layout,
    e: &EngineConfig,
    dtype_bytes: u64,
    checkpointing: bool,
) -> Result<()> {
    let Some((avail, limit)) = available() else {
        return Ok(());
    };
    let ckpt = checkpointing.then_some(e.checkpoint_num_layers);
    let ranks_here = ranks_here(l);
    let micro = e.train_micro_batch_size_per_gpu;
    let n = need(s, l, e, e.zero_stage, micro, dtype_bytes, ckpt);
    let total = n.total().saturating_mul(ranks_here);
    if total <= avail {
        return Ok(());
    }
    let mut fits = Vec::new();
    for stage in e.zero_stage + 1..=3 {
        let t = need(s, l, e, stage, micro, dtype_bytes, ckpt)
            .total()
            .saturating_mul(ranks_here);
        if t <= avail {
            fits.push(format!("ZeRO stage {stage} ({} in this process)", gib(t)));
            break;
        }
    }
    let mut m = micro / 2;
    while m >= 1 {
        let t = need(s, l, e, e.zero_stage, m, dtype_bytes, ckpt)
            .total()
            .saturating_mul(ranks_here);
        if t <= avail {
            fits.push(format!(
                "--batch-size {m} with --gas {} for the same global batch ({})",
                micro.div_ceil(m) * e.gradient_accumulation_steps,
                gib(t)
            ));
            break;
        }
        m /= 2;
    }
    if n.swap > 0 && total.saturating_sub(n.swap.saturating_mul(ranks_here)) <= avail {
        fits.push(format!(
            "a smaller offload_optimizer.sub_group_size or buffer_count (the swap buffers take {} \
             per rank: buffer_count of them, at least 3 per swapped state, of sub_group_size \
             elements each)",
            gib(n.swap)
        ));
    }
    if !checkpointing {
        let t = need(s, l, e, e.zero_stage, micro, dtype_bytes, Some(1))
            .total()
            .saturating_mul(ranks_here);
        if t <= avail {
            fits.push(format!("--checkpoint-activations ({})", gib(t)));
        }
    }
    let offloaded = e.zero_stage == 3 && e.stage3.offload.is_some();
    let hint = if fits.is_empty() && offloaded {
        "nothing smaller fits here: lower reduce_bucket_size, stage3_prefetch_bucket_size, \
         sub_group_size or the micro-batch, or spread the ranks over more machines (mpirun)"
            .to_string()
    } else if fits.is_empty() {
        "nothing smaller fits here: offload to NVMe (ZeRO-3 with offload_optimizer and \
         offload_param on nvme), or spread the ranks over more machines (mpirun)"
            .to_string()
    } else {
        format!("would fit: {}", fits.join("; or "))
    };
    bail!(
        "not enough memory: this run needs about {} in this process (per rank: parameters {}, \
         gradients {}, optimizer {}, activations {} at micro-batch {micro}, buffers {}, swap \
         buffers {}; x {ranks_here} rank(s) here), but it may use {} more ({}); {hint}. \
         (DEEPSCALE_NO_MEMORY_CHECK=1 skips this check.)",
        gib(total),
        gib(n.parameters),
        gib(n.gradients),
        gib(n.optimizer),
        gib(n.activations),
        gib(n.buffers),
        gib(n.swap),
        gib(avail),
        limit.source
    )
}

/// Refuses work that needs about `bytes` in this process (every in-process rank's share
/// together) for `what` (the flags that size it) where that exceeds what the process may use:
/// the benchmarks' buffers, sized by their flags, before any of them is allocated.
pub fn check_bytes(what: &str, bytes: u64) -> Result<()> {
    let Some((avail, limit)) = available() else {
        return Ok(());
    };
    if bytes <= avail {
        return Ok(());
    }
    bail!(
        "not enough memory: {what} needs about {} in this process, but it may use {} more ({}). \
         (DEEPSCALE_NO_MEMORY_CHECK=1 skips this check.)",
        gib(bytes),
        gib(avail),
        limit.source
    )
}

/// A benchmark's training run (`what`: the command and its sizing flags) against what this
/// process may use: [`check`]'s estimate, without its hints (a benchmark has its own flags).
/// `copies`: models each rank holds (a benchmark comparing several loops).
pub fn check_bench(what: &str, s: &Shape, l: &Layout, e: &EngineConfig, copies: u64) -> Result<()> {
    let models = copies.saturating_mul(ranks_here(l));
    let micro = e.train_micro_batch_size_per_gpu;
    let n = need(s, l, e, e.zero_stage, micro, 4, None);
    check_bytes(
        &format!(
            "{what} ({models} model(s) in this process, each: model states {}, activations {} \
             at micro-batch {micro})",
            gib(n.total() - n.activations),
            gib(n.activations)
        ),
        n.total().saturating_mul(models),
    )
}

/// The bytes this process may still allocate (under mpirun its share of the node, whose ranks
/// share its MemAvailable) and the limit that says so; None with `DEEPSCALE_NO_MEMORY_CHECK=1`
/// or where no limit can be read.
fn available() -> Option<(u64, MemoryLimit)> {
    if std::env::var("DEEPSCALE_NO_MEMORY_CHECK").as_deref() == Ok("1") {
        return None;
    }
    let limit = memory_limit()?;
    let share = match crate::launch::mpi_world_size() {
        Some(_) => local_ranks(),
        None => 1,
    };
    Some((limit.bytes / share.max(1), limit))
}

/// The ranks of `l` this process holds: every in-process rank, one under mpirun.
pub fn ranks_here(l: &Layout) -> u64 {
    match crate::launch::mpi_world_size() {
        Some(_) => 1,
        None => l.world_size as u64,
    }
}

/// Ranks of this node under mpirun, else 1.
fn local_ranks() -> u64 {
    candle_deepscale::ops::threads::local_mpi_ranks().unwrap_or(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ZeRO-3 with everything on NVMe still counts what stays in memory: the final gradients
    /// kept for the step (reduce_bucket_size / dp) and the next forward's first gather's
    /// updated pieces (prefetch bucket / dp), both in fp32.
    #[test]
    fn nvme_offload_counts_the_kept_gradients_and_the_handed_off_pieces() {
        let shape = Shape {
            layers: 2,
            hidden: 64,
            heads: 4,
            seq: 32,
            vocab: 512,
            params: 1_000_000,
            largest: 100_000,
        };
        let layout = Layout::in_process(2, 1, 1);
        let mut e = EngineConfig {
            reduce_bucket_size: 200_000,
            ..EngineConfig::default()
        };
        e.stage3.prefetch_bucket_size = 300_000;
        e.stage3.offload = Some(candle_deepscale::runtime::zero::OffloadSettings {
            optimizer_nvme: Some("/nvme".into()),
            param_nvme: Some("/nvme".into()),
            ..Default::default()
        });
        let n = need(&shape, &layout, &e, 3, 1, 4, None);
        // The default pool: 4 swapped kinds x (a resident block, a write behind, a read
        // ahead) of the whole 500 000-element partition (one tile: no read ahead) = 8 buffers.
        let slot = candle_deepscale::runtime::zero::swap_tensor::slot_bytes(500_000) as u64;
        assert_eq!((n.optimizer, n.swap), (0, 8 * slot));
        // `buffer_count` above the working set counts; sub_group_size sizes each buffer.
        if let Some(o) = e.stage3.offload.as_mut() {
            o.buffer_count = 20;
            o.sub_group_size = 100_000;
        }
        let slot = candle_deepscale::runtime::zero::swap_tensor::slot_bytes(100_000) as u64;
        assert_eq!(need(&shape, &layout, &e, 3, 1, 4, None).swap, 20 * slot);
        if let Some(o) = e.stage3.offload.as_mut() {
            o.buffer_count = 4;
        }
        assert_eq!(need(&shape, &layout, &e, 3, 1, 4, None).swap, 12 * slot);
        assert_eq!(n.gradients, 4 * 100_000);
        assert_eq!(n.parameters, 4 * 100_000 + 4 * 150_000);
        // Buckets larger than the model count the model.
        e.reduce_bucket_size = 500_000_000;
        assert_eq!(
            need(&shape, &layout, &e, 3, 1, 4, None).gradients,
            4 * 500_000
        );
    }
}

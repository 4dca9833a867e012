//! What the engine measures of itself (DeepSpeed's `utils/timer.py` and memory reports): the
//! wall clock split of an iteration, memory by category, and the one MFU definition every
//! figure uses — model FLOPs per second over this machine's GEMM peak.
use candle_core::{DType, Device, Result, Tensor};
use std::time::Instant;

/// What the engine measures of its own memory besides model states: the activations a step
/// keeps (peak since the last read).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryMeter {
    pub peak_activation_bytes: u64,
    live_activation_bytes: u64,
}

impl MemoryMeter {
    /// A forward kept `bytes` for its backward (pipelines keep several micro-batches at once).
    pub fn kept(&mut self, bytes: u64) {
        self.live_activation_bytes += bytes;
        self.peak_activation_bytes = self.peak_activation_bytes.max(self.live_activation_bytes);
    }

    /// The backward of a forward that kept `bytes` has started (they are freed as it goes).
    pub fn released(&mut self, bytes: u64) {
        self.live_activation_bytes = self.live_activation_bytes.saturating_sub(bytes);
    }

    /// The iteration is over: nothing is kept.
    pub fn clear_live(&mut self) {
        self.live_activation_bytes = 0;
    }

    /// The peak since the last call, and a new window.
    pub fn take_peak(&mut self) -> u64 {
        std::mem::take(&mut self.peak_activation_bytes)
    }
}

/// One rank's memory by category (bytes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryReport {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub swap_buffers: u64,
    /// Peak of the activations kept for backward.
    pub activations: u64,
    /// Peak of ZeRO's communication staging (gradient buckets, gathered pieces).
    pub communication: u64,
    /// NVMe offload: (bytes read, bytes written) so far.
    pub offload_bytes: Option<(u64, u64)>,
}

impl MemoryReport {
    pub fn model_state(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer + self.swap_buffers
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "parameters {:.2} MiB, gradients {:.2} MiB, optimizer {:.2} MiB, swap buffers {:.2} \
             MiB, activations {:.2} MiB, communication {:.2} MiB",
            mib(self.parameters),
            mib(self.gradients),
            mib(self.optimizer),
            mib(self.swap_buffers),
            mib(self.activations),
            mib(self.communication)
        );
        if let Some((r, w)) = self.offload_bytes {
            s += &format!(", NVMe read {:.2} MiB / written {:.2} MiB", mib(r), mib(w));
        }
        s
    }
}

/// Where training time went (DeepSpeed's `wall_clock_breakdown`): milliseconds per iteration in
/// forward passes, backward passes (with the gradient reduction they overlap) and the optimizer
/// step, averaged over `iterations`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WallClock {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub step_ms: f64,
    pub iterations: u64,
}

impl WallClock {
    /// Adds one forward/backward pass's seconds.
    pub fn add_pass(&mut self, forward: bool, seconds: f64) {
        if forward {
            self.forward_ms += seconds * 1e3;
        } else {
            self.backward_ms += seconds * 1e3;
        }
    }
}

/// FLOPs per token of a GPT/BERT-style transformer, forward + backward: 6N + 12 L T C, with N the
/// parameters used in matrix products (the LM head included, position embeddings not); the
/// PaLM/nanoGPT convention. Recompute is not counted (that would be HFU).
pub fn flops_per_token(layers: usize, hidden: usize, ffn: usize, vocab: usize, seq: usize) -> f64 {
    let (h, l, f) = (hidden as f64, layers as f64, ffn as f64);
    let n = l * (4.0 * h * h + 2.0 * h * f) + vocab as f64 * h;
    6.0 * n + 12.0 * l * seq as f64 * h
}

/// The side of the square product the GEMM peak is measured at (torch_bench.py's `matmul`).
pub const PEAK_GEMM_SIZE: usize = 2048;

/// This machine's GEMM peak in FLOP/s: the best of `tries` products of two `2048 x 2048` f32
/// matrices through the matmul the training step uses — DeepScale's op on the CPU (the system
/// BLAS where one loads, at the process's matmul precision: the bf16 peak in bf16 mode), candle's
/// (cuBLAS) on a GPU. The MFU denominator: measure it once at start.
pub fn gemm_peak_flops(device: &Device, tries: usize) -> Result<f64> {
    gemm_peak_flops_of(device, DType::F32, tries)
}

/// [`gemm_peak_flops`] with operands of `dtype` (a GPU's bf16 or fp16 peak, for parameters of
/// that dtype; on the CPU the process's matmul precision decides instead).
pub fn gemm_peak_flops_of(device: &Device, dtype: DType, tries: usize) -> Result<f64> {
    let n = PEAK_GEMM_SIZE;
    let dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let product = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        if device.is_cpu() {
            crate::ops::matmul::matmul(a, b)
        } else {
            a.matmul(b)
        }
    };
    // A warm-up product: packing buffers, the BLAS's first call, the GPU's kernels.
    product(&a, &b)?;
    device.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..tries.max(1) {
        let t = Instant::now();
        let c = product(&a, &b)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// Model FLOPs utilisation: `tokens_per_s * flops_per_token` over `peak_flops` (the GEMM peak of
/// [`gemm_peak_flops`], measured once at start). Ranks sharing a machine's cores each report
/// their own share of it.
pub fn mfu(tokens_per_s: f64, flops_per_token: f64, peak_flops: f64) -> f64 {
    tokens_per_s * flops_per_token / peak_flops
}

/// How much more memory this process may take, and which limit says so.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// `ulimit -v`, `cgroup memory.max` (or v1's `memory.limit_in_bytes`) or `MemAvailable`.
    pub source: String,
}

/// The tightest of what this process may still allocate: the address-space limit (`ulimit -v`)
/// less what is mapped, the cgroup's memory limit less its usage, and the machine's
/// `MemAvailable`. None where none can be read (not Linux).
pub fn memory_limit() -> Option<MemoryLimit> {
    let mut limits = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) } == 0
        && rl.rlim_cur != libc::RLIM_INFINITY
    {
        let mapped = kib(&status, "VmSize:").unwrap_or(0);
        limits.push(MemoryLimit {
            bytes: rl.rlim_cur.saturating_sub(mapped),
            source: format!("ulimit -v ({} KiB)", rl.rlim_cur / 1024),
        });
    }
    let read_u64 =
        |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        limits.push(MemoryLimit {
            bytes: max.saturating_sub(cur),
            source: format!("cgroup memory.max ({max} bytes)"),
        });
    } else if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ) {
        // v1 reports "no limit" as a huge number.
        if max < 1 << 60 {
            limits.push(MemoryLimit {
                bytes: max.saturating_sub(cur),
                source: format!("cgroup memory.limit_in_bytes ({max} bytes)"),
            });
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(avail) = kib(&meminfo, "MemAvailable:") {
        limits.push(MemoryLimit {
            bytes: avail,
            source: "MemAvailable".into(),
        });
    }
    limits.into_iter().min_by_key(|l| l.bytes)
}

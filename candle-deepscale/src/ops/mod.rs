//! CPU kernels, each a candle custom op with its own backward (candle-nn's `ops.rs` style: the
//! kernel, a public wrapper that falls back to composed candle ops where the kernel does not
//! apply, and a slow reference beside it that the tests hold the kernel against).
//!
//! This folder imports only candle and itself: models and the runtime call these through
//! [`crate::layers`], which picks the kernel or the composed ops.
//!
//! | file | kernel | Megatron / DeepSpeed counterpart |
//! |---|---|---|
//! | `matmul` | products and linears with backward (outputs written once, bias as the GEMM's start, weight gradients in the weight's order), the bias add with a row-sum backward | `torch.matmul`, `F.linear` |
//! | `blas` | a system BLAS (BLIS / OpenBLAS) loaded at run time | MKL/oneDNN under torch |
//! | `bf16_gemm` | AVX512-BF16 GEMM (fp32 accumulation), emulated elsewhere | CPU autocast |
//! | `fast_math` | vectorised exp/tanh and row reductions | |
//! | `random` | the counter-based generator (sliceable init, dropout streams) | Megatron's RNG tracker |
//! | `threads` | running a lone rank on a rayon worker | |
//! | `layer_norm` | LayerNorm | `FusedLayerNorm` |
//! | `bias_gelu` | bias + tanh-GeLU | `fused_bias_gelu` |
//! | `softmax` | scaled upper-triangular masked softmax | `FusedScaleMaskSoftmax` |
//! | `embedding` | embedding lookup with one zeroed table gradient | `VocabParallelEmbedding`'s lookup |
//! | `attention` | causal attention per head in causal row blocks | flash attention |
//! | `cross_entropy` | softmax cross entropy over the padded vocabulary, fused with the LM head | `vocab_parallel_cross_entropy` |
//! | `adam` | the fused AdamW pass over flat fp32 slices | `DeepSpeedCPUAdam` |
//! | `flops` | multiply-accumulates counted by the product wrappers | the flops profiler's patched functionals |
pub mod adam;
pub mod attention;
pub mod bf16_gemm;
pub mod bias_gelu;
pub mod blas;
pub mod cross_entropy;
pub mod embedding;
pub mod fast_math;
pub mod flops;
pub mod layer_norm;
pub mod matmul;
pub mod random;
pub mod softmax;
pub mod threads;

use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Switches every fused kernel of this folder (LayerNorm, bias + GeLU, embedding, causal softmax,
/// causal attention, cross entropy, and the matmul op) on, or off for candle's composed ops:
/// to compare, or to rule them out when debugging (`DEEPSCALE_FUSED=0` in the binary). The BLAS
/// behind the f32 products is a separate choice ([`blas::set_enabled`]): it picks a library, not
/// kernels.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are on (the default).
pub fn fused() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// fp16 / bf16 tensors on the CPU (an fp16 config's model there): their dtype when the fused
/// kernels run them in fp32 — operands widened, fp32 accumulation, the result rounded back, as
/// half-precision GEMMs on GPUs accumulate — instead of candle's element-by-element half
/// arithmetic (an fp16 GPT-2 step ran 1.8x slower that way).
pub fn half_on_cpu(ts: &[&Tensor]) -> Option<DType> {
    let dt = ts.first()?.dtype();
    (fused()
        && matches!(dt, DType::F16 | DType::BF16)
        && ts.iter().all(|t| t.dtype() == dt && t.device().is_cpu()))
    .then_some(dt)
}

#!/usr/bin/env bash
# Where a training step's time goes: samples `deepscale bench` (release build) with perf's
# cpu-clock after the model is built and warmed up, and sums them by category (GEMM, candle's
# element-wise ops, DeepScale's fused kernels, the optimizer, memory traffic, threads, other).
# Needs linux-perf (Debian: linux-perf). Usage: scripts/profile-step.sh [config] [delay-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-gpt2-125m}"
delay="${2:-30}"
bin=target/release/deepscale
[ -x "$bin" ] || cargo build --release -p deepscale
data="$(mktemp -d)/perf.data"
perf record -q -D "$((delay * 1000))" -e cpu-clock -F 499 -o "$data" \
  "$bin" bench --config "$config" --iters 6 --no-bf16 >/dev/null
perf report -i "$data" --no-children --sort dso,symbol --stdio 2>/dev/null |
  awk '/^ +[0-9.]+%/ {
    p = $1; sub("%", "", p); $1 = ""; s = $0
    if (s ~ /gemm|libblis|libopenblas/) c = "GEMM (system BLAS or the gemm crate: kernels and packing; bf16_gemm)"
    else if (s ~ /fused|cross_entropy|fast_math/) c = "DeepScale fused kernels (LayerNorm, bias+GeLU, softmax, cross entropy)"
    else if (s ~ /cpu_adam|grad_norm|add_into|ZeroOptimizer|flat::/) c = "optimizer and ZeRO buffers"
    else if (s ~ /binary_map|unary_map|Map1|Map2|affine|copy_strided|index_select|reduce|where_cond/) c = "candle element-wise, copies and reductions"
    else if (s ~ /memset|memmove|memcpy|clear_page|page_fault/) c = "memory (zeroing, copies, page faults)"
    else if (s ~ /Barrier|backtrace|rayon|spin|park|futex|sched|switch/) c = "thread pools (waiting, hand-off)"
    else c = "other"
    sum[c] += p
  }
  END { for (c in sum) printf "%6.1f%%  %s\n", sum[c], c }' | sort -rn

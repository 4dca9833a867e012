#!/usr/bin/env bash
# The GPU check: everything DeepScale's CUDA and NCCL paths should do, run on a machine with
# NVIDIA GPUs in about ten minutes after the build, each step under its own time limit, one summary
# line per step and one JSON file with all of it.
#
#   scripts/gpu-check.sh [--out DIR] [--bundle DIR|FILE.tar.xz] [--skip-build]
#   scripts/gpu-check.sh --dry-run [--out DIR]    what it would run, checked on this machine
#   scripts/gpu-check.sh --prepare-bundle DIR      build the binaries for a GPU machine without cargo
#
# Steps: inventory (nvidia-smi) -> build (cargo, --features nccl; or a prepared bundle) -> each test
# of tests/gpu.rs (CUDA training equal to the CPU run, NCCL collectives, dp 2 with ZeRO 0/1/2, tp 2,
# bf16; a test needing more GPUs than present is reported skipped, with why) -> pretrain-gpt2
# --device cuda at dp 1 and, with two GPUs, dp 2 and tp 2 -> bench on GPU 0 (GPT-2 124M tokens/s
# and MFU against the GPU's measured GEMM peak, fp32 and bf16) -> evaluate and generate --bf16 on
# the dp-1 run's checkpoint (bf16 parameters; the loss against fp32's).
#
# Environment: DEEPSCALE_GPU_TARGET_DIR (build folder, reused; default target-gpu/ here),
# DEEPSCALE_BIN (--dry-run: the deepscale binary whose flags the dry run checks),
# DEEPSCALE_DRY_GPUS (--dry-run: how many GPUs to pretend; default 1).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

DRY=0
OUT="$ROOT/gpu-check-out"
BUNDLE=""
PREPARE=""
SKIP_BUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --bundle) BUNDLE="$2"; shift ;;
    --prepare-bundle) PREPARE="$2"; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
LOG="$OUT/logs"
mkdir -p "$LOG"
TARGET="${DEEPSCALE_GPU_TARGET_DIR:-$ROOT/target-gpu}"
STEPS_JSON="$OUT/steps.jsonl"
# The dp-1 run's checkpoint (read by the inference step) lives outside OUT: OUT is what comes back.
CKPT_DIR="$(mktemp -d)"
trap 'rm -rf "$CKPT_DIR"' EXIT
CKPT="$CKPT_DIR/ckpt-dp1"
: > "$STEPS_JSON"
T0=$(date +%s)

# One summary line and one JSON line per step: name, status (pass/fail/skipped/dry-run), seconds,
# detail (why skipped, what failed, the figures).
record() {
  local name="$1" status="$2" secs="$3" detail="$4"
  printf 'gpu-check: %-28s %-8s %5ss  %s\n' "$name" "$status" "$secs" "$detail"
  python3 - "$name" "$status" "$secs" "$detail" >> "$STEPS_JSON" <<'PY'
import json, sys
name, status, secs, detail = sys.argv[1:5]
print(json.dumps({"step": name, "status": status, "seconds": int(secs), "detail": detail}))
PY
}

# Runs a step's command under its own time limit (seconds), its output in logs/NAME.log.
# Sets RC (124: timed out) and SECS. In a dry run it prints the command instead.
run_step() {
  local name="$1" limit="$2"; shift 2
  local start; start=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "would run [$name, limit ${limit}s]: $*" | tee "$LOG/$name.log"
    RC=0
  else
    timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    RC=$?
  fi
  SECS=$(( $(date +%s) - start ))
}

# --- build the binaries for a GPU machine that has no Rust toolchain (run where cargo and the
# package registries are): CUDA 13.4's nvcc and the libraries the binary links from PyPI, a
# link-time stub of the driver library (the real one comes with the GPU machine's driver), a
# release build, stripped, packed.
if [ -n "$PREPARE" ]; then
  set -e
  eval "$(bash scripts/install-cuda-toolchain.sh)"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP_OVERRIDE:-90}"
  LIBS="${DEEPSCALE_CUDA_LIBS:-$HOME/.cache/deepscale/cuda-libs-13}"
  if [ ! -f "$LIBS/.complete" ]; then
    rm -rf "$LIBS"; mkdir -p "$LIBS"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$LIBS/site" \
      nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-nccl-cu13 >&2
    touch "$LIBS/.complete"
  fi
  LINK="$LIBS/link"; mkdir -p "$LINK"
  for lib in cublas cublasLt curand nvrtc nccl; do
    f="$(find "$LIBS/site" -name "lib$lib.so.*" -type f | sort | head -n1)"
    [ -n "$f" ] || { echo "gpu-check: lib$lib not found under $LIBS/site" >&2; exit 1; }
    ln -sf "$f" "$LINK/lib$lib.so"
  done
  # The driver API's symbols, as cudarc declares them, in a stub with the real SONAME.
  python3 - "$LINK/cuda_stub.c" <<'PY'
import glob, re, sys, os
names = set()
for f in glob.glob(os.path.expanduser("~/.cargo/registry/src/*/cudarc-*/src/driver/sys/*.rs")):
    names.update(re.findall(r"pub fn (cu[A-Za-z0-9_]+)\s*\(", open(f).read()))
open(sys.argv[1], "w").write("".join(f"void {n}(void) {{}}\n" for n in sorted(names)))
PY
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LINK"
  export CARGO_TARGET_DIR="$TARGET"
  cargo build --release -p deepscale --features nccl
  gpu_test="$(cargo test --release -p deepscale --features nccl --test gpu --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
  stage="$(mktemp -d)"
  cp "$TARGET/release/deepscale" "$stage/deepscale"
  cp "$gpu_test" "$stage/gpu-tests"
  strip "$stage/deepscale" "$stage/gpu-tests"
  git rev-parse HEAD > "$stage/commit" 2>/dev/null || true
  mkdir -p "$PREPARE"
  tar -C "$stage" -cJf "$PREPARE/gpu-bundle.tar.xz" deepscale gpu-tests commit
  rm -rf "$stage"
  ls -l "$PREPARE/gpu-bundle.tar.xz"
  echo "gpu-check: carry $PREPARE and run: scripts/gpu-check.sh --bundle $PREPARE/gpu-bundle.tar.xz"
  exit 0
fi

# --- 1. inventory
if [ "$DRY" = 1 ]; then
  NGPU="${DEEPSCALE_DRY_GPUS:-1}"
  GPU_NAMES="(dry run: $NGPU pretended)"
  CAP=90
  record inventory dry-run 0 "$GPU_NAMES"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L > "$LOG/inventory.log" 2>&1; then
  NGPU=$(grep -c '^GPU ' "$LOG/inventory.log")
  GPU_NAMES="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd';')"
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.' | tr -d ' ')"
  record inventory pass 0 "$NGPU GPU(s): $GPU_NAMES; compute capability $CAP"
else
  record inventory fail 0 "no NVIDIA GPU or driver (nvidia-smi failed)"
  NGPU=0
fi

# --- 2. build (or a prepared bundle)
BIN=""; GPU_TESTS=""
if [ -n "$BUNDLE" ]; then
  dir="$BUNDLE"
  if [ -f "$BUNDLE" ]; then
    dir="$OUT/bundle"; mkdir -p "$dir"
    tar -C "$dir" -xJf "$BUNDLE" || { record build fail 0 "cannot unpack $BUNDLE"; dir=""; }
  fi
  if [ -n "$dir" ] && [ -x "$dir/deepscale" ] && [ -x "$dir/gpu-tests" ]; then
    BIN="$dir/deepscale"; GPU_TESTS="$dir/gpu-tests"
    record build pass 0 "prepared bundle $BUNDLE (commit $(cat "$dir/commit" 2>/dev/null || echo '?'))"
  elif [ -n "$dir" ]; then
    record build fail 0 "$BUNDLE holds no deepscale and gpu-tests"
  fi
elif [ "$DRY" = 1 ]; then
  BIN="${DEEPSCALE_BIN:-$TARGET/release/deepscale}"
  GPU_TESTS="$TARGET/release/deps/gpu-XXXX"
  run_step build 1800 cargo build --release -p deepscale --features nccl
  record build dry-run "$SECS" "CUDA_COMPUTE_CAP=$CAP, CARGO_TARGET_DIR=$TARGET"
elif [ "$SKIP_BUILD" = 1 ] || command -v cargo >/dev/null 2>&1; then
  start=$(date +%s)
  if ! command -v nvcc >/dev/null 2>&1; then
    eval "$(bash scripts/install-cuda-toolchain.sh)"
  fi
  export CUDA_COMPUTE_CAP="${CAP:-90}" CARGO_TARGET_DIR="$TARGET"
  ok=1
  if [ "$SKIP_BUILD" = 0 ]; then
    cargo build --release -p deepscale --features nccl > "$LOG/build.log" 2>&1 || ok=0
  fi
  GPU_TESTS="$(cargo test --release -p deepscale --features nccl --test gpu --no-run \
    --message-format=json 2>>"$LOG/build.log" | python3 -c '
import json, sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')" || ok=0
  BIN="$TARGET/release/deepscale"
  secs=$(( $(date +%s) - start ))
  if [ "$ok" = 1 ] && [ -x "$BIN" ] && [ -n "$GPU_TESTS" ]; then
    record build pass "$secs" "the build took ${secs}s (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, $TARGET)"
  else
    record build fail "$secs" "see logs/build.log: $(tail -n 3 "$LOG/build.log" | tr '\n' ' ')"
    BIN=""
  fi
else
  record build fail 0 "no cargo here and no --bundle: build one with --prepare-bundle where cargo is"
fi

# The CUDA libraries the binaries load (cuBLAS, NCCL, ...) where a Python install keeps them.
if [ "$DRY" = 0 ]; then
  pylibs="$(python3 - 2>/dev/null <<'PY' || true
import glob, os, nvidia
dirs = []
for d in nvidia.__path__:
    dirs += glob.glob(os.path.join(d, "*", "lib")) + glob.glob(os.path.join(d, "*", "*", "lib"))
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="${pylibs:+$pylibs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
fi

# --- 3. the GPU test suite, test by test
if [ -n "$GPU_TESTS" ]; then
  if [ "$DRY" = 1 ]; then
    names="$(grep -A1 '^#\[test\]' tests/gpu.rs | grep -o 'fn [a-z0-9_]*' | sed 's/^fn //')"
  else
    names="$("$GPU_TESTS" --list 2>/dev/null | sed -n 's/: test$//p')"
  fi
  [ -n "$names" ] || record gpu-tests fail 0 "no tests listed"
  for t in $names; do
    run_step "test-$t" 150 env DEEPSCALE_REQUIRE_GPU=0 "$GPU_TESTS" --exact "$t" --nocapture --test-threads=1
    if [ "$DRY" = 1 ]; then
      record "test-$t" dry-run "$SECS" "tests/gpu.rs"
    elif [ "$RC" = 124 ]; then
      record "test-$t" fail "$SECS" "timed out"
    elif [ "$RC" != 0 ]; then
      record "test-$t" fail "$SECS" "$(grep -m1 -E 'panicked|error' "$LOG/test-$t.log" | cut -c1-200)"
    elif grep -q '^skipped: ' "$LOG/test-$t.log"; then
      record "test-$t" skipped "$SECS" "$(grep -m1 '^skipped: ' "$LOG/test-$t.log" | sed 's/^skipped: //')"
    else
      record "test-$t" pass "$SECS" ""
    fi
  done
else
  record gpu-tests skipped 0 "no build"
fi

# A pretraining run: pass when it ends with a falling loss; the JSON summary is kept.
pretrain() {
  local name="$1" gpus="$2"; shift 2
  if [ -z "$BIN" ]; then record "$name" skipped 0 "no build"; return; fi
  if [ "$NGPU" -lt "$gpus" ]; then
    record "$name" skipped 0 "needs $gpus GPUs, this machine has $NGPU"; return
  fi
  run_step "$name" 150 "$BIN" pretrain-gpt2 --device cuda --train-iters 30 --log-interval 10 \
    --eval-interval 30 --eval-iters 2 --json "$@"
  if [ "$DRY" = 1 ]; then
    # The flags exist: a build without CUDA gets past parsing and stops at the device.
    if "$BIN" pretrain-gpt2 --device cuda --train-iters 30 --log-interval 10 \
      --eval-interval 30 --eval-iters 2 --json "$@" > "$LOG/$name.check" 2>&1 ||
      grep -q -- '--device cuda' "$LOG/$name.check"; then
      record "$name" dry-run 0 "$*"
    else
      record "$name" fail 0 "flags refused: $(head -n 3 "$LOG/$name.check" | tr '\n' ' ')"
    fi
    return
  fi
  local figures
  figures="$(tail -n 1 "$LOG/$name.log" | python3 - 2>/dev/null <<'PY'
import json, sys
j = json.loads(sys.stdin.read())
assert j["final_loss"] < j["initial_loss"], "the loss did not fall"
print("loss %.3f -> %.3f, %.0f tokens/s" % (j["initial_loss"], j["final_loss"], j["tokens_per_s"]))
PY
)"
  if [ "$RC" = 0 ] && [ -n "$figures" ]; then
    record "$name" pass "$SECS" "$figures"
  else
    record "$name" fail "$SECS" "rc $RC: $(grep -m1 -E 'error|panicked' "$LOG/$name.log" | cut -c1-200)"
  fi
}

# --- 4. pretraining on GPUs
pretrain pretrain-dp1 1 --save "$CKPT"
pretrain pretrain-dp2-zero2 2 --world-size 2 --zero-stage 2
pretrain pretrain-tp2 2 --world-size 2 --model-parallel-size 2

# --- 5. the benchmark on GPU 0
if [ -z "$BIN" ]; then
  record bench skipped 0 "no build"
elif [ "$NGPU" -lt 1 ]; then
  record bench skipped 0 "no GPU"
else
  run_step bench 240 "$BIN" bench --device cuda --config small,gpt2-125m --iters 5 --json
  if [ "$DRY" = 1 ]; then
    if "$BIN" bench --device cuda --config small,gpt2-125m --iters 5 --json > "$LOG/bench.check" 2>&1 ||
      grep -q -- '--device cuda' "$LOG/bench.check"; then
      record bench dry-run 0 "GPT-2 124M and the small GPT, fp32 and bf16"
    else
      record bench fail 0 "flags refused: $(head -n 3 "$LOG/bench.check" | tr '\n' ' ')"
    fi
  elif [ "$RC" = 0 ]; then
    tail -n 1 "$LOG/bench.log" > "$OUT/bench.json"
    record bench pass "$SECS" "$(python3 - "$OUT/bench.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rows = []
for r in j["results"]:
    t = "%s: fp32 %.0f tokens/s MFU %.0f%%" % (r["config"], r["tokens_per_s"], 100 * r["mfu"])
    if "bf16_mfu" in r:
        t += ", bf16 %.0f tokens/s MFU %.0f%%" % (r["bf16_tokens_per_s"], 100 * r["bf16_mfu"])
    rows.append(t)
print("; ".join(rows))
PY
)"
  else
    record bench fail "$SECS" "rc $RC: $(grep -m1 -E 'error|panicked' "$LOG/bench.log" | cut -c1-200)"
  fi
fi

# --- 6. inference on GPU 0: `evaluate --task loss` of the dp-1 run's checkpoint in fp32 and with
# --bf16 (bf16 parameters), which must agree to bf16 rounding; `generate --bf16` samples from it.
TEXT="The quick brown fox jumps over the lazy dog, and the dog sleeps on in the afternoon sun."
if [ -z "$BIN" ]; then
  record infer-bf16 skipped 0 "no build"
elif [ "$NGPU" -lt 1 ]; then
  record infer-bf16 skipped 0 "no GPU"
elif [ "$DRY" = 1 ]; then
  # No checkpoint here: the flags must get past parsing (to the device or the missing --load).
  ok=1
  for cmd in "evaluate --task loss --text x --json --bf16" "generate --prompt x --greedy --out-seq-length 16 --json --bf16"; do
    # shellcheck disable=SC2086
    "$BIN" $cmd --device cuda --load "$CKPT" > "$LOG/infer-bf16.check" 2>&1
    grep -qE -- '--device cuda|not a DeepScale checkpoint' "$LOG/infer-bf16.check" || ok=0
  done
  if [ "$ok" = 1 ]; then
    record infer-bf16 dry-run 0 "evaluate and generate --bf16 --device cuda --load the dp-1 checkpoint"
  else
    record infer-bf16 fail 0 "flags refused: $(head -n 3 "$LOG/infer-bf16.check" | tr '\n' ' ')"
  fi
elif [ ! -d "$CKPT" ]; then
  record infer-bf16 skipped 0 "pretrain-dp1 saved no checkpoint"
else
  start=$(date +%s)
  for p in fp32 bf16; do
    flag=""; [ "$p" = bf16 ] && flag="--bf16"
    # shellcheck disable=SC2086
    timeout --kill-after=10 120 "$BIN" evaluate --task loss --device cuda --load "$CKPT" \
      --text "$TEXT" --json $flag > "$LOG/infer-$p.log" 2>&1
  done
  timeout --kill-after=10 120 "$BIN" generate --device cuda --load "$CKPT" --prompt "The" \
    --greedy --out-seq-length 16 --json --bf16 > "$LOG/infer-generate.log" 2>&1
  SECS=$(( $(date +%s) - start ))
  figures="$(python3 - "$LOG/infer-fp32.log" "$LOG/infer-bf16.log" "$LOG/infer-generate.log" 2>&1 <<'PY'
import json, sys
last = lambda f: json.loads(open(f).read().strip().splitlines()[-1])
fp32, bf16, gen = (last(f) for f in sys.argv[1:4])
a, b = fp32["loss"], bf16["loss"]
assert abs(a - b) <= 3e-2 * abs(a), "bf16 loss %.5f far from fp32 %.5f" % (b, a)
assert len(gen["token_ids"]) > 0, "generate --bf16 produced no tokens"
print("loss fp32 %.5f, bf16 %.5f; generate --bf16: %d tokens" % (a, b, len(gen["token_ids"])))
PY
)"
  if [ $? = 0 ]; then
    record infer-bf16 pass "$SECS" "$figures"
  else
    record infer-bf16 fail "$SECS" "$(echo "$figures" | tail -n 1 | cut -c1-200)"
  fi
fi

# --- the summary: one JSON file with every step
TOTAL=$(( $(date +%s) - T0 ))
python3 - "$STEPS_JSON" "$OUT/gpu-check.json" "$TOTAL" "$DRY" "$NGPU" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
total, dry, ngpu = int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
counts = {}
for s in steps:
    counts[s["status"]] = counts.get(s["status"], 0) + 1
out = {"dry_run": dry, "gpus": ngpu, "seconds": total, "counts": counts, "steps": steps}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"gpu-check: {len(steps)} steps in {total}s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; {sys.argv[2]}")
PY
grep -q '"status": "fail"' "$STEPS_JSON" && exit 1
exit 0

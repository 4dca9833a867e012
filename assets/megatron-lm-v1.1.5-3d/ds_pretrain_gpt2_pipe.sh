#!/usr/bin/env bash
# Mirrors DeepSpeedExamples Megatron-LM-v1.1.5-3D_parallelism/examples/ds_pretrain_gpt2_pipe.sh:
# GPT-2 over pipe x data x model parallel ranks with ds_config.json (ZeRO 0) or
# ds_zero_stage_2_config.json (CONFIG=ds_zero_stage_2_config.json ZERO_STAGE=2).
#   MODEL=tiny (default, runs here) | 345m | 1.5b;  WORLD (default 8), PP_SIZE (2), MP_SIZE (2)
#   GAS (accumulation; default: the config's train_batch_size / (micro x dp)), ITERS, DATA,
#   CHECKPOINT_PATH (passes --save/--load), DEEPSCALE (the binary)
# ZeRO-2 with PP_SIZE > 1 is refused (as in DeepSpeed); use it with PP_SIZE=1.
set -euo pipefail
script_dir=$(cd "$(dirname "$0")" && pwd)
assets=$(dirname "$script_dir")
MODEL=${MODEL:-tiny}
WORLD=${WORLD:-8}
PP_SIZE=${PP_SIZE:-2}
MP_SIZE=${MP_SIZE:-2}
ZERO_STAGE=${ZERO_STAGE:-0}
config_json="$script_dir/${CONFIG:-ds_config.json}"
DATA=${DATA:-$assets/data/sample.jsonl}
DEEPSCALE=${DEEPSCALE:-cargo run --release -q -p deepscale --}

case "$MODEL" in
  tiny) NLAYERS=4; NHIDDEN=64; HEADS=4; SEQ=64; ITERS=${ITERS:-20} ;;
  345m) NLAYERS=24; NHIDDEN=1024; HEADS=16; SEQ=1024; ITERS=${ITERS:-320000} ;;
  1.5b) NLAYERS=48; NHIDDEN=1600; HEADS=16; SEQ=1024; ITERS=${ITERS:-320000} ;;
  *) echo "MODEL must be tiny, 345m or 1.5b" >&2; exit 1 ;;
esac
dp=$(( WORLD / (PP_SIZE * MP_SIZE) ))
read -r tbs micro < <(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c['train_batch_size'], c['train_micro_batch_size_per_gpu'])" "$config_json")
BATCHSIZE=$micro
GAS=${GAS:-$(( tbs / (micro * dp) ))}

gpt_options=(
  --model-parallel-size "$MP_SIZE"
  --pipe-parallel-size "$PP_SIZE"
  --num-layers "$NLAYERS" --hidden-size "$NHIDDEN" --num-attention-heads "$HEADS"
  --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --batch-size "$BATCHSIZE" --gas "$GAS"
  --train-iters "$ITERS" --lr-decay-iters "$ITERS"
  --data-path "$DATA"
  --vocab-file "$assets/gpt2/gpt2-vocab.json" --merge-file "$assets/gpt2/gpt2-merges.txt"
  --data-impl mmap --split 949,50,1 --distributed-backend nccl
  --lr 1.5e-4 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2 --clip-grad 1.0 --warmup 0.01
  --checkpoint-activations --log-interval 1 --eval-interval 10 --eval-iters 2 --fp16
)
if [ -n "${CHECKPOINT_PATH:-}" ]; then
  gpt_options+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 500)
fi
deepspeed_options=(
  --deepspeed --deepspeed_config "$config_json" --zero-stage "$ZERO_STAGE"
  --deepspeed-activation-checkpointing
)
# shellcheck disable=SC2086
exec $DEEPSCALE pretrain-gpt2 --world-size "$WORLD" "${gpt_options[@]}" "${deepspeed_options[@]}" "$@"

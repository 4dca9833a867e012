#!/usr/bin/env bash
# Mirrors DeepSpeedExamples Megatron-LM-v1.1.5-ZeRO3/examples/ds_pretrain_gpt2-zero3.sh: GPT-2 with
# ZeRO stage 3 (ds_zero_stage_3_config.json) or ZeRO-Infinity (CONFIG=ds_zero_stage_infinity_config.json).
#   MODEL=tiny (default) | 1.5b | 10b;  WORLD (default 4), MP_SIZE (1), ITERS, DATA, DEEPSCALE
# ZeRO-Infinity swaps to the config's nvme_path (/nvme_data): point it at a fast local disk first.
set -euo pipefail
script_dir=$(cd "$(dirname "$0")" && pwd)
assets=$(dirname "$script_dir")
MODEL=${MODEL:-tiny}
WORLD=${WORLD:-4}
MP_SIZE=${MP_SIZE:-1}
config_json="$script_dir/${CONFIG:-ds_zero_stage_3_config.json}"
DATA=${DATA:-$assets/data/sample.jsonl}
DEEPSCALE=${DEEPSCALE:-cargo run --release -q -p deepscale --}

case "$MODEL" in
  tiny) NLAYERS=2; NHIDDEN=64; HEADS=4; SEQ=64; ITERS=${ITERS:-20} ;;
  1.5b) NLAYERS=48; NHIDDEN=1600; HEADS=16; SEQ=1024; ITERS=${ITERS:-320000} ;;
  10b) NLAYERS=50; NHIDDEN=4096; HEADS=32; SEQ=1024; ITERS=${ITERS:-320000} ;;
  *) echo "MODEL must be tiny, 1.5b or 10b" >&2; exit 1 ;;
esac
dp=$(( WORLD / MP_SIZE ))
micro=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c.get('train_micro_batch_size_per_gpu') or c['train_batch_size'] // int(sys.argv[2]))" "$config_json" "$dp")

gpt_options=(
  --model-parallel-size "$MP_SIZE"
  --num-layers "$NLAYERS" --hidden-size "$NHIDDEN" --num-attention-heads "$HEADS"
  --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --batch-size "$micro" --train-iters "$ITERS" --lr-decay-iters "$ITERS"
  --data-path "$DATA"
  --vocab-file "$assets/gpt2/gpt2-vocab.json" --merge-file "$assets/gpt2/gpt2-merges.txt"
  --data-impl mmap --split 949,50,1 --distributed-backend nccl
  --lr 1.5e-4 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2 --clip-grad 1.0 --warmup 0.01
  --checkpoint-activations --log-interval 1 --eval-interval 10 --eval-iters 2 --fp16
  --scattered-embeddings --split-transformers
)
deepspeed_options=(
  --deepspeed --deepspeed_config "$config_json" --zero-stage 3
  --deepspeed-activation-checkpointing
)
# shellcheck disable=SC2086
exec $DEEPSCALE pretrain-gpt2 --world-size "$WORLD" "${gpt_options[@]}" "${deepspeed_options[@]}" "$@"

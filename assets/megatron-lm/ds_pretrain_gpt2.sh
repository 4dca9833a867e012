#!/usr/bin/env bash
# Mirrors DeepSpeedExamples Megatron-LM/scripts/ds_zero2_pretrain_gpt2_model_parallel.sh (and
# ds_pretrain_gpt2.sh): GPT-2 with ZeRO-2, model parallel, DeepSpeed activation checkpointing.
#   MODEL=tiny (default, runs here in about two minutes) | 345m | 1.5b | 8.3b
#   CONFIG=ds_zero2_config.json (default) | ds_zero-offload_config.json | ds_zero-offload_10B_config.json
#   WORLD (ranks, default 4), MP_SIZE (tensor parallel, default 2), ITERS, DATA, DEEPSCALE (the binary)
set -euo pipefail
script_dir=$(cd "$(dirname "$0")" && pwd)
assets=$(dirname "$script_dir")
MODEL=${MODEL:-tiny}
WORLD=${WORLD:-4}
MP_SIZE=${MP_SIZE:-2}
config_json="$script_dir/${CONFIG:-ds_zero2_config.json}"
DATA=${DATA:-$assets/data/sample.jsonl}
DEEPSCALE=${DEEPSCALE:-cargo run --release -q -p deepscale --}

case "$MODEL" in
  tiny) model=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64
               --max-position-embeddings 64); ITERS=${ITERS:-20}; stage_rbs=50000000 ;;
  345m) model=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024
               --max-position-embeddings 1024); ITERS=${ITERS:-100000}; stage_rbs=50000000 ;;
  1.5b) model=(--num-layers 48 --hidden-size 1600 --num-attention-heads 16 --seq-length 1024
               --max-position-embeddings 1024); ITERS=${ITERS:-100000}; stage_rbs=50000000 ;;
  8.3b) model=(--num-layers 72 --hidden-size 3072 --num-attention-heads 24 --seq-length 1024
               --max-position-embeddings 1024); ITERS=${ITERS:-100000}; stage_rbs=50000000 ;;
  *) echo "MODEL must be tiny, 345m, 1.5b or 8.3b" >&2; exit 1 ;;
esac
# The micro-batch: the config's train_micro_batch_size_per_gpu, else its train_batch_size /
# (dp x accumulation), as DeepSpeed derives it.
dp=$(( WORLD / MP_SIZE ))
batch=$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
micro = c.get("train_micro_batch_size_per_gpu")
print(micro or c["train_batch_size"] // (int(sys.argv[2]) * c.get("gradient_accumulation_steps", 1)))
' "$config_json" "$dp")

gpt_options=(
  --model-parallel-size "$MP_SIZE"
  "${model[@]}"
  --batch-size "$batch"
  --train-iters "$ITERS"
  --train-data "$DATA"
  --lazy-loader
  --tokenizer-type GPT2BPETokenizer
  --vocab-file "$assets/gpt2/gpt2-vocab.json"
  --merge-file "$assets/gpt2/gpt2-merges.txt"
  --split 949,50,1
  --distributed-backend nccl
  --lr 0.00015
  --no-load-optim
  --lr-decay-style cosine
  --weight-decay 1e-2
  --clip-grad 1.0
  --warmup .01
  --fp16
  --log-interval 5
  --eval-interval 10
  --eval-iters 2
)
deepspeed_options=(
  --deepspeed
  --deepspeed_config "$config_json"
  --zero-stage 2
  --zero-reduce-bucket-size "$stage_rbs"
  --zero-allgather-bucket-size "$stage_rbs"
)
chkp_opt=(
  --checkpoint-activations
  --deepspeed-activation-checkpointing
  --partition-activations
  --synchronize-each-layer
  --contigious-checkpointing
)
# shellcheck disable=SC2086
exec $DEEPSCALE pretrain-gpt2 --world-size "$WORLD" "${gpt_options[@]}" "${deepspeed_options[@]}" "${chkp_opt[@]}" "$@"

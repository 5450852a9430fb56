#!/usr/bin/env bash
# The accelerator benchmark: ViT-B/16 at 224 px, batch 128 per device, bfloat16, for full
# fine-tuning, LoRA and DMLoRA (K=4, r=8 on q/k/v): train and eval images/s, achieved FLOP/s
# as a fraction of the chip's peak, peak device memory, compile time, and the merged-vs-
# unmerged logits check. One process per method, because a device's peak memory is per
# process; the three JSONs are then joined into one JSON and one Markdown table.
#
#   benchmarks/accelerator.sh [OUT_DIR]          # default benchmarks/results/accelerator
#   DRY_RUN=1 benchmarks/accelerator.sh /tmp/acc # tiny model on CPU, seconds: checks the script
#
# Budget: at most 8 minutes on one GPU or TPU host (3 compilations of a ViT-B/16 step + eval,
# 20 timed steps each; a 4th dmlora row with cuDNN attention on a GPU). LoRA is one branch of
# rank K*r = 32 (DMLoRA's parameter count).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/accelerator}
mkdir -p "$OUT"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  SIZE=(--variant tiny/4 --image_size 16 --per_device_batch 4 --steps 2 --warmup 1 --eval_steps 1
        --merged_steps 1 --matmul_size 128 --num_classes 10 --logits_images 4)
else
  SIZE=(--variant B/16 --image_size 224 --per_device_batch 128 --steps 20 --warmup 2 --eval_steps 10
        --merged_steps 4 --matmul_size 4096 --num_classes 100 --logits_images 8)
fi
COMMON=(--dtype bfloat16 --num_branches 4 --rank 8 --targets query,key,value --per_branch_lora 0
        --in_process 1 "${SIZE[@]}")

files=()
for method in full lora dmlora; do
  echo "[accelerator] $method" >&2
  python -m dmlora_jax.bench --methods "$method" "${COMMON[@]}" --json "$OUT/$method.json" >&2
  files+=("$OUT/$method.json")
done
# On a GPU, jax.nn.dot_product_attention with implementation=None (what attention=auto asks for)
# is XLA's in jax 0.10.2; a dmlora_cudnn row measures cuDNN's fused attention beside it (left out
# of the table, not fatal, if cuDNN refuses the shapes).
if [[ "${DRY_RUN:-0}" != "1" ]] && command -v nvidia-smi > /dev/null; then
  echo "[accelerator] dmlora with attention=cudnn" >&2
  if python -m dmlora_jax.bench --methods dmlora --attention cudnn "${COMMON[@]}" --json "$OUT/dmlora_cudnn.json" >&2; then
    files+=("$OUT/dmlora_cudnn.json")
  fi
fi
python -m dmlora_jax.bench --combine "$(IFS=,; echo "${files[*]}")" --json "$OUT/accelerator.json" \
    --markdown "$OUT/accelerator.md"

#!/usr/bin/env bash
# The full VTAB-1k sweep (19 tasks x 4 ablation rows x lr grid, then seeds) and its report.
#
#   bash launch/vtab1k_sweep.sh [extra dmlora_jax.sweep arguments, e.g. --config.batch_size=128]
#
# runs, from the repository root:
#   python3 -m dmlora_jax.sweep --out $SWEEP_DIR --benchmark vtab1k --lrs $LRS --seeds $SEEDS \
#       --rows $ROWS [--tasks $TASKS] --config.data.root=$DATA_ROOT \
#       --config.model.init_checkpoint=$CKPT --config.data.normalization=$NORMALIZATION "$@"
#   python3 -m dmlora_jax.report $SWEEP_DIR
# Re-running it resumes: finished runs are skipped, unfinished ones resume from checkpoints.
# 19 tasks x 4 rows x (3 lrs + 3 seeds) = 456 ViT-B/16 runs of 110 epochs on 800-1,000 images.
#
# Parameters (environment variables):
#   SWEEP_DIR      default runs/vtab1k_sweep
#   DATA_ROOT      NOAH-layout root holding the 19 task folders, default data/vtab-1k
#   CKPT           base checkpoint, default checkpoints/ViT-B_16.npz (IN-21k, inputs in [-1, 1])
#   NORMALIZATION  inception (default, for the Google .npz) | imagenet
#   LRS            stage-1 lr grid, default 3e-4,1e-3,3e-3
#   SEEDS          final runs per task, default 3
#   ROWS           default dmlora,lora,multibranch,dropout
#   TASKS          comma-separated subset (default: all 19)
#   PYTHON         default python3
# Multi-host: pass the jax.distributed flags (--coordinator_address=... --num_processes=...
# --process_id=...) as arguments; only process 0 writes the report.
set -euo pipefail

SWEEP_DIR="${SWEEP_DIR:-runs/vtab1k_sweep}"
DATA_ROOT="${DATA_ROOT:-data/vtab-1k}"
CKPT="${CKPT:-checkpoints/ViT-B_16.npz}"
NORMALIZATION="${NORMALIZATION:-inception}"
LRS="${LRS:-3e-4,1e-3,3e-3}"
SEEDS="${SEEDS:-3}"
ROWS="${ROWS:-dmlora,lora,multibranch,dropout}"
TASKS="${TASKS:-}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tasks=()
if [[ -n "$TASKS" ]]; then tasks=(--tasks "$TASKS"); fi
status=0
"$PYTHON" -m dmlora_jax.sweep --out "$SWEEP_DIR" --benchmark vtab1k --lrs "$LRS" --seeds "$SEEDS" \
  --rows "$ROWS" "${tasks[@]}" --config.data.root="$DATA_ROOT" --config.model.init_checkpoint="$CKPT" \
  --config.data.normalization="$NORMALIZATION" "$@" || status=$?

# One report, by process 0 (other hosts of a pod pass --process_id=N with N > 0).
for arg in "$@"; do
  if [[ "$arg" == --process_id=* && "$arg" != --process_id=0 ]]; then exit "$status"; fi
done
"$PYTHON" -m dmlora_jax.report "$SWEEP_DIR" || status=$?
exit "$status"

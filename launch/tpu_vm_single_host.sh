#!/usr/bin/env bash
# DMLoRA on a single-host Cloud TPU VM (e.g. v4-8, v5litepod-8): one process, all local chips.
#
# Usage (from the repository root on your workstation, gcloud authenticated):
#   launch/tpu_vm_single_host.sh create    # gcloud compute tpus tpu-vm create
#   launch/tpu_vm_single_host.sh setup     # copy the code, pip install, fetch ViT-B/16, copy the data
#   launch/tpu_vm_single_host.sh train     # one task: python -m dmlora_jax.main (TASK=cifar)
#   launch/tpu_vm_single_host.sh sweep     # the VTAB-1k sweep + report (launch/vtab1k_sweep.sh)
#   launch/tpu_vm_single_host.sh fetch     # copy $RUN_DIR back to ./runs/
#   launch/tpu_vm_single_host.sh delete
#
# The gcloud commands it runs (with the defaults below):
#   gcloud compute tpus tpu-vm create dmlora --project=$PROJECT --zone=us-central2-b \
#       --accelerator-type=v4-8 --version=tpu-ubuntu2204-base
#   gcloud compute tpus tpu-vm scp /tmp/dmlora_jax.tgz dmlora:~/ --zone=us-central2-b --worker=all
#   gcloud compute tpus tpu-vm ssh dmlora --zone=us-central2-b --worker=all --command='...'
#   gcloud compute tpus tpu-vm delete dmlora --zone=us-central2-b --quiet
#
# Parameters (environment variables):
#   PROJECT           GCP project (default: gcloud's configured project)
#   ZONE              default us-central2-b
#   ACCELERATOR_TYPE  default v4-8
#   TPU_VERSION       TPU VM runtime image, default tpu-ubuntu2204-base
#   TPU_NAME          default dmlora
#   SPOT              1 = spot (preemptible) VM; runs and sweeps resume by themselves
#   BUCKET            gs:// bucket holding vtab-1k/ in the NOAH layout (required for setup)
#   DATA_SUBDIR       folder under $BUCKET, default vtab-1k
#   CKPT_URL          base checkpoint, default gs://vit_models/imagenet21k/ViT-B_16.npz
#   TASK              task of `train`, default cifar
#   RUN_DIR           on the VM, default ~/runs
#   EXTRA_ARGS        appended to the training / sweep command (e.g. "--config.batch_size=128")
set -euo pipefail

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
TPU_NAME="${TPU_NAME:-dmlora}"
RUN_DIR="${RUN_DIR:-runs}"  # relative to the VM's home directory
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

case "${1:-}" in
  create)
    create_vm
    ;;
  setup)
    need_bucket
    ship_and_install "python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  train)
    on_all "cd ~/dmlora_jax && python3 -m dmlora_jax.main --config=configs/vtab1k.py:task=$TASK \
      --workdir=\$HOME/$RUN_DIR/$TASK $COMMON $EXTRA_ARGS"
    ;;
  sweep)
    on_all "cd ~/dmlora_jax && SWEEP_DIR=\$HOME/$RUN_DIR/vtab1k_sweep DATA_ROOT=\$HOME/data/$DATA_SUBDIR \
      CKPT=\$HOME/dmlora_jax/checkpoints/ViT-B_16.npz bash launch/vtab1k_sweep.sh $EXTRA_ARGS"
    ;;
  fetch)
    mkdir -p "$REPO/runs"
    "${GC[@]}" scp --recurse "$TPU_NAME":"$RUN_DIR" "$REPO/runs/" "${WHERE[@]}" --worker=0
    ;;
  delete)
    "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    sed -n '2,12p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac

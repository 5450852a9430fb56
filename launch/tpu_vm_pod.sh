#!/usr/bin/env bash
# DMLoRA on a multi-host Cloud TPU VM pod slice (e.g. v4-32 = 4 hosts): one process per host,
# joined by jax.distributed; every command runs on all workers at once (--worker=all).
#
# Usage (from the repository root on your workstation, gcloud authenticated):
#   launch/tpu_vm_pod.sh create   # gcloud compute tpus tpu-vm create
#   launch/tpu_vm_pod.sh setup    # code + pip on every host, data copied to every host,
#                                 # the bucket mounted with gcsfuse at ~/bucket (shared workdirs)
#   launch/tpu_vm_pod.sh train    # one task, all hosts: python -m dmlora_jax.main
#   launch/tpu_vm_pod.sh sweep    # the VTAB-1k sweep + report, all hosts in-process
#   launch/tpu_vm_pod.sh delete
#
# The gcloud commands it runs (with the defaults below):
#   gcloud compute tpus tpu-vm create dmlora-pod --project=$PROJECT --zone=us-central2-b \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
#   gcloud compute tpus tpu-vm scp /tmp/dmlora_jax.tgz dmlora-pod:~/ --zone=us-central2-b --worker=all
#   gcloud compute tpus tpu-vm ssh dmlora-pod --zone=us-central2-b --worker=all --command='...'
#   gcloud compute tpus tpu-vm describe dmlora-pod --zone=us-central2-b --format=json  # worker IPs
#   gcloud compute tpus tpu-vm delete dmlora-pod --zone=us-central2-b --quiet
#
# Why a shared workdir: orbax writes a multi-host checkpoint collectively into one directory,
# and a resumed (or preempted) run must find it from every host, so workdirs live under the
# gcsfuse mount ~/bucket/$RUN_SUBDIR. Data is read-only and copied to each host's disk.
# jax.distributed gets explicit flags: worker 0's internal IP as coordinator, the worker count,
# and each host's agent-worker-number from the metadata server as its process id.
#
# Parameters (environment variables):
#   PROJECT, ZONE (us-central2-b), ACCELERATOR_TYPE (v4-32), TPU_VERSION (tpu-ubuntu2204-base),
#   TPU_NAME (dmlora-pod), SPOT (1 = spot VMs), BUCKET (gs://..., required for setup/train/sweep),
#   DATA_SUBDIR (vtab-1k), CKPT_URL (gs://vit_models/imagenet21k/ViT-B_16.npz), TASK (cifar),
#   RUN_SUBDIR (runs, under the bucket), PORT (8476, coordinator), EXTRA_ARGS (appended).
set -euo pipefail

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
TPU_NAME="${TPU_NAME:-dmlora-pod}"
RUN_SUBDIR="${RUN_SUBDIR:-runs}"
PORT="${PORT:-8476}"
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

dist_flags() {  # --coordinator_address/--num_processes/--process_id, process id resolved per host
  local ip_n
  ip_n="$("${GC[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format=json | python3 -c \
    'import json, sys; e = json.load(sys.stdin)["networkEndpoints"]; print(e[0]["ipAddress"], len(e))')"
  local ip="${ip_n% *}" n="${ip_n#* }"
  local meta="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
  echo "--coordinator_address=$ip:$PORT --num_processes=$n --process_id=\$(curl -s -H Metadata-Flavor:Google $meta)"
}

case "${1:-}" in
  create)
    create_vm
    ;;
  setup)
    need_bucket
    ship_and_install "mkdir -p ~/bucket \
      && (command -v gcsfuse >/dev/null || { \
           echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
             | sudo tee /etc/apt/sources.list.d/gcsfuse.list \
           && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
           && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }) \
      && (mountpoint -q ~/bucket || gcsfuse --implicit-dirs ${BUCKET#gs://} ~/bucket)"
    ;;
  train)
    need_bucket
    flags="$(dist_flags)"
    on_all "cd ~/dmlora_jax && python3 -m dmlora_jax.main --config=configs/vtab1k.py:task=$TASK \
      --workdir=\$HOME/bucket/$RUN_SUBDIR/$TASK $COMMON $flags $EXTRA_ARGS"
    ;;
  sweep)
    need_bucket
    flags="$(dist_flags)"
    on_all "cd ~/dmlora_jax && SWEEP_DIR=\$HOME/bucket/$RUN_SUBDIR/vtab1k_sweep DATA_ROOT=\$HOME/data/$DATA_SUBDIR \
      CKPT=\$HOME/dmlora_jax/checkpoints/ViT-B_16.npz bash launch/vtab1k_sweep.sh $flags $EXTRA_ARGS"
    ;;
  delete)
    "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    sed -n '2,10p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac

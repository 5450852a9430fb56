# Shared by tpu_vm_single_host.sh and tpu_vm_pod.sh, which source it after setting their own
# defaults of ACCELERATOR_TYPE, TPU_NAME and the usage line range. Not meant to be run.

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:-us-central2-b}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
BUCKET="${BUCKET:-}"
DATA_SUBDIR="${DATA_SUBDIR:-vtab-1k}"
CKPT_URL="${CKPT_URL:-gs://vit_models/imagenet21k/ViT-B_16.npz}"
TASK="${TASK:-cifar}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

# The ViT-B/16 IN-21k .npz expects inputs in [-1, 1] (PROTOCOL.md): inception normalisation.
COMMON="--config.data.root=\$HOME/data/$DATA_SUBDIR --config.model.init_checkpoint=\$HOME/dmlora_jax/checkpoints/ViT-B_16.npz --config.data.normalization=inception"

on_all() {  # run a command on every worker of the TPU VM (one on a single host)
  "${GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

need_bucket() {
  if [[ -z "$BUCKET" ]]; then echo "set BUCKET=gs://... (holding $DATA_SUBDIR/)" >&2; exit 2; fi
}

create_vm() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  "${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$TPU_VERSION" "${spot[@]}"
}

# Copies the tracked files of the working tree (uncommitted edits included; not .git or runs)
# to every worker, installs requirements.txt and jax[tpu] at the version it pins, fetches the
# base checkpoint and copies the data; then runs the shell command $1 there (may be empty).
ship_and_install() {
  local tgz
  tgz="$(mktemp -d)/dmlora_jax.tgz"
  git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$tgz"
  "${GC[@]}" scp "$tgz" "$TPU_NAME":~/ "${WHERE[@]}" --worker=all
  on_all "set -e; mkdir -p ~/dmlora_jax && tar -xzf ~/dmlora_jax.tgz -C ~/dmlora_jax && cd ~/dmlora_jax \
    && python3 -m pip install -q -r requirements.txt \
    && python3 -m pip install -q \"jax[tpu]==\$(python3 -c 'import jax; print(jax.__version__)')\" \
         -f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
    && mkdir -p checkpoints ~/data && gsutil -q cp -n $CKPT_URL checkpoints/ \
    && gsutil -q -m rsync -r $BUCKET/$DATA_SUBDIR ~/data/$DATA_SUBDIR \
    ${1:+&& $1}"
}

r"""DMLoRA on one VTAB-1k task in the NOAH folder layout (ViT-B/16, ImageNet-21k).

Command (one task, final protocol: train800val200 -> test):

  python -m dmlora_jax.main --config=configs/vtab1k.py:task=cifar --workdir=runs/cifar \
      --config.data.root=data/vtab-1k --config.model.init_checkpoint=checkpoints/ViT-B_16.npz

- `task=` is a folder under config.data.root: one of the 19 VTAB-1k tasks (class count
  known) or any other folder in the same layout (classes read from the label files).
- Hyper-parameter search: add `--config.data.protocol=tune` (train800 -> val200; test is
  never looked at).
- The base checkpoint is the public ImageNet-21k ViT-B/16:
  gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz checkpoints/
  (those checkpoints expect inputs in [-1, 1]: add --config.data.normalization=inception;
  the NOAH-style PyTorch repos use ImageNet mean/std with timm's weights.)
- `:task=cifar,runlocal` shrinks the run to a tiny-model smoke test.

Recipe: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs (10 warm-up, cosine) for stage 1,
then 10 epochs of 2S-LS (Adam on log alpha_l, config.stage2.lr; the paper's "one tenth of
stage 1", 1e-4 here, barely moves the scales: see the README's known limits); K=4 branches
of rank 8 on q/k/v, alpha 8, branch drop probability linear 0 -> 0.5, resolution 224.
Expected time: 1,000 images x 110 epochs of ViT-B/16 training is about 110k image-steps:
roughly 10-15 min on one A100/H100 class GPU or a TPU v3-8 (not measured here); it is
impractical on a 2-core CPU (see benchmarks/README.md for measured CPU throughput).
Reproduces: the DMLoRA row of a VTAB-1k table for that task (published reference numbers
for other methods are in ../shared/PROTOCOL.md).
"""

from dmlora_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, task="cifar", variant="B/16", method="dmlora", runlocal=False)
  c = config_base.get_base_config()
  c.method = a.method
  c.model.variant = a.variant
  c.model.init_checkpoint = "checkpoints/ViT-B_16.npz"
  c.data.source = "vtab1k_folder"
  c.data.root = "data/vtab-1k"
  c.data.task = a.task
  if a.runlocal:
    config_base.apply_runlocal(c)
  return c

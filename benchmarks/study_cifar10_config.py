r"""The proxy accuracy study: adapt a CIFAR-10-source-5 backbone to 5 unseen CIFAR-10 classes.

One run (the study script runs the whole grid, see benchmarks/study_cifar10.py):

  python benchmarks/study_cifar10.py pretrain --out runs/study_cifar10      # the backbone, once
  python -m dmlora_jax.main --config=benchmarks/study_cifar10_config.py:method=dmlora --workdir=/tmp/s \
      --config.data.protocol=tune

- Backbone: "mini/4" (width 96, depth 4, 3 heads, patch 4, 32 px), pre-trained from scratch on
  ../shared/data/cifar10_source5.npz (airplane, automobile, bird, cat, deer) by
  benchmarks/study_cifar10.py (recipe there), exported in the public .npz layout.
- Task: ../shared/data/vtab1k/cifar10_t5 (dog, frog, horse, ship, truck), VTAB-1k layout.
- Recipe: the VTAB-1k one (AdamW, wd 1e-4, cosine, warm-up, ImageNet mean/std, no
  augmentation), shortened to 10 + 3 epochs so the grid fits 2 CPU cores; K=4 branches of
  rank 8 on q/k/v, alpha 8, branch drop linear 0 -> 0.5; `method=` picks the row (a method of
  dmlora_jax/methods.py: linear, lora, multibranch, dropout, dmlora, full).
Expected time: about 25-30 s per run on a 2-core AMD EPYC (shared); the grid of the study
script (6 rows x (2 lrs + 3 seeds)) took 13 min. Results (test top-1 67-70%): benchmarks/README.md.
"""

import os

from dmlora_jax import config_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stage-1 lr grid per row, chosen on val200 (full fine-tuning wants a smaller lr).
LRS = {"full": (1e-4, 3e-4)}
DEFAULT_LRS = (1e-3, 3e-3)


def get_config(arg=None):
  a = config_base.parse_arg(arg, method="dmlora", runlocal=False,
                            checkpoint=os.path.join(REPO, "runs", "study_cifar10", "backbone_mini4.npz"))
  c = config_base.get_base_config()
  c.model.variant = "mini/4"
  c.model.init_checkpoint = a.checkpoint
  c.data.source = "vtab1k_folder"
  c.data.root = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "vtab1k"))
  c.data.task = "cifar10_t5"
  c.data.image_size = 32
  c.data.num_workers = 2
  c.batch_size = 64
  c.checkpoint_every = 100000  # the trainer still saves at the stage boundary and the end
  c.keep_checkpoints = 1
  c.log_every = 50
  c.dmlora.num_branches = 4
  c.dmlora.rank = 8
  c.dmlora.alpha = 8.0
  c.stage1.epochs = 10
  c.stage1.warmup_epochs = 1
  c.stage2.epochs = 3
  c.method = a.method
  if a.runlocal:
    c.stage1.epochs, c.stage2.epochs = 1, min(c.stage2.epochs, 1)
  return c

"""The shared default configuration that every file under `configs/` starts from.

Defaults follow the common VTAB-1k recipe (NOAH / FacT / RepAdapter; see
../shared/PROTOCOL.md): AdamW, lr 1e-3, weight decay 1e-4, batch 64, 100 epochs,
cosine decay with 10 warm-up epochs, 224 px, ImageNet mean/std, seed 42.
"""

import ml_collections

# The projections a DMLoRA branch set can sit beside, by their checkpoint names.
ALL_TARGETS = ("query", "key", "value", "out", "Dense_0", "Dense_1")


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.method = "dmlora"  # dmlora | lora | full | linear
  c.batch_size = 64
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 10

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"
  c.model.init_checkpoint = ""  # .npz in the public ViT layout; "" = random init (warned)
  c.model.gelu_approximate = True  # tanh GELU, as the public checkpoints were trained
  c.model.representation_size = 0  # 0 = no pre_logits layer
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.remat = False  # rematerialise each encoder block in the backward pass
  c.model.drop_path = 0.0  # stochastic depth of the last block (some PyTorch recipes use 0.1)

  c.data = ml_collections.ConfigDict()
  c.data.source = "vtab1k_folder"  # vtab1k_folder | fgvc_json | tfds | demo
  c.data.root = ""
  c.data.task = ""
  c.data.image_size = 224
  c.data.num_classes = 0  # 0 = known for the task, or read from the label files
  c.data.normalization = "imagenet"  # imagenet mean/std | inception ([-1, 1])
  c.data.protocol = "final"  # final: train800val200 -> test; tune: train800 -> val200
  c.data.tfds_data_dir = ""
  c.data.num_workers = 8  # image decoding threads

  c.dmlora = ml_collections.ConfigDict()
  c.dmlora.num_branches = 4
  c.dmlora.rank = 8  # rank of each branch
  c.dmlora.split_rank = False  # True: each branch gets rank // num_branches (single-LoRA budget)
  c.dmlora.alpha = 8.0  # global scale; the update is (alpha / rank) * sum_k B_k A_k
  c.dmlora.targets = ("query", "key", "value")
  c.dmlora.init = "kaiming_uniform"  # kaiming_uniform (PEFT) | gaussian
  c.dmlora.drop_schedule = "linear"  # constant | linear | cosine | step
  c.dmlora.drop_start = 0.0
  c.dmlora.drop_end = 0.5
  c.dmlora.drop_steps = 4  # number of plateaus of the `step` schedule
  c.dmlora.min_active = 1
  c.dmlora.rescale = True  # inverted-dropout 1/(1-p) rescale of kept branches

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.epochs = 100
  c.stage1.lr = 1e-3
  c.stage1.warmup_epochs = 10
  c.stage1.warmup_init_lr = 1e-6
  c.stage1.min_lr = 1e-5
  c.stage1.weight_decay = 1e-4

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.epochs = 10  # 0 disables 2S-LS
  # Adam lr on log alpha_l: a relative change of the scales per step (not a weight lr, so
  # not tied to stage1.lr); choose it on val200 (the sweep's --stage2_lrs).
  c.stage2.lr = 1e-2
  c.stage2.granularity = "module"  # module: one alpha_l per adapted projection | block: one per block
  c.stage2.train_head = False
  c.stage2.head_lr_ratio = 0.1  # with train_head: the head's stage-2 lr = stage1.lr * this
  # A workdir whose checkpoint at the end of stage 1 starts this run (its stage 1 must be
  # this config's: checked). Tunes stage 2 without retraining stage 1.
  c.stage2.init_from = ""
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'task=cifar,variant=B/16,runlocal' -> {task: 'cifar', variant: 'B/16', runlocal: True}.

  Keys must be among `defaults` (a misspelt key is an error that names it); values take the
  type of their default.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, val = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
    d = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(d, bool):
      out[key] = val.lower() in ("1", "true", "yes")
    elif isinstance(d, int):
      out[key] = int(val)
    elif isinstance(d, float):
      out[key] = float(val)
    else:
      out[key] = val
  return ml_collections.ConfigDict(out)


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a smoke run (seconds on a laptop CPU)."""
  c.model.variant = "tiny/4"
  c.model.init_checkpoint = ""
  c.data.image_size = 32
  c.batch_size = 16
  c.stage1.epochs = 1
  c.stage1.warmup_epochs = 0
  c.stage2.epochs = 1 if c.stage2.epochs else 0
  c.checkpoint_every = 20
  c.log_every = 5
  return c

"""The configuration: the defaults every file under `configs/` starts from, the one check of
a config before anything runs (`validate`), the dotted-key override (`override`), and the
flat view and fingerprints that results.json and checkpoints record.

Defaults follow the common VTAB-1k recipe (NOAH / FacT / RepAdapter; see
../shared/PROTOCOL.md): AdamW, lr 1e-3, weight decay 1e-4, batch 64, 100 epochs,
cosine decay with 10 warm-up epochs, 224 px, ImageNet mean/std, seed 42.
"""

import difflib
import hashlib
import json
import os

import ml_collections

# The projections a DMLoRA branch set can sit beside, by their checkpoint names.
ALL_TARGETS = ("query", "key", "value", "out", "Dense_0", "Dense_1")
# config.model.attention (kernels.ATTENTION, kept here so that validating a config needs no
# JAX backend: the sweep validates in a parent process that must not take the accelerator).
ATTENTION = ("auto", "cpu_kernel", "xla", "dot_product_attention", "cudnn", "pallas_tpu_flash")


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.method = "dmlora"  # a name of methods.METHODS: full, linear, lora, multibranch, dropout, dmlora, dmlora_block,
  # and the comparison methods ssf, vpt_deep
  c.batch_size = 64
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 10
  # How the step runs over the devices (steps.Pmap / steps.Jit): pmap over the local devices,
  # or jit with a data-parallel NamedSharding over all devices of all processes.
  c.parallel = "pmap"

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"  # NAME/PATCH (tiny, mini, Ti, S, M, B, L, H) | auto: the model init_checkpoint holds
  c.model.num_heads = 0  # model.variant=auto: 0 = from the checkpoint (timm files do not say it: set it)
  c.model.init_checkpoint = ""  # .npz (public layout) | .safetensors (timm / transformers) | hf-hub:ORG/NAME; "" = random
  c.model.gelu_approximate = True  # tanh GELU, as the public checkpoints were trained
  c.model.representation_size = 0  # 0 = no pre_logits layer
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  # vit.REMAT: what each encoder block keeps for the backward pass: none | full (recompute the
  # block) | dots (keep the projections' matmul outputs). True/False (configs before the
  # policies) mean full/none; any type is accepted here and checked by `validate`.
  c.model.remat = ml_collections.FieldReference("none", field_type=object)
  # The blocks under nn.scan with params stacked over depth: one block compiled, not `depth`
  # (layout.py: checkpoints, merge and exports keep the public per-block layout).
  c.model.scan_layers = False
  c.model.drop_path = 0.0  # stochastic depth of the last block (some PyTorch recipes use 0.1)
  # Other ViT families (docs/config.md has the settings of each); the defaults are the original ViT.
  c.model.layer_scale = False  # LayerScale on each residual branch (DINOv2)
  c.model.num_registers = 0  # register tokens (DINOv2 with registers: 4)
  c.model.no_embed_class = False  # the position embedding covers the patches only (timm's DINOv2-reg)
  c.model.pre_norm = False  # LayerNorm before the first block (CLIP)
  c.model.activation = "gelu"  # gelu (model.gelu_approximate says which) | quick_gelu (OpenAI CLIP)
  c.model.pool = "token"  # token: class token | avg: mean patch token with fc_norm
  c.model.patch_bias = True  # patch-embedding bias (CLIP: False)
  c.model.layer_norm_eps = 1e-6  # OpenAI CLIP: 1e-5
  # kernels.ATTENTION: auto (per backend) | cpu_kernel | xla | dot_product_attention | cudnn |
  # pallas_tpu_flash. Checked against the backend when the model is built (setup.build_model).
  c.model.attention = "auto"

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
  c.dmlora.drop_end = 0.5  # val200 of the real-backbone study: 87.00 vs 86.17 at 0.75
  c.dmlora.drop_steps = 4  # number of plateaus of the `step` schedule
  c.dmlora.min_active = 1
  c.dmlora.rescale = True  # inverted-dropout 1/(1-p) rescale of kept branches

  # DoRA (method=dora): one LoRA branch on the direction, a trained magnitude per output unit.
  # Rank, alpha and targets as the LoRA row's defaults, so the two compare at equal rank.
  c.dora = ml_collections.ConfigDict()
  c.dora.rank = 8
  c.dora.alpha = 8.0  # LoRA scale alpha / rank, as PEFT's lora_alpha
  c.dora.targets = ("query", "key", "value")
  c.dora.init = "kaiming_uniform"  # of A, as PEFT

  # AdaLoRA (method=adalora), PEFT's AdaLoraConfig and its schedule (adalora.py). The budget
  # falls from rank (init_r) to target_rank triplets per module on average; tinit and tfinal
  # are fractions of the stage-1 steps (PEFT counts them in steps).
  c.adalora = ml_collections.ConfigDict()
  c.adalora.rank = 12  # init_r: triplets per module at the start (1.5 x the target, as the paper)
  c.adalora.target_rank = 8  # target_r
  c.adalora.alpha = 8.0  # PEFT's lora_alpha: the update is (alpha / rank) P diag(Lambda) Q
  c.adalora.targets = ("query", "key", "value")
  c.adalora.tinit = 0.1  # warm-up without pruning
  c.adalora.tfinal = 0.2  # final fine-tuning at the fixed rank pattern
  c.adalora.delta_t = 10  # steps between re-allocations
  c.adalora.beta1 = 0.85  # smoothing of the sensitivity
  c.adalora.beta2 = 0.85  # smoothing of its uncertainty
  c.adalora.orth_reg_weight = 0.5

  # SSF (method=ssf): gamma ~ N(1, init_std^2), beta ~ N(0, init_std^2) as the official code's
  # init_ssf_scale_shift (0.02); 0 starts at the identity (exactly the backbone).
  c.ssf = ml_collections.ConfigDict()
  c.ssf.init_std = 0.02

  # VPT-deep (method=vpt_deep): prompt tokens per block. The paper tunes it per task over
  # {1, 5, 10, 50, 100, 200}; 50 is the value of that grid nearest the mean length behind its
  # VTAB-1k parameter count (0.60 M with the head: about 61 tokens per block on ViT-B/16).
  c.vpt = ml_collections.ConfigDict()
  c.vpt.num_prompts = 50

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.epochs = 100
  c.stage1.lr = 1e-3
  c.stage1.warmup_epochs = 10
  c.stage1.warmup_init_lr = 1e-6
  c.stage1.min_lr = 1e-5
  c.stage1.weight_decay = 1e-4
  # The head's stage-1 lr = stage1.lr * this (its whole schedule, warm-up included). 1 trains
  # the head with everything else; full fine-tuning, whose backbone wants an lr ~100x below the
  # adapters', needs more for the zero-initialised head to fit in a short schedule (the real-
  # backbone study's `full` row uses 100: benchmarks/README.md).
  c.stage1.head_lr_mult = 1.0

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.epochs = 10  # 0 disables 2S-LS
  # Adam lr on log alpha_l: a relative change of the scales per step (not a weight lr, so
  # not tied to stage1.lr); choose it on val200 (the sweep's --stage2_lrs).
  c.stage2.lr = 1e-2
  # module: one alpha_l per adapted projection | block: one per block. The real-backbone study
  # (benchmarks/README.md) found no difference on test (-0.07 points [-0.43, +0.28]).
  c.stage2.granularity = "module"
  c.stage2.train_head = False
  c.stage2.head_lr_ratio = 0.1  # with train_head: the head's stage-2 lr = its stage-1 lr * this
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


class ConfigError(ValueError):
  """A config value that cannot run; the message is one line naming the key and what is allowed."""


# ---- overrides ----

def parse_value(old, text: str):
  """A command-line string as the type of the value it replaces."""
  if isinstance(old, bool):
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("1", "true", "yes")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  if isinstance(old, (tuple, list)):
    items = [s.strip() for s in text.strip("()[]").split(",") if s.strip()]
    kind = type(old[0]) if old else str
    return tuple(s.strip("'\"") if kind is str else kind(s) for s in items)
  return text


def override(config: ml_collections.ConfigDict, key: str, value) -> None:
  """config[a.b.c] = value; a string value is parsed as the old value's type. An unknown key
  is a ConfigError that names it (and the closest existing one)."""
  parts = key.split(".")
  node = config
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(p, known, n=1)
      hint = f" Did you mean {'.'.join(parts[:i] + close)}?" if close else ""
      raise ConfigError(f"config.{key}: no such config key.{hint}")
    if i < len(parts) - 1:
      node = node[p]
  last = parts[-1]
  old = node[last]
  if isinstance(value, str) and not isinstance(old, str) and old is not None:
    try:
      value = parse_value(old, value)
    except ValueError as e:
      raise ConfigError(f"config.{key}={value}: {e}") from None
  node[last] = value


# ---- the flat view and fingerprints ----

def flatten(config) -> dict:
  """{'a.b.c': value} with tuples as lists (as results.json holds it)."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, ml_collections.ConfigDict):
        walk(key + ".", v)
      else:
        out[key] = list(v) if isinstance(v, tuple) else v
  walk("", config)
  return out


# Config keys that do not change what stage 1 computes (paths, logging, threads). The base
# weights are compared by their fingerprint, not by model.init_checkpoint's path.
STAGE1_IRRELEVANT = ("data.root", "data.tfds_data_dir", "data.num_workers", "log_every", "checkpoint_every",
                     "keep_checkpoints", "model.init_checkpoint")


# Keys added after checkpoints first recorded fingerprints, with their defaults: left out of
# the hash while at the default, so that a run written before they existed still matches
# (its stage 1 was computed exactly so). Another value changes the numerics (within float
# rounding) and so the fingerprint.
LATER_KEYS = {"model.attention": "auto", "parallel": "pmap", "model.num_heads": 0, "model.layer_scale": False,
              "model.num_registers": 0, "model.no_embed_class": False, "model.pre_norm": False,
              "model.activation": "gelu", "model.pool": "token", "model.patch_bias": True, "model.layer_norm_eps": 1e-6,
              "model.scan_layers": False, "stage1.head_lr_mult": 1.0}

# The config blocks of the comparison methods (a Method's `module` or `config_block` -> prefix).
METHOD_BLOCKS = {"ssf": "ssf.", "vpt": "vpt.", "dora": "dora.", "adalora": "adalora."}


def other_methods_keys(config) -> tuple[str, ...]:
  """Prefixes of the comparison methods' config blocks that config.method does not read
  (config.vpt and config.dora for ssf, all of them for dmlora). Fingerprints and the sweep's
  staleness check leave them out, so that adding a method's block changes nothing for the runs
  (and checkpoints) of the others."""
  from dmlora_jax import methods
  m = methods.get(config.method)
  return tuple(p for name, p in METHOD_BLOCKS.items() if name not in (m.module, m.config_block))


def canonical(flat: dict) -> dict:
  """A flat config with model.remat as recorded before the policies: none/full as False/True
  (their aliases), so that runs made with the boolean keep their fingerprints and results;
  dots as itself. Other keys unchanged."""
  if "model.remat" not in flat:
    return flat
  from dmlora_jax import vit
  try:
    policy = vit.remat_policy(flat["model.remat"])
  except ValueError:
    return flat
  return {**flat, "model.remat": {"none": False, "full": True}.get(policy, policy)}


def stage1_fingerprint(config) -> str:
  """A hash of every config value that stage 1 depends on: everything but stage2.*,
  STAGE1_IRRELEVANT and other methods' blocks, with the method as the method whose stage 1 it
  shares (dmlora's is dropout's). Two runs with equal fingerprints train bit-identical stage 1s."""
  from dmlora_jax import methods
  flat = canonical(flatten(config))
  other = other_methods_keys(config)
  used = {k: v for k, v in flat.items()
          if not k.startswith(("stage2.",) + other) and k not in STAGE1_IRRELEVANT
          and not (k in LATER_KEYS and v == LATER_KEYS[k])}
  used["method"] = methods.get(config.method).stage1_key
  return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the one check ----

def _one_of(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _check(ok: bool, key: str, value, wanted: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {wanted}")


def validate(config) -> None:
  """Checks every value a run reads, before any data or checkpoint is read. Raises a
  ConfigError whose one-line message names the key, the value and what is allowed."""
  from dmlora_jax import methods, schedules, vit
  from dmlora_jax.data import build
  from dmlora_jax.data.normalize import MODES
  c = config
  _one_of("method", c.method, tuple(methods.METHODS))
  method = methods.get(c.method)
  from dmlora_jax import checkpoint_source, setup
  try:
    cfg = setup.vit_config(c, 1)
  except checkpoint_source.SourceError as e:
    raise ConfigError(f"config.model.init_checkpoint: {e}") from None
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.{e}") from None
  _one_of("model.dtype", c.model.dtype, ("float32", "bfloat16"))
  _one_of("model.attention", c.model.attention, ATTENTION)
  try:
    vit.remat_policy(c.model.remat)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  _check(isinstance(c.model.scan_layers, bool), "model.scan_layers", c.model.scan_layers, "must be True or False")
  _check(0.0 <= c.model.drop_path < 1.0, "model.drop_path", c.model.drop_path, "must be in [0, 1)")
  _one_of("model.activation", c.model.activation, vit.ACTIVATIONS)
  _one_of("model.pool", c.model.pool, vit.POOLS)
  _check(c.model.num_registers >= 0, "model.num_registers", c.model.num_registers, "must be >= 0")
  _check(c.model.layer_norm_eps > 0, "model.layer_norm_eps", c.model.layer_norm_eps, "must be > 0")
  if c.model.init_checkpoint and not c.model.init_checkpoint.startswith(checkpoint_source.HUB):
    _check(os.path.isfile(c.model.init_checkpoint), "model.init_checkpoint", c.model.init_checkpoint,
           "no such file (empty = random init)")
  _one_of("data.source", c.data.source, tuple(build.SOURCES))
  _one_of("data.protocol", c.data.protocol, tuple(build.PROTOCOLS))
  _one_of("data.normalization", c.data.normalization, MODES)
  _check(c.data.image_size > 0 and c.data.image_size % cfg.patch_size == 0, "data.image_size", c.data.image_size,
         f"must be a positive multiple of the patch size {cfg.patch_size} of model.variant={c.model.variant}")
  _check(c.data.num_classes >= 0, "data.num_classes", c.data.num_classes, "must be >= 0 (0 = read from the task)")
  _check(c.batch_size > 0, "batch_size", c.batch_size, "must be > 0")
  _one_of("parallel", c.parallel, ("pmap", "jit"))
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _check(c[key] >= 1, key, c[key], "must be >= 1")
  s1 = c.stage1
  _check(s1.epochs >= 1, "stage1.epochs", s1.epochs, "must be >= 1")
  _check(0 <= s1.warmup_epochs <= s1.epochs, "stage1.warmup_epochs", s1.warmup_epochs,
         f"must be in [0, stage1.epochs={s1.epochs}]")
  _check(s1.lr > 0, "stage1.lr", s1.lr, "must be > 0")
  _check(0 < s1.min_lr <= s1.lr, "stage1.min_lr", s1.min_lr, f"must be in (0, stage1.lr={s1.lr}]")
  _check(s1.weight_decay >= 0, "stage1.weight_decay", s1.weight_decay, "must be >= 0")
  _check(s1.head_lr_mult > 0, "stage1.head_lr_mult", s1.head_lr_mult, "must be > 0")
  if method.branches != "none":
    blk = method.config_block
    d = c[blk]
    if method.branches == "K":
      _check(d.num_branches >= 1, "dmlora.num_branches", d.num_branches, "must be >= 1")
    _check(d.rank >= 1, f"{blk}.rank", d.rank, "must be >= 1")
    _check(d.alpha > 0, f"{blk}.alpha", d.alpha, "must be > 0 (the scales are stored as log alpha_l)")
    bad = [t for t in d.targets if t not in ALL_TARGETS]
    _check(bool(d.targets) and not bad, f"{blk}.targets", tuple(d.targets),
           f"unknown target(s) {bad or '(none given)'}; choose from {', '.join(ALL_TARGETS)}")
    if "init" in d:
      _one_of(f"{blk}.init", d.init, ("kaiming_uniform", "gaussian"))
    if method.adalora:
      _check(1 <= d.target_rank <= d.rank, "adalora.target_rank", d.target_rank, f"must be in [1, adalora.rank={d.rank}]")
      _check(0 <= d.tinit and 0 <= d.tfinal and d.tinit + d.tfinal < 1, "adalora.tinit", d.tinit,
             f"tinit and tfinal (={d.tfinal}) must be >= 0 with tinit + tfinal < 1 (fractions of stage 1)")
      _check(d.delta_t >= 1, "adalora.delta_t", d.delta_t, "must be >= 1")
    k = 1 if method.branches == "one" else d.num_branches
    if k > 1 and d.split_rank:
      _check(d.rank % d.num_branches == 0 and d.rank >= d.num_branches, "dmlora.split_rank", True,
             f"rank {d.rank} is not divisible by num_branches {d.num_branches}")
    if method.drop:
      _one_of("dmlora.drop_schedule", d.drop_schedule, schedules.SCHEDULES)
      for key in ("drop_start", "drop_end"):
        _check(0.0 <= d[key] < 1.0, f"dmlora.{key}", d[key], "must be in [0, 1)")
      if d.drop_schedule == "step":
        _check(d.drop_steps >= 2, "dmlora.drop_steps", d.drop_steps, "must be >= 2 for the step schedule")
      _check(0 <= d.min_active <= k, "dmlora.min_active", d.min_active, f"must be in [0, num_branches={k}]")
  if method.module == "ssf":
    _check(c.ssf.init_std >= 0, "ssf.init_std", c.ssf.init_std, "must be >= 0 (0 = start at the identity)")
    _check(cfg.patch_bias, "model.patch_bias", cfg.patch_bias,
           "method=ssf needs the patch embedding's bias (its shift merges into it)")
  if method.module == "vpt":
    _check(c.vpt.num_prompts >= 1, "vpt.num_prompts", c.vpt.num_prompts, "must be >= 1")
  if method.two_stage and c.stage2.epochs:
    s2 = c.stage2
    _check(s2.epochs >= 0, "stage2.epochs", s2.epochs, "must be >= 0 (0 skips 2S-LS)")
    _check(s2.lr > 0, "stage2.lr", s2.lr, "must be > 0 (or stage2.epochs=0 to skip 2S-LS)")
    _one_of("stage2.granularity", s2.granularity, ("module", "block"))
    _check(s2.head_lr_ratio > 0, "stage2.head_lr_ratio", s2.head_lr_ratio, "must be > 0")


def resolve(config) -> ml_collections.ConfigDict:
  """A validated copy of the config with the settings its method fixes applied (e.g.
  dmlora_block's stage2.granularity=block)."""
  validate(config)
  return with_method_settings(config)


def with_method_settings(config) -> ml_collections.ConfigDict:
  """A copy of the config with the settings its method fixes applied (no validation)."""
  from dmlora_jax import methods
  c = config.copy_and_resolve_references()
  for key, value in methods.get(c.method).settings:
    override(c, key, value)
  return c

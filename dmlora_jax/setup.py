"""What a run is made of, built the same way by the trainer, the sweep and the bench: the
resolved config and its method, the model, the initial params split into the leaves the
method trains and the frozen rest, the step plan, and each stage's optimizer and step
configuration.

  s = setup.build(config, num_classes)          # config: config_base.resolve(...) first
  plan = s.plan(num_train_examples)
  tx, lr = s.optimizer(1, plan)
  step_fn = steps.make_train_step(s.model, tx, s.step_config(1, plan))
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmlora_jax import checkpoint_source, config_base, data, dmlora, dora, kernels, layout, methods, npz, optimizers, partition, pytrees, steps, vit
from dmlora_jax.progress import say


@dataclasses.dataclass(frozen=True)
class Plan:
  steps_per_epoch: int
  stage1_steps: int
  stage2_steps: int

  @property
  def total(self) -> int:
    return self.stage1_steps + self.stage2_steps

  def stage_steps(self, stage: int) -> int:
    return self.stage1_steps if stage == 1 else self.stage2_steps


def build_model(config, num_classes: int, adapter: dmlora.AdapterSpec | None = None,
                method: methods.Method | None = None) -> vit.ViT:
  """The ViT of config.model; a plain one without `adapter` and `method` (a method's own module,
  SSF or VPT, is switched on by passing the method). An attention implementation that cannot
  run on this backend is a ConfigError here, before anything is compiled."""
  kernels.attention_fn(config.model.attention)
  cfg = vit_config(config, num_classes)
  if method is not None and method.model_fields(config):
    cfg = dataclasses.replace(cfg, **method.model_fields(config))
  return vit.ViT(cfg, adapter)


def vit_config(config, num_classes: int) -> vit.ViTConfig:
  """config.model as a ViTConfig: model.variant (e.g. B/16) and the family fields, or with
  model.variant=auto the model that model.init_checkpoint describes (checkpoint_source.describe),
  the config filling in only what the file cannot say."""
  m = config.model
  common = dict(representation_size=m.representation_size, gelu_approximate=m.gelu_approximate, dtype=m.dtype,
                remat=m.remat, scan_layers=m.scan_layers, drop_path=m.drop_path, attention=m.attention, **{f: m[f] for f in FAMILY_FIELDS})
  if m.variant != "auto":
    return vit.parse_variant(m.variant, num_classes, **common)
  if not m.init_checkpoint:
    raise config_base.ConfigError("config.model.variant='auto' reads the model from model.init_checkpoint, which is empty")
  path = checkpoint_source.resolve(m.init_checkpoint)
  info = checkpoint_source.describe(path)
  heads = info.pop("num_heads", 0)
  if m.num_heads and heads and m.num_heads != heads:
    raise config_base.ConfigError(f"config.model.num_heads={m.num_heads}, but {path} has {heads} heads")
  heads = heads or m.num_heads
  if not heads:
    raise config_base.ConfigError(f"config.model.num_heads: {path} does not say its head count (timm's fused qkv, no "
                                  "config.json beside it); set it (ViT-S: 6, B: 12, L: 16, H: 16)")
  shape = {k: info.pop(k) for k in ("width", "depth", "mlp_dim", "patch_size")}
  if shape["width"] % heads:
    raise config_base.ConfigError(f"config.model.num_heads={heads} does not divide the width {shape['width']} of {path}")
  return vit.ViTConfig(num_heads=heads, num_classes=num_classes, **shape, **{**common, **info})


_PLAIN = vit.parse_variant("tiny/4", 1)  # the family fields' defaults
# config.model fields that are ViTConfig fields of the same name (other ViT families).
FAMILY_FIELDS = ("layer_scale", "num_registers", "no_embed_class", "pre_norm", "activation", "pool", "patch_bias",
                 "layer_norm_eps")


def init_params(model: vit.ViT, config, image_size: int) -> tuple[dict, str]:
  """Random init from config.seed, then the base checkpoint if one is configured, then DoRA's
  magnitudes (if any) from the loaded kernels. Returns (params as host arrays in the public
  layout, also with model.scan_layers; fingerprint of the base weights)."""
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  params = jax.jit(model.init)(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
  # The public per-block layout from here on, whatever the model applies (layout.py): the
  # checkpoint loaders, DoRA's magnitudes, the partition and checkpoints read block names.
  # (Random init of a scanned model draws other numbers than the unrolled one's.)
  params = jax.tree.map(np.asarray, layout.unstack(params))
  path = config.model.init_checkpoint
  if path:
    params, fp = npz.load_pretrained(params, path, posemb_prefix=model.cfg.posemb_prefix)
  else:
    say("WARNING: model.init_checkpoint is empty; fine-tuning a randomly initialised backbone")
    base = {k: v for k, v in pytrees.flatten(params).items() if k.rsplit("/", 1)[-1] not in vit.ADDED_LEAVES}
    fp = "random:" + npz.fingerprint(base)
  return jax.tree.map(np.asarray, pytrees.unflatten(dora.init_magnitudes(pytrees.flatten(params)))), fp


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  method: methods.Method
  adapter: dmlora.AdapterSpec | None
  model: vit.ViT
  params: dict
  trainable: dict  # the leaves the method ever trains (its train state and checkpoints)
  frozen: dict
  base_fingerprint: str
  num_classes: int

  def plan(self, num_train: int) -> Plan:
    c = self.config
    spe = data.steps_per_epoch(num_train, c.batch_size)
    if spe == 0:
      raise config_base.ConfigError(f"config.batch_size={c.batch_size} exceeds the {num_train} training examples")
    return Plan(spe, c.stage1.epochs * spe, self.method.stage2_epochs(c) * spe)

  def optimizer(self, stage: int, plan: Plan):
    """(optax transformation, learning-rate schedule) of a stage."""
    return optimizers.make_optimizer(self.method, stage, plan.stage_steps(stage), self.config)

  def step_config(self, stage: int, plan: Plan) -> steps.StepConfig:
    c, d, ad = self.config, self.config.dmlora, self.adapter
    drop = self.method.drop and ad is not None
    return steps.StepConfig(
        trained=self.method.trained(stage, c.stage2.train_head), normalization=c.data.normalization,
        stage1_steps=plan.stage1_steps, drop=drop and stage == 1, drop_schedule=d.drop_schedule,
        drop_start=d.drop_start, drop_end=d.drop_end, drop_steps=d.drop_steps, min_active=d.min_active,
        rescale=d.rescale, mask_shape=(self.model.cfg.depth, len(ad.targets), ad.num_branches) if ad else None,
        targets=tuple(ad.targets) if ad else ())

  def device_frozen(self) -> dict:
    """The frozen leaves as the train state holds them: stacked over depth when the model
    scans its blocks (so the largest part of the params is stacked in memory once, not
    restacked each step), else public. `frozen` itself stays public for the merge and exports."""
    return layout.for_model(self.model, self.frozen)

  def host_state(self, stage: int, plan: Plan, trainable=None, step: int = 0) -> steps.TrainState:
    """The train state of a stage on the host, with a fresh optimizer state."""
    trainable = self.trainable if trainable is None else trainable
    tx, _ = self.optimizer(stage, plan)
    return steps.TrainState(step=np.int32(step), trainable=trainable, frozen=self.device_frozen(),
                            opt_state=jax.tree.map(np.asarray, tx.init(trainable)))


def build(config: ml_collections.ConfigDict, num_classes: int) -> Setup:
  """The model and initial params of a (resolved) config for a task of num_classes."""
  method = methods.get(config.method)
  adapter = method.adapter(config)
  model = build_model(config, num_classes, adapter, method)
  if config.model.variant == "auto":
    c = model.cfg
    family = ", ".join(f"{f}={getattr(c, f)}" for f in FAMILY_FIELDS if getattr(c, f) != getattr(_PLAIN, f))
    say(f"model.variant=auto: {config.model.init_checkpoint} holds width {c.width}, depth {c.depth}, {c.num_heads} "
        f"heads, MLP {c.mlp_dim}, patch {c.patch_size}" + (f"; {family}" if family else ""))
  params, fingerprint = init_params(model, config, config.data.image_size)
  trainable, frozen = partition.split(params, method.owned)
  return Setup(config, method, adapter, model, params, trainable, frozen, fingerprint, num_classes)

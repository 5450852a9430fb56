"""Which leaves train when: labels by regex over parameter paths, and the optimizers of
the two stages of 2S-LS as one `optax.multi_transform` each.

Every leaf must match exactly one rule (as in big_vision's optax.py): an unmatched leaf,
or one matched twice, is an error that names it.
"""

import functools
import re
from typing import Any, Mapping

import jax
import optax

from dmlora_jax import dmlora, optim
from dmlora_jax.merge import flatten, unflatten

FROZEN, BRANCHES, HEAD, SCALE = "frozen", "branches", "head", "scale"

# (regex over 'a/b/c' paths, label). The backbone rule lists the checkpoint leaf names, so
# a new kind of leaf cannot slip into a group silently.
RULES = (
    (r"^(cls|embedding/(kernel|bias)|pre_logits/(kernel|bias)"
     r"|Transformer/posembed_input/pos_embedding"
     r"|Transformer/(encoderblock_\d+/)?(\w+/)*\w+/(kernel|bias|scale))$", FROZEN),
    (r"^.*/lora_[ab]$", BRANCHES),
    (r"^.*/lora_log_scale$", SCALE),
    (r"^head/(kernel|bias)$", HEAD),
)


@functools.lru_cache(maxsize=None)
def label_of(path: str) -> str:
  hits = [label for rx, label in RULES if re.match(rx, path)]
  if len(hits) != 1:
    raise ValueError(f"parameter {path} matches {len(hits)} partition rules ({hits}); "
                     "every leaf must match exactly one")
  return hits[0]


def labels(params: Mapping[str, Any]) -> dict:
  """A tree like params (nested) whose leaves are the labels."""
  return unflatten({k: label_of(k) for k in flatten(params)})


def trained_labels(method: str, stage: int, stage2_train_head: bool = False) -> frozenset[str]:
  """The labels that receive gradients in a stage of a method."""
  if method in ("dmlora", "lora"):
    if stage == 1:
      return frozenset({BRANCHES, HEAD})
    return frozenset({SCALE, HEAD} if stage2_train_head else {SCALE})
  if method == "full":
    return frozenset({FROZEN, HEAD})  # the backbone ('frozen' rule) trains in full FT
  if method == "linear":
    return frozenset({HEAD})
  raise ValueError(f"config.method must be dmlora, lora, full or linear, got {method!r}")


def owned_labels(method: str) -> frozenset[str]:
  """Labels of the leaves a method ever trains: those kept in the train state and checkpoint."""
  out = trained_labels(method, 1)
  if method in ("dmlora", "lora"):
    out |= {SCALE}
  return frozenset(out)


def split(params: Mapping[str, Any], keep: frozenset[str]) -> tuple[dict, dict]:
  """(leaves whose label is in keep, the rest), both nested."""
  flat = flatten(params)
  a = {k: v for k, v in flat.items() if label_of(k) in keep}
  b = {k: v for k, v in flat.items() if label_of(k) not in keep}
  return unflatten(a), unflatten(b)


def join(*trees: Mapping[str, Any]) -> dict:
  out = {}
  for t in trees:
    out.update(flatten(t))
  return unflatten(out)


def _decay_mask(tree):
  # Weight decay on matrices only (kernels, lora_a/lora_b), not on biases or scalars (timm).
  # tree.map, not flatten: inside multi_transform the other labels' leaves are MaskedNodes.
  return jax.tree.map(lambda v: getattr(v, "ndim", 0) >= 2, tree)


def _branch_units(tree):
  # One AdamW step count per branch: lora_a (K, d_in, r) and lora_b (K, r, d_out) along K.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 1 if optim.path_str(path).rsplit("/", 1)[-1] in (dmlora.LORA_A, dmlora.LORA_B) else 0, tree)


def make_optimizer(method: str, stage: int, total_steps: int, c) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of one stage over the owned (trainable-at-some-point) leaves.

  Stage 1: AdamW (`optim.masked_adamw`: a dropped branch keeps its parameters, moments and
  step count; its update takes the step's `keep` tree), linear warm-up from
  stage1.warmup_init_lr to stage1.lr, cosine to stage1.min_lr. Stage 2: Adam on the
  log-scales at stage2.lr with a cosine decay to stage2.lr * stage1.min_lr / stage1.lr,
  tied per encoder block when stage2.granularity is 'block' (and on the head at
  stage1.lr * stage2.head_lr_ratio when stage2.train_head). Leaves not trained in the stage
  get set_to_zero, which has no state. `total_steps` is the number of steps of this stage;
  `c` is the full config. Returns (optimizer, learning-rate schedule of the stage).
  """
  s1 = c.stage1
  on = trained_labels(method, stage, c.stage2.train_head)
  if stage == 1:
    warmup = int(round(total_steps * s1.warmup_epochs / max(s1.epochs, 1)))
    lr = optax.warmup_cosine_decay_schedule(s1.warmup_init_lr, s1.lr, warmup, max(total_steps, warmup + 1),
                                            end_value=s1.min_lr)
    tx = optim.masked_adamw(lr, weight_decay=s1.weight_decay, decay_mask=_decay_mask, unit_ndim=_branch_units)
    txs = {lab: tx for lab in on}
  else:
    lr = optax.cosine_decay_schedule(c.stage2.lr, max(total_steps, 1), alpha=s1.min_lr / s1.lr)
    scale_tx = optim.masked_adamw(lr)
    if c.stage2.granularity == "block":
      scale_tx = optax.chain(optim.share_per_block(optim.encoder_block), scale_tx)
    head_lr = optax.cosine_decay_schedule(s1.lr * c.stage2.head_lr_ratio, max(total_steps, 1),
                                          alpha=s1.min_lr / s1.lr)
    txs = {SCALE: scale_tx, HEAD: optim.masked_adamw(head_lr)}
    txs = {lab: txs[lab] for lab in on}
  transforms = {lab: txs.get(lab, optax.set_to_zero()) for lab in (FROZEN, BRANCHES, HEAD, SCALE)}
  return optax.multi_transform(transforms, labels, mask_compatible_extra_args=True), lr

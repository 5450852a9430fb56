"""The optimizers and learning-rate schedules of the two stages (`make_optimizer`), and the
optax transformations they are made of: AdamW that skips dropped branches, and the per-block
tie of the 2S-LS scales.

`masked_adamw` is AdamW (decoupled weight decay, as torch.optim.AdamW and optax.adamw) with
one step count per *unit* of a leaf instead of one per optimizer. A unit is a slice along
the leaf's leading axes: for the branch leaves `lora_a` (K, d_in, r) and `lora_b` (K, r, d_out)
the unit is one branch. The update takes `keep`, a tree like the params whose leaves are
boolean arrays of the units' shape (or None / True = every unit kept). A unit that is not
kept in a step is left exactly as it was: no moment update, no step count, no weight decay,
no parameter change. That is what torch's AdamW does for a parameter whose `.grad` is None
(PyTorch DMLoRA/PEFT code keeps each branch as its own parameter), and what DMLoRA means by
a dropped branch taking no part in the step. A kept unit gets the AdamW update of its own
count c:

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   c = c + 1
    p = p - lr(t) * ( m / (1 - b1^c) / (sqrt(v / (1 - b2^c)) + eps) + wd * p )

where the learning-rate schedule lr(t) runs on the optimizer's global step t (as a torch LR
scheduler), not on the unit's count.
"""

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dmlora_jax import adalora, dmlora, methods, partition
from dmlora_jax.partition import BRANCHES, FROZEN, HEAD, SCALE

PyTree = Any


class MaskedAdamWState(NamedTuple):
  count: jax.Array  # global step of this optimizer: drives the learning-rate schedule
  counts: PyTree  # per leaf, int32 of the units' shape: how often each unit was updated
  mu: PyTree
  nu: PyTree


def _expand(k: jax.Array, ndim: int) -> jax.Array:
  """Units' flags (leading axes) broadcastable against a leaf of `ndim` dimensions."""
  k = jnp.asarray(k)
  return k.reshape(k.shape + (1,) * (ndim - k.ndim))


def masked_adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_mask: Callable[[PyTree], PyTree] | None = None,
                 unit_ndim: Callable[[PyTree], PyTree] | None = None) -> optax.GradientTransformationExtraArgs:
  """AdamW whose dropped units keep their parameters, moments and step counts bit-identical.

  Args:
    learning_rate: a float or a schedule of the global step.
    b1, b2, eps: Adam's constants (torch and optax defaults).
    weight_decay: decoupled weight decay, applied (like the Adam step) only to kept units.
    decay_mask: params -> tree of bools, which leaves are decayed (all if None).
    unit_ndim: params -> tree of ints, how many leading axes index a leaf's units (0: the
      leaf is one unit). Default 0 everywhere, which makes this plain AdamW.
  Returns:
    A transformation whose update takes `keep=` (see the module docstring).
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    nd = unit_ndim(params) if unit_ndim is not None else jax.tree.map(lambda _: 0, params)
    counts = jax.tree.map(lambda p, n: jnp.zeros(jnp.shape(p)[:n], jnp.int32), params, nd)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return MaskedAdamWState(jnp.zeros([], jnp.int32), counts, zeros, jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, keep=None, **unused_extra_args):
    del unused_extra_args
    if params is None:
      raise ValueError("masked_adamw needs the params (for weight decay and the units' shapes)")
    lr = schedule(state.count)
    decay = decay_mask(params) if decay_mask is not None else jax.tree.map(lambda _: True, params)
    if keep is None:
      keep = jax.tree.map(lambda c: jnp.ones(c.shape, bool), state.counts)

    def leaf(g, c, m, v, p, k, d):
      kept = jnp.asarray(k, bool) & jnp.ones(c.shape, bool)  # units' shape
      c_new = c + kept.astype(jnp.int32)
      kb = _expand(kept, g.ndim)
      cb = _expand(jnp.maximum(c_new, 1), g.ndim)  # a never-kept unit's count is 0: not divided by
      m_new = b1 * m + (1 - b1) * g
      v_new = b2 * v + (1 - b2) * jnp.square(g)
      m_hat = m_new / (1 - b1 ** cb).astype(g.dtype)
      v_hat = v_new / (1 - b2 ** cb).astype(g.dtype)
      u = m_hat / (jnp.sqrt(v_hat) + eps)
      if d and weight_decay:
        u = u + weight_decay * p
      u = -lr * u
      return (jnp.where(kb, u, jnp.zeros_like(u)), c_new, jnp.where(kb, m_new, m), jnp.where(kb, v_new, v))

    out = jax.tree.map(leaf, updates, state.counts, state.mu, state.nu, params, keep, decay)
    is_out = lambda x: isinstance(x, tuple) and len(x) == 4 and not isinstance(x, MaskedAdamWState)
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)
    new_state = MaskedAdamWState(optax.safe_int32_increment(state.count), pick(1), pick(2), pick(3))
    return pick(0), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_kept_updates(params: PyTree, updates: PyTree, keep: PyTree | None = None) -> PyTree:
  """params + updates where kept; elsewhere the old params themselves (bit-identical even for
  a -0.0 entry, which adding +0.0 would turn into +0.0)."""
  new = optax.apply_updates(params, updates)
  if keep is None:
    return new
  return jax.tree.map(lambda n, p, k: jnp.where(_expand(jnp.asarray(k, bool), jnp.ndim(p)), n, p), new, params, keep)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def share_per_block(block_of: Callable[[str], str | None]) -> optax.GradientTransformation:
  """Ties leaves within a block: each leaf's update becomes the sum of its block's updates.

  The gradient of a parameter shared by several uses is the sum of the uses' gradients, so
  leaves that start equal and always receive this summed update stay equal: they are one
  parameter (one 2S-LS scale per block) stored in several places (one per adapted module),
  which keeps the per-module layout that the merge and the exports read. `block_of(path)`
  names a leaf's block ('a/b/c' paths), or None to leave the leaf alone.
  """

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    blocks = [block_of(path_str(path)) for path, _ in leaves]
    sums: dict[str, jax.Array] = {}
    for b, (_, g) in zip(blocks, leaves):
      if b is not None:
        sums[b] = g if b not in sums else sums[b] + g
    out = [g if b is None else sums[b] for b, (_, g) in zip(blocks, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


_BLOCK = re.compile(r"^(.*encoderblock_\d+)/")


def encoder_block(path: str) -> str | None:
  """'Transformer/encoderblock_3/MlpBlock_3/Dense_0/lora_log_scale' -> 'Transformer/encoderblock_3'."""
  m = _BLOCK.match(path)
  return m.group(1) if m else None


# ---- the two stages ----

def _decay_mask(tree):
  # Weight decay on matrices only (kernels, lora_a/lora_b), not on biases or scalars (timm).
  # tree.map, not flatten: inside multi_transform the other labels' leaves are MaskedNodes.
  return jax.tree.map(lambda v: getattr(v, "ndim", 0) >= 2, tree)


def _branch_units(tree):
  # One AdamW step count per branch: lora_a (K, d_in, r) and lora_b (K, r, d_out) along K.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 1 if path_str(path).rsplit("/", 1)[-1] in (dmlora.LORA_A, dmlora.LORA_B) else 0, tree)


def make_optimizer(method: methods.Method, stage: int, total_steps: int,
                   c) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of one stage over the owned (trainable-at-some-point) leaves.

  Stage 1: AdamW (`masked_adamw`: a dropped branch keeps its parameters, moments and
  step count; its update takes the step's `keep` tree), linear warm-up from
  stage1.warmup_init_lr to stage1.lr, cosine to stage1.min_lr; the head's schedule is that
  one times stage1.head_lr_mult. Stage 2: Adam on the log-scales at stage2.lr with a cosine
  decay to stage2.lr * stage1.min_lr / stage1.lr, tied per encoder block when
  stage2.granularity is 'block' (and on the head at stage1.lr * stage1.head_lr_mult *
  stage2.head_lr_ratio when stage2.train_head). Leaves not trained in the stage get
  set_to_zero, which has no state. `total_steps` is the number of steps of this stage;
  `c` is the full config. Returns (optimizer, learning-rate schedule of the stage).
  """
  s1 = c.stage1
  on = method.trained(stage, c.stage2.train_head)
  if stage == 1:
    warmup = int(round(total_steps * s1.warmup_epochs / max(s1.epochs, 1)))
    lr = optax.warmup_cosine_decay_schedule(s1.warmup_init_lr, s1.lr, warmup, max(total_steps, warmup + 1),
                                            end_value=s1.min_lr)
    tx = masked_adamw(lr, weight_decay=s1.weight_decay, decay_mask=_decay_mask, unit_ndim=_branch_units)
    txs = {lab: tx for lab in on}
    mult = float(s1.head_lr_mult)
    if HEAD in on and mult != 1:
      txs[HEAD] = masked_adamw(lambda step: lr(step) * mult, weight_decay=s1.weight_decay,
                               decay_mask=_decay_mask, unit_ndim=_branch_units)
    if method.adalora:  # its regulariser and budget masking around the branch leaves' AdamW
      a = c.adalora
      txs[BRANCHES] = adalora.adalora_tx(tx, adalora.Schedule(
          a.rank, a.target_rank, total_steps, int(a.tinit * total_steps), int(a.tfinal * total_steps), a.delta_t,
          a.beta1, a.beta2, a.orth_reg_weight))
  else:
    lr = optax.cosine_decay_schedule(c.stage2.lr, max(total_steps, 1), alpha=s1.min_lr / s1.lr)
    scale_tx = masked_adamw(lr)
    if c.stage2.granularity == "block":
      scale_tx = optax.chain(share_per_block(encoder_block), scale_tx)
    head_lr = optax.cosine_decay_schedule(s1.lr * s1.head_lr_mult * c.stage2.head_lr_ratio,
                                          max(total_steps, 1), alpha=s1.min_lr / s1.lr)
    txs = {SCALE: scale_tx, HEAD: masked_adamw(head_lr)}
    txs = {lab: txs[lab] for lab in on}
  transforms = {lab: txs.get(lab, optax.set_to_zero()) for lab in partition.LABELS}
  return optax.multi_transform(transforms, partition.labels, mask_compatible_extra_args=True), lr

"""AdaLoRA (Zhang et al., ICLR 2023) as HF PEFT computes it: an SVD-form update whose
triplets are pruned to a budget by importance.

Each adapted projection gets P (d_in, r), Lambda (r,) and Q (r, d_out) (PEFT's lora_A^T,
lora_E, lora_B^T), and

    W' = W + (alpha / r) P diag(Lambda) Q          (PEFT: scaling / ranknum, ranknum = r)

with P and Q ~ N(0, 0.02^2) and Lambda = 0 at the start. The forward pass builds W' (weight-sized
work; the fused q/k/v matmul and the LayerNorm fold stay as they are), which is also the merge.

Training (`adalora_tx`, wrapped around the branch leaves' optimizer):
- the loss gets PEFT's orthogonality term, orth_reg_weight * mean over the P's and Q's of
  ||P^T P - I||_F (resp. ||Q Q^T - I||_F), added here as its gradient;
- after each step's gradient, the sensitivity |p * g| of every entry of P, Lambda and Q is
  smoothed (beta1) with its uncertainty (beta2), and a triplet i of a module scores
  s(Lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij), s = smoothed sensitivity * uncertainty;
- the budget (total kept triplets over all modules) is init_r * modules for tinit steps, falls
  as a cubic to target_r * modules until total - tfinal, and stays there; every delta_t steps
  in between (and once at total - tfinal), the triplets at or below the k-th smallest score,
  k = initial - current budget, get Lambda = 0; in the final tfinal steps the mask fixed at
  total - tfinal is applied every step (PEFT's rank_pattern).
Parameter shapes never change: a pruned triplet is a zero in Lambda, inside one compiled step.

Differences from PEFT, for the record: PEFT scores with the parameters after the optimizer
step (update_and_allocate runs after optimizer.step()); here the score uses the parameters the
gradient was taken at. PEFT's rank_pattern-resized adapter export is not written (merged.npz is).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dmlora_jax import dmlora

ADALORA_E = dmlora.ADALORA_E
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Schedule:
  init_r: int
  target_r: int
  total: int  # stage-1 steps
  tinit: int
  tfinal: int
  delta_t: int
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5

  def budget(self, step: jax.Array, modules: int) -> tuple[jax.Array, jax.Array]:
    """(kept triplets over all modules, whether to re-mask) after global step `step` (1-based,
    as PEFT's global_step)."""
    init_b, target_b = self.init_r * modules, self.target_r * modules
    span = max(self.total - self.tfinal - self.tinit, 1)
    mul = 1.0 - (step - self.tinit) / span
    mid = jnp.floor((init_b - target_b) * mul ** 3 + target_b).astype(jnp.int32)
    budget = jnp.where(step <= self.tinit, init_b, jnp.where(step > self.total - self.tfinal, target_b, mid))
    remask = (step > self.tinit) & (step < self.total - self.tfinal) & (step % self.delta_t == 0)
    return budget, remask | (step == self.total - self.tfinal)


class AdaLoRAState(NamedTuple):
  count: jax.Array
  ipt: PyTree  # smoothed sensitivity of the P, Lambda, Q leaves
  unc: PyTree  # its smoothed uncertainty
  final_mask: PyTree  # per module (r,) bool: the rank pattern fixed at total - tfinal
  inner: Any


def _modules(params) -> dict[str, dict[str, Any]]:
  """{module path: {leaf name: array}} of the AdaLoRA leaves of a (possibly masked) tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(p, "key", str(p)) for p in path]
    if names[-1] in (dmlora.LORA_A, dmlora.LORA_B, ADALORA_E):
      out.setdefault("/".join(names[:-1]), {})[names[-1]] = leaf
  return {m: v for m, v in out.items() if ADALORA_E in v}


def orth_penalty(params) -> jax.Array:
  """PEFT's regulariser: mean over the P's and Q's of ||P^T P - I||_F, ||Q Q^T - I||_F."""
  terms = []
  for leaves in _modules(params).values():
    p, q = leaves[dmlora.LORA_A][0], leaves[dmlora.LORA_B][0]  # (d_in, r), (r, d_out)
    eye = jnp.eye(p.shape[1], dtype=jnp.float32)
    terms.append(jnp.linalg.norm(p.T @ p - eye))
    terms.append(jnp.linalg.norm(q @ q.T - eye))
  return jnp.mean(jnp.stack(terms)) if terms else jnp.float32(0.0)


def triplet_scores(ipt, unc) -> dict[str, jax.Array]:
  """Per module, the (r,) score of each triplet (PEFT's RankAllocator._element_score sums)."""
  s = jax.tree.map(lambda i, u: i * u, ipt, unc)
  out = {}
  for m, leaves in _modules(s).items():
    out[m] = leaves[ADALORA_E] + leaves[dmlora.LORA_A][0].mean(0) + leaves[dmlora.LORA_B][0].mean(1)
  return out


def _set_leaf(tree, module, name, fn):
  """The tree with one leaf (module/name) replaced by fn(leaf)."""
  def go(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    return fn(leaf) if "/".join(names[:-1]) == module and names[-1] == name else leaf
  return jax.tree_util.tree_map_with_path(go, tree)


def adalora_tx(inner: optax.GradientTransformationExtraArgs, sched: Schedule) -> optax.GradientTransformationExtraArgs:
  """The branch leaves' optimizer with AdaLoRA's regulariser and budget masking around it."""

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    final = {m: jnp.ones(l[ADALORA_E].shape, bool) for m, l in _modules(params).items()}
    return AdaLoRAState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params), final, inner.init(params))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise ValueError("adalora_tx needs the params")
    reg = jax.grad(orth_penalty)(params)
    grads = jax.tree.map(lambda g, r: g + sched.orth_reg_weight * r, grads, reg)
    ipt_now = jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)
    ipt = jax.tree.map(lambda e, i: sched.beta1 * e + (1 - sched.beta1) * i, state.ipt, ipt_now)
    unc = jax.tree.map(lambda u, i, e: sched.beta2 * u + (1 - sched.beta2) * jnp.abs(i - e), state.unc, ipt_now, ipt)
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    step = state.count + 1
    mods = _modules(params)
    budget, remask = sched.budget(step, len(mods))
    scores = triplet_scores(ipt, unc)
    flat = jnp.concatenate([scores[m] for m in mods]) if mods else jnp.zeros((0,))
    k = sched.init_r * len(mods) - budget  # how many triplets to drop
    threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.clip(k - 1, 0, max(flat.size - 1, 0))], -jnp.inf)
    final_phase = step > sched.total - sched.tfinal
    final_mask = {}
    for m in mods:
      keep_now = scores[m] > threshold
      keep = jnp.where(final_phase, state.final_mask[m], jnp.where(remask, keep_now, True))
      final_mask[m] = jnp.where(step == sched.total - sched.tfinal, keep_now, state.final_mask[m])
      e = mods[m][ADALORA_E]
      # a pruned triplet's Lambda ends the step at exactly 0 (PEFT's masked_fill_)
      updates = _set_leaf(updates, m, ADALORA_E, lambda u, e=e, keep=keep: jnp.where(keep, u, -e))
    return updates, AdaLoRAState(step, ipt, unc, final_mask, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def effective_kernel(kernel_IxO, p_1xIxR, q_1xRxO, e_R, log_scale) -> jax.Array:
  """W' = W + (alpha / r) P diag(Lambda) Q in float32, alpha = exp(log_scale) (PEFT: scaling / ranknum)."""
  r = e_R.shape[0]
  p, q = p_1xIxR[0].astype(jnp.float32), q_1xRxO[0].astype(jnp.float32)
  return kernel_IxO.astype(jnp.float32) + (p * e_R.astype(jnp.float32)) @ q * (
      jnp.exp(jnp.asarray(log_scale, jnp.float32)) / (r + 1e-5))

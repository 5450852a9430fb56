"""Branch-drop schedules p(t) and per-step branch keep masks: pure, jittable functions.

The step is a traced value everywhere, so a new step never recompiles.
"""

import jax
import jax.numpy as jnp

SCHEDULES = ("constant", "linear", "cosine", "step")


def drop_probability(step, total_steps: int, schedule: str, p_start: float, p_end: float,
                     num_plateaus: int = 4) -> jax.Array:
  """p(t) for t = step / (total_steps - 1), clipped to [0, 1].

  constant: p_end throughout (the target rate, as plain dropout; p_start is unused).
  linear:   p_start + (p_end - p_start) t.
  cosine:   p_start + (p_end - p_start) (1 - cos(pi t)) / 2.
  step:     `num_plateaus` equal plateaus from p_start to p_end, both included.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"dmlora.drop_schedule must be one of {SCHEDULES}, got {schedule!r}")
  for name, p in (("drop_start", p_start), ("drop_end", p_end)):
    if not 0.0 <= p < 1.0:
      raise ValueError(f"dmlora.{name} must be in [0, 1), got {p}")
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)
  if schedule == "constant":
    return jnp.full_like(t, p_end)
  if schedule == "linear":
    frac = t
  elif schedule == "cosine":
    frac = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
  else:
    if num_plateaus < 2:
      raise ValueError(f"dmlora.drop_steps must be >= 2 for the step schedule, got {num_plateaus}")
    level = jnp.minimum(jnp.floor(t * num_plateaus), num_plateaus - 1)
    frac = level / (num_plateaus - 1)
  return p_start + (p_end - p_start) * frac


def branch_masks(key: jax.Array, p, shape: tuple[int, ...], min_active: int = 1,
                 rescale: bool = True) -> jax.Array:
  """Keep multipliers of shape (..., K): independent Bernoulli(1 - p) draws per module.

  At least `min_active` branches of every module are kept: those with the largest uniform
  draws, so the forced ones are a uniformly random choice. Kept branches are multiplied
  by 1 / (1 - p) when `rescale` (inverted dropout), else by 1; dropped ones by 0.

  Why evaluation uses all branches with no rescale: with rescale, E[m_k] = (1-p)/(1-p) = 1
  whenever min_active does not bind, and the branch sum is linear in m, so the expected
  training output of a layer is exactly the all-branch output, which is what evaluation
  computes and what the merge W + (alpha_l / r) sum_k B_k A_k folds into the weights.
  (min_active can only raise a branch's keep rate, a small bias that vanishes for p -> 0.)
  Without rescale, training sees (1-p) of the full update in expectation, and the learned
  scales absorb that in stage 2 (which trains with all branches).
  """
  k = shape[-1]
  if not 0 <= min_active <= k:
    raise ValueError(f"dmlora.min_active must be in [0, num_branches={k}], got {min_active}")
  p = jnp.asarray(p, jnp.float32)
  u = jax.random.uniform(key, shape)
  keep = u >= p
  if min_active > 0:
    # Rank of each branch's draw within its module, 0 for the largest draw.
    order = jnp.argsort(-u, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    keep = keep | (rank < min_active)
  scale = 1.0 / (1.0 - p) if rescale else jnp.float32(1.0)
  return keep.astype(jnp.float32) * scale

"""Branch-drop schedules p(t) and per-step branch keep masks: pure, jittable functions.

The step is a traced value everywhere, so a new step never recompiles.
"""

import math

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


def keep_probability(p, num_branches: int, min_active: int) -> jax.Array:
  """q = P(a given branch is kept) under independent Bernoulli(1 - p) keeps with at least
  `min_active` of the K branches forced on.

  The forcing keeps max(N, m) branches, N ~ Binomial(K, 1 - p), m = min_active, so by
  symmetry q = E[max(N, m)] / K = (1 - p) + (1/K) sum_{n<m} (m - n) C(K, n) (1-p)^n p^(K-n).
  Written as (1 - p) plus the forcing's correction, which is accurate in float32 when the
  correction is tiny.
  """
  k, m = num_branches, min_active
  p = jnp.asarray(p, jnp.float32)
  q = 1.0 - p
  for n in range(min(m, k + 1)):
    q = q + (m - n) * math.comb(k, n) * (1.0 - p) ** n * p ** (k - n) / k
  return q


def masks_from_uniform(u: jax.Array, p, min_active: int = 1, rescale: bool = True) -> jax.Array:
  """Keep multipliers (..., K) from uniform draws u (..., K): branch k is kept when u_k >= p,
  and the `min_active` largest draws of every module are kept whatever p (the forced ones
  are thus a uniformly random choice among the dropped). Kept branches are multiplied by
  1 / q with q = keep_probability(p, K, min_active) when `rescale`, else by 1; dropped ones by 0.

  Unbiased: E[m_k] = q * (1 / q) = 1 exactly, for every p, K and min_active (dividing by
  1 - p instead would give (1 - p + p^K / K) / (1 - p) at min_active = 1: 1.03 at p = 0.5,
  K = 4). The branch sum is linear in m, so the expected training output of a layer is the
  all-branch output, which is what evaluation and the merge W + (alpha_l / r) sum_k B_k A_k
  compute. Without rescale, training sees q of the full update in expectation.
  """
  k = u.shape[-1]
  if not 0 <= min_active <= k:
    raise ValueError(f"dmlora.min_active must be in [0, num_branches={k}], got {min_active}")
  p = jnp.asarray(p, jnp.float32)
  keep = u >= p
  if min_active > 0:
    # Rank of each branch's draw within its module, 0 for the largest draw.
    order = jnp.argsort(-u, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    keep = keep | (rank < min_active)
  scale = 1.0 / keep_probability(p, k, min_active) if rescale else jnp.float32(1.0)
  return keep.astype(jnp.float32) * scale


def branch_masks(key: jax.Array, p, shape: tuple[int, ...], min_active: int = 1,
                 rescale: bool = True) -> jax.Array:
  """Keep multipliers of shape (..., K): independent draws per module and branch, see
  `masks_from_uniform`."""
  return masks_from_uniform(jax.random.uniform(key, shape), p, min_active, rescale)

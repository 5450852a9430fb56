"""The DMLoRA branch set that sits beside one frozen projection.

For an input x and a frozen kernel W viewed as a (d_in, d_out) matrix, the adapted
projection is

    y = x W + b + (alpha_l / r) * sum_k m_k (x A_k) B_k,

with A_k: (d_in, r), B_k: (r, d_out), and m_k the per-step keep multiplier of branch k
(0 for a dropped branch, 1/q or 1 for a kept one with q its keep probability, 1 at
evaluation). The per-module scale is stored as its logarithm, alpha_l = exp(lora_log_scale),
initialised to log(alpha): positive by construction, and an Adam learning rate on it is a
relative change of alpha_l per step (2S-LS, stage 2). The K branches
are computed as ONE low-rank product of rank K*r: x [A_1 .. A_K] gives (..., K*r), the
mask is applied to that hidden vector, and [B_1; ..; B_K] maps it back. The cost is that
of a LoRA of rank K*r, and a multiplier of exactly 0 makes both gradients of branch k
exactly 0 (they are products with m_k), so a dropped branch takes no part in the step
while the compiled program and the parameter shapes stay the same for every mask.

LoRA is the special case K=1 with m = 1.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

# Leaf names of the adapter. They never collide with checkpoint names, so regexes can
# target them (`.*/lora_a$`), and merge/export can drop them.
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_LOG_SCALE = "lora_log_scale"
DORA_MAGNITUDE = "dora_magnitude"  # DoRA's m (dora.py)
ADALORA_E = "adalora_e"  # AdaLoRA's singular values Lambda (adalora.py)
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_LOG_SCALE, DORA_MAGNITUDE, ADALORA_E)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Which projections get branches, and how many of what rank."""
  num_branches: int = 4
  rank: int = 8
  alpha: float = 8.0
  targets: Sequence[str] = ("query", "key", "value")
  init: str = "kaiming_uniform"  # kaiming_uniform | gaussian
  dora: bool = False  # DoRA: one branch, and a magnitude vector per projection (dora.py)
  adalora: bool = False  # AdaLoRA: one branch in SVD form P diag(Lambda) Q (adalora.py)

  def __post_init__(self):
    from dmlora_jax.config_base import ALL_TARGETS
    if self.num_branches < 1:
      raise ValueError(f"dmlora.num_branches must be >= 1, got {self.num_branches}")
    if self.rank < 1:
      raise ValueError(f"dmlora.rank must be >= 1, got {self.rank}")
    bad = [t for t in self.targets if t not in ALL_TARGETS]
    if bad or not self.targets:
      raise ValueError(f"dmlora.targets: unknown target(s) {bad or '(none given)'}; "
                       f"choose from {ALL_TARGETS}")
    if not self.alpha > 0:
      raise ValueError(f"dmlora.alpha must be > 0 (the scales are stored as log alpha_l), got {self.alpha}")
    if (self.dora or self.adalora) and self.num_branches != 1:
      raise ValueError(f"DoRA and AdaLoRA have one branch, got num_branches={self.num_branches}")
    if self.init not in ("kaiming_uniform", "gaussian"):
      raise ValueError(f"dmlora.init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}")


def lora_a_init(kind: str):
  """Initialiser of A (stored (K, d_in, r)).

  kaiming_uniform matches PEFT: torch's kaiming_uniform_(a=sqrt(5)) on a Linear(d_in, r)
  weight, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)). gaussian matches PEFT's "gaussian": N(0, 1/r).
  """
  def init(key, shape, dtype=jnp.float32):
    _, d_in, r = shape
    if kind == "gaussian":
      return jax.random.normal(key, shape, dtype) / r
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def fused_a(lora_a_KxIxR: jax.Array) -> jax.Array:
  """[A_1 .. A_K] as one (d_in, K*r) matrix."""
  k, d_in, r = lora_a_KxIxR.shape
  return jnp.transpose(lora_a_KxIxR, (1, 0, 2)).reshape(d_in, k * r)


def branch_multipliers(mask_K: jax.Array | None, log_scale: jax.Array, num_branches: int,
                       rank: int) -> jax.Array:
  """The (K*r,) multiplier of the fused hidden vector: (alpha_l / r) * m_k, repeated r times."""
  m = jnp.ones((num_branches,), jnp.float32) if mask_K is None else mask_K.astype(jnp.float32)
  return jnp.repeat(m, rank) * (jnp.exp(log_scale.astype(jnp.float32)) / rank)


def lora_delta(x_NxI: jax.Array, lora_a_KxIxR: jax.Array, lora_b_KxRxO: jax.Array,
               log_scale: jax.Array, mask_K: jax.Array | None = None,
               dtype=jnp.float32) -> jax.Array:
  """(alpha_l / r) * sum_k m_k (x A_k) B_k, as one rank-K*r product. x may have leading dims.

  The two matmuls run in `dtype` (bfloat16 on accelerators); the hidden vector comes out of
  the first in float32 and takes the masks and scales in float32, so that alpha_l / r and
  the 1/q rescale are not rounded to bfloat16's 8-bit mantissa."""
  k, _, r = lora_a_KxIxR.shape
  h = jnp.dot(x_NxI.astype(dtype), fused_a(lora_a_KxIxR).astype(dtype), preferred_element_type=jnp.float32)
  h = h * branch_multipliers(mask_K, log_scale, k, r)
  return jnp.dot(h.astype(dtype), lora_b_KxRxO.reshape(k * r, -1).astype(dtype))


def delta_kernel(lora_a_KxIxR: jax.Array, lora_b_KxRxO: jax.Array,
                 log_scale: jax.Array) -> jax.Array:
  """The merged update (alpha_l / r) * sum_k A_k B_k as a float32 (d_in, d_out) matrix,
  alpha_l = exp(log_scale)."""
  r = lora_a_KxIxR.shape[-1]
  a = lora_a_KxIxR.astype(jnp.float32)
  b = lora_b_KxRxO.astype(jnp.float32)
  return jnp.einsum("kir,kro->io", a, b) * (jnp.exp(jnp.asarray(log_scale, jnp.float32)) / r)


_BLOCK_INDEX = re.compile(r"encoderblock_(\d+)/")


def branch_keep(params: Mapping[str, Any], masks_DxTxK: jax.Array | None,
                targets: Sequence[str]) -> dict | None:
  """The step's keep flags as a tree like `params` (nested), for `optimizers.masked_adamw`.

  masks: the (depth, len(targets), K) keep multipliers that the forward pass used. The
  leaves lora_a and lora_b of target t in block i get masks[i, t] > 0, shape (K,); every
  other leaf gets True (always kept). None (no masks) gives None: everything kept.
  """
  if masks_DxTxK is None:
    return None
  out = {}
  for path in traverse_util.flatten_dict(dict(params), sep="/"):
    *_, module, leaf = path.split("/")
    if leaf in (LORA_A, LORA_B):
      block = int(_BLOCK_INDEX.search(path).group(1))
      out[path] = masks_DxTxK[block, list(targets).index(module)] > 0
    else:
      out[path] = True
  return traverse_util.unflatten_dict(out, sep="/")

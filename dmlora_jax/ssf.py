"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features"): a learned per-channel
scale gamma and shift beta after every linear layer, every LayerNorm and the patch embedding
of the frozen ViT, y -> y * gamma + beta, as the official code (dongzelian/SSF,
models/vision_transformer.py: `ssf_ada` after qkv, proj, fc1, fc2, norm1, norm2, the patch
embedding and the final norm).

The leaves `ssf_scale` and `ssf_shift` sit in the module whose output they modulate, with its
output shape (a projection's (H, Dh) for query/key/value, whose concatenation is the official
code's one (3D,) vector after the fused qkv matmul). Training applies them to the output, as
the official code does (`apply`): (x W + b) * gamma + beta. The merge (`merge_params`) writes
the same function into the plain ViT's weights: x (W diag gamma) + (b * gamma + beta), and
LN(x) * gamma + beta is x_hat (s * gamma) + (c * gamma + beta) for a LayerNorm of scale s and
bias c (`fold`). Training does not use the folded form: the gradient of a folded gamma is a
reduction of a kernel-sized gradient, full fine-tuning's cost (measured 3x LoRA's step at
112 px, benchmarks/README.md), where the output form reduces an activation-sized product.

Initialisation as the official `init_ssf_scale_shift`: gamma ~ N(1, std^2), beta ~ N(0, std^2)
with std = config.ssf.init_std (0.02 there); 0 gives the identity (the backbone's function).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

SCALE = "ssf_scale"
SHIFT = "ssf_shift"
LEAVES = (SCALE, SHIFT)


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


def declare(module, shape, std: float) -> tuple[jax.Array, jax.Array]:
  """(gamma, beta) of `shape` as params of `module` (call inside its compact __call__)."""
  return module.param(SCALE, _normal(1.0, std), shape), module.param(SHIFT, _normal(0.0, std), shape)


def apply(y: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
  """y * gamma + beta over y's trailing (channel) axis, in y's dtype."""
  return y * gamma.astype(y.dtype) + beta.astype(y.dtype)


def fold(weight: jax.Array, bias: jax.Array, gamma: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(W * gamma, b * gamma + beta): a layer y = x W + b (or a LayerNorm's scale and bias)
  followed by y * gamma + beta, as one layer. gamma broadcasts over W's trailing (output) axes."""
  return weight * gamma, bias * gamma + beta


def merge(flat: Mapping[str, Any]) -> dict:
  """Folds every (ssf_scale, ssf_shift) pair of a flat param map into its module's kernel and
  bias (a linear layer or the patch embedding) or scale and bias (a LayerNorm), in float32,
  cast back to the stored dtype. Returns the flat map without the SSF leaves."""
  out = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in LEAVES}
  for key in flat:
    if not key.endswith("/" + SCALE):
      continue
    module = key[: -len(SCALE) - 1]
    gamma = jnp.asarray(flat[key], jnp.float32)
    beta = jnp.asarray(flat[f"{module}/{SHIFT}"], jnp.float32)
    weight = f"{module}/kernel" if f"{module}/kernel" in flat else f"{module}/scale"
    if f"{module}/bias" not in flat:
      raise ValueError(f"SSF: {module} has no bias to fold its shift into (model.patch_bias=False?)")
    w, b = flat[weight], flat[f"{module}/bias"]
    w2, b2 = fold(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), gamma, beta)
    out[weight], out[f"{module}/bias"] = w2.astype(w.dtype), b2.astype(b.dtype)
  return out

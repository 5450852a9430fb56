"""DoRA (Liu et al., ICML 2024): a LoRA update with the weight's direction and magnitude
decoupled,

    W' = m * (W + s B A) / ||W + s B A||_c,      s = alpha / r,

where ||.||_c is the L2 norm of each output unit's weights (over the inputs: axis 0 of this
model's (d_in, d_out) kernels; `torch.linalg.norm(weight, dim=1)` on torch's (out, in) in HF
PEFT), and m (d_out,) is trainable, initialised to ||W||_c so that the model starts as the
pre-trained one. As in PEFT (and section 4.3 of the paper), the norm is detached from the
gradient: it is treated as a constant, so gradients reach m and, through the numerator, A and B.

The forward pass builds W' (weight-sized work) and runs the plain projection with it: the
same maths as PEFT's activation-side form (m / ||.|| - 1) x W^T + (m / ||.||) s x (BA)^T, and
the fused q/k/v matmul and the LayerNorm fold stay as they are. The merge is W' itself.
"""

import jax
import jax.numpy as jnp

from dmlora_jax import dmlora

DORA_MAGNITUDE = dmlora.DORA_MAGNITUDE


def column_norm(w_IxO: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(w_IxO.astype(jnp.float32)), axis=0))


def effective_kernel(kernel_IxO, lora_a_1xIxR, lora_b_1xRxO, log_scale, magnitude_O) -> jax.Array:
  """W' = m * (W + s A B) / stop_gradient(||W + s A B||_c), float32, (d_in, d_out)."""
  w = kernel_IxO.astype(jnp.float32) + dmlora.delta_kernel(lora_a_1xIxR, lora_b_1xRxO, log_scale)
  return w * (magnitude_O.astype(jnp.float32) / jax.lax.stop_gradient(column_norm(w)))


def init_magnitudes(flat: dict) -> dict:
  """Sets every dora_magnitude to the column norms of its (loaded) kernel: the step after the
  base checkpoint is loaded, so that m starts at ||W||_c of the pre-trained weights."""
  out = dict(flat)
  for k in flat:
    if k.endswith("/" + DORA_MAGNITUDE):
      module = k[: -len(DORA_MAGNITUDE) - 1]
      w = jnp.asarray(flat[f"{module}/kernel"])
      d_out = flat[k].shape[0]
      out[k] = jax.device_get(column_norm(w.reshape(-1, d_out))).astype(flat[k].dtype)
  return out

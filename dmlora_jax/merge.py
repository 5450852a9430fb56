"""Folding the DMLoRA branches into the frozen weights: a pure function over the params.

    W' = W + (alpha_l / r) * sum_k A_k B_k      (x W convention; B_k A_k in torch's W x)

with alpha_l = exp(lora_log_scale) (DoRA: W' = m (W + s A B) / ||W + s A B||_c, dora.py),
computed in float32 whatever the storage dtype, then
cast back to the kernel's dtype and reshaped to its checkpoint shape. The result has exactly the names and shapes of a public
ViT checkpoint and runs in the plain model with no adapter code.

SSF's scales and shifts fold in the same way (ssf.merge: W' = W diag gamma, b' = b gamma + beta,
and a LayerNorm's scale and bias likewise). VPT's prompts do not fold into weights: a tree with
prompts is refused (methods.Method.merges says which methods merge).
"""

from typing import Any, Mapping

import jax.numpy as jnp

from dmlora_jax import adalora, dmlora, dora, layout, ssf, vpt
from dmlora_jax.pytrees import flatten, unflatten

Params = Mapping[str, Any]


def adapted_modules(params: Params) -> list[str]:
  """Paths of the modules that hold DMLoRA branches, in parameter order."""
  return [k[: -len(dmlora.LORA_A) - 1] for k in flatten(params) if k.endswith("/" + dmlora.LORA_A)]


def merge_params(params: Params) -> dict:
  """Returns a plain-ViT param tree with every branch set (and every SSF scale and shift)
  merged into its kernel, in the public layout (a stacked or partly stacked tree,
  config.model.scan_layers, is unstacked first)."""
  params = layout.unstack(params)
  flat = flatten(params)
  prompts = [k for k in flat if k.rsplit("/", 1)[-1] in vpt.LEAVES]
  if prompts:
    raise ValueError(f"{prompts[0]}: VPT's prompts are tokens, not a weight update; they cannot merge into a plain ViT")
  flat = ssf.merge(flat)
  out = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  for module in adapted_modules(params):
    kernel = flat[f"{module}/kernel"]
    a, b, s = (flat[f"{module}/{leaf}"] for leaf in (dmlora.LORA_A, dmlora.LORA_B, dmlora.LORA_LOG_SCALE))
    if f"{module}/{dmlora.ADALORA_E}" in flat:  # AdaLoRA: W + (alpha / r) P diag(Lambda) Q
      merged = adalora.effective_kernel(kernel.reshape(a.shape[1], -1), a, b, flat[f"{module}/{dmlora.ADALORA_E}"], s)
    elif f"{module}/{dmlora.DORA_MAGNITUDE}" in flat:  # DoRA: the kernel the forward pass builds
      merged = dora.effective_kernel(kernel.reshape(a.shape[1], -1), a, b, s, flat[f"{module}/{dmlora.DORA_MAGNITUDE}"])
    else:
      delta = dmlora.delta_kernel(a, b, s)
      merged = kernel.astype(jnp.float32).reshape(delta.shape) + delta
    out[f"{module}/kernel"] = merged.reshape(kernel.shape).astype(kernel.dtype)
  return unflatten(out)

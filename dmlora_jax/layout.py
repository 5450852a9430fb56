"""The two layouts of the encoder blocks' params, and the pure functions between them.

public (checkpoints, npz.load_pretrained, merge, exports, the train state's trainable leaves):
    Transformer/encoderblock_{i}/<rest>          one subtree per block, i = 0 .. depth-1
stacked (what a model with config.model.scan_layers applies; the train state's frozen leaves):
    Transformer/encoderblock/<rest>              every leaf with a leading depth axis

`stack` and `unstack` are exact inverses (a concatenation along a new axis 0, no arithmetic).
Both pass leaves outside the blocks through, and `stack` leaves an already stacked subtree as
it is, so a tree whose frozen part is stacked and whose trainable part is public stacks into
what the scanned model applies (steps.py does that inside the jitted step).
"""

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from dmlora_jax.pytrees import flatten, unflatten

STACKED = "encoderblock"  # the scanned module's name (vit.Transformer._scanned)
_BLOCK = re.compile(r"^(.*?)" + STACKED + r"_(\d+)/(.*)$")
_STACKED = re.compile(r"^(.*?)" + STACKED + r"/(.*)$")


def is_stacked(params: Mapping[str, Any]) -> bool:
  return any(_STACKED.match(k) for k in flatten(params))


def stack(params: Mapping[str, Any]) -> dict:
  """Public -> stacked: `encoderblock_{i}/<rest>` for i = 0..n-1 -> `encoderblock/<rest>` (n, ...).
  NumPy leaves stay NumPy (host), others become jax arrays (inside jit). A leaf missing for
  some block is a ValueError (the blocks of a tree must be alike)."""
  flat = flatten(params)
  out, groups = {}, {}
  for k, v in flat.items():
    m = _BLOCK.match(k)
    if m:
      groups.setdefault(f"{m.group(1)}{STACKED}/{m.group(3)}", {})[int(m.group(2))] = v
    else:
      out[k] = v
  for k, by_block in groups.items():
    n = len(by_block)
    if sorted(by_block) != list(range(n)):
      raise ValueError(f"layout.stack: {k} is held by blocks {sorted(by_block)}, not by blocks 0..{n - 1}")
    if k in out:
      raise ValueError(f"layout.stack: {k} is both stacked and per block")
    leaves = [by_block[i] for i in range(n)]
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    out[k] = xp.stack(leaves)
  return unflatten(out)


def unstack(params: Mapping[str, Any]) -> dict:
  """Stacked -> public: the inverse of `stack` (leaves outside `encoderblock/` unchanged)."""
  out = {}
  for k, v in flatten(params).items():
    m = _STACKED.match(k)
    if not m:
      out[k] = v
      continue
    for i in range(v.shape[0]):
      out[f"{m.group(1)}{STACKED}_{i}/{m.group(2)}"] = v[i]
  return unflatten(out)


def for_model(model, params: Mapping[str, Any]):
  """The params as `model` applies them: stacked if it scans its blocks, else as given."""
  return stack(params) if model.cfg.scan_layers else params

"""Which leaves are which: a label per parameter by regex over its path.

Every leaf must match exactly one rule (as in big_vision's optax.py): an unmatched leaf,
or one matched twice, is an error that names it. Which labels train in which stage of a
method is in methods.py; the optimizers that act on them are in optimizers.py.
"""

import functools
import re
from typing import Any, Mapping

from dmlora_jax import pytrees

FROZEN, BRANCHES, HEAD, SCALE = "frozen", "branches", "head", "scale"
# The comparison methods' own leaves: SSF's scale and shift (ssf.py), VPT's prompts (vpt.py).
PEFT = "peft"
LABELS = (FROZEN, BRANCHES, HEAD, SCALE, PEFT)

# (regex over 'a/b/c' paths, label). The backbone rule lists the checkpoint leaf names, so
# a new kind of leaf cannot slip into a group silently.
RULES = (
    (r"^(cls|registers|embedding/(kernel|bias)|pre_logits/(kernel|bias)|fc_norm/(scale|bias)"
     r"|Transformer/posembed_input/pos_embedding|Transformer/encoderblock_\d+/ls[12]"
     r"|MAPHead_0/probe|MAPHead_0/(\w+/)*\w+/(kernel|bias|scale)"
     r"|Transformer/(encoderblock_\d+/)?(\w+/)*\w+/(kernel|bias|scale))$", FROZEN),
    (r"^.*/(lora_[ab]|dora_magnitude|adalora_e)$", BRANCHES),
    (r"^.*/lora_log_scale$", SCALE),
    (r"^head/(kernel|bias)$", HEAD),
    (r"^(.*/)?ssf_(scale|shift)$|^Transformer/vpt_prompts$", PEFT),
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
  return pytrees.unflatten({k: label_of(k) for k in pytrees.flatten(params)})


def split(params: Mapping[str, Any], keep: frozenset[str]) -> tuple[dict, dict]:
  """(leaves whose label is in keep, the rest), both nested."""
  return pytrees.split(params, lambda path: label_of(path) in keep)

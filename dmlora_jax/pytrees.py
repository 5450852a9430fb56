"""Param trees as flat {'a/b/c': leaf} maps, and splitting and joining them by path.

The params of this project are nested dicts whose paths are the public checkpoint names
(`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`); regexes over
these paths decide what trains (partition.py), what is merged (merge.py) and what is saved.
"""

from typing import Any, Callable, Mapping

from flax import traverse_util

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
  """Nested params -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested params."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def split(tree: Tree, keep: Callable[[str], bool]) -> tuple[dict, dict]:
  """(the leaves whose path satisfies `keep`, the rest), both nested."""
  flat = flatten(tree)
  return (unflatten({k: v for k, v in flat.items() if keep(k)}),
          unflatten({k: v for k, v in flat.items() if not keep(k)}))


def join(*trees: Tree) -> dict:
  """One nested tree holding the leaves of all; a later tree wins on a shared path."""
  out = {}
  for t in trees:
    out.update(flatten(t))
  return unflatten(out)

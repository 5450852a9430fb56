"""The in-memory containers every source produces: `Split`, `Task` and `DataError`."""

import dataclasses

import numpy as np


class DataError(ValueError):
  """Bad or missing input data; the message is one line that says what to fix."""


@dataclasses.dataclass
class Split:
  """Decoded, RGB, resized examples of one split, cached in RAM.

  `shard_count > 1` means this process holds only examples `shard_index::shard_count` of the
  `num_examples_global` examples (eval splits of multi-process runs); otherwise all of them.
  """
  name: str
  images: np.ndarray  # uint8 (N, S, S, 3)
  labels: np.ndarray  # int32 (N,)
  num_examples_global: int
  shard_index: int = 0
  shard_count: int = 1


@dataclasses.dataclass
class Task:
  """What the trainer consumes: the class count, the split to train on and the eval splits."""
  name: str
  num_classes: int
  train: Split
  evals: dict[str, Split]


def shard_size(num_examples: int, index: int, count: int) -> int:
  """Number of examples in the strided shard `range(index, num_examples, count)`."""
  return len(range(index, num_examples, count))


def one_line(text: str) -> str:
  """Collapses an exception text so error messages stay on one line."""
  return " ".join(str(text).split())

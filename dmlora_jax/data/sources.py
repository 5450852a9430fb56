"""What a data source hands to `build_task`: lazily loadable splits and shared checks."""

import dataclasses
import os
from typing import Callable, Protocol

import numpy as np

from dmlora_jax.data import images
from dmlora_jax.data.split import DataError

# At most this many missing paths are listed in an error.
SHOW = 5


class SplitSource(Protocol):
  name: str

  def count(self) -> int | None:
    """The global example count without decoding anything, or None where it is unknown."""

  def load(self, shard_index: int, shard_count: int, size: int, num_workers: int
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (uint8 images, int32 labels) of examples shard_index::shard_count, and the global count."""


@dataclasses.dataclass
class FileSplit:
  """A split listed as image files with labels (folder and JSON layouts)."""
  name: str
  refs: list  # [images.ImageRef]
  labels: np.ndarray  # int32

  def count(self) -> int:
    return len(self.refs)

  def load(self, shard_index: int, shard_count: int, size: int, num_workers: int):
    refs = self.refs[shard_index::shard_count]
    imgs = images.decode_files(refs, size, num_workers, desc=self.name)
    return imgs, self.labels[shard_index::shard_count].copy(), len(self.refs)


@dataclasses.dataclass
class ArraySplit:
  """A split already in memory as native uint8 images (demo data)."""
  name: str
  native: np.ndarray
  labels: np.ndarray
  convert: Callable | None = None

  def count(self) -> int:
    return len(self.labels)

  def load(self, shard_index: int, shard_count: int, size: int, num_workers: int):
    native = self.native[shard_index::shard_count]
    imgs = images.resize_stream(iter(native), size, num_workers, desc=self.name, count=len(native),
                                convert=self.convert)
    return imgs, self.labels[shard_index::shard_count].astype(np.int32), len(self.labels)


def listing(path: str, limit: int = 30) -> str:
  """What a directory holds, for 'not found' errors (folders first, with a trailing /)."""
  try:
    entries = sorted(os.listdir(path))
  except OSError as e:
    return f"<cannot list: {e.strerror}>"
  names = [e + "/" for e in entries if os.path.isdir(os.path.join(path, e))]
  names += [e for e in entries if not os.path.isdir(os.path.join(path, e))]
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return (", ".join(names[:limit]) + more) if names else "<empty>"


def require_dir(path: str, what: str) -> None:
  """Raises a DataError naming what exists at the nearest existing ancestor."""
  if os.path.isdir(path):
    return
  if not path:
    raise DataError(f"{what} is not set (config.data.root='')")
  parent = os.path.dirname(os.path.abspath(path))
  while parent and not os.path.isdir(parent):
    parent = os.path.dirname(parent)
  raise DataError(f"{what} {path} does not exist; {parent} holds: {listing(parent)}")


def check_exist(refs, list_desc: str) -> None:
  """Fails up front, listing the first few missing files, before any decoding starts."""
  missing = [r for r in refs if not os.path.isfile(r.path)]
  if missing:
    shown = ", ".join(f"{r.path} ({r.where})" for r in missing[:SHOW])
    more = f" and {len(missing) - SHOW} more" if len(missing) > SHOW else ""
    raise DataError(f"{len(missing)} image(s) named in {list_desc} are missing: {shown}{more}")

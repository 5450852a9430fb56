"""Tasks on disk for the tests, written once per session from real images that an installed
dependency ships (scikit-learn's 1,797 handwritten digits, 8x8 grey): nothing is read from
outside the repository and nothing is downloaded.

- vtab_root(): `<root>/digits/` in the VTAB-1k (NOAH) folder layout: train800, val200, their
  union (own copies, as NOAH writes them) and test (797), the split of the `demo` source,
  as 8x8 grey PNGs (the loader converts them to RGB and resizes), with classes.txt.
- fgvc_root(): `<root>/cub/` in the VPT FGVC layout: train/val/test.json mapping image paths
  under images/ to class ids (the digit + 100: ids need not start at 0), from the same images.
"""

import fcntl
import functools
import json
import os

import numpy as np
from PIL import Image

from conftest import SHARED_TMP
from dmlora_jax.data import demo

SPLITS = ("train800", "val200", "train800val200", "test")


def _digits():
  imgs, labels = demo.native_images()
  return imgs, labels, demo.split_indices(len(labels))


def _once(name: str, build) -> str:
  """SHARED_TMP/name, built by build(root) once per session: the workers of pytest -n share
  it (one builds, holding a lock; a marker says it is complete)."""
  root = os.path.join(SHARED_TMP, name)
  with open(root + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(root + ".done"):
      build(root)
      open(root + ".done", "w").close()
  return root


@functools.cache
def vtab_root() -> str:
  return _once("vtab1k", _write_vtab)


def _write_vtab(root: str) -> None:
  path = os.path.join(root, "digits")
  imgs, labels, idx = _digits()
  for split in SPLITS:
    os.makedirs(os.path.join(path, "images", split))
    lines = []
    for i, j in enumerate(idx[split]):
      rel = f"images/{split}/{i:06d}.png"
      Image.fromarray(imgs[j]).save(os.path.join(path, rel))
      lines.append(f"{rel} {labels[j]}\n")
    with open(os.path.join(path, f"{split}.txt"), "w") as f:
      f.writelines(lines)
  with open(os.path.join(path, "classes.txt"), "w") as f:
    f.writelines(f"{d}\n" for d in range(10))


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(8x8 grey images, labels) of one split, in list order: what the task files hold."""
  imgs, labels, idx = _digits()
  return imgs[idx[split]], labels[idx[split]]


@functools.cache
def fgvc_root() -> str:
  return _once("fgvc", _write_fgvc)


def _write_fgvc(root: str) -> None:
  path = os.path.join(root, "cub")
  imgs, labels, idx = _digits()
  parts = {"train": idx["train800"], "val": idx["val200"], "test": idx["test"][:300]}
  for split, ids in parts.items():
    entries = {}
    for j in ids:
      rel = f"{100 + labels[j]:03d}.digit/{j:04d}.png"
      full = os.path.join(path, "images", rel)
      os.makedirs(os.path.dirname(full), exist_ok=True)
      Image.fromarray(imgs[j]).save(full)
      entries[rel] = int(100 + labels[j])
    with open(os.path.join(path, f"{split}.json"), "w") as f:
      json.dump(entries, f)

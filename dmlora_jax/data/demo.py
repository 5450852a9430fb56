"""Offline demo data: scikit-learn's bundled handwritten digits as a VTAB-1k-like task.

1,797 real 8x8 grey images (values 0..16) ship inside scikit-learn, so this works on a fresh
machine without network. Pixels are scaled to 0..255, tiled to RGB and resized (bicubic).
"""

import numpy as np

from dmlora_jax.data import sources

NUM_CLASSES = 10
SPLIT_SEED = 0  # fixed: the split is part of the task definition


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
  """A fixed random draw: train800, val200, their union, and test = the rest (797)."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
  return {"train800": perm[:800], "val200": perm[800:1000], "train800val200": perm[:1000],
          "test": perm[1000:]}


def native_images() -> tuple[np.ndarray, np.ndarray]:
  """-> (uint8 (1797, 8, 8) scaled to 0..255, int64 labels)."""
  from sklearn.datasets import load_digits  # lazy: sklearn is only needed for the demo
  d = load_digits()
  return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def splits(cfg, names: tuple[str, ...]) -> tuple[int, dict]:
  imgs, labels = native_images()
  idx = split_indices(len(labels))
  num_classes = int(cfg.num_classes) if cfg.num_classes > 0 else NUM_CLASSES
  return num_classes, {n: sources.ArraySplit(n, imgs[idx[n]], labels[idx[n]]) for n in names}

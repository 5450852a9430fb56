"""benchmarks/ssf_init_drift.py: the identity init leaves the backbone's features as they are,
a random one moves them, and its nearest-class-mean probe against NumPy by hand."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import task_files
from dmlora_jax import npz, vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import ssf_init_drift as drift  # noqa: E402


def test_nearest_class_mean_by_hand():
  train = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
  train_y = np.array([3, 3, 7, 7])
  # Class means of the unit vectors: about (1, 0.025) for 3, (0.017, 1) for 7.
  x = np.array([[1.0, 0.2], [0.3, 1.0], [5.0, 4.0], [4.0, 5.0]])
  assert drift.ncm_accuracy(train, train_y, x, np.array([3, 7, 3, 7])) == 1.0
  assert drift.ncm_accuracy(train, train_y, x, np.array([7, 7, 7, 7])) == 0.5


def test_identity_init_keeps_the_features_and_a_random_one_moves_them(tmp_path):
  model = vit.ViT(vit.parse_variant("tiny/4", 10, gelu_approximate=False))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  npz.save_npz(str(tmp_path / "backbone.npz"), params)
  out = tmp_path / "drift.json"
  assert drift.main(["--backbone", str(tmp_path / "backbone.npz"), "--task", os.path.join(task_files.vtab_root(), "digits"),
                     "--variant", "tiny/4", "--image_size", "16", "--stds", "0,0.3", "--seeds", "0",
                     "--json", str(out)]) == 0
  plain, ident, moved = json.loads(out.read_text())["rows"]
  assert plain["std"] is None and ident["std"] == 0.0 and moved["std"] == 0.3
  assert ident["cos_min"] == pytest.approx(1.0, abs=1e-5) and ident["rel_dist_median"] < 1e-5
  assert ident["ncm_val200"] == plain["ncm_val200"]
  assert moved["cos_median"] < 0.999 and moved["rel_dist_median"] > 1e-3

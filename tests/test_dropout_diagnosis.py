"""benchmarks/dropout_diagnosis.py: the masked merge and the branch geometry it reports,
checked against NumPy by hand on a made-up module."""

import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import dropout_diagnosis as diag  # noqa: E402

from dmlora_jax import schedules  # noqa: E402


def _module(a, b, w, alpha=8.0):
  return {"Transformer": {"encoderblock_0": {"MultiHeadDotProductAttention_1": {"query": {
      "kernel": w, "lora_a": a, "lora_b": b, "lora_log_scale": np.float32(np.log(alpha))}}}}}


def _leaf(tree, name):
  return tree["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"][name]


def test_branch_geometry_against_numpy():
  rng = np.random.default_rng(0)
  k, d, r = 4, 6, 2
  a, b = rng.normal(size=(k, d, r)), rng.normal(size=(k, r, d))
  w = rng.normal(size=(d, d))
  got = diag.branch_geometry(_module(a, b, w))
  per = [8.0 / r * a[i] @ b[i] for i in range(k)]
  total = sum(per)
  assert got["branch_coherence"] == pytest.approx(np.linalg.norm(total) / sum(np.linalg.norm(p) for p in per))
  assert got["update_rel_norm"] == pytest.approx(np.linalg.norm(total) / np.linalg.norm(w))
  same = diag.branch_geometry(_module(np.repeat(a[:1], k, 0), np.repeat(b[:1], k, 0), w))
  assert same["branch_coherence"] == pytest.approx(1.0)  # K copies of one branch point the same way


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_masked_branches_scale_each_branch_by_its_keep_multiplier(p):
  rng = np.random.default_rng(1)
  k, d, r = 4, 5, 3
  a, b = rng.normal(size=(k, d, r)).astype(np.float32), rng.normal(size=(k, r, d)).astype(np.float32)
  params = _module(a, b, np.eye(d, dtype=np.float32))
  key = jax.random.PRNGKey(3)
  out = diag.masked_branches(params, key, p, min_active=1)
  # The same draw as the function makes: one split per module, in module order.
  _, sub = jax.random.split(key)
  m = np.asarray(schedules.branch_masks(sub, p, (k,), min_active=1, rescale=True))
  np.testing.assert_allclose(np.asarray(_leaf(out, "lora_b")), b * m[:, None, None], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(_leaf(out, "lora_a")), a)  # A untouched
  kept = m > 0
  assert kept.sum() >= 1  # min_active
  q = float(schedules.keep_probability(p, k, 1))
  np.testing.assert_allclose(m[kept], 1.0 / q, rtol=1e-6)
  if p == 0.0:
    np.testing.assert_allclose(np.asarray(_leaf(out, "lora_b")), b, rtol=1e-6)

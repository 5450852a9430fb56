"""Data parallelism over 4 simulated CPU devices (a subprocess: the device count is fixed
when JAX starts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join([REPO, HERE]))
  out = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_steps.py")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_masks_identical_across_devices_within_a_step(report):
  assert report["mask_shape"] == [4, 2, 3, 3]  # devices, depth, targets, K
  assert report["masks_equal_across_devices"] == [True, True]
  assert 0.2 < report["kept_fraction"][0] < 0.8  # p = 0.5: some kept, some dropped


def test_masked_updates_leave_the_same_state_on_every_device(report):
  assert report["state_equal_across_devices"]


def test_masks_differ_from_one_step_to_the_next(report):
  assert report["masks_differ_across_steps"]


def test_pmap_and_shard_map_give_the_same_step(report):
  assert report["shard_map_masks_equal_pmap"]
  assert report["max_update"] > 1e-4  # the steps did change the params
  assert report["max_abs_diff_pmap_vs_shard_map"] < 1e-6
  assert abs(report["loss_pmap"] - report["loss_shard_map"]) < 1e-6


def test_per_device_randomness_folds_in_the_device_index(report):
  assert report["device_keys_distinct"]  # drop-path keys differ by device, branch masks do not
  assert np.isfinite(report["drop_path_loss"])

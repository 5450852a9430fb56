"""Data parallelism over 4 simulated CPU devices (a subprocess: the device count is fixed
when JAX starts), config.parallel=pmap and =jit among it: the same training, the same masks on
every device, and a step that never copies between host and devices outside the trainer's
logging and checkpoint points; and the comparison methods (DoRA, AdaLoRA, SSF, VPT-deep) data
parallel: 4 devices x 8 images equal to 1 device x 32 (and AdaLoRA's own optimizer the same
bits on every device)."""

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
                       capture_output=True, text=True, timeout=600)
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


# ---- config.parallel (parallel_steps.py) ----

@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_training_runs_under_transfer_guard_disallow(report, parallel):
  # A host sync or an implicit copy anywhere but restore / logging / checkpoints fails the run.
  assert report["parallel"][parallel]["guarded_run"] == "ok"
  assert report["parallel"][parallel]["steps"] == 5


@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_branch_masks_are_identical_on_every_device(report, parallel):
  r = report["parallel"][parallel]
  assert r["mask_copies"] == 4
  assert r["masks_equal_across_devices"] == [True, True]
  assert r["masks_differ_across_steps"]


def test_pmap_and_jit_give_the_same_masks_and_merged_export(report):
  assert report["parallel"]["pmap"]["masks"] == report["parallel"]["jit"]["masks"]
  assert report["parallel"]["same_keys"]
  assert report["parallel"]["max_abs_diff_export"] < 1e-6
  # Each mode's own evaluator over all 797 test images (a near-tie may flip one prediction).
  assert set(report["parallel"]["jit"]["accuracy"]) == set(report["parallel"]["pmap"]["accuracy"]) == {"test"}
  assert abs(report["parallel"]["pmap"]["accuracy"]["test"] - report["parallel"]["jit"]["accuracy"]["test"]) <= 2e-3



# ---- the comparison methods (multidevice_methods.py) ----

@pytest.mark.parametrize("method", ["dora", "adalora", "ssf", "vpt_deep"])
def test_comparison_method_trains_data_parallel(report, method):
  r = report["methods"][method]
  assert r["num_devices"] == 4
  if method == "adalora":
    # The trainer's own step (AdaLoRA's rank allocator inside its optimizer) keeps every
    # device's trained leaves and optimizer state the same bits.
    assert r["state_equal_across_devices"]
    assert r["adam_max_update"] > 1e-4
  # 4 devices x 8 images = 1 device x 32 images (SGD: the update is the averaged gradient).
  assert r["sgd_max_update"] > 1e-2
  assert r["max_abs_diff_4_vs_1_device"] < 1e-5
  assert abs(r["loss_4"] - r["loss_1"]) < 1e-5

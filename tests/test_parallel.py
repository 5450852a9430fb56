"""config.parallel=pmap and =jit on 4 simulated CPU devices (a subprocess: the device count is
fixed when JAX starts): the same training, the same masks on every device, and a step that
never copies between host and devices outside the trainer's logging and checkpoint points."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join([REPO, HERE]))
  out = subprocess.run([sys.executable, os.path.join(HERE, "parallel_steps.py")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_training_runs_under_transfer_guard_disallow(report, parallel):
  # A host sync or an implicit copy anywhere but restore / logging / checkpoints fails the run.
  assert report[parallel]["guarded_run"] == "ok"
  assert report[parallel]["steps"] == 5


@pytest.mark.parametrize("parallel", ["pmap", "jit"])
def test_branch_masks_are_identical_on_every_device(report, parallel):
  r = report[parallel]
  assert r["mask_copies"] == 4
  assert r["masks_equal_across_devices"] == [True, True]
  assert r["masks_differ_across_steps"]


def test_pmap_and_jit_give_the_same_masks_and_merged_export(report):
  assert report["pmap"]["masks"] == report["jit"]["masks"]
  assert report["same_keys"]
  assert report["max_abs_diff_export"] < 1e-6

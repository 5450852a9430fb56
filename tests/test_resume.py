"""Resume is exact: kill -9 and SIGTERM at arbitrary points, restart the same command, and
the merged export is bitwise equal to the uninterrupted run's. Also: damaged checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from dmlora_jax import npz
from task_files import vtab_root
from trainer_utils import logged_step, run_main, subprocess_env

ARGS = ["--config=configs/vtab1k.py:task=digits", f"--config.data.root={vtab_root()}",
        "--config.model.variant=mini/4", "--config.model.init_checkpoint=", "--config.data.image_size=16",
        "--config.batch_size=32", "--config.stage1.epochs=3", "--config.stage1.warmup_epochs=1",
        "--config.stage2.epochs=1", "--config.dmlora.drop_start=0.3", "--config.checkpoint_every=25",
        "--config.log_every=1", "--config.data.num_workers=2"]
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
STAGE1, TOTAL = 3 * (1000 // 32), 4 * (1000 // 32)


def _start_and_signal(wd, sig, after_step):
  env = subprocess_env(**ENV)
  p = subprocess.Popen([sys.executable, "-m", "dmlora_jax.main", *ARGS, f"--workdir={wd}"], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while logged_step(wd) < after_step and p.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert p.poll() is None, "the run finished before it could be interrupted: " + p.stderr.read()[-2000:]
  p.send_signal(sig)
  out, err = p.communicate(timeout=240)
  return p.returncode, out, err


def _export(wd):
  return npz.load_npz(os.path.join(wd, "merged.npz"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("straight"))
  r = run_main(ARGS + [f"--workdir={wd}"], env_extra=ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def test_kill_and_sigterm_then_resume_give_a_bitwise_equal_export(uninterrupted, tmp_path):
  wd = str(tmp_path / "interrupted")
  rc, _, _ = _start_and_signal(wd, signal.SIGKILL, after_step=30)  # past the checkpoint of step 25
  assert rc == -signal.SIGKILL
  assert not os.path.exists(os.path.join(wd, "results.json"))
  rc, out, err = _start_and_signal(wd, signal.SIGTERM, after_step=STAGE1 + 5)  # in stage 2
  assert rc == 0, err[-3000:]
  assert "Resumed from checkpoint step" in out and "Stopped at step" in out
  stopped = int(out.split("Stopped at step ")[1].split()[0])
  assert STAGE1 < stopped < TOTAL
  assert str(stopped) in os.listdir(os.path.join(wd, "checkpoints"))  # SIGTERM saved that very step
  r = run_main(ARGS + [f"--workdir={wd}"], env_extra=ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed from checkpoint step {stopped}" in r.stdout
  a, b = _export(uninterrupted), _export(wd)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  ra = json.load(open(os.path.join(uninterrupted, "results.json")))
  rb = json.load(open(os.path.join(wd, "results.json")))
  assert ra["accuracy"] == rb["accuracy"] and ra["scales"] == rb["scales"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
  wd = str(tmp_path / "damaged")
  shutil.copytree(uninterrupted, wd)
  os.remove(os.path.join(wd, "merged.npz"))
  ck = os.path.join(wd, "checkpoints")
  steps_ = sorted(int(s) for s in os.listdir(ck) if s.isdigit())
  newest, previous = steps_[-1], steps_[-2]
  # Damage the newest: delete its array data but keep the step directory (orbax still lists it).
  for item in ("trainable", "opt_state"):
    for root, _, files in os.walk(os.path.join(ck, str(newest), item)):
      for f in files:
        if not f.startswith("_"):
          os.remove(os.path.join(root, f))
  r = run_main(["--mode=export"] + ARGS + [f"--workdir={wd}"], env_extra=ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"checkpoint {newest} is damaged" in r.stdout
  assert f"Restored checkpoint step {previous}" in r.stdout
  assert os.path.isdir(os.path.join(wd, "checkpoints_damaged", str(newest)))  # kept, not deleted
  assert os.path.exists(os.path.join(wd, "merged.npz"))


def test_checkpoint_in_the_old_one_item_layout_is_refused_in_one_line_and_kept(uninterrupted, tmp_path):
  wd = str(tmp_path / "old_layout")
  shutil.copytree(uninterrupted, wd)
  ck = os.path.join(wd, "checkpoints")
  for step in (s for s in os.listdir(ck) if s.isdigit()):  # every step as the old version wrote it
    os.rename(os.path.join(ck, step, "trainable"), os.path.join(ck, step, "state"))
    shutil.rmtree(os.path.join(ck, step, "opt_state"))
  before = sorted(os.listdir(ck))
  r = run_main(["--mode=export"] + ARGS + [f"--workdir={wd}"], env_extra=ENV)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "the layout of dmlora_jax before" in lines[0] and "trainable" in lines[0], r.stderr
  assert "Traceback" not in r.stderr and sorted(os.listdir(ck)) == before  # nothing moved aside
  assert not os.path.exists(os.path.join(wd, "checkpoints_damaged"))


@pytest.mark.parametrize("override,message", [
    ("--config.seed=7", "was trained from base weights"),  # another random backbone
    ("--config.batch_size=16", "steps per epoch"),  # the data order would not replay
])
def test_resume_refuses_a_run_it_could_not_continue_exactly(uninterrupted, tmp_path, override, message):
  wd = str(tmp_path / "changed")
  shutil.copytree(uninterrupted, wd)
  r = run_main(ARGS + [f"--workdir={wd}", override], env_extra=ENV)
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr


def test_export_of_a_workdir_without_checkpoints_says_train_first_and_creates_nothing(tmp_path):
  wd = str(tmp_path / "never_trained")
  os.mkdir(wd)
  r = run_main(["--mode=export"] + ARGS + [f"--workdir={wd}"], env_extra=ENV)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "no checkpoint in" in lines[0] and "train first" in lines[0], r.stderr
  assert os.listdir(wd) == []  # no empty checkpoints/ that a continuing run would take for a source

"""Two processes x 2 CPU devices joined by jax.distributed over loopback (gloo) against one
process x 4 devices; and a SIGTERM to one process of a two-process run.

The two-process export runs with config.parallel=jit and is compared with the one-process
pmap run, so one pair checks both the jit path across processes and its agreement with pmap
(measured 2026-12-06: within 3e-8, the same test accuracy); the SIGTERM pair runs with pmap,
so multi-process pmap (and its preemption and resume) stays covered. Each pair costs about a
minute on the 2-core VM: a pair per path and test is past this suite's budget."""

import json
import os
import signal
import socket
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
        "--config.model.variant=tiny/4", "--config.model.init_checkpoint=", "--config.data.image_size=16",
        "--config.batch_size=32", "--config.stage1.epochs=2", "--config.stage1.warmup_epochs=1",
        "--config.stage2.epochs=1", "--config.dmlora.drop_start=0.3", "--config.dmlora.num_branches=3",
        "--config.dmlora.rank=2", "--config.checkpoint_every=20", "--config.log_every=1",
        "--config.data.num_workers=2"]
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(wd, extra=()):
  port = _free_port()
  env = subprocess_env(**TWO_DEVICES)
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "dmlora_jax.main", *ARGS, *extra, f"--workdir={wd}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _wait(procs, timeout=300):
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def single_process_4_devices(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("one_process"))
  r = run_main(ARGS + [f"--workdir={wd}"], env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def test_two_processes_under_jit_give_the_pmap_process_merged_export(single_process_4_devices, tmp_path):
  wd = str(tmp_path / "two_processes")
  codes, outs = _wait(_start_pair(wd, extra=["--config.parallel=jit"]))
  assert codes == [0, 0], [o[1][-2000:] for o in outs]
  assert "2 process(es) x 2" in outs[0][0]
  assert "top-1 test" in outs[0][0] and "top-1 test" not in outs[1][0]  # only process 0 reports
  a, b = npz.load_npz(os.path.join(single_process_4_devices, "merged.npz")), npz.load_npz(os.path.join(wd, "merged.npz"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
  ra = json.load(open(os.path.join(single_process_4_devices, "results.json")))
  rb = json.load(open(os.path.join(wd, "results.json")))
  assert abs(ra["accuracy"]["test"] - rb["accuracy"]["test"]) <= 2e-3  # eval covers all 1,000 once


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(single_process_4_devices, tmp_path):
  wd = str(tmp_path / "preempted")
  procs = _start_pair(wd, extra=["--config.stage1.epochs=6", "--config.parallel=pmap"])
  deadline = time.time() + 240
  while logged_step(wd) < 10 and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.01)
  assert all(p.poll() is None for p in procs), "the run ended before it could be preempted"
  procs[1].send_signal(signal.SIGTERM)
  codes, outs = _wait(procs)
  assert codes == [0, 0], [o[1][-2000:] for o in outs]
  stopped = int(outs[0][0].split("Stopped at step ")[1].split()[0])
  assert os.path.isdir(os.path.join(wd, "checkpoints", str(stopped)))
  assert max(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()) == stopped
  assert not os.path.exists(os.path.join(wd, "results.json"))
  codes, outs = _wait(_start_pair(wd, extra=["--config.stage1.epochs=6", "--config.parallel=pmap"]))
  assert codes == [0, 0], [o[1][-2000:] for o in outs]
  assert f"Resumed from checkpoint step {stopped}" in outs[0][0]
  assert os.path.exists(os.path.join(wd, "results.json"))

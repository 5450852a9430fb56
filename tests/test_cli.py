"""The command line as a user meets it: one-line errors, and the README's main command."""

import json
import os


import pytest

from task_files import vtab_root
from trainer_utils import run_main


@pytest.fixture(scope="module")
def base():
  return ["--config=configs/vtab1k.py:task=digits,runlocal", f"--config.data.root={vtab_root()}"]


def _one_line_error(r):
  err = [l for l in r.stderr.splitlines() if l.strip() and "oneDNN" not in l and not l.startswith(("I", "W"))]
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(err) == 1, err
  return err[0]


def test_misspelt_override_names_the_key(base, tmp_path):
  line = _one_line_error(run_main(base + ["--config.stage1.lrr=0.1", f"--workdir={tmp_path}"]))
  assert "--config.stage1.lrr" in line and "Did you mean" in line


def test_unknown_config_argument_names_it(tmp_path):
  line = _one_line_error(run_main(["--config=configs/vtab1k.py:tsk=cifar10", f"--workdir={tmp_path}"]))
  assert "unknown config argument 'tsk'" in line


def test_wrong_type_override_names_the_key(base, tmp_path):
  line = _one_line_error(run_main(base + ["--config.dmlora.rank=eight", f"--workdir={tmp_path}"]))
  assert "config.dmlora.rank" in line or "dmlora.rank" in line


def test_invalid_value_is_one_line_that_lists_the_choices(base, tmp_path):
  line = _one_line_error(run_main(base + ["--config.method=dmlroa", f"--workdir={tmp_path}"]))
  assert "config.method='dmlroa' is not one of full, linear, lora, multibranch, dropout, dmlora" in line
  assert not os.path.exists(tmp_path / "checkpoints")  # refused before anything was written


def test_missing_data_root_is_one_line(base, tmp_path):
  line = _one_line_error(run_main(base + [f"--config.data.root={tmp_path}/nowhere", f"--workdir={tmp_path}/wd"]))
  assert "nowhere" in line


def test_missing_checkpoint_file_is_one_line(base, tmp_path):
  line = _one_line_error(run_main(base + [f"--config.model.init_checkpoint={tmp_path}/ViT-B_16.npz",
                                          f"--workdir={tmp_path}/wd"]))
  assert "config.model.init_checkpoint" in line and "ViT-B_16.npz" in line and "no such file" in line


def test_batch_not_divisible_by_device_count_is_one_line(base, tmp_path):
  r = run_main(base + ["--config.batch_size=30", f"--workdir={tmp_path}"],
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert "batch_size=30 is not divisible by the 4 devices" in _one_line_error(r)


def test_readme_main_command_runs_the_demo_end_to_end(tmp_path):
  """configs/demo.py as in the README (fewer epochs to keep CI short): both stages, export, eval."""
  wd = str(tmp_path / "demo")
  r = run_main(["--config=configs/demo.py", f"--workdir={wd}", "--config.stage1.epochs=1",
                "--config.stage1.warmup_epochs=1", "--config.stage2.epochs=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Stage 2 (2S-LS)" in r.stdout and "top-1 test" in r.stdout and "merged export" in r.stdout
  res = json.load(open(os.path.join(wd, "results.json")))
  assert res["stage2_steps"] > 0 and os.path.exists(os.path.join(wd, "merged.npz"))
  assert 0.0 <= res["accuracy"]["test"] <= 1.0

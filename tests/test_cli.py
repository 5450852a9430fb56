"""The command line as a user meets it: one-line errors, and the README's main command."""

import json
import os


from trainer_utils import VTAB_ROOT, run_main

BASE = ["--config=configs/vtab1k.py:task=cifar10,runlocal", f"--config.data.root={VTAB_ROOT}"]


def _one_line_error(r):
  err = [l for l in r.stderr.splitlines() if l.strip() and "oneDNN" not in l and not l.startswith(("I", "W"))]
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(err) == 1, err
  return err[0]


def test_misspelt_override_names_the_key(tmp_path):
  line = _one_line_error(run_main(BASE + ["--config.stage1.lrr=0.1", f"--workdir={tmp_path}"]))
  assert "--config.stage1.lrr" in line and "Did you mean" in line


def test_unknown_config_argument_names_it(tmp_path):
  line = _one_line_error(run_main(["--config=configs/vtab1k.py:tsk=cifar10", f"--workdir={tmp_path}"]))
  assert "unknown config argument 'tsk'" in line


def test_missing_data_root_is_one_line(tmp_path):
  line = _one_line_error(run_main(BASE + [f"--config.data.root={tmp_path}/nowhere", f"--workdir={tmp_path}/wd"]))
  assert "nowhere" in line


def test_missing_checkpoint_file_is_one_line(tmp_path):
  line = _one_line_error(run_main(BASE + [f"--config.model.init_checkpoint={tmp_path}/ViT-B_16.npz",
                                          f"--workdir={tmp_path}/wd"]))
  assert "checkpoint file not found" in line and "ViT-B_16.npz" in line


def test_batch_not_divisible_by_device_count_is_one_line(tmp_path):
  r = run_main(BASE + ["--config.batch_size=30", f"--workdir={tmp_path}"],
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert "batch_size=30 is not divisible by the 4 devices" in _one_line_error(r)


def test_readme_main_command_runs_the_demo_end_to_end(tmp_path):
  """configs/demo.py as in the README (fewer epochs to keep CI short): both stages, export, eval."""
  wd = str(tmp_path / "demo")
  r = run_main(["--config=configs/demo.py", f"--workdir={wd}", "--config.stage1.epochs=2",
                "--config.stage2.epochs=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Stage 2 (2S-LS)" in r.stdout and "top-1 test" in r.stdout and "merged export" in r.stdout
  res = json.load(open(os.path.join(wd, "results.json")))
  assert res["stage2_steps"] > 0 and os.path.exists(os.path.join(wd, "merged.npz"))
  assert 0.0 <= res["accuracy"]["test"] <= 1.0

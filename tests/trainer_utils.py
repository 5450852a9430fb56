"""Helpers of the trainer tests: tiny configs on the digits task of task_files.py."""

import json
import os
import subprocess
import sys

from conftest import REPO
from dmlora_jax import config_base, data, setup, training
from task_files import vtab_root

def subprocess_env(**extra) -> dict:
  """This process's environment (conftest puts the session's XLA compilation cache in it, so
  subprocess runs share the compiled programs) with the repository importable."""
  return {**os.environ, "PYTHONPATH": REPO, **extra}


def tiny_config(method="dmlora", epochs=1, stage2_epochs=1, image_size=16, batch_size=32, **over):
  c = config_base.get_base_config()
  c.method = method
  c.model.variant = "tiny/4"
  c.data.source = "vtab1k_folder"
  c.data.root = vtab_root()
  c.data.task = "digits"
  c.data.image_size = image_size
  c.data.num_workers = 2
  c.batch_size = batch_size
  c.stage1.epochs = epochs
  c.stage1.warmup_epochs = 0
  c.stage2.epochs = stage2_epochs
  c.dmlora.num_branches = 3
  c.dmlora.rank = 2
  c.log_every = 1000
  c.checkpoint_every = 1000
  for k, v in over.items():
    config_base.override(c, k, v)
  return c


def make_trainer(config, workdir: str) -> training.Trainer:
  """The trainer of a config as train_and_evaluate builds it (its task decoded, nothing run)."""
  c = config_base.resolve(config)
  task = data.build_task(c.data)
  return training.Trainer(setup.build(c, task.num_classes), task, workdir)


def run_main(args, env_extra=None, timeout=300, **kw):
  env = subprocess_env(**(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "dmlora_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kw)


def logged_step(workdir: str) -> int:
  """The last step a run wrote to metrics.jsonl (0 before the first line)."""
  try:
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0
  except (FileNotFoundError, json.JSONDecodeError, IndexError):
    return 0

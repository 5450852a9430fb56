"""Adapter-sized orbax checkpoints: the trained leaves, the optimizer state and a JSON meta
(step, stage, fingerprints), each its own orbax item.

The frozen backbone is not saved; a fingerprint of it is, and checked on resume. Written
through a CheckpointManager with the `ocp.args` API. A damaged newest checkpoint (orbax
counts a finished step with missing files as the latest and raises on restore) is moved
aside to `checkpoints_damaged/` (never deleted) and the previous one is used.
"""

import logging as std_logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from dmlora_jax.progress import say


LEGACY_ITEM = "state"  # before 9791675: trained leaves and optimizer state in one item


class ResumeError(RuntimeError):
  """A checkpoint that exists but cannot be used for this run."""


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_dir = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
    self.keep, self.read_only = keep, read_only
    self._open()

  def _open(self):
    # A read-only manager logs three warnings about the options it ignores; they say nothing
    # to a user who only reads another run's checkpoint.
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    if self.read_only:
      absl_logger.setLevel(std_logging.ERROR)  # a Python level (absl's own ERROR is -2)
    try:
      options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=not self.read_only,
                                             read_only=self.read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    finally:
      absl_logger.setLevel(level)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
    """items: named host numpy pytrees (optax states may be namedtuples; stored as state
    dicts), each its own orbax item, so that a reader restores only what it needs."""
    if step in self.manager.all_steps():
      return
    args = {name: ocp.args.StandardSave(jax.tree.map(np.asarray, serialization.to_state_dict(tree)))
            for name, tree in items.items()}
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def restore_latest(self, targets_for_meta: Callable[[dict], dict[str, Any]]) -> tuple[dict, dict] | None:
    """Restores the newest usable checkpoint. targets_for_meta(meta) gives {item name: tree to
    restore into} (their structure can depend on the stage; it may raise ResumeError to refuse
    the checkpoint). Returns ({item name: tree}, meta), or None if there is no checkpoint."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, targets_for_meta)
      except ResumeError:
        raise
      except Exception as e:  # orbax raises many types for missing/corrupt files
        logging.error("Checkpoint step %d in %s is damaged (%s: %s); moving it to %s and trying the "
                      "previous one", step, self.directory, type(e).__name__, str(e).splitlines()[0][:200],
                      self.damaged_dir)
        say(f"WARNING: checkpoint {step} is damaged ({type(e).__name__}); moved to {self.damaged_dir}, "
              "resuming from the previous one")
        self._move_aside(step)
    return None

  def restore(self, step: int, targets_for_meta: Callable[[dict], dict[str, Any]]) -> tuple[dict, dict]:
    """({item name: tree}, meta) of one step, only the items that targets_for_meta names."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    targets = targets_for_meta(meta)
    step_dir = os.path.join(self.directory, str(step))
    if os.path.isdir(os.path.join(step_dir, LEGACY_ITEM)) and not any(
        os.path.isdir(os.path.join(step_dir, name)) for name in targets):
      raise ResumeError(f"checkpoint {step_dir} holds one '{LEGACY_ITEM}' item, the layout of dmlora_jax before "
                        f"commit 9791675; this version reads the items {', '.join(targets)}: finish that run with "
                        "the version that started it, or use another --workdir")
    args = {name: ocp.args.StandardRestore(jax.tree.map(np.asarray, serialization.to_state_dict(t)))
            for name, t in targets.items()}
    got = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {name: serialization.from_state_dict(t, got[name]) for name, t in targets.items()}, meta

  def _move_aside(self, step: int):
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir, exist_ok=True)
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.damaged_dir, str(step))
      n = 0
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(self.damaged_dir, f"{step}.{n}")
      shutil.move(src, dst)
    self.manager.close()
    self._open()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

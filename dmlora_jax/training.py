"""The two-stage loop of one run in a workdir: compiled steps, checkpoints, exact resume,
preemption, and stage 2 started from another run's stage 1.

Resume is exact: the data order is a pure function of (seed, epoch) and each step's key is
fold_in(base_key, step), so a run stopped anywhere and started again computes the same steps.

The step never waits on the host: batches are copied to the devices ahead of the step that
reads them (data.prefetch), the train state is donated, the step keys are made on the
devices (steps.key_maker), and metrics come back only every config.log_every steps. The
places that do copy between host and devices (restore and the first placement, logging,
checkpoints, the stage-2 switch) say so with jax.transfer_guard("allow"): train() called
under jax.transfer_guard("disallow") fails at any other copy (tests/test_multidevice.py). The
guard is per thread: data.prefetch's thread places the batches (explicit copies) unguarded.
"""

import os
import signal

import jax
import numpy as np
from absl import logging

from dmlora_jax import config_base, data, merge, pytrees, steps
from dmlora_jax.checkpointing import Checkpointer, ResumeError
from dmlora_jax.progress import MetricWriter, Progress, say
from dmlora_jax.setup import Plan, Setup


class _Stop:
  """SIGTERM (TPU VM preemption) sets a flag; the loop saves and exits 0."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    self.requested = True
    logging.warning("Received signal %d: will checkpoint and stop", signum)


def check_batch(batch_size: int, n_local: int) -> None:
  n_dev = n_local * jax.process_count()
  if batch_size % n_dev:
    raise config_base.ConfigError(f"config.batch_size={batch_size} is not divisible by the {n_dev} devices "
                                  f"({jax.process_count()} process(es) x {n_local} local)")


def checkpoint_meta(s: Setup, plan: Plan, step: int, stage: int) -> dict:
  return {"step": int(step), "stage": int(stage), "base_fingerprint": s.base_fingerprint,
          "method": s.config.method, "seed": int(s.config.seed), "steps_per_epoch": plan.steps_per_epoch,
          "stage1_config": config_base.stage1_fingerprint(s.config)}


def refuse_other_runs(s: Setup, plan: Plan, directory: str, meta: dict, same_method: bool = True) -> None:
  """Raises ResumeError when a checkpoint was not written by this run's configuration."""
  if meta.get("base_fingerprint") != s.base_fingerprint:
    raise ResumeError(f"{directory}: checkpoint {meta.get('step')} was trained from base "
                      f"weights {meta.get('base_fingerprint')}, but this config gives {s.base_fingerprint} "
                      "(different model.init_checkpoint or seed); use a new --workdir")
  if same_method and meta.get("method") != s.config.method:
    raise ResumeError(f"{directory}: checkpoint is method={meta.get('method')}, config "
                      f"says {s.config.method}; use a new --workdir")
  if meta.get("steps_per_epoch") != plan.steps_per_epoch:
    raise ResumeError(f"{directory}: checkpoint {meta.get('step')} was written with "
                      f"{meta.get('steps_per_epoch')} steps per epoch, this config gives "
                      f"{plan.steps_per_epoch} (batch_size or data changed); resuming would not be "
                      "exact: use a new --workdir")


def restore_trainable(s: Setup, plan: Plan, workdir: str) -> tuple[dict, dict] | None:
  """(trained leaves, meta) of the newest checkpoint of a workdir, without the optimizer
  state (for export and evaluation), or None if there is none. A workdir without checkpoints/
  is left as it was (no empty folder that a continuing run would take for a source)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = Checkpointer(workdir, s.config.keep_checkpoints)
  try:
    def targets(meta):
      refuse_other_runs(s, plan, ckpt.directory, meta)
      return {"trainable": s.trainable}
    got = ckpt.restore_latest(targets)
  finally:
    ckpt.close()
  if got is None:
    return None
  say(f"Restored checkpoint step {got[1]['step']} (stage {got[1]['stage']}) from {ckpt.directory}")
  return got[0]["trainable"], got[1]


class Trainer:
  """Both stages of one run (resumes by itself from the workdir's checkpoints)."""

  def __init__(self, s: Setup, task: data.Task, workdir: str):
    self.s, self.task, self.workdir = s, task, workdir
    self.config = s.config
    self.devices = jax.local_devices()
    self.par = steps.parallel(self.config.parallel)  # config.parallel: pmap or jit
    check_batch(self.config.batch_size, len(self.devices))
    self.plan = s.plan(task.train.num_examples_global)
    self.checkpointer = Checkpointer(workdir, self.config.keep_checkpoints)
    self.base_key = jax.random.key(self.config.seed)
    self._compiled = {}

  def train_step(self, stage: int):
    """(the step of config.parallel, optimizer, lr schedule) of a stage, compiled once."""
    if stage not in self._compiled:
      tx, lr = self.s.optimizer(stage, self.plan)
      fn = steps.make_train_step(self.s.model, tx, self.s.step_config(stage, self.plan))
      self._compiled[stage] = (self.par.train_step(fn), tx, lr)
    return self._compiled[stage]

  def save(self, state_dev, stage: int) -> int:
    with jax.transfer_guard("allow"):  # a checkpoint point
      return self._save(state_dev, stage)

  def _save(self, state_dev, stage: int) -> int:
    host = self.par.get(state_dev.replace(frozen=None))
    step = int(host.step)
    self.checkpointer.save(step, {"trainable": host.trainable, "opt_state": host.opt_state},
                           checkpoint_meta(self.s, self.plan, step, stage))
    logging.info("Saved checkpoint at step %d (stage %d)", step, stage)
    return step

  def _targets(self, directory: str, same_method: bool = True):
    def targets(meta):
      refuse_other_runs(self.s, self.plan, directory, meta, same_method)
      st = self.s.host_state(meta["stage"], self.plan)
      return {"trainable": st.trainable, "opt_state": st.opt_state}
    return targets

  def restore(self) -> tuple[steps.TrainState, int] | None:
    got = self.checkpointer.restore_latest(self._targets(self.checkpointer.directory))
    if got is None:
      if not self.config.stage2.init_from:
        return None
      got = self._stage1_from(self.config.stage2.init_from)
    else:
      say(f"Resumed from checkpoint step {got[1]['step']} (stage {got[1]['stage']}) in {self.checkpointer.directory}")
    items, meta = got
    state = steps.TrainState(step=np.int32(meta["step"]), trainable=items["trainable"], frozen=self.s.device_frozen(),
                             opt_state=items["opt_state"])
    return state, meta["stage"]

  def _stage1_from(self, source: str) -> tuple[dict, dict]:
    """stage2.init_from: the end-of-stage-1 checkpoint of another run whose stage 1 is this
    config's (same base weights, seed, data and every stage-1 setting; its method may be
    another with the same stage 1, e.g. dropout for dmlora)."""
    step = self.plan.stage1_steps
    where = f"config.stage2.init_from={source}"
    if not os.path.isdir(os.path.join(source, "checkpoints")):
      raise ResumeError(f"{where}: no checkpoints/ folder there")
    src = Checkpointer(source, read_only=True)
    try:
      if step not in src.all_steps():
        raise ResumeError(f"{where}: no checkpoint at step {step} (the end of stage 1) among {src.all_steps()}; "
                          "the source run must have finished stage 1 and kept that checkpoint")
      base = self._targets(src.directory, same_method=False)
      mine = config_base.stage1_fingerprint(self.config)

      def targets(meta):
        if meta.get("stage1_config") != mine:
          raise ResumeError(f"{where}: its stage 1 was run with another configuration (stage-1 fingerprint "
                            f"{meta.get('stage1_config')}, this config {mine}): only stage2.* may differ")
        return base(meta)

      got = src.restore(step, targets)
    finally:
      src.close()
    say(f"Stage 1 taken from {source} (checkpoint {step}); training stage 2 only")
    return got

  def batches(self, epoch: int, skip: int):
    """One epoch's batches from `skip` on, placed as config.parallel's step reads them. Run
    inside data.prefetch, the host-to-device copy overlaps the running step (except in a
    multi-process pmap, which takes host arrays)."""
    it = data.train_batches(self.task.train, self.config.batch_size, self.config.seed, epoch,
                            jax.process_index(), jax.process_count())
    for i, b in enumerate(it):
      if i >= skip:
        yield self.par.put_batch(b)

  def _start_stage2(self, state_dev, step: int):
    c = self.config
    with jax.transfer_guard("allow"):  # a checkpoint point: the stage-2 state is built on the host
      trainable = self.par.get(state_dev.trainable)
      state_dev = self.par.put_state(self.s.host_state(2, self.plan, trainable, step))
    self.save(state_dev, 2)
    n_mod = len(merge.adapted_modules(self.s.params))
    n_free = n_mod if c.stage2.granularity == "module" else self.s.model.cfg.depth
    say(f"Stage 2 (2S-LS): learning {n_free} scale(s) alpha_l (one per {c.stage2.granularity}, "
        f"{n_mod} adapted modules) as log alpha_l at lr {c.stage2.lr:g}")
    return state_dev

  def train(self):
    """Runs (or resumes) both stages; returns the final device state, or None if stopped early."""
    c, plan = self.config, self.plan
    with jax.transfer_guard("allow"):  # restore and the first placement on the devices
      restored = self.restore()
      if restored is None:
        state, stage = self.s.host_state(1, plan), 1
      else:
        state, stage = restored
      step = int(state.step)
      state_dev = self.par.put_state(state)
      counter = self.par.put_replicated(np.int32(step))  # the step number, on the devices
    next_key = steps.key_maker(c.seed)
    stop = _Stop()
    # Several processes agree on preemption through orbax's sync point (JAX's preemption
    # notifier catches SIGTERM); one process alone uses its own handler.
    multi = jax.process_count() > 1
    old = None if multi else signal.signal(signal.SIGTERM, stop)
    writer = MetricWriter(self.workdir, enabled=jax.process_index() == 0)
    progress = Progress(plan.total, step, c.batch_size, enabled=jax.process_index() == 0)
    try:
      if step == 0 and plan.total > 0:
        self.save(state_dev, stage)  # step 0: a restart before the first save resumes at once
      while step < plan.total:
        if stage == 1 and step >= plan.stage1_steps:  # the 2S-LS boundary
          state_dev, stage = self._start_stage2(state_dev, step), 2
        step_fn, _, lr_fn = self.train_step(stage)
        stage_end = plan.stage1_steps if stage == 1 else plan.total
        epoch, skip = divmod(step, plan.steps_per_epoch)
        for batch in data.prefetch(self.batches(epoch, skip)):
          key, counter = next_key(counter)  # fold_in(base_key, step), made on the devices
          state_dev, metrics = step_fn(state_dev, batch, key)
          step += 1
          if step % c.log_every == 0 or step == stage_end:
            with jax.transfer_guard("allow"):  # the logging point: the step's metrics to the host
              m = {k: float(self.par.first(v)) for k, v in metrics.items() if k != "masks"}
              stage_step = step - (0 if stage == 1 else plan.stage1_steps)
              m["lr"] = float(lr_fn(stage_step - 1))
            m["images_per_s"] = progress.update(step, stage, m)
            writer.write(step, stage, m)
          if stop.requested or self.checkpointer.reached_preemption(step):
            self.save(state_dev, stage)
            say(f"Stopped at step {step} by a termination signal; checkpoint saved. Run the same command "
                "to resume.")
            return None
          if step % c.checkpoint_every == 0 and step != plan.stage1_steps:
            self.save(state_dev, stage)
          if step >= stage_end or step % plan.steps_per_epoch == 0:
            break
      self.save(state_dev, stage)
      return state_dev
    finally:
      if old is not None:
        signal.signal(signal.SIGTERM, old)
      writer.close()

  def final_params(self, state_dev) -> dict:
    host = self.par.get(state_dev.replace(frozen=None))
    return pytrees.join(self.s.frozen, host.trainable)

  def close(self) -> None:
    self.checkpointer.close()

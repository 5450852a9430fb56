"""config.parallel=pmap and =jit on 4 CPU devices, for tests/multidevice_steps.py (which
runs under XLA_FLAGS=--xla_force_host_platform_device_count=4 and reuses its task and model
here, to save building them again): the trainer in each mode, run whole (stage 1, logging and
checkpoints) under jax.transfer_guard("disallow") and then evaluated, and the branch masks of
two steps on every device. Returns a JSON-able report (tests/test_multidevice.py reads it)."""

import dataclasses
import tempfile
import time

import jax
import numpy as np

from dmlora_jax import config_base, evaluation, merge, pytrees, steps, training
from trainer_utils import tiny_config


def parallel_report(built, task) -> dict:
  """`built`: a setup.Setup of the tiny dmlora model; `task`: the digits task, both decoded."""
  assert jax.local_device_count() == 4, jax.devices()
  # batch 200 of the 1,000 digits: 5 steps of stage 1 (one compiled step per mode). Only
  # config.parallel differs between the two runs.
  base = config_base.resolve(tiny_config(batch_size=200, stage2_epochs=0, log_every=2, checkpoint_every=2, **{
      "dmlora.drop_start": 0.5, "dmlora.drop_end": 0.5, "dmlora.min_active": 0}))
  report = {}
  exports = {}
  for parallel in ("pmap", "jit"):
    c = base.copy_and_resolve_references()
    c.parallel = parallel
    run = training.Trainer(dataclasses.replace(built, config=c), task, tempfile.mkdtemp())
    r = report[parallel] = {}
    # Any host <-> device copy outside the trainer's allowed points (restore, logging,
    # checkpoints, the stage-2 switch) raises here.
    t0 = time.time()
    try:
      with jax.transfer_guard("disallow"):
        state = run.train()
      r["guarded_run"] = "ok"
    except Exception as e:  # reported, so that the test shows the copy that was refused
      r["guarded_run"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      state = None
    r["train_s"] = time.time() - t0
    if state is not None:
      r["steps"] = int(run.par.first(state.step))
      exports[parallel] = merge.merge_params(run.final_params(state))
      # The evaluator of the same mode on the trained state (the trainer's own evaluation).
      ev = evaluation.Evaluator(built.model, c.data.normalization, c.batch_size, run.devices, parallel)
      r["accuracy"] = ev(state, task.evals)
    # Two stage-1 steps by hand, placed as the parallel mode places them: the masks per
    # device. The keys as the trainer makes them (the same placement: the step is reused).
    fn = run.train_step(1)[0]
    st = run.par.put_state(run.s.host_state(1, run.plan))
    counter = run.par.put_replicated(np.int32(0))
    next_key = steps.key_maker(c.seed)
    batches = run.batches(0, 0)
    masks = []
    for i in range(2):
      key, counter = next_key(counter)
      st, m = fn(st, next(batches), key)
      masks.append(run.par.copies(m["masks"]))
    r["mask_copies"] = len(masks[0])
    r["masks_equal_across_devices"] = [all(np.array_equal(c[0], x) for x in c) for c in masks]
    r["masks_differ_across_steps"] = not np.array_equal(masks[0][0], masks[1][0])
    r["masks"] = [c[0].tolist() for c in masks]
    run.close()

  if len(exports) == 2:
    a, b = (pytrees.flatten(exports[p]) for p in ("pmap", "jit"))
    report["same_keys"] = set(a) == set(b)
    report["max_abs_diff_export"] = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
  return report

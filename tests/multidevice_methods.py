"""The comparison methods (DoRA, AdaLoRA, SSF, VPT-deep) under data parallelism, imported by
multidevice_steps.py (4 simulated CPU devices). For each method, the per-device step with SGD
over 4 devices x 8 images equals it over 1 device x 32 images (the pmean-ed gradient is the
full batch's gradient): a second formulation. For AdaLoRA, whose optimizer is its own (the
rank allocator scores every triplet from the gradients and prunes), the trainer's own pmap
step must also leave the same trained leaves and optimizer state, bit for bit, on every
device; the other methods train with the AdamW of every other row."""

import tempfile

import jax
import numpy as np
import optax

from dmlora_jax import steps
from trainer_utils import make_trainer, tiny_config

METHODS = ("dora", "adalora", "ssf", "vpt_deep")
# Short AdaLoRA schedule so that two steps cross the warm-up into rank allocation.
OVERRIDES = {"adalora": {"adalora.tinit": 0, "adalora.tfinal": 0, "adalora.delta_t": 1}}


def method_report(method: str) -> dict:
  c = tiny_config(method=method, batch_size=32, **OVERRIDES.get(method, {}))
  run = make_trainer(c, tempfile.mkdtemp())
  rng = np.random.default_rng(1)
  # Non-zero trained leaves (LoRA's B starts at 0, SSF at identity) so every gradient path is live.
  trainable = jax.tree.map(lambda x: (np.asarray(x) + rng.standard_normal(x.shape) * 0.05).astype(x.dtype),
                           run.s.trainable)
  host = run.s.host_state(1, run.plan, trainable)
  batches = [next(run.batches(0, 0)), next(run.batches(1, 0))]
  report = {"num_devices": len(run.devices)}
  if method == "adalora":
    fn = run.train_step(1)[0]
    state = steps.replicate(host, run.devices)
    for i, b in enumerate(batches):
      state, _ = fn(state, b, jax.random.fold_in(run.base_key, i))
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.trainable, state.opt_state))]
    trained4 = [np.asarray(x[0]) for x in jax.tree.leaves(state.trainable)]
    report["state_equal_across_devices"] = all(np.array_equal(x[0], x[d]) for x in leaves for d in range(x.shape[0]))
    report["adam_max_update"] = max(float(np.max(np.abs(a - np.asarray(b))))
                                    for a, b in zip(trained4, jax.tree.leaves(trainable)))

  sgd = optax.sgd(0.5)
  step_fn = steps.make_train_step(run.s.model, sgd, run.s.step_config(1, run.plan))
  sgd_host = host.replace(opt_state=sgd.init(trainable))
  out = {}
  for n in (4, 1):
    devs = jax.local_devices()[:n]
    pm = jax.pmap(step_fn, axis_name=steps.AXIS, in_axes=(0, 0, None), devices=devs)
    st = steps.replicate(sgd_host, devs)
    b = {k: np.asarray(v).reshape((n, -1) + np.shape(v)[2:]) for k, v in batches[0].items()}
    st, m = pm(st, b, run.base_key)
    out[n] = ([np.asarray(x[0]) for x in jax.tree.leaves(st.trainable)], float(np.asarray(m["loss"])[0]))
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(out[4][0], out[1][0]))
  moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(out[4][0], jax.tree.leaves(trainable)))
  return {**report, "max_abs_diff_4_vs_1_device": diff, "sgd_max_update": moved,
          "loss_4": out[4][1], "loss_1": out[1][1]}


def methods_report() -> dict:
  return {m: method_report(m) for m in METHODS}

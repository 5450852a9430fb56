"""Run with 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4) by
test_multidevice.py: prints a JSON report of masks per device, pmap vs shard_map, and
config.parallel=pmap vs =jit (parallel_steps.py)."""

import json
import sys
import tempfile

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmlora_jax import steps
from multidevice_methods import methods_report
from parallel_steps import parallel_report
from trainer_utils import make_trainer, tiny_config

assert jax.local_device_count() == 4, jax.devices()
c = tiny_config(batch_size=32, **{"dmlora.drop_start": 0.5, "dmlora.drop_end": 0.5, "dmlora.min_active": 0})
run = make_trainer(c, tempfile.mkdtemp())
rng = np.random.default_rng(0)
trainable = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype), run.s.trainable)
host = run.s.host_state(1, run.plan, trainable)
batches = [next(run.batches(0, 0)), next(run.batches(1, 0))]

# The trainer's pmap step (AdamW), two steps with the trainer's own keys: the masks.
fn = run.train_step(1)[0]
state = steps.replicate(host, run.devices)
masks = []
for i, b in enumerate(batches):
  state, m = fn(state, b, jax.random.fold_in(run.base_key, i))
  masks.append(np.asarray(m["masks"]))  # (devices, depth, targets, K)
# Every device applied the same masked update: trained leaves and optimizer state (moments,
# per-branch step counts) are the same bits on all four.
per_device = [np.asarray(x) for x in jax.tree.leaves((state.trainable, state.opt_state))]
state_equal = all(np.array_equal(x[0], x[d]) for x in per_device for d in range(4))

# The same per-device step under pmap and under jit + shard_map over a 1-D mesh with the
# same axis name. SGD, so that the parameter change is the averaged gradient itself (Adam's
# first step is ~lr * sign(g), which would magnify rounding in near-zero gradients).
sgd = optax.sgd(0.1)
step_fn = steps.make_train_step(run.s.model, sgd, run.s.step_config(1, run.plan))
sgd_host = host.replace(opt_state=sgd.init(trainable))
pm = steps.pmap_train_step(step_fn)
state = steps.replicate(sgd_host, run.devices)
for i, b in enumerate(batches):
  state, m1 = pm(state, b, jax.random.fold_in(run.base_key, i))
pmapped = steps.unreplicate(state.trainable)
mesh = Mesh(np.array(run.devices), (steps.AXIS,))
sm = steps.shard_map_train_step(step_fn, mesh)
st = jax.device_put(sgd_host, NamedSharding(mesh, P()))
for i, b in enumerate(batches):
  flat = {k: jax.device_put(v.reshape((-1,) + v.shape[2:]), NamedSharding(mesh, P(steps.AXIS))) for k, v in b.items()}
  st, m2 = sm(st, flat, jax.random.fold_in(run.base_key, i))
sharded = jax.tree.map(np.asarray, st.trainable)

keys = jax.pmap(lambda _, k: jax.random.key_data(steps.device_key(k)), axis_name=steps.AXIS,
                in_axes=(0, None))(np.zeros(4), jax.random.key(3))
keys = np.asarray(keys).reshape(4, -1)

# A drop-path run compiles and trains under pmap (per-device rngs).
c2 = tiny_config(batch_size=32, **{"model.drop_path": 0.3})
run2 = make_trainer(c2, tempfile.mkdtemp())
st2, m3 = run2.train_step(1)[0](steps.replicate(run2.s.host_state(1, run2.plan), run2.devices), next(run2.batches(0, 0)),
                               jax.random.key(0))

# config.parallel=pmap vs =jit, each trained under jax.transfer_guard("disallow") (parallel_steps.py).
parallel = parallel_report(run.s, run.task)

diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(pmapped), jax.tree.leaves(sharded))]
moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(pmapped), jax.tree.leaves(trainable))]
json.dump({
    "state_equal_across_devices": bool(state_equal),
    "masks_equal_across_devices": [bool(all(np.array_equal(m[0], m[d]) for d in range(4))) for m in masks],
    "masks_differ_across_steps": bool(not np.array_equal(masks[0][0], masks[1][0])),
    "mask_shape": list(masks[0].shape),
    "kept_fraction": [float((m[0] > 0).mean()) for m in masks],
    "shard_map_masks_equal_pmap": bool(np.array_equal(np.asarray(m2["masks"]), masks[1][0])),
    "max_abs_diff_pmap_vs_shard_map": max(diffs),
    "max_update": max(moved),
    "device_keys_distinct": len({tuple(k) for k in keys}) == 4,
    "drop_path_loss": float(np.asarray(m3["loss"])[0]),
    "loss_pmap": float(np.asarray(m1["loss"])[0]), "loss_shard_map": float(np.asarray(m2["loss"])),
    "parallel": parallel,
    "methods": methods_report(),
}, sys.stdout)

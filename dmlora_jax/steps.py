"""The per-device train and eval steps, their pmap / shard_map wrappers, and the two ways a
run lays them out over the devices (config.parallel: `Pmap`, `Jit`).

The train step is a pure function `(state, batch, step_key) -> (state, metrics)`.
- Branch masks come from `step_key` alone (the caller passes fold_in(base_key, step), the
  same on every device), so all devices drop the same branches in a step: a dropped
  branch takes no part in that iteration anywhere. Randomness that should differ per
  device (drop-path) uses `device_key`, which folds in `lax.axis_index(axis_name)`.
- p(t) is computed from `state.step` inside the compiled function: no recompilation.
- Gradients are taken w.r.t. the leaves trained in this stage only, so the frozen weights'
  gradients are never computed (XLA sees no use for them), and averaged across devices.
- With config.model.scan_layers the state's frozen leaves are already stacked over depth
  (setup.Setup.host_state) and the trainable ones are public (checkpoints, the optimizer's
  per-path labels and branch keep, 2S-LS all read block names): `layout.for_model` stacks the
  trainable leaves inside the step (a copy of those leaves only) and the gradient flows
  back through the stack to the public leaves.
- The same masks reach the optimizer (`dmlora.branch_keep` -> `optimizers.masked_adamw`): a dropped
  branch's lora_a, lora_b, Adam moments and step count leave the step bit-identical.
"""

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmlora_jax import dmlora, layout, optimizers, partition, pytrees, schedules
from dmlora_jax.data import normalize

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the global step over both stages
  trainable: Any  # the leaves this method ever trains (nested dict)
  frozen: Any  # everything else; returned untouched (donated, so never copied)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What one stage's step does, as the method table and config say (setup.Setup.step_config)."""
  trained: frozenset  # the partition labels that receive gradients in this stage
  normalization: str
  stage1_steps: int
  drop: bool = False  # branch dropout in this step (stage 1 of a dropout method)
  drop_schedule: str = "linear"
  drop_start: float = 0.0
  drop_end: float = 0.0
  drop_steps: int = 4
  min_active: int = 1
  rescale: bool = True
  mask_shape: tuple[int, ...] | None = None  # (depth, num_targets, K); None = no adapter
  targets: tuple[str, ...] = ()  # the adapted projections, in the order of the masks' axis 1

  def __post_init__(self):
    if self.mask_shape is not None and len(self.targets) != self.mask_shape[1]:
      raise ValueError(f"StepConfig: mask_shape {self.mask_shape} has {self.mask_shape[1]} targets, but targets "
                       f"names {len(self.targets)}: {self.targets}")

  @property
  def uses_masks(self) -> bool:
    return self.drop and self.mask_shape is not None


def drop_probability(sc: StepConfig, step) -> jax.Array:
  if not sc.uses_masks:
    return jnp.float32(0.0)
  return schedules.drop_probability(step, sc.stage1_steps, sc.drop_schedule, sc.drop_start, sc.drop_end,
                                    sc.drop_steps)


def device_key(step_key: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """A key for this device's own randomness in a step: fold_in(step_key, device index)."""
  return jax.random.fold_in(jax.random.fold_in(step_key, 1), jax.lax.axis_index(axis_name))


def make_train_step(model, tx: optax.GradientTransformation, sc: StepConfig, axis_name: str = AXIS) -> Callable:
  """The per-device step; run it under pmap or shard_map with `axis_name`."""
  trained = sc.trained
  tx = optax.with_extra_args_support(tx)  # a plain optax optimizer ignores the keep= flags

  def step_fn(state: TrainState, batch: dict, step_key: jax.Array):
    diff, held = partition.split(state.trainable, trained)
    images = normalize(batch["image"], sc.normalization)
    labels = batch["label"]
    p = drop_probability(sc, state.step)
    masks = None
    if sc.uses_masks:
      masks = schedules.branch_masks(step_key, p, sc.mask_shape, sc.min_active, sc.rescale)

    # Drop-path differs per device (each holds other examples): the device index is folded
    # in. The branch masks above do not: every device drops the same branches.
    rngs = {"drop_path": device_key(step_key, axis_name)}

    def loss_fn(diff):
      params = layout.for_model(model, pytrees.join(state.frozen, held, diff))
      logits = model.apply({"params": params}, images, masks, train=True, rngs=rngs).astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(diff)
    grads = jax.lax.pmean(grads, axis_name)
    # multi_transform wants the whole owned tree; the held leaves get zero updates and
    # are not touched below, so they stay bit-identical.
    full_grads = pytrees.join(jax.tree.map(jnp.zeros_like, held), grads)
    keep = dmlora.branch_keep(state.trainable, masks, sc.targets)
    extra = {} if keep is None else {"keep": keep}
    updates, opt_state = tx.update(full_grads, state.opt_state, state.trainable, **extra)
    upd_diff, _ = partition.split(updates, trained)
    keep_diff = None if keep is None else partition.split(keep, trained)[0]
    trainable = pytrees.join(held, optimizers.apply_kept_updates(diff, upd_diff, keep_diff))
    metrics = {
        # The step's keep multipliers (device-invariant by construction; tests compare devices).
        "masks": masks if masks is not None else jnp.zeros((0,), jnp.float32),
        "loss": jax.lax.pmean(loss, axis_name),
        "accuracy": jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), axis_name),
        "drop_p": p,
    }
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return step_fn


def make_eval_step(model, normalization: str, axis_name: str = AXIS) -> Callable:
  """Per-device eval: all branches, no rescale. Returns (correct, count) summed over devices."""

  def eval_fn(state: TrainState, batch: dict):
    params = layout.for_model(model, pytrees.join(state.frozen, state.trainable))
    logits = model.apply({"params": params}, normalize(batch["image"], normalization))
    hit = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * batch["mask"]
    return jax.lax.psum(hit.sum(), axis_name), jax.lax.psum(batch["mask"].sum(), axis_name)

  return eval_fn


# ---- wrappers ----

def pmap_train_step(step_fn: Callable) -> Callable:
  """pmap over local devices; state and batch carry a leading device axis, the key does not."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def pmap_eval_step(eval_fn: Callable) -> Callable:
  return jax.pmap(eval_fn, axis_name=AXIS, in_axes=(0, 0))


def shard_map_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """The same per-device step under jit + shard_map over a 1-D mesh with axis AXIS.
  The state is replicated (no device axis), the batch is split along its first axis."""
  # check_vma=False keeps pmap's semantics: the gradient of a replicated input is the
  # per-device gradient (reduced by our explicit pmean), not implicitly psum-ed by autodiff.
  f = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()), check_vma=False)
  return jax.jit(f, donate_argnums=(0,))


def shard_map_eval_step(eval_fn: Callable, mesh: Mesh) -> Callable:
  """The eval step under jit + shard_map: state replicated, batch split along its first axis."""
  f = jax.shard_map(eval_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
  return jax.jit(f)


def local_sharding(devices=None) -> NamedSharding:
  """Splits a leading axis over the local devices, as pmap lays out its inputs."""
  return NamedSharding(Mesh(np.array(devices or jax.local_devices()), (AXIS,)), P(AXIS))


def replicate(tree: Any, devices=None) -> Any:
  """Host tree -> the same tree with a leading axis over the local devices, on them."""
  devices = devices or jax.local_devices()
  n = len(devices)
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), tree)
  if jax.process_count() > 1:
    return stacked  # pmap over several processes takes host arrays with a local-device axis
  return jax.device_put(stacked, local_sharding(devices))


def first_device(x) -> np.ndarray:
  """The first local device's entry of an array with a leading local-device axis, on the host."""
  return np.array(x[0]) if isinstance(x, np.ndarray) else np.asarray(x.addressable_data(0))[0]


def unreplicate(tree: Any) -> Any:
  """The first local device's copy of a replicated tree, as host numpy arrays."""
  return jax.tree.map(first_device, tree)


def shard_batch(batch: dict, num_devices: int) -> dict:
  """(local_batch, ...) -> (num_devices, local_batch // num_devices, ...)."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


# ---- config.parallel: how a run places its state and batches, and runs the steps ----

class Pmap:
  """config.parallel=pmap (the default): the steps pmapped over the local devices; the state
  and batches carry a leading local-device axis. With several processes, pmap takes host
  arrays (replicated state, each process's own batch) and joins the processes itself."""
  name = "pmap"

  def __init__(self, devices=None):
    self.devices = list(devices or jax.local_devices())
    self.multi = jax.process_count() > 1
    # Where a device-resident scalar every device reads (the step counter of the keys) lives.
    self.replicated = None if self.multi else NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P())

  def train_step(self, step_fn: Callable) -> Callable:
    return pmap_train_step(step_fn)

  def eval_step(self, eval_fn: Callable) -> Callable:
    return pmap_eval_step(eval_fn)

  def put_state(self, tree: Any) -> Any:
    return replicate(tree, self.devices)

  def put_batch(self, batch: dict) -> dict:
    """This process's batch (local_batch, ...) -> (local devices, local_batch / devices, ...)."""
    b = shard_batch(batch, len(self.devices))
    return b if self.multi else jax.device_put(b, local_sharding(self.devices))

  def put_replicated(self, x):
    return x if self.replicated is None else jax.device_put(x, self.replicated)

  def get(self, tree: Any) -> Any:
    """A replicated device tree -> host numpy (the first local device's copy)."""
    return unreplicate(tree)

  def first(self, x) -> np.ndarray:
    return first_device(x)

  def copies(self, x) -> list[np.ndarray]:
    """Every local device's copy of a per-device output (tests compare them)."""
    return list(np.asarray(x))


class Jit:
  """config.parallel=jit: the same per-device step under jax.jit (+ shard_map, which gives it
  the named axis its pmean and device key use) with a data-parallel NamedSharding over all
  devices of all processes: the batch is split along its leading axis, the state replicated.
  Arrays have no device axis; several processes each contribute their own rows of the global
  batch (jax.make_array_from_process_local_data)."""
  name = "jit"

  def __init__(self, devices=None):
    self.devices = list(devices or jax.devices())
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.split = NamedSharding(self.mesh, P(AXIS))

  def train_step(self, step_fn: Callable) -> Callable:
    return shard_map_train_step(step_fn, self.mesh)

  def eval_step(self, eval_fn: Callable) -> Callable:
    return shard_map_eval_step(eval_fn, self.mesh)

  def put_state(self, tree: Any) -> Any:
    return jax.tree.map(self.put_replicated, tree)

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.split, np.asarray(v)) for k, v in batch.items()}

  def put_replicated(self, x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

  def get(self, tree: Any) -> Any:
    return jax.tree.map(self.first, tree)

  def first(self, x) -> np.ndarray:
    return np.asarray(x.addressable_data(0))

  def copies(self, x) -> list[np.ndarray]:
    return [np.asarray(s.data) for s in x.addressable_shards]


PARALLEL = {"pmap": Pmap, "jit": Jit}


def parallel(name: str = "pmap", devices=None) -> Pmap | Jit:
  """The layout of config.parallel; `devices` defaults to the local devices (pmap) or all
  devices of all processes (jit)."""
  return PARALLEL[name](devices)


def key_maker(seed: int) -> Callable:
  """Compiled counter -> (fold_in(key(seed), counter), counter + 1): each step's key made on
  the devices from a device-resident counter, so that the loop sends nothing to the devices
  per step (a Python step number would be a host-to-device copy every step). The keys are
  bit-identical to fold_in(jax.random.key(seed), step) made on the host."""
  return jax.jit(lambda counter: (jax.random.fold_in(jax.random.key(seed), counter), counter + 1))

"""Fine-tuning one task: stage 1 (branches + head, branch dropout), stage 2 (per-layer
scales, 2S-LS), evaluation, orbax resume, and the merged export.

Everything with side effects (devices, files, logging) lives here; the maths is in
steps.py, partition.py, schedules.py and merge.py.
"""

import dataclasses
import hashlib
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dmlora_jax import data, dmlora, hostmem, merge, npz, partition, steps, vit
from dmlora_jax.checkpointing import Checkpointer, ResumeError
from dmlora_jax.progress import MetricWriter, Progress, print_summary, say

METHODS = ("dmlora", "lora", "full", "linear")


class ConfigError(ValueError):
  pass


# Errors that are the user's input, reported as one line by main (no traceback).
USER_ERRORS = (ConfigError, ResumeError, npz.CheckpointError, data.DataError, FileNotFoundError)


# ---- model ----

def adapter_spec(config) -> dmlora.AdapterSpec | None:
  """The branch layout of a method. LoRA is DMLoRA with K = 1 (and no dropout, no stage 2)."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method must be one of {METHODS}, got {config.method!r}")
  if config.method in ("full", "linear"):
    return None
  d = config.dmlora
  k = 1 if config.method == "lora" else d.num_branches
  rank = d.rank
  if d.split_rank and k > 1:
    if d.rank % k:
      raise ConfigError(f"dmlora.split_rank: rank {d.rank} is not divisible by num_branches {k}")
    rank = d.rank // k
  return dmlora.AdapterSpec(num_branches=k, rank=rank, alpha=d.alpha, targets=tuple(d.targets), init=d.init)


def build_model(config, num_classes: int, adapter=None) -> vit.ViT:
  m = config.model
  cfg = vit.parse_variant(m.variant, num_classes, representation_size=m.representation_size,
                          gelu_approximate=m.gelu_approximate, dtype=m.dtype, remat=m.remat,
                          drop_path=m.drop_path)
  return vit.ViT(cfg, adapter)


def init_params(model: vit.ViT, config, image_size: int) -> tuple[dict, str]:
  """Random init from config.seed, then the base checkpoint if one is configured.
  Returns (params, fingerprint of the base weights)."""
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  params = jax.jit(model.init)(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
  params = jax.tree.map(np.asarray, params)
  path = config.model.init_checkpoint
  if path:
    return npz.load_pretrained(params, path)
  say("WARNING: model.init_checkpoint is empty; fine-tuning a randomly initialised backbone")
  base = {k: v for k, v in merge.flatten(params).items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  return params, "random:" + npz.fingerprint(base)


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ---- the run ----

@dataclasses.dataclass
class Plan:
  steps_per_epoch: int
  stage1_steps: int
  stage2_steps: int

  @property
  def total(self) -> int:
    return self.stage1_steps + self.stage2_steps

  def stage_of(self, step: int) -> int:
    return 1 if step < self.stage1_steps else 2


class _Stop:
  """SIGTERM (TPU VM preemption) sets a flag; the loop saves and exits 0."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    self.requested = True
    logging.warning("Received signal %d: will checkpoint and stop", signum)


def _check_stage2(config):
  s2 = config.stage2
  if s2.granularity not in ("module", "block"):
    raise ConfigError(f"config.stage2.granularity must be 'module' or 'block', got {s2.granularity!r}")
  if s2.epochs and config.method == "dmlora" and not s2.lr > 0:
    raise ConfigError(f"config.stage2.lr must be > 0 (or stage2.epochs=0 to skip 2S-LS), got {s2.lr}")


def _check_batch(config, n_local: int):
  n_dev = n_local * jax.process_count()
  if config.batch_size % n_dev:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the {n_dev} devices "
                      f"({jax.process_count()} process(es) x {n_local} local)")


class Run:
  """One fine-tuning run in a workdir (resumes by itself from its checkpoints)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, decode_train: bool = True,
               decode_eval: bool = True):
    self.config, self.workdir = config, workdir
    self.devices = jax.local_devices()
    self.n_local = len(self.devices)
    _check_batch(config, self.n_local)
    _check_stage2(config)
    self.adapter = adapter_spec(config)
    self.task = data.build_task(config.data, jax.process_index(), jax.process_count(), decode_train, decode_eval)
    self.num_classes = self.task.num_classes
    self.model = build_model(config, self.num_classes, self.adapter)
    self.params, self.base_fingerprint = init_params(self.model, config, config.data.image_size)
    owned = partition.owned_labels(config.method)
    self.trainable, self.frozen = partition.split(self.params, owned)
    spe = data.steps_per_epoch(self.task.train.num_examples_global, config.batch_size)
    if spe == 0:
      raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {self.task.train.num_examples_global} "
                        f"training examples of {self.task.train.name}")
    s2 = config.stage2.epochs if config.method == "dmlora" else 0
    self.plan = Plan(spe, config.stage1.epochs * spe, s2 * spe)
    self.checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    self.base_key = jax.random.key(config.seed)
    self._compiled = {}

  # -- pieces --
  def step_config(self, stage: int) -> steps.StepConfig:
    c, d = self.config, self.config.dmlora
    mask_shape = None
    if self.adapter is not None:
      mask_shape = (self.model.cfg.depth, len(self.adapter.targets), self.adapter.num_branches)
    drop = c.method == "dmlora"
    return steps.StepConfig(method=c.method, stage=stage, normalization=c.data.normalization,
                            stage1_steps=self.plan.stage1_steps, drop_schedule=d.drop_schedule,
                            drop_start=d.drop_start if drop else 0.0, drop_end=d.drop_end if drop else 0.0,
                            drop_steps=d.drop_steps, min_active=d.min_active, rescale=d.rescale,
                            mask_shape=mask_shape, targets=tuple(self.adapter.targets) if self.adapter else (),
                            stage2_train_head=c.stage2.train_head)

  def optimizer(self, stage: int):
    n = self.plan.stage1_steps if stage == 1 else self.plan.stage2_steps
    return partition.make_optimizer(self.config.method, stage, n, self.config)

  def train_step(self, stage: int):
    if ("train", stage) not in self._compiled:
      tx, lr = self.optimizer(stage)
      fn = steps.make_train_step(self.model, tx, self.step_config(stage))
      self._compiled[("train", stage)] = (steps.pmap_train_step(fn), tx, lr)
    return self._compiled[("train", stage)]

  def eval_step(self):
    if "eval" not in self._compiled:
      self._compiled["eval"] = steps.pmap_eval_step(steps.make_eval_step(self.model, self.config.data.normalization))
    return self._compiled["eval"]

  def host_state(self, stage: int, trainable=None, step: int = 0) -> steps.TrainState:
    trainable = self.trainable if trainable is None else trainable
    tx = self.train_step(stage)[1]
    return steps.TrainState(step=np.int32(step), trainable=trainable, frozen=self.frozen,
                            opt_state=jax.tree.map(np.asarray, tx.init(trainable)))

  def meta(self, step: int, stage: int) -> dict:
    return {"step": int(step), "stage": int(stage), "base_fingerprint": self.base_fingerprint,
            "method": self.config.method, "seed": int(self.config.seed),
            "steps_per_epoch": self.plan.steps_per_epoch, "stage1_config": stage1_fingerprint(self.config)}

  def save(self, state_dev, stage: int):
    host = steps.unreplicate(state_dev.replace(frozen=None))
    step = int(host.step)
    self.checkpointer.save(step, {"trainable": host.trainable, "opt_state": host.opt_state}, self.meta(step, stage))
    logging.info("Saved checkpoint at step %d (stage %d)", step, stage)
    return step

  def _target(self, directory: str):
    """target_for_meta of Checkpointer.restore: refuses a checkpoint of another run."""

    def target(meta):
      if meta.get("base_fingerprint") != self.base_fingerprint:
        raise ResumeError(f"{directory}: checkpoint {meta.get('step')} was trained from base "
                          f"weights {meta.get('base_fingerprint')}, but this config gives {self.base_fingerprint} "
                          "(different model.init_checkpoint or seed); use a new --workdir")
      if meta.get("method") != self.config.method:
        raise ResumeError(f"{directory}: checkpoint is method={meta.get('method')}, config "
                          f"says {self.config.method}; use a new --workdir")
      if meta.get("steps_per_epoch") != self.plan.steps_per_epoch:
        raise ResumeError(f"{directory}: checkpoint {meta.get('step')} was written with "
                          f"{meta.get('steps_per_epoch')} steps per epoch, this config gives "
                          f"{self.plan.steps_per_epoch} (batch_size or data changed); resuming would not be "
                          "exact: use a new --workdir")
      s = self.host_state(meta["stage"])
      return {"trainable": s.trainable, "opt_state": s.opt_state}

    return target

  def restore(self) -> tuple[steps.TrainState, int] | None:
    got = self.checkpointer.restore_latest(self._target(self.checkpointer.directory))
    if got is None:
      if not self.config.stage2.init_from:
        return None
      got = self._stage1_from(self.config.stage2.init_from)
    else:
      say(f"Resumed from checkpoint step {got[1]['step']} (stage {got[1]['stage']}) in {self.checkpointer.directory}")
    tree, meta = got
    state = steps.TrainState(step=np.int32(meta["step"]), trainable=tree["trainable"], frozen=self.frozen,
                             opt_state=tree["opt_state"])
    return state, meta["stage"]

  def _stage1_from(self, source: str) -> tuple[dict, dict]:
    """stage2.init_from: the end-of-stage-1 checkpoint of another run whose stage 1 is this
    config's (same base weights, seed, data, method and every stage-1 setting)."""
    step = self.plan.stage1_steps
    where = f"config.stage2.init_from={source}"
    if not os.path.isdir(os.path.join(source, "checkpoints")):
      raise ResumeError(f"{where}: no checkpoints/ folder there")
    src = Checkpointer(source, read_only=True)
    try:
      if step not in src.all_steps():
        raise ResumeError(f"{where}: no checkpoint at step {step} (the end of stage 1) among {src.all_steps()}; "
                          "the source run must have finished stage 1 and kept that checkpoint")
      base_target = self._target(src.directory)
      mine = stage1_fingerprint(self.config)

      def target(meta):
        if meta.get("stage1_config") != mine:
          raise ResumeError(f"{where}: its stage 1 was run with another configuration (stage-1 fingerprint "
                            f"{meta.get('stage1_config')}, this config {mine}): only stage2.* may differ")
        return base_target(meta)

      got = src.restore(step, target)
    finally:
      src.close()
    say(f"Stage 1 taken from {source} (checkpoint {step}); training stage 2 only")
    return got

  def batches(self, epoch: int, skip: int):
    """One epoch's batches from `skip` on, with a leading local-device axis. Run inside
    data.prefetch, the host-to-device copy overlaps the running step (single process;
    a multi-process pmap takes host arrays)."""
    it = data.train_batches(self.task.train, self.config.batch_size, self.config.seed, epoch,
                            jax.process_index(), jax.process_count())
    sharding = steps.local_sharding(self.devices) if jax.process_count() == 1 else None
    for i, b in enumerate(it):
      if i >= skip:
        b = steps.shard_batch(b, self.n_local)
        yield b if sharding is None else jax.device_put(b, sharding)

  def evaluate(self, state_dev) -> dict[str, float]:
    ev = self.eval_step()
    out = {}
    for name, split in self.task.evals.items():
      correct = total = 0.0
      for b in data.eval_batches(split, self.config.batch_size, jax.process_index(), jax.process_count()):
        c, n = ev(state_dev, steps.shard_batch(b, self.n_local))
        correct += float(steps.first_device(c))
        total += float(steps.first_device(n))
      if int(total) != split.num_examples_global:
        raise RuntimeError(f"evaluation of {name} covered {int(total)} of {split.num_examples_global} examples")
      out[name] = correct / total
    return out

  # -- the loop --
  def train(self) -> steps.TrainState:
    """Runs (or resumes) both stages; returns the final device state, or None if stopped early."""
    c, plan = self.config, self.plan
    restored = self.restore()
    if restored is None:
      state, stage = self.host_state(1), 1
    else:
      state, stage = restored
    step = int(state.step)
    state_dev = steps.replicate(state, self.devices)
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
          trainable = steps.unreplicate(state_dev.trainable)
          state_dev = steps.replicate(self.host_state(2, trainable, step), self.devices)
          stage = 2
          self.save(state_dev, stage)
          n_mod = len(merge.adapted_modules(self.params))
          n_free = n_mod if c.stage2.granularity == "module" else self.model.cfg.depth
          say(f"Stage 2 (2S-LS): learning {n_free} scale(s) alpha_l (one per {c.stage2.granularity}, "
              f"{n_mod} adapted modules) as log alpha_l at lr {c.stage2.lr:g}")
        step_fn, _, lr_fn = self.train_step(stage)
        stage_end = plan.stage1_steps if stage == 1 else plan.total
        epoch, skip = divmod(step, plan.steps_per_epoch)
        for batch in data.prefetch(self.batches(epoch, skip)):
          key = jax.random.fold_in(self.base_key, step)
          state_dev, metrics = step_fn(state_dev, batch, key)
          step += 1
          if step % c.log_every == 0 or step == stage_end:
            m = {k: float(steps.first_device(v)) for k, v in metrics.items() if k != "masks"}
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
    host = steps.unreplicate(state_dev.replace(frozen=None))
    return partition.join(self.frozen, host.trainable)


def export_merged(params: dict, workdir: str) -> str:
  path = os.path.join(workdir, "merged.npz")
  if jax.process_index() == 0:
    npz.save_npz(path, merge.merge_params(params))
  return path


def learned_scales(params: dict) -> dict[str, float]:
  """alpha_l of every adapted module (exp of its stored log-scale)."""
  flat = merge.flatten(params)
  return {m: float(np.exp(flat[f"{m}/{dmlora.LORA_LOG_SCALE}"])) for m in merge.adapted_modules(params)}


def scale_spread(scales: dict[str, float]) -> dict[str, float]:
  """min, max and std of the learned alpha_l (std of log alpha_l: 0 when stage 2 moved nothing)."""
  if not scales:
    return {}
  v = np.array(list(scales.values()), np.float64)
  return {"min": float(v.min()), "max": float(v.max()), "std_log": float(np.log(v).std())}


def stage_losses(workdir: str, stage: int) -> list[list[float]]:
  """[[step, loss], ...] of one stage from metrics.jsonl (a resumed run re-logs some steps:
  the last line of each step wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      try:
        m = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        continue
      if m.get("stage") == stage:
        by_step[m["step"]] = m["loss"]
  return [[s, by_step[s]] for s in sorted(by_step)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The main job. Returns the results dict (also written to workdir/results.json)."""
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  run = Run(config, workdir)
  plan = run.plan
  say(f"dmlora_jax: method={config.method} variant={config.model.variant} task={config.data.task} "
        f"({run.task.train.name}: {run.task.train.num_examples_global} examples, {run.num_classes} classes), "
        f"{plan.total} steps = {plan.stage1_steps} stage 1 + {plan.stage2_steps} stage 2, "
        f"{jax.process_count()} process(es) x {run.n_local} {jax.devices()[0].platform} device(s)")
  if jax.default_backend() == "cpu":
    say(f"host: {hostmem.status()}")
  state_dev = run.train()
  if state_dev is None:
    return None
  acc = run.evaluate(state_dev)
  params = run.final_params(state_dev)
  export = export_merged(params, workdir)
  owned_params = count(run.trainable)
  scales = learned_scales(params)
  results = {
      "accuracy": acc,
      "method": config.method,
      "config": flatten_config(config),
      "trainable_params": owned_params,
      "total_params": count(run.params),
      "steps": plan.total,
      "stage1_steps": plan.stage1_steps,
      "stage2_steps": plan.stage2_steps,
      "wall_time_s": time.time() - t0,
      "scales": scales,
      "scale_spread": scale_spread(scales),
      "stage2_loss": stage_losses(workdir, 2),
      "base_fingerprint": run.base_fingerprint,
      "merged_npz": export,
      "devices": f"{jax.process_count()}x{run.n_local} {jax.devices()[0].device_kind}",
  }
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  run.checkpointer.close()
  print_summary(results)
  return results


def write_json_atomic(path: str, obj) -> None:
  """A reader (the sweep, a person) never sees a half-written file: temp file + rename."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# Config keys that do not change what stage 1 computes (paths, logging, threads). The base
# weights are compared by their fingerprint, not by model.init_checkpoint's path.
STAGE1_IRRELEVANT = ("data.root", "data.tfds_data_dir", "data.num_workers", "log_every", "checkpoint_every",
                     "keep_checkpoints", "model.init_checkpoint")


def stage1_fingerprint(config) -> str:
  """A hash of every config value that stage 1 depends on: everything but stage2.* and
  STAGE1_IRRELEVANT. Two runs with equal fingerprints train bit-identical stage 1s."""
  flat = flatten_config(config)
  used = {k: v for k, v in flat.items() if not k.startswith("stage2.") and k not in STAGE1_IRRELEVANT}
  return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten_config(config) -> dict:
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, ml_collections.ConfigDict):
        walk(key + ".", v)
      else:
        out[key] = list(v) if isinstance(v, tuple) else v
  walk("", config)
  return out


def _restored_params(config, workdir, need_eval: bool) -> tuple[Run, dict]:
  # Only the train split's example count is needed (the resume checks); its images are not.
  run = Run(config, workdir, decode_train=False, decode_eval=need_eval)
  got = run.restore()
  if got is None:
    raise ResumeError(f"no checkpoint in {run.checkpointer.directory}: train first")
  state, _ = got
  return run, partition.join(run.frozen, state.trainable)


def export_from_checkpoint(config, workdir: str) -> str:
  """--mode=export: writes merged.npz from the newest checkpoint."""
  run, params = _restored_params(config, workdir, need_eval=False)
  path = export_merged(params, workdir)
  run.checkpointer.close()
  say(f"Wrote {path}")
  return path


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """--mode=eval: merges the newest checkpoint and evaluates it with the plain ViT."""
  run, params = _restored_params(config, workdir, need_eval=True)
  plain = build_model(config, run.num_classes, None)
  run.model = plain
  merged = merge.merge_params(params)
  state = steps.TrainState(step=np.int32(0), trainable={}, frozen=merged, opt_state=())
  acc = run.evaluate(steps.replicate(state, run.devices))
  run.checkpointer.close()
  for k, v in acc.items():
    say(f"{k} top-1: {100 * v:.2f}%")
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "eval.json"), {"accuracy": acc, "from": "merged newest checkpoint"})
  return acc

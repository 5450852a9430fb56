"""The three jobs of `python -m dmlora_jax.main`: train (both stages, evaluate, export),
export (merged.npz, merged.safetensors and the PEFT adapter from the newest checkpoint) and eval (the merged newest checkpoint on the
plain ViT). A method whose params do not merge (VPT-deep's prompts) exports prompts.npz, the
full params with the prompts, and is evaluated with its own model. Each validates the config first, before any data or checkpoint is read.

The pieces: setup.py (model, params, plan), training.py (the loop, checkpoints, resume),
evaluation.py (top-1), merge.py (the merge), npz.py (the export).
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from dmlora_jax import checkpoint_source, config_base, data, dmlora, hostmem, merge, methods, npz, peft_export, pytrees, setup, \
  timm_format
from dmlora_jax.checkpointing import ResumeError
from dmlora_jax.config_base import ConfigError
from dmlora_jax.evaluation import Evaluator
from dmlora_jax.progress import print_summary, say
from dmlora_jax.training import Trainer, check_batch, restore_trainable

# Errors that are the user's input, reported as one line by main (no traceback).
USER_ERRORS = (ConfigError, ResumeError, npz.CheckpointError, checkpoint_source.SourceError, data.DataError,
               FileNotFoundError)


# ---- results ----

PROMPTS_NPZ = "prompts.npz"


def export_merged(params: dict, workdir: str, method: methods.Method | None = None) -> str:
  """The exports of a run (process 0 writes them):
  - merged.npz: the merged weights in the public naming;
  - merged.safetensors: the same in timm's naming, loadable by timm's ViT as it is;
  - adapter/: the branches as a PEFT LoRA on timm's ViT, unmerged (peft_export.py).
  A part timm's naming lacks (pre_logits), or a method without branches, skips the last two
  or the adapter with a one-line note. A method that does not merge (VPT-deep) writes only
  prompts.npz: every param with its prompts (npz.load_npz reads it; the method's model runs
  it), and says why in one line. Returns the path of merged.npz (or prompts.npz)."""
  if method is not None and not method.merges:
    path = os.path.join(workdir, PROMPTS_NPZ)
    if jax.process_index() == 0:
      npz.save_npz(path, params)
      say(f"note: method={method.name} has no merged export (its prompts are input tokens, not a weight update: "
          f"no merged.npz, merged.safetensors or adapter/); {PROMPTS_NPZ} holds the params with the prompts")
    return path
  path = os.path.join(workdir, "merged.npz")
  if jax.process_index() == 0:
    merged = merge.merge_params(params)
    npz.save_npz(path, merged)
    flat = pytrees.flatten(merged)
    if any(k.startswith("pre_logits/") for k in flat):
      say("note: no merged.safetensors (timm's naming has no pre_logits layer); merged.npz holds it")
    else:
      timm_format.save_safetensors(os.path.join(workdir, "merged.safetensors"),
                                   timm_format.from_public({k: np.asarray(v) for k, v in flat.items()}))
    try:
      peft_export.export_peft(params, os.path.join(workdir, "adapter"))
    except timm_format.FormatError as e:
      say(f"note: {e}")
  return path


def learned_scales(params: dict) -> dict[str, float]:
  """alpha_l of every adapted module (exp of its stored log-scale)."""
  flat = pytrees.flatten(params)
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


def write_json_atomic(path: str, obj) -> None:
  """A reader (the sweep, a person) never sees a half-written file: temp file + rename."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# ---- the jobs ----

def _prepare(config: ml_collections.ConfigDict, decode_train: bool = True, decode_eval: bool = True):
  """Validated config, its task (data read after the config is known to be good) and setup."""
  config = config_base.resolve(config)
  check_batch(config.batch_size, jax.local_device_count())
  task = data.build_task(config.data, jax.process_index(), jax.process_count(), decode_train, decode_eval)
  return config, task, setup.build(config, task.num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The main job. Returns the results dict (also written to workdir/results.json), or None
  if a termination signal stopped it (a checkpoint is saved; the same call resumes)."""
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  config, task, s = _prepare(config)
  trainer = Trainer(s, task, workdir)
  plan = trainer.plan
  n_local = len(trainer.devices)
  say(f"dmlora_jax: method={config.method} variant={config.model.variant} task={config.data.task} "
      f"({task.train.name}: {task.train.num_examples_global} examples, {task.num_classes} classes), "
      f"{plan.total} steps = {plan.stage1_steps} stage 1 + {plan.stage2_steps} stage 2"
      f"{f' (head at lr x {config.stage1.head_lr_mult:g})' if config.stage1.head_lr_mult != 1 else ''}, "
      f"{jax.process_count()} process(es) x {n_local} {jax.devices()[0].platform} device(s)")
  if jax.default_backend() == "cpu":
    say(f"host: {hostmem.status()}")
  state_dev = trainer.train()
  if state_dev is None:
    trainer.close()
    return None
  acc = Evaluator(s.model, config.data.normalization, config.batch_size, trainer.devices,
                  config.parallel)(state_dev, task.evals)
  params = trainer.final_params(state_dev)
  export = export_merged(params, workdir, s.method)
  scales = learned_scales(params)
  results = {
      "accuracy": acc,
      "method": config.method,
      "config": config_base.flatten(config),
      "trainable_params": setup.count(s.trainable),
      "total_params": setup.count(s.params),
      "steps": plan.total,
      "stage1_steps": plan.stage1_steps,
      "stage2_steps": plan.stage2_steps,
      "wall_time_s": time.time() - t0,
      "scales": scales,
      "scale_spread": scale_spread(scales),
      "stage2_loss": stage_losses(workdir, 2),
      "base_fingerprint": s.base_fingerprint,
      "merged_npz": export if s.method.merges else None,
      "prompts_npz": None if s.method.merges else export,
      "devices": f"{jax.process_count()}x{n_local} {jax.devices()[0].device_kind}",
  }
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  trainer.close()
  print_summary(results)
  return results


def _restored_params(config, workdir: str, need_eval: bool, need_train: bool = False):
  # The train split's example count is needed (the resume checks); its images only where asked.
  config, task, s = _prepare(config, decode_train=need_train, decode_eval=need_eval)
  plan = s.plan(task.train.num_examples_global)
  got = restore_trainable(s, plan, workdir)
  if got is None:
    raise ResumeError(f"no checkpoint in {os.path.abspath(os.path.join(workdir, 'checkpoints'))}: train first")
  trainable, _ = got
  return config, task, s, pytrees.join(s.frozen, trainable)


def export_from_checkpoint(config, workdir: str) -> str:
  """--mode=export: writes merged.npz, merged.safetensors and adapter/ from the newest checkpoint
  (prompts.npz for a method that does not merge)."""
  _, _, s, params = _restored_params(config, workdir, need_eval=False)
  path = export_merged(params, workdir, s.method)
  say(f"Wrote {path}")
  return path


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """--mode=eval: merges the newest checkpoint and evaluates it with the plain ViT (a method
  that does not merge: its own model on the unmerged params)."""
  config, task, s, params = _restored_params(config, workdir, need_eval=True)
  if s.method.merges:
    model, params, what = setup.build_model(config, task.num_classes), merge.merge_params(params), "merged"
  else:
    model, what = s.model, "unmerged"
  evaluator = Evaluator(model, config.data.normalization, config.batch_size, parallel=config.parallel)
  acc = evaluator(evaluator.replicate_params(params), task.evals)
  for k, v in acc.items():
    say(f"{k} top-1: {100 * v:.2f}%")
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "eval.json"), {"accuracy": acc, "from": f"{what} newest checkpoint"})
  return acc

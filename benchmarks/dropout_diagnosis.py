"""Why does branch dropout cost in the real-backbone study? Evidence from train800 and val200 only.

The study (benchmarks/real_backbone.md) finds the `dropout` row (DMLoRA's stage 1: K=4
branches, p(t) linear 0 -> 0.5) below the `multibranch` row (the same K=4 branches, no
dropout) on test. This script reads the study's *tune* runs, which trained on train800 and
never saw val200 or test, and measures, per run, at the end of stage 1:

- fit: top-1 and mean NLL on train800 with all branches (does dropout leave the model
  under-fitted after 125 steps?);
- val200 with all branches (what the study's selection read) and its NLL;
- val200 under the training-time masks: the mean top-1 of single masked passes at the
  schedule's final p, and the top-1 of their averaged softmax (Monte-Carlo dropout). If the
  all-branch pass is worse than the masked passes the network was trained under, evaluation
  suffers a train/test shift (the "variance shift" of dropout); if it is better, it does not;
- the branches themselves: ||sum_k dW_k|| / sum_k ||dW_k|| (1 when the K branches point the
  same way, 1/sqrt(K) when orthogonal), and the update's size ||dW|| / ||W||, averaged over
  the adapted modules.

A masked pass is the merge of a masked branch set: branch k of each module (masks drawn
per module, as in training) multiplied by its keep multiplier m_k (0, or 1/q, q the keep
probability with min_active) before W + (alpha_l / r) sum_k m_k A_k B_k, run by the plain ViT.

    python benchmarks/dropout_diagnosis.py --runs runs/study_real/main --tasks animal_mnist,cifar10_t5 \
        --rows lora,multibranch,dropout --lrs 0.001,0.003 --samples 8

It needs the tune runs' checkpoints, which only the machine that trained them has (the
archive in benchmarks/results/real_backbone_runs keeps results.json only); a run without one
is skipped with a message. About 90 s a run on the 2-core VM.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmlora_jax import data, config_base, dmlora, merge, schedules, setup, trainer  # noqa: E402
from dmlora_jax.checkpointing import ResumeError  # noqa: E402
from dmlora_jax.data import normalize  # noqa: E402
from dmlora_jax.pytrees import flatten, unflatten  # noqa: E402


def run_config(workdir: str):
  """The run's own config, rebuilt from the flat copy in its results.json."""
  with open(os.path.join(workdir, "results.json")) as f:
    flat = json.load(f)["config"]
  config = config_base.get_base_config()
  for key, value in flat.items():
    config_base.override(config, key, tuple(value) if isinstance(value, list) else value)
  return config


def masked_branches(params: dict, key: jax.Array, p: float, min_active: int) -> dict:
  """params with lora_b[k] of every module multiplied by a freshly drawn keep multiplier."""
  flat = dict(flatten(params))
  for module in merge.adapted_modules(params):
    b = flat[f"{module}/{dmlora.LORA_B}"]
    key, sub = jax.random.split(key)
    m = schedules.branch_masks(sub, p, (b.shape[0],), min_active=min_active, rescale=True)
    flat[f"{module}/{dmlora.LORA_B}"] = b * m[:, None, None]
  return unflatten(flat)


def branch_geometry(params: dict) -> dict:
  flat = flatten(params)
  coherence, size = [], []
  for module in merge.adapted_modules(params):
    a = np.asarray(flat[f"{module}/{dmlora.LORA_A}"], np.float64)
    b = np.asarray(flat[f"{module}/{dmlora.LORA_B}"], np.float64)
    w = np.asarray(flat[f"{module}/kernel"], np.float64).reshape(a.shape[1], -1)
    scale = float(np.exp(np.asarray(flat[f"{module}/{dmlora.LORA_LOG_SCALE}"]))) / a.shape[-1]
    per = np.einsum("kir,kro->kio", a, b) * scale
    total = per.sum(0)
    norms = np.linalg.norm(per.reshape(per.shape[0], -1), axis=1)
    coherence.append(np.linalg.norm(total) / max(norms.sum(), 1e-30))
    size.append(np.linalg.norm(total) / np.linalg.norm(w))
  return {"branch_coherence": float(np.mean(coherence)), "update_rel_norm": float(np.mean(size))}


def diagnose(workdir: str, samples: int, seed: int) -> dict:
  config = run_config(workdir)
  try:  # train800 decoded too: the fit is measured on it
    config, task, _, params = trainer._restored_params(config, workdir, need_eval=True, need_train=True)
  except ResumeError:
    return None
  plain = setup.build_model(config, task.num_classes)
  norm = config.data.normalization

  @jax.jit
  def logits_of(p, images):
    return plain.apply({"params": p}, normalize(images, norm))

  def outputs(p, split):
    out = []
    for b in data.eval_batches(split, config.batch_size):
      lg = np.asarray(logits_of(p, b["image"]), np.float64)
      out.append(lg[b["mask"] > 0])
    return np.concatenate(out)

  def scores(lg, labels):
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float((lg.argmax(-1) == labels).mean()), float(-logp[np.arange(len(labels)), labels].mean())

  train, val = task.train, task.evals["val200"]
  res = {"workdir": workdir, "method": config.method, "task": config.data.task, "lr": config.stage1.lr}
  merged = merge.merge_params(params)
  res["train800_top1"], res["train800_nll"] = scores(outputs(merged, train), train.labels)
  val_logits = outputs(merged, val)
  res["val200_top1"], res["val200_nll"] = scores(val_logits, val.labels)
  res.update(branch_geometry(params))
  # The run's own branch count (LoRA's one branch is never dropped): multibranch too, as a
  # control never trained masked.
  branches = flatten(params)[f"{merge.adapted_modules(params)[0]}/{dmlora.LORA_A}"].shape[0]
  if samples and branches > 1:
    p_end = float(config.dmlora.drop_end)
    key = jax.random.PRNGKey(seed)
    probs, singles = 0.0, []
    for _ in range(samples):
      key, sub = jax.random.split(key)
      lg = outputs(merge.merge_params(masked_branches(params, sub, p_end, config.dmlora.min_active)), val)
      singles.append(scores(lg, val.labels)[0])
      e = np.exp(lg - lg.max(-1, keepdims=True))
      probs = probs + e / e.sum(-1, keepdims=True)
    res["mc_p"] = p_end
    res["val200_masked_single_top1"] = float(np.mean(singles))
    res["val200_mc_top1"] = float((probs.argmax(-1) == val.labels).mean())
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", required=True, help="the study's main sweep directory (<row>/<task>/tune_lr<lr>)")
  ap.add_argument("--tasks", default="animal_mnist,cifar10_t5")
  ap.add_argument("--rows", default="lora,multibranch,dropout")
  ap.add_argument("--lrs", default="0.001,0.003")
  ap.add_argument("--samples", type=int, default=8, help="masked passes per run (at the schedule's final p)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results/dropout_diagnosis.json")
  args = ap.parse_args()
  out = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      out = json.load(f)["runs"]
  done = {(r["task"], r["row"], float(r["lr"])) for r in out}  # the committed file has ${OUT} in its paths
  for task in args.tasks.split(","):
    for row in args.rows.split(","):
      for lr in args.lrs.split(","):
        wd = os.path.join(args.runs, row, task, f"tune_lr{lr}")
        if (task, row, float(lr)) in done:
          continue
        if not os.path.exists(os.path.join(wd, "results.json")):
          print(f"{wd}: no finished run, skipped", flush=True)
          continue
        t0 = time.time()
        r = diagnose(wd, args.samples, args.seed)
        if r is None:  # an archived run comes back without its checkpoint
          print(f"{wd}: no checkpoint (restored from the archive?), skipped", flush=True)
          continue
        r["row"] = row
        out.append(r)
        print(json.dumps(r), f"({time.time() - t0:.0f} s)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
          json.dump({"command": " ".join(sys.argv), "runs": out}, f, indent=1)


if __name__ == "__main__":
  main()

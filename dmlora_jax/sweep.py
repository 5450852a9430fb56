r"""The benchmark sweep: lr grid on val200, then seeds on test, for every task and ablation row.

  python -m dmlora_jax.sweep --out runs/sweep --benchmark vtab1k \
      --lrs 3e-4,1e-3,3e-3 --seeds 3 --rows dmlora,lora,multibranch,dropout \
      --config.data.root=data/vtab-1k --config.model.init_checkpoint=checkpoints/ViT-B_16.npz

For each row x task:
  1. every lr of the grid trains on train800 and is scored on val200 (`data.protocol=tune`),
     in <out>/<row>/<task>/tune_lr<lr>/;
  2. the lr with the best val200 top-1 is chosen (ties: the first in grid order). Test is
     never read here: a tune run that reports a test accuracy is an error;
  3. that lr retrains on train800val200 and evaluates test (`data.protocol=final`) for each
     seed, in <out>/<row>/<task>/final_seed<s>/.
<out>/sweep.json summarises the choices; `python -m dmlora_jax.report <out>` makes the table.

Resume: a run whose results.json exists (and was made by the same configuration) is skipped;
an unfinished one is started again with the same workdir, and the trainer resumes it from its
checkpoints. Re-running the same command after a crash or preemption finishes the sweep.
A run that fails is reported (sweep.json "failed", exit status 1 at the end); the others go on.

Runs are in-process (`trainer.train_and_evaluate`) by default; `--isolate` starts each one as
`python -m dmlora_jax.main` instead, so that a crash (or leaked memory) cannot take the sweep
down with it. On a multi-host slice run the same command on every host (in-process mode, with a
shared --out such as a gcsfuse mount); process 0 makes the skip and selection decisions.
"""

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# VTAB-1k tasks by group (../shared/PROTOCOL.md), in the order of published tables.
VTAB1K_GROUPS = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
VTAB1K_TASKS = tuple(t for g in VTAB1K_GROUPS.values() for t in g)
FGVC_TASKS = ("cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  config_file: str  # relative to the repository root
  task_arg: str  # the config argument that names the task
  tasks: tuple[str, ...]


BENCHMARKS = {
    "vtab1k": Benchmark("configs/vtab1k.py", "task", VTAB1K_TASKS),
    "fgvc": Benchmark("configs/fgvc.py", "dataset", FGVC_TASKS),
}

# The ablation rows: name -> config overrides (applied after the command line's, so a row
# always means what its name says).
ROWS: dict[str, dict] = {
    # Plain LoRA: one branch (K=1), no branch dropout, no stage 2; the scale stays at alpha.
    "lora": {"method": "lora", "stage2.epochs": 0},
    # K branches trained together, none ever dropped (p(t) = 0), no 2S-LS: isolates what
    # the branch count alone gives over LoRA.
    "multibranch": {"method": "dmlora", "dmlora.drop_start": 0.0, "dmlora.drop_end": 0.0, "stage2.epochs": 0},
    # K branches with the branch-drop schedule p(t), no 2S-LS ("without 2S-LS"): isolates
    # what dropout adds over plain multi-branch.
    "dropout": {"method": "dmlora", "stage2.epochs": 0},
    # The full method: branch dropout in stage 1, then the learned per-layer scales (2S-LS).
    "dmlora": {"method": "dmlora"},
    # Reference rows, not ablations (not run unless asked for).
    "full": {"method": "full", "stage2.epochs": 0},
    "linear": {"method": "linear", "stage2.epochs": 0},
}
DEFAULT_ROWS = ("dmlora", "lora", "multibranch", "dropout")

# Keys that do not change what a run computes; a finished run made with other values of
# these is still the same run (e.g. resumed on another machine with the data elsewhere).
IRRELEVANT_KEYS = ("data.root", "data.tfds_data_dir", "data.num_workers", "log_every", "checkpoint_every",
                   "keep_checkpoints")


class SweepError(ValueError):
  pass


# ---- configs ----

def load_config(benchmark: Benchmark, task: str) -> ml_collections.ConfigDict:
  path = os.path.join(REPO, benchmark.config_file)
  if not os.path.exists(path):
    raise SweepError(f"{benchmark.config_file} not found in {REPO}")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"{benchmark.task_arg}={task}")


def parse_value(old, text: str):
  """A command-line string as the type of the value it replaces."""
  if isinstance(old, bool):
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("1", "true", "yes")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  if isinstance(old, (tuple, list)):
    items = [s.strip() for s in text.strip("()[]").split(",") if s.strip()]
    kind = type(old[0]) if old else str
    return tuple(s.strip("'\"") if kind is str else kind(s) for s in items)
  return text


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
  """config[a.b.c] = value; a string value is parsed as the old value's type. Unknown keys
  are an error that names the key (and the closest existing one)."""
  parts = key.split(".")
  node = config
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(p, known, n=1)
      hint = f" Did you mean {'.'.join(parts[:i] + close)}?" if close else ""
      raise SweepError(f"--config.{key}: no such config key.{hint}")
    if i < len(parts) - 1:
      node = node[p]
  last = parts[-1]
  old = node[last]
  if isinstance(value, str) and not isinstance(old, str) and old is not None:
    try:
      value = parse_value(old, value)
    except ValueError as e:
      raise SweepError(f"--config.{key}={value}: {e}") from None
  node[last] = value


def flatten(config) -> dict:
  """results.json's "config" as it reads back from JSON (the trainer's own flattening)."""
  from dmlora_jax import trainer  # lazy, as in _train
  return json.loads(json.dumps(trainer.flatten_config(config)))


def fmt_lr(lr: float) -> str:
  return f"{lr:g}"


# ---- the plan ----

@dataclasses.dataclass(frozen=True)
class RunSpec:
  row: str
  task: str
  kind: str  # tune | final
  lr: float | None = None  # None for a final run until its lr is chosen
  seed: int = 0

  @property
  def name(self) -> str:
    return f"tune_lr{fmt_lr(self.lr)}" if self.kind == "tune" else f"final_seed{self.seed}"

  def workdir(self, out: str) -> str:
    return os.path.join(out, self.row, self.task, self.name)

  def label(self) -> str:
    what = f"lr={fmt_lr(self.lr)}" if self.lr is not None else "lr=?"
    return f"{self.row}/{self.task} {self.kind} {what}" + (f" seed={self.seed}" if self.kind == "final" else "")


def run_config(base: ml_collections.ConfigDict, overrides: dict, spec: RunSpec) -> ml_collections.ConfigDict:
  """base + command-line overrides + the row's overrides + this run's lr, seed and protocol."""
  c = base.copy_and_resolve_references()
  for k, v in overrides.items():
    set_key(c, k, v)
  for k, v in ROWS[spec.row].items():
    set_key(c, k, v)
  c.stage1.lr = float(spec.lr)
  c.seed = int(spec.seed)
  c.data.protocol = "tune" if spec.kind == "tune" else "final"
  return c


def select_lr(val_acc: dict[float, float]) -> float:
  """argmax over the grid of the val accuracy; ties go to the first lr in grid order."""
  if not val_acc:
    raise SweepError("no finished tune run to choose an lr from")
  return max(val_acc, key=lambda lr: (val_acc[lr], -list(val_acc).index(lr)))


def val_accuracy(results: dict) -> tuple[str, float]:
  """The one validation split of a tune run. Test in a tune run would be test-set selection."""
  acc = results["accuracy"]
  if "test" in acc:
    raise SweepError("a tune run reported a test accuracy: hyper-parameters must be chosen on val only")
  if len(acc) != 1:
    raise SweepError(f"a tune run should evaluate exactly one val split, got {sorted(acc)}")
  return next(iter(acc.items()))


def read_results(workdir: str) -> dict | None:
  """results.json of a finished run, or None (absent or cut short while being written)."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def stale_keys(results: dict, config) -> list[str]:
  want, have = flatten(config), results.get("config", {})
  return sorted(k for k in set(want) | set(have) if k not in IRRELEVANT_KEYS and want.get(k) != have.get(k))


# ---- running ----

class _Multihost:
  """Process 0 decides (skip? which lr?) and every process follows: all of them must enter
  the same collective training runs in the same order."""

  def __init__(self):
    import jax
    self.jax = jax
    self.index, self.count = jax.process_index(), jax.process_count()

  def agree(self, value: float) -> float:
    if self.count == 1:
      return value
    import numpy as np
    from jax.experimental import multihost_utils
    return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def _in_process(config, workdir: str) -> dict | None:
  from dmlora_jax import trainer  # lazy: importing it pulls in the data pipeline
  return trainer.train_and_evaluate(config, workdir)


def _subprocess(config_file: str, task_arg: str, spec: RunSpec, overrides: dict, workdir: str) -> dict | None:
  flags = {k: v for k, v in overrides.items()}
  flags.update(ROWS[spec.row])
  flags.update({"stage1.lr": spec.lr, "seed": spec.seed, "data.protocol": "tune" if spec.kind == "tune" else "final"})
  fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  cmd = [sys.executable, "-m", "dmlora_jax.main", f"--config={os.path.join(REPO, config_file)}:{task_arg}={spec.task}",
         f"--workdir={workdir}"] + [f"--config.{k}={fmt(v)}" for k, v in flags.items()]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run(cmd, cwd=REPO, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"python -m dmlora_jax.main exited {proc.returncode}")
  return read_results(workdir)  # None: stopped by a signal (exit 0 without results)


class Sweep:
  def __init__(self, args, overrides: dict):
    self.args, self.overrides = args, overrides
    self.bench = BENCHMARKS[args.benchmark]
    self.out = args.out
    self.host = _Multihost()
    self.counts = {"ran": 0, "skipped": 0, "failed": 0}
    self.failed: list[dict] = []
    self.selection: dict = {}
    self.i, self.total = 0, len(args.rows) * len(args.tasks) * (len(args.lrs) + len(args.seeds))
    self.t0 = time.time()
    self.preempted = False

  def say(self, msg: str) -> None:
    if self.host.index == 0:
      print(msg, flush=True)

  def config(self, spec: RunSpec):
    return run_config(load_config(self.bench, spec.task), self.overrides, spec)

  def run(self, spec: RunSpec) -> dict | None:
    """Runs (or skips, or resumes) one training; None if it failed or was stopped."""
    self.i += 1
    wd = spec.workdir(self.out)
    head = f"[{self.i}/{self.total}] {spec.label()}"
    try:
      config = self.config(spec)
      done = read_results(wd) if self.host.index == 0 else None
      stale = stale_keys(done, config) if done is not None else []
      # 0: run (or resume), 1: finished before, 2: finished by another configuration.
      verdict = self.host.agree(2.0 if stale else 1.0 if done is not None else 0.0)
      if verdict == 2:
        raise SweepError(f"{wd}/results.json was made with a different configuration ({', '.join(stale[:5])}"
                         f"{'...' if len(stale) > 5 else ''}); delete that run or use another --out")
      if verdict == 1:
        self.counts["skipped"] += 1
        self.say(f"{head}: done before, skipped ({_acc_str(done)})")
        return done if done is not None else {"accuracy": {}}
      self.say(f"{head}: running in {wd}")
      t = time.time()
      if self.args.isolate:
        res = _subprocess(self.bench.config_file, self.bench.task_arg, spec, self.overrides, wd)
      else:
        res = _in_process(config, wd)
      if res is None:
        self.preempted = True
        return None
      self.counts["ran"] += 1
      if spec.kind == "tune" and not self.args.keep_tune_exports and self.host.index == 0:
        # A tune run's merged model is never used again and is backbone-sized (~350 MB for
        # B/16); its results.json and adapter-sized checkpoints stay.
        _remove(os.path.join(wd, "merged.npz"))
      self.say(f"{head}: {_acc_str(res)} in {time.time() - t:.0f}s (sweep {_hms(time.time() - self.t0)})")
      return res
    except Exception as e:  # one failed run is reported, the sweep goes on
      self.counts["failed"] += 1
      self.failed.append({"run": spec.label(), "workdir": wd, "error": f"{type(e).__name__}: {e}"})
      self.say(f"{head}: FAILED: {type(e).__name__}: {e}")
      if self.args.verbose:
        traceback.print_exc()
      return None

  def row_task(self, row: str, task: str) -> None:
    val: dict[float, float] = {}
    metric = None
    for lr in self.args.lrs:
      res = self.run(RunSpec(row, task, "tune", lr, self.args.tune_seed))
      if self.preempted:
        return
      if res is None:
        continue
      acc = math.nan
      if self.host.index == 0:
        try:
          metric, acc = val_accuracy(res)
        except SweepError as e:
          self.counts["failed"] += 1
          self.failed.append({"run": f"{row}/{task} tune lr={fmt_lr(lr)}", "error": str(e)})
      acc = self.host.agree(acc)
      if not math.isnan(acc):
        val[lr] = acc
    entry = {"metric": metric, "val": {fmt_lr(k): v for k, v in val.items()}, "lr": None, "final": {}}
    self.selection.setdefault(row, {})[task] = entry
    if not val:
      self.say(f"{row}/{task}: no finished tune run; its final runs are skipped")
      self.i += len(self.args.seeds)
      return
    best = select_lr(val)
    entry["lr"] = best
    self.say(f"{row}/{task}: chose lr={fmt_lr(best)} on {metric} "
             f"({', '.join(f'{fmt_lr(k)}: {100 * v:.2f}' for k, v in val.items())})")
    for s in self.args.seeds:
      res = self.run(RunSpec(row, task, "final", best, s))
      if self.preempted:
        return
      if res is not None and "test" in res.get("accuracy", {}):
        entry["final"][str(s)] = res["accuracy"]["test"]
    self.write()

  def write(self) -> None:
    if self.host.index != 0:
      return
    summary = {
        "benchmark": self.args.benchmark,
        "rows": list(self.args.rows), "tasks": list(self.args.tasks),
        "lrs": list(self.args.lrs), "seeds": list(self.args.seeds), "tune_seed": self.args.tune_seed,
        "overrides": self.overrides, "row_overrides": {r: ROWS[r] for r in self.args.rows},
        "selection": self.selection,
        "counts": self.counts, "failed": self.failed, "preempted": self.preempted,
        "finished": not self.preempted and self.i >= self.total,
    }
    os.makedirs(self.out, exist_ok=True)
    tmp = os.path.join(self.out, "sweep.json.tmp")
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(self.out, "sweep.json"))

  def __call__(self) -> int:
    self.say(f"Sweep: {len(self.args.rows)} row(s) x {len(self.args.tasks)} task(s) x "
             f"({len(self.args.lrs)} lr + {len(self.args.seeds)} seed) = {self.total} runs in {self.out}")
    for row in self.args.rows:
      for task in self.args.tasks:
        self.row_task(row, task)
        if self.preempted:
          self.write()
          self.say("Sweep stopped by a termination signal; run the same command to resume.")
          return 0
    self.write()
    c = self.counts
    self.say(f"Sweep done in {_hms(time.time() - self.t0)}: {c['ran']} ran, {c['skipped']} skipped, "
             f"{c['failed']} failed. Summary: {os.path.join(self.out, 'sweep.json')}")
    for f in self.failed:
      self.say(f"  FAILED {f['run']}: {f['error']}")
    return 1 if self.failed else 0


def _acc_str(res: dict | None) -> str:
  acc = (res or {}).get("accuracy", {})
  return ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()) or "no accuracy"


def _hms(s: float) -> str:
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# ---- command line ----

def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
  p = argparse.ArgumentParser(
      prog="python -m dmlora_jax.sweep", description=__doc__.split("\n\n")[0],
      epilog="Any --config.KEY=VALUE (e.g. --config.data.root=data/vtab-1k) is passed to every run.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="sweep directory (runs, sweep.json)")
  p.add_argument("--benchmark", default="vtab1k", choices=sorted(BENCHMARKS))
  p.add_argument("--tasks", type=_names, default=None, help="comma-separated; default: all of the benchmark")
  p.add_argument("--lrs", type=_floats, default=(3e-4, 1e-3, 3e-3), help="stage-1 lr grid (default 3e-4,1e-3,3e-3)")
  p.add_argument("--seeds", type=int, default=3, help="number of final runs per task; seeds 0..N-1 (default 3)")
  p.add_argument("--tune_seed", type=int, default=42, help="seed of the tune runs (default 42, the recipe's)")
  p.add_argument("--rows", type=_names, default=DEFAULT_ROWS, help=f"rows of {sorted(ROWS)} (default: "
                 f"{','.join(DEFAULT_ROWS)})")
  p.add_argument("--isolate", action="store_true", help="run each training as a subprocess of dmlora_jax.main")
  p.add_argument("--keep_tune_exports", action="store_true", help="keep merged.npz of tune runs (default: deleted)")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of failed runs")
  p.add_argument("--coordinator_address", default=None, help="jax.distributed (multi-host, in-process mode)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  args, rest = p.parse_known_args(argv)
  overrides = {}
  for a in rest:
    key, eq, val = a.partition("=")
    if not key.startswith("--config.") or not eq:
      p.error(f"unrecognised argument {a!r} (config overrides are --config.KEY=VALUE)")
    overrides[key[len("--config."):]] = val
  bench = BENCHMARKS[args.benchmark]
  args.tasks = args.tasks or bench.tasks
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    p.error(f"unknown row(s) {unknown}; known: {sorted(ROWS)}")
  if not args.lrs or args.seeds < 1:
    p.error("--lrs needs at least one value and --seeds at least 1")
  args.seeds = tuple(range(args.seeds))
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  sweep_args = (args.coordinator_address, args.num_processes, args.process_id)
  if not args.isolate:
    from dmlora_jax import distributed
    distributed.initialize(*sweep_args)
  elif any(a is not None for a in sweep_args):
    raise SystemExit("error: --isolate runs single-process trainings; drop the jax.distributed flags")
  # Fail before the first run on a misspelt key or bad value, not after hours of training.
  try:
    for task in args.tasks:
      for row in args.rows:
        run_config(load_config(BENCHMARKS[args.benchmark], task), overrides, RunSpec(row, task, "tune", args.lrs[0]))
  except (SweepError, ValueError) as e:  # ValueError: a config file rejecting its argument
    print(f"error: {e}", file=sys.stderr)
    return 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; progress goes to stdout
  return Sweep(args, overrides)()


if __name__ == "__main__":
  sys.exit(main())

r"""The benchmark sweep: lr grid on val200, then seeds on test, for every task and ablation row.

  python -m dmlora_jax.sweep --out runs/sweep --benchmark vtab1k \
      --lrs 3e-4,1e-3,3e-3 --seeds 3 --rows dmlora,lora,multibranch,dropout \
      --config.data.root=data/vtab-1k --config.model.init_checkpoint=checkpoints/ViT-B_16.npz

For each row x task:
  1. every lr of the grid trains on train800 and is scored on val200 (`data.protocol=tune`),
     in <out>/<row>/<task>/tune_lr<lr>/;
  2. the lr with the best val200 top-1 is chosen (ties: the first in grid order). If it is
     the smallest or largest lr tried, the grid is extended on that side by its own ratio
     and the new lr is run, up to --extend_edges times; a choice still on an edge after that
     is printed as a WARNING and marked "edge" in sweep.json. Test is never read here: a
     tune run that reports a test accuracy is an error;
  3. that lr retrains on train800val200 and evaluates test (`data.protocol=final`) for each
     seed, in <out>/<row>/<task>/final_seed<s>/.
The `dmlora` row is the `dropout` row's stage 1 followed by 2S-LS (STAGE1_FROM): it takes
the dropout row's chosen lr and its checkpoints at the end of stage 1 (stage2.init_from),
and chooses stage2.lr from --stage2_lrs on val200 in the same way
(<out>/dmlora/<task>/tune_lr<lr>_s2lr<lr2>/). Its stage 1 is thus bit-identical to the
dropout row's, so dmlora - dropout measures 2S-LS alone, and it costs only stage 2. A dmlora
row asked for without the dropout row brings it in.
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
import concurrent.futures
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import traceback

import ml_collections

from dmlora_jax import config_base, methods
from dmlora_jax.data import fgvc, vtab_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@dataclasses.dataclass(frozen=True)
class Benchmark:
  config_file: str  # relative to the repository root
  task_arg: str  # the config argument that names the task
  tasks: tuple[str, ...]


BENCHMARKS = {
    "vtab1k": Benchmark("configs/vtab1k.py", "task", tuple(vtab_tasks.TASKS)),
    "fgvc": Benchmark("configs/fgvc.py", "dataset", tuple(fgvc.DATASETS)),
}

# The rows are the methods of methods.py (each row is one config.method); the ablation rows
# of DMLoRA are lora, multibranch, dropout and dmlora.
ROWS = tuple(methods.METHODS)
DEFAULT_ROWS = ("dmlora", "lora", "multibranch", "dropout")
# row -> the row whose stage 1 it continues: same stage-1 lr and checkpoints, only stage2.lr
# is chosen (on val200, from --stage2_lrs).
STAGE1_FROM = {r: methods.continues_stage1(r) for r in ROWS if methods.continues_stage1(r)}

# Keys that do not change what a run computes; a finished run made with other values of
# these is still the same run (e.g. resumed on another machine with the data elsewhere).
# stage2.init_from is a path; the trainer checks that its stage 1 is this run's (fingerprint).
IRRELEVANT_KEYS = ("data.root", "data.tfds_data_dir", "data.num_workers", "log_every", "checkpoint_every",
                   "keep_checkpoints", "stage2.init_from")


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


def flatten(config) -> dict:
  """results.json's "config" as it reads back from JSON."""
  return json.loads(json.dumps(config_base.flatten(config)))


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
  stage2_lr: float | None = None  # set for the rows of STAGE1_FROM (they choose it)

  @property
  def name(self) -> str:
    if self.kind == "final":
      return f"final_seed{self.seed}"
    return f"tune_lr{fmt_lr(self.lr)}" + (f"_s2lr{fmt_lr(self.stage2_lr)}" if self.stage2_lr is not None else "")

  def workdir(self, out: str) -> str:
    return os.path.join(out, self.row, self.task, self.name)

  def stage1_source(self) -> "RunSpec | None":
    """The run whose stage 1 this one continues (same task, kind, lr and seed), if any."""
    src = STAGE1_FROM.get(self.row)
    return None if src is None else RunSpec(src, self.task, self.kind, self.lr, self.seed)

  def label(self) -> str:
    what = f"lr={fmt_lr(self.lr)}" if self.lr is not None else "lr=?"
    if self.stage2_lr is not None:
      what += f" stage2.lr={fmt_lr(self.stage2_lr)}"
    return f"{self.row}/{self.task} {self.kind} {what}" + (f" seed={self.seed}" if self.kind == "final" else "")


def run_overrides(spec: RunSpec, out: str | None = None) -> dict:
  """The row's overrides + this run's lr(s), seed, protocol and stage-1 source (a workdir
  under `out`, for the rows of STAGE1_FROM)."""
  over = {"method": spec.row, "stage1.lr": float(spec.lr), "seed": int(spec.seed),
          "data.protocol": "tune" if spec.kind == "tune" else "final"}
  if spec.stage2_lr is not None:
    over["stage2.lr"] = float(spec.stage2_lr)
  src = spec.stage1_source()
  if src is not None and out is not None and stage1_kept(src, out):
    over["stage2.init_from"] = os.path.abspath(src.workdir(out))
  return over


def stage1_kept(src: RunSpec, out: str) -> bool:
  """Whether the stage-1 source run kept its checkpoints. A run restored from results.json
  alone (an archive) has none: the continuing run then trains its own stage 1, the same
  configuration and seed, instead of failing on the missing checkpoint. An empty checkpoints/
  folder counts as none."""
  ckpt = os.path.join(src.workdir(out), "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def run_config(base: ml_collections.ConfigDict, overrides: dict, spec: RunSpec,
               out: str | None = None) -> ml_collections.ConfigDict:
  """base + command-line overrides + the row's overrides + this run's lr, seed and protocol."""
  c = base.copy_and_resolve_references()
  for k, v in overrides.items():
    config_base.override(c, k, v)
  for k, v in run_overrides(spec, out).items():
    config_base.override(c, k, v)
  return c


def select_lr(val_acc: dict[float, float]) -> float:
  """argmax over the grid of the val accuracy; ties go to the first lr in grid order."""
  if not val_acc:
    raise SweepError("no finished tune run to choose an lr from")
  return max(val_acc, key=lambda lr: (val_acc[lr], -list(val_acc).index(lr)))


def edge_extension(val_acc: dict[float, float]) -> float | None:
  """The next lr to try when the best val accuracy is reached only at the smallest or largest
  lr tried: one more step of the grid's own ratio on that side (x3 for a one-point grid).
  None when a best value lies inside the grid (a tie with an inner lr included)."""
  tried = sorted(val_acc)
  top = max(val_acc.values())
  best = [lr for lr in tried if val_acc[lr] == top]
  if len(tried) == 1:
    return tried[0] * 3
  if any(tried[0] < lr < tried[-1] for lr in best):
    return None
  if select_lr(val_acc) == tried[0]:
    return tried[0] * tried[0] / tried[1]
  return tried[-1] * tried[-1] / tried[-2]


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
  """The config keys whose values differ between a finished run and the run wanted. The blocks
  of other methods (config.ssf for a dmlora row) do not count: a run made before such a block
  existed is still the same run. The wanted config is compared as the trainer records it, with
  the settings its method fixes applied (dmlora_block's stage2.granularity=block)."""
  want, have = config_base.canonical(flatten(config_base.with_method_settings(config))), results.get("config", {})
  # A run written before a key existed ran at the key's default (config_base.LATER_KEYS);
  # model.remat compares as its policy (a run's False is today's "none").
  have = config_base.canonical({**{k: v for k, v in config_base.LATER_KEYS.items() if k not in have}, **have})
  other = config_base.other_methods_keys(config)
  return sorted(k for k in set(want) | set(have)
                if k not in IRRELEVANT_KEYS and not k.startswith(other) and not _same(want.get(k), have.get(k)))


def _same(a, b) -> bool:
  """Equal config values; floats within 1e-9 relative. An lr reached by extending a grid
  (3e-3 * 3 * 3 = 0.026999999999999996) and the same lr written in a grid (0.027) name one run
  directory (fmt_lr) and are one run, not a stale one."""
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-9)
  return a == b


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


def _subprocess(config_file: str, task_arg: str, spec: RunSpec, overrides: dict, workdir: str,
                out: str, cpus: frozenset[int] | None = None) -> dict | None:
  """One run as `python -m dmlora_jax.main`. With `cpus` (--jobs > 1) it is pinned to those
  cores and its output goes to <workdir>/train.log instead of the sweep's own."""
  flags = {k: v for k, v in overrides.items()}
  flags.update(run_overrides(spec, out))
  fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  cmd = [sys.executable, "-m", "dmlora_jax.main", f"--config={os.path.join(REPO, config_file)}:{task_arg}={spec.task}",
         f"--workdir={workdir}"] + [f"--config.{k}={fmt(v)}" for k, v in flags.items()]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  if cpus is None:
    proc = subprocess.run(cmd, cwd=REPO, env=env)
  else:
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "train.log")
    with open(log, "a") as f:
      # Pinned from here rather than by a preexec_fn, which would run Python in a forked
      # child of this threaded process; the child has not started its own threads yet, and
      # those it starts inherit the affinity.
      proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
      try:
        os.sched_setaffinity(proc.pid, cpus)
      except ProcessLookupError:  # already gone: its exit status says why
        pass
      proc.wait()
  if proc.returncode != 0:
    where = "" if cpus is None else f" (its output: {log})"
    raise RuntimeError(f"python -m dmlora_jax.main exited {proc.returncode}{where}")
  return read_results(workdir)  # None: stopped by a signal (exit 0 without results)


def cpu_slots(jobs: int) -> list[frozenset[int]]:
  """This process's CPUs split into `jobs` disjoint sets (a run per set at a time)."""
  cpus = sorted(os.sched_getaffinity(0))
  if jobs > len(cpus):
    raise SweepError(f"--jobs {jobs} exceeds the {len(cpus)} CPUs this process may use")
  return [frozenset(cpus[i::jobs]) for i in range(jobs)]


class Sweep:
  def __init__(self, args, overrides: dict):
    self.args, self.overrides = args, overrides
    self.bench = BENCHMARKS[args.benchmark]
    self.out = args.out
    self.host = _Multihost()
    self.counts = {"ran": 0, "skipped": 0, "failed": 0}
    self.failed: list[dict] = []
    self.selection: dict = {}
    n_final = 0 if args.tune_only else len(args.seeds)
    grid = lambda r: args.stage2_lrs if r in STAGE1_FROM else args.row_lrs.get(r, args.lrs)
    self.i, self.total = 0, sum(len(args.tasks) * (len(grid(r)) + n_final) for r in args.rows)
    self.t0 = time.time()
    self.preempted = False
    # --jobs N: the (row, task) pairs run in threads, at most N trainings at a time, each
    # pinned to its own CPUs; a row continuing another's stage 1 waits for that row's task.
    self.lock = threading.RLock()
    self.slots = queue.Queue()
    for cpus in cpu_slots(args.jobs) if args.jobs > 1 else []:
      self.slots.put(cpus)
    self.finished = {}

  def say(self, msg: str) -> None:
    if self.host.index == 0:
      with self.lock:
        print(msg, flush=True)

  def config(self, spec: RunSpec):
    return run_config(load_config(self.bench, spec.task), self.overrides, spec, self.out)

  def run(self, spec: RunSpec) -> dict | None:
    """Runs (or skips, or resumes) one training; None if it failed or was stopped."""
    with self.lock:
      if self.preempted:
        return None
      self.i += 1
      head = f"[{self.i}/{self.total}] {spec.label()}"
    wd = spec.workdir(self.out)
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
        self.count("skipped")
        self.say(f"{head}: done before, skipped ({_acc_str(done)})")
        return done if done is not None else {"accuracy": {}}
      src = spec.stage1_source()
      if src is not None and not stage1_kept(src, self.out):
        self.say(f"{head}: {src.workdir(self.out)} kept no checkpoints (restored from its results.json?): "
                 "this run trains its own stage 1 (same configuration and seed) before stage 2")
      if self.args.isolate and self.args.jobs > 1:
        cpus = self.slots.get()  # wait for a free share of the CPUs
        try:
          self.say(f"{head}: running in {wd} (CPUs {','.join(map(str, sorted(cpus)))})")
          t = time.time()
          res = _subprocess(self.bench.config_file, self.bench.task_arg, spec, self.overrides, wd, self.out, cpus)
        finally:
          self.slots.put(cpus)
      elif self.args.isolate:
        self.say(f"{head}: running in {wd}")
        t = time.time()
        res = _subprocess(self.bench.config_file, self.bench.task_arg, spec, self.overrides, wd, self.out)
      else:
        self.say(f"{head}: running in {wd}")
        t = time.time()
        res = _in_process(config, wd)
      if res is None:
        self.preempted = True
        return None
      self.count("ran")
      if spec.kind == "tune" and not self.args.keep_tune_exports and self.host.index == 0:
        # A tune run's merged model is never used again and is backbone-sized (~350 MB for
        # B/16), and so is VPT-deep's prompts.npz; its results.json and adapter-sized checkpoints stay.
        for name in ("merged.npz", "merged.safetensors", "prompts.npz"):
          _remove(os.path.join(wd, name))
      self.say(f"{head}: {_acc_str(res)} in {time.time() - t:.0f}s (sweep {_hms(time.time() - self.t0)})")
      return res
    except Exception as e:  # one failed run is reported, the sweep goes on
      self.count("failed", {"run": spec.label(), "workdir": wd, "error": f"{type(e).__name__}: {e}"})
      self.say(f"{head}: FAILED: {type(e).__name__}: {e}")
      if self.args.verbose:
        traceback.print_exc()
      return None

  def run_all(self, specs: list[RunSpec]) -> list[dict | None]:
    """self.run over independent runs: side by side with --jobs > 1, else in order."""
    if self.args.jobs > 1 and len(specs) > 1:
      with concurrent.futures.ThreadPoolExecutor(len(specs)) as ex:
        return list(ex.map(self.run, specs))
    out = []
    for spec in specs:
      out.append(self.run(spec))
      if self.preempted:
        break
    return out

  def tune(self, grid, spec_of) -> tuple[dict, str | None, bool, int]:
    """Runs the tune runs of a grid (spec_of(value) -> RunSpec), extending it at an edge
    (see the module docstring). Returns ({value: val accuracy}, metric, best still on an edge,
    the number of extensions run)."""
    val: dict[float, float] = {}
    metric = None
    todo, extensions, tried = list(grid), 0, set(grid)
    while todo:
      batch, todo = todo, []
      for value, res in zip(batch, self.run_all([spec_of(v) for v in batch])):
        if res is None:
          continue
        acc = math.nan
        if self.host.index == 0:
          try:
            metric, acc = val_accuracy(res)
          except SweepError as e:
            self.count("failed", {"run": spec_of(value).label(), "error": str(e)})
        acc = self.host.agree(acc)
        if not math.isnan(acc):
          val[value] = acc
      if self.preempted:
        return val, metric, False, extensions
      if val and extensions < self.args.extend_edges:
        nxt = edge_extension(val)
        # A failed run is not tried again, also when the extension rounds differently from the
        # grid's lr (9e-3 * 3 = 0.026999999999999996 against 2.7e-2: one run directory).
        if nxt is not None and not any(_same(nxt, t) for t in tried):
          edge = f"  best {fmt_lr(select_lr(val))} is at the edge of {sorted(map(fmt_lr, val), key=float)}: "
          why = self.invalid(spec_of(nxt))
          if why:
            self.say(edge + f"cannot extend the grid to {fmt_lr(nxt)}: {why}")
          else:
            self.say(edge + f"extending the grid to {fmt_lr(nxt)}")
            todo.append(nxt)
            tried.add(nxt)
            extensions += 1
            with self.lock:
              self.total += 1
    return val, metric, bool(val) and edge_extension(val) is not None, extensions

  def invalid(self, spec: RunSpec) -> str:
    """Why spec's config would be refused by the trainer ('' when it is valid)."""
    try:
      config_base.validate(self.config(spec))
    except (SweepError, ValueError) as e:
      return str(e)
    return ""

  def count(self, what: str, failure: dict | None = None) -> None:
    with self.lock:
      self.counts[what] += 1
      if failure is not None:
        self.failed.append(failure)

  def skip(self, n: int) -> None:
    with self.lock:
      self.i += n

  def row_task(self, row: str, task: str) -> None:
    try:
      self._row_task(row, task)
    finally:
      self.finished[(row, task)].set()

  def _row_task(self, row: str, task: str) -> None:
    src_row = STAGE1_FROM.get(row)
    if src_row is not None and (src_row, task) in self.finished:
      self.finished[(src_row, task)].wait()  # its chosen lr and checkpoints
    if src_row is None:
      grid, key = self.args.row_lrs.get(row, self.args.lrs), "lr"
      lr = None
      spec_of = lambda v: RunSpec(row, task, "tune", v, self.args.tune_seed)
    else:
      grid, key = self.args.stage2_lrs, "stage2_lr"
      lr = (self.selection.get(src_row, {}).get(task) or {}).get("lr")
      spec_of = lambda v: RunSpec(row, task, "tune", lr, self.args.tune_seed, stage2_lr=v)
    entry = {"metric": None, "val": {}, "lr": lr, "final": {}}
    if src_row is not None:
      entry.update({"stage1_from": src_row, "stage2_lr": None})
    with self.lock:
      self.selection.setdefault(row, {})[task] = entry
    if src_row is not None and lr is None:
      self.say(f"{row}/{task}: the {src_row} row chose no lr for this task; its runs are skipped")
      self.skip(len(grid) + (0 if self.args.tune_only else len(self.args.seeds)))
      return
    val, metric, edge, extensions = self.tune(grid, spec_of)
    if self.preempted:
      return
    best = select_lr(val) if val else None
    with self.lock:
      entry.update({"metric": metric, "val": {fmt_lr(k): v for k, v in val.items()}})
      if val:
        entry[key], entry["edge"] = best, edge
    if not val:
      self.say(f"{row}/{task}: no finished tune run; its final runs are skipped")
      self.skip(0 if self.args.tune_only else len(self.args.seeds))
      return
    what = "lr" if key == "lr" else "stage2.lr"
    self.say(f"{row}/{task}: chose {what}={fmt_lr(best)} on {metric} "
             f"({', '.join(f'{fmt_lr(k)}: {100 * v:.2f}' for k, v in sorted(val.items()))})")
    if edge:
      self.say(f"WARNING: {row}/{task}: the chosen {what}={fmt_lr(best)} is still at the edge of the grid after "
               f"{extensions} extension(s); its optimum may lie outside: widen the grid")
    self.write()
    if self.args.tune_only:
      return
    finals = [RunSpec(row, task, "final", best, s) if src_row is None
              else RunSpec(row, task, "final", lr, s, stage2_lr=best) for s in self.args.seeds]
    for spec, res in zip(finals, self.run_all(finals)):
      if res is not None and "test" in res.get("accuracy", {}):
        with self.lock:
          entry["final"][str(spec.seed)] = res["accuracy"]["test"]
    self.write()

  def write(self) -> None:
    if self.host.index != 0:
      return
    summary = {
        "benchmark": self.args.benchmark,
        "rows": list(self.args.rows), "tasks": list(self.args.tasks),
        "lrs": list(self.args.lrs), "row_lrs": {r: list(v) for r, v in self.args.row_lrs.items()},
        "stage2_lrs": list(self.args.stage2_lrs), "extend_edges": self.args.extend_edges,
        "seeds": list(self.args.seeds), "tune_seed": self.args.tune_seed, "tune_only": self.args.tune_only,
        "overrides": self.overrides,
        "stage1_from": {r: STAGE1_FROM[r] for r in self.args.rows if r in STAGE1_FROM},
        "selection": self.selection,
        "counts": self.counts, "failed": self.failed, "preempted": self.preempted,
        "finished": not self.preempted and self.i >= self.total,
    }
    os.makedirs(self.out, exist_ok=True)
    tmp = os.path.join(self.out, "sweep.json.tmp")
    with self.lock, open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
      f.close()
      os.replace(tmp, os.path.join(self.out, "sweep.json"))

  def __call__(self) -> int:
    self.say(f"Sweep: {len(self.args.rows)} row(s) x {len(self.args.tasks)} task(s) x "
             f"({len(self.args.lrs)} lr" + (", tune only" if self.args.tune_only else f" + {len(self.args.seeds)} seed")
             + f") = {self.total} runs in {self.out}"
             + (f", {self.args.jobs} at a time (outputs in each run's train.log)" if self.args.jobs > 1 else ""))
    pairs = [(row, task) for row in self.args.rows for task in self.args.tasks]
    self.finished = {pair: threading.Event() for pair in pairs}
    if self.args.jobs > 1:
      threads = [threading.Thread(target=self.row_task, args=pair, daemon=True) for pair in pairs]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    else:
      for pair in pairs:
        self.row_task(*pair)
        if self.preempted:
          break
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
  p.add_argument("--row_lrs", action="append", default=[], metavar="ROW=LR,LR,...",
                 help="a row's own stage-1 lr grid instead of --lrs (repeatable), e.g. full=1e-5,3e-5,1e-4")
  p.add_argument("--stage2_lrs", type=_floats, default=(1e-3, 1e-2, 1e-1),
                 help="stage-2 (2S-LS, log-scale) lr grid of the dmlora row (default 1e-3,1e-2,1e-1)")
  p.add_argument("--extend_edges", type=int, default=2,
                 help="how often a grid may grow by one step when its best value is on an edge (default 2)")
  p.add_argument("--tune_only", action="store_true", help="choose on val200 only; no final runs on test")
  p.add_argument("--seeds", type=int, default=3, help="number of final runs per task; seeds 0..N-1 (default 3)")
  p.add_argument("--tune_seed", type=int, default=42, help="seed of the tune runs (default 42, the recipe's)")
  p.add_argument("--rows", type=_names, default=DEFAULT_ROWS, help=f"rows of {sorted(ROWS)} (default: "
                 f"{','.join(DEFAULT_ROWS)})")
  p.add_argument("--isolate", action="store_true", help="run each training as a subprocess of dmlora_jax.main")
  p.add_argument("--jobs", type=int, default=1,
                 help="with --isolate: run up to N trainings at once, each pinned to 1/N of the CPUs (CPU hosts; "
                      "on 2 cores, 2 single-core runs gave 1.26x the images/s of one 2-core run)")
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
  row_lrs = {}
  for item in args.row_lrs:
    row, eq, grid = item.partition("=")
    if not eq or row not in ROWS:
      p.error(f"--row_lrs {item!r}: expected ROW=LR,LR,... with ROW in {sorted(ROWS)}")
    try:
      row_lrs[row] = _floats(grid)
    except ValueError:
      p.error(f"--row_lrs {item!r}: {grid!r} is not a comma-separated list of numbers")
  args.row_lrs = row_lrs
  rows = list(args.rows)
  for row in list(rows):  # a row that continues another's stage 1 needs that row first
    src = STAGE1_FROM.get(row)
    if src is not None and src not in rows[:rows.index(row)]:
      if src in rows:
        rows.remove(src)
      rows.insert(rows.index(row), src)
      print(f"note: the {row} row continues the {src} row's stage 1; running {src} first", flush=True)
  args.rows = tuple(rows)
  if args.jobs < 1 or (args.jobs > 1 and not args.isolate):
    p.error("--jobs N needs N >= 1, and --isolate when N > 1 (each run its own process)")
  if not args.lrs or not args.stage2_lrs or args.seeds < 1 or args.extend_edges < 0:
    p.error("--lrs and --stage2_lrs need at least one value, --seeds at least 1, --extend_edges >= 0")
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
      base = load_config(BENCHMARKS[args.benchmark], task)
      for row in args.rows:  # every value of the row's grids (an lr below stage1.min_lr is refused)
        for lr in args.row_lrs.get(row, args.lrs):
          for s2 in (args.stage2_lrs if row in STAGE1_FROM else (None,)):
            config_base.validate(run_config(base, overrides, RunSpec(row, task, "tune", lr, stage2_lr=s2), args.out))
  except (SweepError, ValueError) as e:  # ConfigError, or a config file rejecting its argument
    print(f"error: {e}", file=sys.stderr)
    return 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; progress goes to stdout
  return Sweep(args, overrides)()


if __name__ == "__main__":
  sys.exit(main())

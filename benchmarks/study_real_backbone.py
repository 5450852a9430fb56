r"""The real-backbone study: what each part of DMLoRA buys on a pre-trained ViT-S/14 (DINOv2-small).

  python benchmarks/study_real_backbone.py --out runs/study_real      # everything, resumable
  python benchmarks/study_real_backbone.py --out runs/study_real --phase report   # tables only

Backbone: ../shared/tools/get_real_backbone.sh writes a real ViT-S/14 (DINOv2-small, saliency
fine-tuned, LayerScale folded in, exact GELU, ImageNet mean/std) in the public .npz layout
with its native 37x37 position grid; it loads through config.model.init_checkpoint as it is
and the loader resamples the grid to 8x8 (112 px). Tasks: ../shared/data/vtab1k/{cifar10,
cifar10_t5, animal_mnist} (VTAB-1k layout; train800 -> val200 for choices, train800val200 ->
test for the table).

Phases (each resumes: finished runs are skipped, unfinished ones resume from checkpoints):
1. knobs (val200 only): the `dropout` row (stage 1 of DMLoRA) at the default knobs (K=4,
   rank 8 per branch, drop_end 0.5) and one knob changed at a time: K=2, K=8, drop_end=0.75,
   rank r/K per branch (split_rank). Each variant chooses its lr on val200 from LRS (extended
   at an edge). Per knob, the value with the best val200 top-1 (at its best lr), averaged over
   the tasks, is kept if it beats the default by more than the standard error of that mean
   (else the default stays). Test is never read.
   The comparison methods (rows dora, adalora, ssf, vpt_deep) choose their own key knob the same
   way (METHOD_KNOBS: DoRA's rank, AdaLoRA's budget, SSF's init std, VPT-deep's prompt length; the default
   value's runs are the row's main tune runs, the others in out/method_knobs/); a choice at an
   end of that grid is extended one step past it (METHOD_KNOB_EDGES), as an lr grid is.
2. main: the sweep of dmlora_jax.sweep with the chosen knobs: rows linear, lora, multibranch,
   dropout, dmlora, dmlora_block (2S-LS with one scale per block), full, and the comparison
   methods dora, adalora, ssf, vpt_deep (a method whose chosen knob is not its default runs
   in its variant's dir); each row's lr on
   val200 from its grid (ROW_LRS, extended at an edge), the dmlora rows' stage-2 lr from
   STAGE2_LRS on val200 (their stage 1 is the dropout row's), then 3 seeds on test.
3. report: benchmarks/real_backbone.md (tables: test top-1 mean ± std per row and task and
   the mean over tasks, paired differences with 95% intervals, the knob and lr choices, the
   2S-LS scales), benchmarks/results/real_backbone.json and benchmarks/real_backbone_scales.png.

The recipe (RECIPE) is the VTAB-1k one (AdamW, wd 1e-4, cosine with warm-up, ImageNet
mean/std, no augmentation) shortened to fit 2 CPU cores: 112 px, batch 32, 5 + 2 epochs.
Finished runs are kept in the repository: every run's results.json is copied (paths written as
${OUT}, ${BACKBONE}, ${DATA}) into benchmarks/results/real_backbone_runs/ after each phase
(and by `--phase archive`), and a study started in an empty --out restores them first (only
when the backbone's sha256 is the archived one), so a fresh clone resumes the study where the
last one stopped instead of rerunning it. A run restored this way has no checkpoints: the
dmlora row's stage 2 needs the dropout row's stage-1 checkpoints, so archive them together.

Runs go through `python -m dmlora_jax.main` subprocesses (the sweep's --isolate), two at a
time each on one core (--jobs; 1.26x the throughput of one run on both cores here), sharing
one XLA compilation cache; each run's output is in its workdir's train.log. `--smoke` runs the whole pipeline on a tiny random-init model in a few
minutes (pipeline check only: its numbers mean nothing).
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
TASKS = ("cifar10", "cifar10_t5", "animal_mnist")
ROWS = ("linear", "lora", "multibranch", "dropout", "dmlora", "dmlora_block", "full",
        "dora", "adalora", "ssf", "vpt_deep")
LRS = (3e-4, 1e-3, 3e-3)  # the adapter rows; extended at an edge by the sweep
# full: from val200 of its head-at-100x runs with the floor at 1e-5 (cifar10 best at 3e-5, the
# other two at 1e-5, 1e-4 worst on all three; runs in main_head_lr_mult100/).
ROW_LRS = {"full": (3e-6, 1e-5, 3e-5), "linear": (3e-3, 1e-2, 3e-2),
           # SSF's and VPT's papers train at larger lrs than LoRA's (a scale/shift or a token,
           # not a low-rank product); the sweep extends any grid at an edge.
           "ssf": (1e-3, 3e-3, 1e-2), "vpt_deep": (1e-3, 3e-3, 1e-2),
           # AdaLoRA's val200 (LRS extended twice, budgets 4 and 8) peaks at 3e-3..2.7e-2 and is
           # still rising at 2.7e-2 on animal_mnist (its update is a product of three factors,
           # Lambda = 0 and P, Q ~ N(0, 0.02^2) at the start), so its grid starts one LRS step up.
           "adalora": (3e-3, 9e-3, 2.7e-2)}
# Rows whose recipe differs from the others' (row -> overrides); each trains in its own dir.
# Full fine-tuning's backbone wants an lr ~100x below the adapters' (val200: 1e-4 already wrecks
# cifar10, 21.5%), and at that lr the zero-initialised head cannot fit in 125 steps (cifar10's
# best, 40.0% at 3e-5, is 25 points under the linear probe's 65.0%; runs in main/full/): its
# head trains at 100x, which puts it at 1e-3..1e-2, where the adapter rows' heads train. The
# cosine's floor moves down as far (stage1.min_lr 1e-5 -> 1e-7): at the recipe's 1e-5 a full
# run at lr 1e-5 never decayed, and the grid could not extend below it.
ROW_CONFIG = {"full": {"stage1.head_lr_mult": "100", "stage1.min_lr": "1e-7"}}
STAGE2_LRS = (1e-4, 1e-3, 1e-2, 1e-1)  # 1e-4 = "one tenth of stage 1" at stage1.lr 1e-3
SEEDS = 3
VAL_SIZE = 200  # val200
RECIPE = {
    "model.variant": "S/14", "model.gelu_approximate": "false", "data.image_size": "112",
    "data.normalization": "imagenet", "data.num_workers": "2", "batch_size": "32",
    "stage1.epochs": "5", "stage1.warmup_epochs": "1", "stage2.epochs": "2",
    "checkpoint_every": "100000", "keep_checkpoints": "1", "log_every": "10",
}
SMOKE = {
    "model.variant": "tiny/4", "model.init_checkpoint": "", "data.image_size": "16", "data.num_workers": "2",
    "batch_size": "64", "stage1.epochs": "1", "stage1.warmup_epochs": "0", "stage2.epochs": "1",
    "checkpoint_every": "100000", "keep_checkpoints": "1", "log_every": "1000",
}
# One knob changed at a time from the defaults (name -> overrides); "base" is the default.
KNOBS = {
    "base": {},
    "K2": {"dmlora.num_branches": "2"},
    "K8": {"dmlora.num_branches": "8"},
    "drop_end0.75": {"dmlora.drop_end": "0.75"},
    "split_rank": {"dmlora.split_rank": "true"},
}
KNOB_GROUPS = {"num_branches": ("K2", "base", "K8"), "drop_end": ("base", "drop_end0.75"),
               "split_rank": ("base", "split_rank")}
# The comparison methods' own key knob (issue 14), one grid each around its paper's default
# ("base" = config_base's): DoRA's rank, AdaLoRA's budget (target rank per module, init_r at
# 1.5x it as the paper), VPT-deep's prompt length (from the paper's grid). SSF's init std:
# the official N(1, 0.02^2) scales and N(0, 0.02^2) shifts move DINOv2-small's pre-head features
# by 66% (median relative distance on cifar10's val200, cosine 0.77; nearest-class-mean val200
# 42.0% -> 33.8%, benchmarks/ssf_init_drift.py) before any step, so the identity start (0)
# is the other variant.
METHOD_KNOBS = {
    "dora": {"rank4": {"dora.rank": "4"}, "base": {}, "rank16": {"dora.rank": "16"}},
    "adalora": {"budget4": {"adalora.target_rank": "4", "adalora.rank": "6"}, "base": {},
                "budget12": {"adalora.target_rank": "12", "adalora.rank": "18"}},
    "vpt_deep": {"prompts10": {"vpt.num_prompts": "10"}, "base": {}, "prompts100": {"vpt.num_prompts": "100"}},
    "ssf": {"init0": {"ssf.init_std": "0"}, "base": {}},
}
# A method's knob chosen at an end of its METHOD_KNOBS grid is extended one step past that end,
# once (as an lr grid is): (below the first variant, above the last). The extension's tune runs
# go to out/method_knobs/<method>_<name>; a variant chosen there is reported on the grid's edge.
METHOD_KNOB_EDGES = {
    "dora": ({"rank2": {"dora.rank": "2"}}, {"rank32": {"dora.rank": "32"}}),
    "adalora": ({"budget2": {"adalora.target_rank": "2", "adalora.rank": "3"}},
                {"budget24": {"adalora.target_rank": "24", "adalora.rank": "36"}}),
    "vpt_deep": ({"prompts5": {"vpt.num_prompts": "5"}}, {"prompts200": {"vpt.num_prompts": "200"}}),
}
# Variants at the end of their knob's range: nothing lies past them, so a choice there is not
# "on the edge of the measured grid" (an init std of 0, the identity, is the least there is).
METHOD_KNOB_BOUNDS = {"ssf": ("init0",)}


ARCHIVE = os.path.join(REPO, "benchmarks", "results", "real_backbone_runs")


_SHA_CACHE: dict = {}


def _sha256(path: str) -> str:
  """The file's sha256, hashed once per (path, size, mtime) in this process: archive() runs every
  --archive_every seconds and the backbone is 88 MB."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key not in _SHA_CACHE:
    _SHA_CACHE[key] = _sha256_of_file(path)
  return _SHA_CACHE[key]


def _sha256_of_file(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _swap(obj, pairs):
  """obj with every string that starts with a pair's first element re-prefixed by its second."""
  if isinstance(obj, dict):
    return {k: _swap(v, pairs) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_swap(v, pairs) for v in obj]
  if isinstance(obj, str):
    for old, new in pairs:
      if obj == old or obj.startswith(old.rstrip("/") + "/"):
        return new + obj[len(old):]
  return obj


def _runs(root: str) -> list[str]:
  """results.json paths under root, relative to it."""
  return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "results.json"), recursive=True))


def archive(out: str, backbone_path: str, data_root: str, to: str = ARCHIVE) -> int:
  """Copies every finished run's results.json under out into `to`, machine paths replaced by
  placeholders, with the backbone's sha256 and the phase times. Returns how many changed."""
  pairs = [(backbone_path, "${BACKBONE}"), (data_root, "${DATA}"), (out, "${OUT}")]
  n = 0
  for rel in _runs(out):
    if rel.startswith("backbone" + os.sep):
      continue
    try:
      with open(os.path.join(out, rel)) as f:
        text = json.dumps(_swap(json.load(f), pairs), indent=1, sort_keys=True) + "\n"
    except (OSError, json.JSONDecodeError):  # being written right now: the next archive takes it
      continue
    dst = os.path.join(to, rel)
    if os.path.exists(dst) and open(dst).read() == text:
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      f.write(text)
    n += 1
  meta = {"backbone_sha256": _sha256(backbone_path), "backbone_file": os.path.basename(backbone_path)}
  times = os.path.join(out, "times.json")
  if os.path.exists(times):
    meta["times_s"] = json.load(open(times))
  os.makedirs(to, exist_ok=True)
  with open(os.path.join(to, "archive.json"), "w") as f:
    json.dump(meta, f, indent=2)
  print(f"archive: {n} run(s) written to {to} ({len(_runs(to))} in all)", flush=True)
  return n


def restore(out: str, backbone_path: str, data_root: str, frm: str = ARCHIVE) -> int:
  """Writes the archived runs that out lacks into out (placeholders -> this machine's paths),
  when the archive was made with this backbone (sha256). Returns how many were restored."""
  meta_path = os.path.join(frm, "archive.json")
  if not os.path.exists(meta_path):
    return 0
  meta = json.load(open(meta_path))
  sha = _sha256(backbone_path)
  if meta.get("backbone_sha256") != sha:
    print(f"WARNING: {frm} was made with another backbone (sha256 {meta.get('backbone_sha256')}, this one {sha}): "
          "nothing restored, every run trains", flush=True)
    return 0
  pairs = [("${BACKBONE}", backbone_path), ("${DATA}", data_root), ("${OUT}", out)]
  n = 0
  for rel in _runs(frm):
    dst = os.path.join(out, rel)
    if os.path.exists(dst):
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
      json.dump(_swap(json.load(open(os.path.join(frm, rel))), pairs), f, indent=2)
    n += 1
  times = os.path.join(out, "times.json")
  if n and not os.path.exists(times) and meta.get("times_s"):
    with open(times, "w") as f:
      json.dump(meta["times_s"], f, indent=2)
  print(f"restored {n} finished run(s) from {frm}", flush=True)
  return n


def backbone(out: str) -> str:
  path = os.path.join(out, "backbone", "dinov2_s14.npz")
  if os.path.exists(path):
    return path
  tool = os.path.join(SHARED, "tools", "get_real_backbone.sh")
  if not os.path.exists(tool):
    raise SystemExit(f"error: {tool} not found: this study needs ../shared beside the repository "
                     "(or put a ViT-S/14 .npz in the public layout at " + path + ")")
  print(f"fetching the backbone with {tool} (about 10 s)", flush=True)
  subprocess.run(["bash", tool, os.path.dirname(path)], check=True)
  return path


def sweep(out: str, rows, overrides: dict, extra: list[str], jobs: int, tasks=TASKS, seeds=SEEDS,
          stage2_lrs=STAGE2_LRS) -> int:
  from dmlora_jax import sweep as sweep_mod
  argv = ["--out", out, "--tasks", ",".join(tasks), "--rows", ",".join(rows), "--lrs", _grid(LRS),
          "--stage2_lrs", _grid(stage2_lrs), "--seeds", str(seeds), "--isolate", "--jobs", str(jobs)]
  for row, grid in ROW_LRS.items():
    if row in rows:
      argv += ["--row_lrs", f"{row}={_grid(grid)}"]
  argv += extra + [f"--config.{k}={v}" for k, v in overrides.items()]
  print(f"\n=== python -m dmlora_jax.sweep {' '.join(argv)}", flush=True)
  return sweep_mod.main(argv)


def _grid(values) -> str:
  return ",".join(f"{v:g}" for v in values)


def _scores(wd: str, row: str) -> dict | None:
  """A tune-only variant's evidence from its runs' own results: per task the best val200 at
  the sweep's lr rule, over the whole grid; None when no task has its grid."""
  from dmlora_jax.sweep import select_lr
  per_task, lrs, edge = {}, {}, {}
  for t in TASKS:
    val = {}
    for path in glob.glob(os.path.join(wd, row, t, "tune_lr*", "results.json")):
      if "_s2lr" in path:
        continue
      res = json.load(open(path))
      val[res["config"]["stage1.lr"]] = res["accuracy"]["val200"]
    if len(val) >= len(ROW_LRS.get(row, LRS)):  # the whole grid ran
      lrs[t] = select_lr(dict(sorted(val.items())))  # the sweep's rule (ties: the smaller lr)
      per_task[t] = val[lrs[t]]
      edge[t] = lrs[t] in (min(val), max(val))
  if not per_task:
    return None
  return {"val200_best": per_task, "lr": lrs, "edge": edge,
          "mean": float(sum(per_task.values()) / len(per_task)) if len(per_task) == len(TASKS) else math.nan}


def _choose(scores: dict, names) -> str | None:
  """The variant of `names` kept: another beats "base" only by more than the binomial standard
  error of base's mean over tasks (val200: 200 images per task, about 1.4 points at 87%); a
  smaller difference is noise at this size. Only variants with every task count."""
  ok = [n for n in names if n in scores and not math.isnan(scores[n]["mean"])]
  if "base" not in ok:
    return None
  p = scores["base"]["val200_best"]
  se = math.sqrt(sum(v * (1 - v) / VAL_SIZE for v in p.values())) / len(p)
  return max(ok, key=lambda n: (scores[n]["mean"] - (0.0 if n == "base" else se), n == "base"))


def method_knob_phase(out: str, main_out: str, common: dict, jobs: int, rows, run: bool = True,
                      tasks=TASKS) -> dict:
  """Each comparison method's own knob (METHOD_KNOBS) on val200, tune runs only: the default
  value's runs are the main phase's tune runs of the row (main_out), the others go to
  out/method_knobs/<method>_<variant>. A choice at an end of the grid runs that end's extension
  (METHOD_KNOB_EDGES) and chooses again over every variant. Runs `tasks`; a choice needs every
  task of TASKS. Returns {method: {"scores", "chosen", "dir", "overrides", "extend", "edge"}}:
  "extend" names the extension the grid's choice asks for (None inside the grid), "edge" whether
  the final choice is the first or last variant measured. The main phase runs a method whose
  chosen variant is not the default in that variant's dir."""
  result = {}
  for method, variants in METHOD_KNOBS.items():
    if method not in rows:
      continue
    low, high = METHOD_KNOB_EDGES.get(method, ({}, {}))
    every = {**low, **variants, **high}  # in the knob's order
    dirs = {n: main_out if n == "base" else os.path.join(out, "method_knobs", f"{method}_{n}") for n in every}
    scores = {}

    def measure(name, train=run):
      if train:
        sweep(dirs[name], (method,), {**common, **every[name]}, ["--tune_only"], jobs, tasks)
      sc = _scores(dirs[name], method)
      if sc is not None:
        scores[name] = sc

    for name in variants:
      measure(name)
    names = tuple(variants)
    chosen = _choose(scores, names)
    ends = {names[0]: low, names[-1]: high}
    extend = next(iter(ends[chosen]), None) if chosen in ends else None
    for name in every:  # the extension asked for runs; one measured before still counts (a choice can move)
      if name not in variants:
        measure(name, train=run and name == extend)
    scores = {n: scores[n] for n in every if n in scores}
    chosen = _choose(scores, tuple(every))
    measured = [n for n in scores if not math.isnan(scores[n]["mean"])]
    result[method] = {"scores": scores, "chosen": chosen, "overrides": every.get(chosen, {}) if chosen else {},
                      "dir": dirs[chosen] if chosen else main_out, "extend": extend,
                      "edge": bool(chosen) and chosen in (measured[0], measured[-1]) and len(measured) > 1
                      and chosen not in METHOD_KNOB_BOUNDS.get(method, ())}
    print(f"\n{method}'s knob (mean val200 top-1 over tasks at each variant's best lr): " +
          ", ".join(f"{n} {100 * v['mean']:.2f}" for n, v in scores.items()) + f"; chosen: {chosen}" +
          (" (on the edge of the measured grid)" if result[method]["edge"] else ""), flush=True)
  with open(os.path.join(out, "method_knobs.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def knob_phase(out: str, common: dict, jobs: int, names=tuple(KNOBS), run: bool = True) -> dict:
  """Runs the knob variants `names` (tune only; run=False only reads what earlier runs left)
  and returns the chosen overrides and the evidence. A variant missing a task has no mean."""
  scores = {}
  for name in KNOBS:
    wd = os.path.join(out, "main") if name == "base" else os.path.join(out, "knobs", name)
    if run and name in names:
      sweep(wd, ("dropout",), {**common, **KNOBS[name]}, ["--tune_only"], jobs)
    # From the tune runs' own results (a later sweep of fewer tasks in the same directory
    # rewrites sweep.json; the runs stay).
    sc = _scores(wd, "dropout")
    if sc is not None:
      scores[name] = sc
  chosen, over = {}, {}
  for knob, names_ in KNOB_GROUPS.items():
    best = _choose(scores, names_)
    if best is not None:
      chosen[knob] = best
      over.update(KNOBS[best])
  result = {"scores": scores, "chosen": chosen, "overrides": over}
  with open(os.path.join(out, "knobs.json"), "w") as f:
    json.dump(result, f, indent=2)
  print("\nknobs (mean val200 top-1 over tasks at each variant's best lr): " +
        ", ".join(f"{n} {100 * s['mean']:.2f}" for n, s in scores.items()) + f"\nchosen: {chosen} -> {over}",
        flush=True)
  return result


def main_dir(out: str, knob_over: dict) -> str:
  if not knob_over:
    return os.path.join(out, "main")
  tag = "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(knob_over.items()))
  return os.path.join(out, f"main_{tag}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "runs", "study_real"))
  p.add_argument("--phase", choices=("all", "knobs", "main", "report", "archive"), default="all")
  p.add_argument("--smoke", action="store_true", help="tiny random-init model: checks the pipeline only")
  p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                 help="trainings at once, each pinned to its share of the CPUs (sweep --jobs; default 2)")
  p.add_argument("--report_to", default=os.path.join(REPO, "benchmarks"),
                 help="where real_backbone.md, the plot and results/real_backbone.json go")
  p.add_argument("--archive", default=ARCHIVE,
                 help="where finished runs' results.json are kept and restored from ('' for neither; "
                      "default benchmarks/results/real_backbone_runs)")
  p.add_argument("--archive_every", type=float, default=600,
                 help="also archive every this many seconds while the study runs (0: only after each phase)")
  p.add_argument("--tasks", default=",".join(TASKS), help="main phase: the tasks (default all three)")
  p.add_argument("--rows", default=",".join(ROWS), help="main phase: the rows (default all)")
  p.add_argument("--seeds", type=int, default=SEEDS, help=f"main phase: seeds per row and task (default {SEEDS})")
  p.add_argument("--knobs", default=",".join(KNOBS),
                 help="knob phase: the variants to run (comma list of " + ", ".join(KNOBS) + ", or 'none' to "
                      "only read what earlier runs left); the choice uses every variant that has all three tasks")
  p.add_argument("--stage2_lrs", default=_grid(STAGE2_LRS),
                 help=f"main phase: the dmlora rows' stage-2 lr grid (default {_grid(STAGE2_LRS)})")
  p.add_argument("--method_knobs", choices=("run", "none"), default="run",
                 help="the comparison methods' own knobs (METHOD_KNOBS) on val200 for the methods in --rows: run "
                      "them, or 'none' to only read what earlier runs left (the default value stands without them)")
  p.add_argument("--main_knobs", choices=("chosen", "base"), default="chosen",
                 help="main phase: the knob phase's choice, or the defaults (K=4, rank 8, drop_end 0.5)")
  args = p.parse_args(argv)
  tasks = tuple(t for t in args.tasks.split(",") if t)
  rows = tuple(r for r in args.rows.split(",") if r)
  knob_names = () if args.knobs == "none" else tuple(k for k in args.knobs.split(",") if k)
  bad = [t for t in tasks if t not in TASKS] + [r for r in rows if r not in ROWS] + \
        [k for k in knob_names if k not in KNOBS]
  if bad or args.seeds < 1:
    p.error(f"unknown --tasks/--rows/--knobs entries {bad} (tasks: {', '.join(TASKS)}; rows: {', '.join(ROWS)}; "
            f"knobs: {', '.join(KNOBS)}) or --seeds {args.seeds} < 1")
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  # One XLA compilation cache for every run of the study (subprocesses inherit it): runs
  # that differ only in the seed compile the same program.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  times_path = os.path.join(out, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  common = dict(SMOKE if args.smoke else RECIPE)
  common["data.root"] = os.path.join(SHARED, "data", "vtab1k")
  keep = bool(args.archive) and not args.smoke
  if not args.smoke:
    common["model.init_checkpoint"] = backbone(out)
  if keep:
    restore(out, common["model.init_checkpoint"], common["data.root"], args.archive)
    if os.path.exists(times_path):
      times = json.load(open(times_path))

  def keep_runs():
    if keep:
      archive(out, common["model.init_checkpoint"], common["data.root"], args.archive)

  if keep and args.phase != "archive" and args.archive_every > 0:
    import threading

    def every():  # a study stopped mid-phase keeps what finished (the archive is in the working tree)
      while True:
        time.sleep(args.archive_every)
        try:
          keep_runs()
        except Exception as e:  # never take the study down
          print(f"archive: skipped ({type(e).__name__}: {e})", flush=True)
    threading.Thread(target=every, daemon=True).start()

  if args.phase == "archive":
    if not keep:
      raise SystemExit("error: --phase archive needs --archive and a real (not --smoke) study")
    keep_runs()
    return 0

  def timed(name, fn):
    t0 = time.time()
    r = fn()
    import real_backbone_report  # lazy, as below: it imports JAX
    real_backbone_report.add_time(times, name, time.time() - t0)
    with open(times_path, "w") as f:
      json.dump(times, f, indent=2)
    return r

  knobs_path = os.path.join(out, "knobs.json")
  if args.phase in ("all", "knobs"):
    knobs = timed("knobs", lambda: knob_phase(out, common, args.jobs, knob_names, run=bool(knob_names)))
    keep_runs()
  elif os.path.exists(knobs_path):
    knobs = json.load(open(knobs_path))
  else:
    raise SystemExit(f"error: {knobs_path} not found: run --phase knobs first")
  main_over = knobs["overrides"] if args.main_knobs == "chosen" else {}
  main_out = main_dir(out, main_over)
  run_mk = args.phase in ("all", "knobs") and args.method_knobs == "run"
  mknobs = timed("method_knobs", lambda: method_knob_phase(out, main_out, common, args.jobs, rows, run=run_mk,
                                                                     tasks=tasks)) \
      if run_mk else method_knob_phase(out, main_out, common, args.jobs, rows, run=False)
  if run_mk:
    keep_runs()
  # A comparison method whose chosen knob is not its default trains in that variant's dir.
  row_dirs = {m: k["dir"] for m, k in mknobs.items() if k["dir"] != main_out}
  row_over = {m: dict(mknobs[m]["overrides"]) for m in row_dirs}
  for m in ROW_CONFIG:  # a row with its own recipe trains in its own dir
    if m in rows:
      row_over[m] = {**row_over.get(m, {}), **ROW_CONFIG[m]}
      row_dirs.setdefault(m, main_dir(out, {**main_over, **ROW_CONFIG[m]}))
  rc = 0
  if args.phase in ("all", "main"):
    s2 = tuple(float(v) for v in args.stage2_lrs.split(","))

    def main_phase():
      rest = [r for r in rows if r not in row_dirs]
      code = sweep(main_out, rest, {**common, **main_over}, [], args.jobs, tasks, args.seeds, s2) if rest else 0
      for m, d in row_dirs.items():
        code = max(code, sweep(d, (m,), {**common, **main_over, **row_over[m]}, [], args.jobs, tasks,
                               args.seeds, s2))
      return code
    rc = timed("main", main_phase)
    keep_runs()
  if args.phase in ("all", "report"):
    import real_backbone_report
    parts = [("--tasks", args.tasks, ",".join(TASKS)), ("--rows", args.rows, ",".join(ROWS)),
             ("--seeds", str(args.seeds), str(SEEDS)), ("--knobs", args.knobs, ",".join(KNOBS)),
             ("--method_knobs", args.method_knobs, "run"), ("--stage2_lrs", args.stage2_lrs, _grid(STAGE2_LRS))]
    command = "python benchmarks/study_real_backbone.py --out runs/study_real" + "".join(
        f" {flag} {v}" for flag, v, default in parts if v != default)
    unmeasured = [k for k in KNOBS if k not in knobs["scores"] or math.isnan(knobs["scores"][k]["mean"])] + [
        f"{m}:{n}" for m, k in mknobs.items() for n in (*METHOD_KNOBS[m], *([k["extend"]] if k["extend"] else []))
        if n not in k["scores"] or math.isnan(k["scores"][n]["mean"])]
    missing = [f"rows {', '.join(r for r in ROWS if r not in rows)}" if len(rows) < len(ROWS) else "",
               f"tasks {', '.join(t for t in TASKS if t not in tasks)}" if len(tasks) < len(TASKS) else "",
               ("seed " if args.seeds + 1 == SEEDS else "seeds ") + ", ".join(str(i) for i in range(args.seeds + 1, SEEDS + 1))
               if args.seeds < SEEDS else "",
               f"knob variants {', '.join(unmeasured)}" if unmeasured else ""]
    missing = [m for m in missing if m]
    not_run = ("a part of the full study; not run yet: " + "; ".join(missing) +
               ". The full study is the same command without --tasks/--rows/--seeds/--knobs (it resumes).") if missing else ""
    real_backbone_report.write(main_out, knobs, times, args.report_to, common if args.smoke else RECIPE, rows, tasks,
                               smoke=args.smoke, seeds=args.seeds, command=command, not_run=not_run,
                               row_dirs=row_dirs, method_knobs=mknobs,
                               row_config={m: ROW_CONFIG[m] for m in rows if m in ROW_CONFIG})
  return rc


if __name__ == "__main__":
  from dmlora_jax import hostmem
  hostmem.reexec_with_hugepages()
  sys.exit(main())

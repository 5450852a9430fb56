r"""The results table and plots of a sweep: python -m dmlora_jax.report SWEEP_DIR

Reads SWEEP_DIR/<row>/<task>/final_seed*/results.json (test top-1 of the final runs; the tune
runs are only used for the lr column) and writes, in SWEEP_DIR:
  report.md, report.csv  one row per method (sweep row): per-task mean over seeds (%) and its
                         standard deviation across seeds (sample std, ddof=1; blank for one seed),
                         the three VTAB group means, the mean of the group means and the mean over
                         tasks (both labelled; PROTOCOL.md), then the published baselines as
                         rows marked "(quoted)";
  scales.png             learned per-layer scales alpha_l (layers x tasks) of the 2S-LS row;
  drop_schedule.png      the branch-drop probability p(t) of each row;
  acc_vs_params.png      mean test accuracy against trainable parameters, per method.
Tasks outside the benchmark (e.g. a custom folder) get their own columns, outside the group
means and the mean over tasks. A mean is left blank unless every task it covers is present.
"""

import csv
import glob
import json
import math
import os
import re
import sys

import numpy as np

from dmlora_jax import methods
from dmlora_jax.data import fgvc, vtab_tasks

MEAN_GROUPS = "mean of group means"
MEAN_TASKS = "mean over tasks"

# Published numbers (ViT-B/16 ImageNet-21k), ../shared/PROTOCOL.md.
QUOTED_VTAB1K = {  # name: (mean of the 3 group means, mean over the 19 tasks)
    "Full fine-tuning": (69.0, 65.6), "Linear probe": (57.6, 52.9), "VPT-deep": (72.0, 69.4),
    "LoRA (NOAH's)": (74.6, 72.3), "NOAH": (75.5, 73.3), "FacT": (75.6, 73.2), "SSF": (75.7, 73.1),
    "RepAdapter": (76.1, 73.8),
}
QUOTED_FGVC = {"Full fine-tuning": 88.5, "Linear probe": 79.3, "VPT-deep": 89.1, "SSF": 90.7}  # mean of 5


# ---- reading ----

def load_runs(sweep_dir: str) -> dict:
  """{row: {task: [results of each final seed]}} and {row: {task: chosen lr}}."""
  runs: dict = {}
  for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "*", "final_seed*", "results.json"))):
    seed_dir = os.path.dirname(path)
    task_dir = os.path.dirname(seed_dir)
    row = os.path.basename(os.path.dirname(task_dir))
    with open(path) as f:
      res = json.load(f)
    if "test" not in res.get("accuracy", {}):
      continue
    res["_seed"] = int(seed_dir.rsplit("final_seed", 1)[1])
    runs.setdefault(row, {}).setdefault(os.path.basename(task_dir), []).append(res)
  return runs


def seed_stats(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for a single seed)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables);
# 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
  return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


# The comparisons the method makes: each part of DMLoRA against the row without it; then
# DMLoRA against each comparison method (reported where both rows ran).
PAIRS = (("dmlora", "lora"), ("dropout", "multibranch"), ("dmlora", "dropout"), ("multibranch", "lora"),
         ("dmlora", "dora"), ("dmlora", "adalora"), ("dmlora", "ssf"), ("dmlora", "vpt_deep"))


def paired_differences(runs: dict, pairs=PAIRS) -> list[dict]:
  """Test top-1 differences a - b (points) over runs paired by (task, seed): per task and
  pooled over all tasks. Each: mean, the 95% t-interval of the mean (n - 1 df), n pairs.
  Seeds pair naturally here: the same seed gives the same data order, head init and, for
  rows sharing a stage 1 (dmlora, dropout), the same stage-1 run."""
  out = []
  for a, b in pairs:
    if a not in runs or b not in runs:
      continue
    pooled = []
    for task in sorted(set(runs[a]) & set(runs[b])):
      acc_a = {x["_seed"]: x["accuracy"]["test"] for x in runs[a][task]}
      acc_b = {x["_seed"]: x["accuracy"]["test"] for x in runs[b][task]}
      d = [100 * (acc_a[s] - acc_b[s]) for s in sorted(set(acc_a) & set(acc_b))]
      if d:
        out.append({"a": a, "b": b, "task": task, **_interval(d)})
        pooled += d
    if pooled:
      out.append({"a": a, "b": b, "task": "all tasks", **_interval(pooled)})
  return out


def _interval(d: list[float]) -> dict:
  v = np.asarray(d, np.float64)
  n = len(v)
  mean = float(v.mean())
  half = t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def benchmark_of(sweep_dir: str, tasks) -> str:
  try:
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
      return json.load(f)["benchmark"]
  except (FileNotFoundError, KeyError, json.JSONDecodeError):
    return "fgvc" if any(t in fgvc.DATASETS for t in tasks) and not any(t in vtab_tasks.TASKS for t in tasks) \
      else "vtab1k"


def _mean_if_complete(means: dict[str, float], tasks) -> float:
  return float(np.mean([means[t] for t in tasks])) if tasks and all(t in means for t in tasks) else math.nan


# ---- the table ----

def table(runs: dict, benchmark: str) -> tuple[list[str], list[dict], list[str]]:
  """Columns, rows (accuracies in %; our rows first, then the quoted ones) and the present
  tasks that are not part of the benchmark."""
  present = sorted({t for r in runs.values() for t in r})
  bench_tasks = tuple(vtab_tasks.TASKS) if benchmark == "vtab1k" else tuple(fgvc.DATASETS)
  groups = vtab_tasks.GROUPS if benchmark == "vtab1k" else {}
  extra = [t for t in present if t not in bench_tasks]
  task_cols = list(bench_tasks) + extra
  cols = ["method", "source"]
  for t in task_cols:
    cols += [t, f"{t} std"]
  cols += [f"{g} mean" for g in groups]
  mg_col = f"{MEAN_GROUPS} ({'/'.join(groups)})" if groups else None
  mt_col = f"{MEAN_TASKS} ({len(bench_tasks)} {benchmark} tasks)"
  cols += ([mg_col] if groups else []) + [mt_col, "trainable params", "seeds"]
  out = []
  for row, by_task in runs.items():
    r = {"method": row, "source": "this sweep"}
    means = {}
    for t, results in by_task.items():
      m, s = seed_stats([100 * x["accuracy"]["test"] for x in results])
      means[t] = m
      r[t], r[f"{t} std"] = m, s
    gm = {g: _mean_if_complete(means, ts) for g, ts in groups.items()}
    for g, v in gm.items():
      r[f"{g} mean"] = v
    if groups:
      r[mg_col] = float(np.mean(list(gm.values())))  # NaN unless all groups are complete
    r[mt_col] = _mean_if_complete(means, bench_tasks)
    r["trainable params"] = int(np.mean([x["trainable_params"] for rs in by_task.values() for x in rs]))
    r["seeds"] = max(len(rs) for rs in by_task.values())
    out.append(r)
  if benchmark == "vtab1k":
    for name, (groups_mean, tasks_mean) in QUOTED_VTAB1K.items():
      out.append({"method": f"{name} (quoted)", "source": "published, ViT-B/16 IN-21k (PROTOCOL.md)",
                  mg_col: groups_mean, mt_col: tasks_mean})
  else:
    for name, v in QUOTED_FGVC.items():
      out.append({"method": f"{name} (quoted)", "source": "published, ViT-B/16 IN-21k (PROTOCOL.md)", mt_col: v})
  return cols, out, extra


def _cell(v, digits: int = 2) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return ""
  return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_csv(path: str, cols: list[str], rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      w.writerow([_cell(r.get(c), 4) for c in cols])


def write_markdown(path: str, cols: list[str], rows: list[dict], benchmark: str, sweep_dir: str,
                   plots: list[str], extra: list[str], runs: dict | None = None) -> None:
  # One column per task with "mean ± std"; blank columns of absent tasks are kept so the
  # table has the published layout.
  show = [c for c in cols if not c.endswith(" std") and c != "source"]

  def fmt(r, c):
    v = _cell(r.get(c))
    s = _cell(r.get(f"{c} std"))
    return f"{v} ± {s}" if v and s else v
  lines = [f"# {benchmark} results: {os.path.abspath(sweep_dir)}", "",
           "Test top-1 (%) of the final runs (train800val200 -> test, lr chosen on val200), mean ± sample "
           "std (ddof=1) across seeds. Group means need every task of the group, "
           f"\"{MEAN_GROUPS}\" all three groups, \"{MEAN_TASKS}\" every task; otherwise blank. "
           "Rows marked (quoted) are published numbers for ViT-B/16 ImageNet-21k (../shared/PROTOCOL.md), "
           "not runs of this sweep: compare only with runs of the same backbone.", "",
           "| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r, c) for c in show) + " |")
  if extra:
    lines += ["", f"Tasks outside the {benchmark} benchmark (own columns, in no mean): {', '.join(extra)}."]
  diffs = paired_differences(runs or {})
  if diffs:
    lines += ["", "Paired differences of test top-1 (points), a - b over runs with the same task and seed; "
              "95% t-interval of the mean (n - 1 degrees of freedom). An interval that contains 0 is no "
              "evidence of a difference.", "", "| a - b | task | mean | 95% interval | pairs |", "|---|---|---|---|---|"]
    lines += [f"| {d['a']} - {d['b']} | {d['task']} | {d['mean']:+.2f} | "
              f"[{_cell(d['low'])}, {_cell(d['high'])}] | {d['n']} |" for d in diffs]
  lines += [""] + [f"![{p}]({p})" for p in plots]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ---- plots ----

def _layer_key(module: str):
  m = re.search(r"encoderblock_(\d+)", module)
  return (int(m.group(1)) if m else -1, module)


def _short(module: str) -> str:
  m = re.search(r"encoderblock_(\d+)", module)
  return f"block {m.group(1)} {module.rsplit('/', 1)[-1]}" if m else module


def plot_scales(runs: dict, path: str) -> bool:
  """Heatmap of alpha_l (mean over seeds): layers x tasks, for the 2S-LS row."""
  import matplotlib.pyplot as plt
  two_stage = [r for r in runs if r in methods.METHODS and methods.METHODS[r].two_stage]
  row = next((r for r in two_stage + list(runs) if any(x.get("scales") for rs in runs[r].values() for x in rs)),
             None)
  if row is None:
    return False
  tasks = sorted(runs[row])
  modules = sorted({m for rs in runs[row].values() for x in rs for m in x.get("scales", {})}, key=_layer_key)
  grid = np.full((len(modules), len(tasks)), np.nan)
  for j, t in enumerate(tasks):
    for i, m in enumerate(modules):
      vals = [x["scales"][m] for x in runs[row][t] if m in x.get("scales", {})]
      if vals:
        grid[i, j] = np.mean(vals)
  fig, ax = plt.subplots(figsize=(max(4.5, 2.5 + 0.45 * len(tasks)), 1.8 + 0.22 * len(modules)))
  im = ax.imshow(grid, aspect="auto", cmap="viridis")
  ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right")
  ax.set_yticks(range(len(modules)), [_short(m) for m in modules], fontsize=7)
  ax.set_title(f"learned per-layer scale $\\alpha_l$\n({row}, mean over seeds)", fontsize=10)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def drop_curve(cfg: dict, stage1_steps: int, stage2_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """p(t) over both stages, as the trainer computes it (0 for methods without branch dropout,
  0 in stage 2 where every branch is active)."""
  from dmlora_jax.schedules import drop_probability
  t = np.arange(stage1_steps + stage2_steps)
  method = methods.METHODS.get(cfg.get("method"))
  if method is None or not method.drop:
    return t, np.zeros(len(t))
  p = np.asarray(drop_probability(np.minimum(t, max(stage1_steps - 1, 0)), stage1_steps,
                                  cfg["dmlora.drop_schedule"], cfg["dmlora.drop_start"], cfg["dmlora.drop_end"],
                                  cfg.get("dmlora.drop_steps", 4)))
  return t, np.where(t < stage1_steps, p, 0.0)


def plot_drop_schedule(runs: dict, path: str) -> bool:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  drawn = False
  for row, by_task in runs.items():
    res = by_task[sorted(by_task)[0]][0]
    s1 = res.get("stage1_steps", res["steps"])
    t, p = drop_curve(res["config"], s1, res.get("stage2_steps", 0))
    if len(t):
      ax.plot(t, p, label=f"{row} ({sorted(by_task)[0]})", drawstyle="steps-post")
      if res.get("stage2_steps"):
        ax.axvline(s1, color="gray", lw=0.8, ls=":")
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel("training step (dotted: start of stage 2, all branches active)")
  ax.set_ylabel("branch drop probability p(t)")
  ax.set_ylim(-0.02, 1.0)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def label_offsets(points: list[tuple], step: float = 9.0) -> list[tuple[float, float]]:
  """Text offsets (points) for the labels of draw_acc_vs_params, in the order of `points`: a
  label whose point lies close to a higher one (within a tenth of a decade in parameters and 4%
  of the accuracy range) goes one line lower than the lowest label of its cluster, so that rows
  with the same parameter count and near-equal accuracy stay readable."""
  ms = [m for _, _, m, _ in points]
  tol = 0.04 * max(max(ms) - min(ms), 1.0) if ms else 1.0
  placed: list[tuple[float, float, int]] = []  # (log10 params, accuracy, line)
  lines = [0] * len(points)
  for i in sorted(range(len(points)), key=lambda i: -points[i][2]):
    lx, m = math.log10(max(points[i][1], 1)), points[i][2]
    near = [ln for px, pm, ln in placed if abs(px - lx) < 0.1 and abs(pm - m) < tol]
    lines[i] = max(near) + 1 if near else 0
    placed.append((lx, m, lines[i]))
  return [(5.0, 4.0 - step * ln) for ln in lines]


def draw_acc_vs_params(points: list[tuple], path: str, xlabel: str, ylabel: str) -> bool:
  """Test top-1 against trainable parameters (log x), one labelled point per row: points are
  (row, params, accuracy %, std or None); a std draws an error bar. False if there is none."""
  import matplotlib.pyplot as plt
  if not points:
    return False
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for (row, n, m, sd), offset in zip(points, label_offsets(points)):
    if sd is None:
      ax.scatter(n, m, s=40)
    else:
      ax.errorbar(n, m, yerr=sd, fmt="o", capsize=3)
    ax.annotate(row, (n, m), textcoords="offset points", xytext=offset, fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_acc_vs_params(rows: list[dict], cols: list[str], runs: dict, path: str) -> bool:
  """Mean test accuracy over the tasks present against trainable parameters, per method."""
  points = []
  for row, by_task in runs.items():
    per_task = [np.mean([x["accuracy"]["test"] for x in rs]) for rs in by_task.values()]
    params = np.mean([x["trainable_params"] for rs in by_task.values() for x in rs])
    points.append((row, params, 100 * np.mean(per_task), None))
  return draw_acc_vs_params(points, path, "trainable parameters (mean over tasks, head included)",
                            f"test top-1 %, mean over the {len({t for r in runs.values() for t in r})} task(s) present")


# ---- entry point ----

def report(sweep_dir: str) -> dict:
  """Writes report.md, report.csv and the plots; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  runs = load_runs(sweep_dir)
  if not runs:
    raise FileNotFoundError(f"no finished final run (*/*/final_seed*/results.json) under {sweep_dir}")
  tasks = {t for r in runs.values() for t in r}
  benchmark = benchmark_of(sweep_dir, tasks)
  cols, rows, extra = table(runs, benchmark)
  out = {"csv": os.path.join(sweep_dir, "report.csv"), "md": os.path.join(sweep_dir, "report.md")}
  plots = []
  for name, fn in (("scales.png", lambda p: plot_scales(runs, p)),
                   ("drop_schedule.png", lambda p: plot_drop_schedule(runs, p)),
                   ("acc_vs_params.png", lambda p: plot_acc_vs_params(rows, cols, runs, p))):
    if fn(os.path.join(sweep_dir, name)):
      plots.append(name)
      out[name] = os.path.join(sweep_dir, name)
  write_csv(out["csv"], cols, rows)
  write_markdown(out["md"], cols, rows, benchmark, sweep_dir, plots, extra, runs)
  return out


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m dmlora_jax.report SWEEP_DIR", file=sys.stderr)
    return 2
  try:
    out = report(argv[0])
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(f"wrote {p}" for p in out.values()))
  with open(out["md"]) as f:
    print("".join(l for l in f if l.startswith("|")), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Tables and the 2S-LS heatmap of the real-backbone study (benchmarks/study_real_backbone.py)."""

import glob
import json
import math
import os
import re

import numpy as np

from dmlora_jax import hostmem, report as sweep_report, sweep

PAIRS = (("dmlora", "lora"), ("dropout", "multibranch"), ("dmlora", "dropout"), ("multibranch", "lora"),
         ("dropout", "lora"), ("dmlora_block", "dropout"), ("dmlora", "dmlora_block"), ("lora", "linear"),
         ("full", "lora"), ("dmlora", "dora"), ("dmlora", "adalora"), ("dmlora", "ssf"), ("dmlora", "vpt_deep"),
         # the comparison methods against LoRA, the reference of their papers' claims, and the
         # published VTAB-1k order's VPT-deep > full
         ("dora", "lora"), ("adalora", "lora"), ("ssf", "lora"), ("vpt_deep", "lora"), ("vpt_deep", "full"))


UNRECORDED = "machine not recorded"


def _by_cpu(entry) -> dict:
  """A phase's times by CPU; a plain number (written before times were kept per CPU) is UNRECORDED's."""
  return {UNRECORDED: float(entry)} if isinstance(entry, (int, float)) else dict(entry)


def add_time(times: dict, phase: str, seconds: float, cpu: str | None = None) -> None:
  """times[phase][cpu] += seconds. The study may run in parts on different machines (it
  resumes); each part's time is kept under the CPU it ran on. A phase time written before
  times were kept per CPU (a plain number) is kept under UNRECORDED."""
  entry = _by_cpu(times.get(phase, {}))
  cpu = cpu or hostmem.cpu_model()
  entry[cpu] = entry.get(cpu, 0.0) + seconds
  times[phase] = entry


def time_summary(times: dict) -> str:
  """'4.9 h on 2 CPU cores; by machine: AMD EPYC 2.1 h, machine not recorded 2.8 h; by phase: knobs 0.0 h,
  main 4.9 h'."""
  per_phase = {k: _by_cpu(v) for k, v in times.items()}
  per_cpu = {}
  for entry in per_phase.values():
    for cpu, sec in entry.items():
      per_cpu[cpu] = per_cpu.get(cpu, 0.0) + sec
  wall = sum(per_cpu.values())
  cpus = ", ".join(f"{cpu} {sec / 3600:.1f} h" for cpu, sec in sorted(per_cpu.items(), key=lambda kv: -kv[1]))
  return (f"{wall / 3600:.1f} h on {os.cpu_count()} CPU cores; by machine: {cpus or 'nothing run'}; by phase: "
          + ", ".join(f"{k} {sum(v.values()) / 3600:.1f} h" for k, v in per_phase.items()))


def _pct(v) -> str:
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def test_table(runs: dict, rows, tasks) -> tuple[list[str], dict]:
  """Markdown lines and numbers: test top-1 mean ± std per row and task, and the mean over
  tasks with the std across seeds of each seed's mean over tasks."""
  data = {}
  lines = ["| row | " + " | ".join(tasks) + " | mean over tasks | trainable params |",
           "|---|" + "---|" * (len(tasks) + 2)]
  for row in rows:
    if row not in runs:
      continue
    cells, per_seed = [], {}
    data[row] = {}
    for t in tasks:
      accs = {x["_seed"]: x["accuracy"]["test"] for x in runs[row].get(t, [])}
      for s, a in accs.items():
        per_seed.setdefault(s, {})[t] = a
      if accs:
        m, sd = sweep_report.seed_stats([100 * a for a in accs.values()])
        data[row][t] = {"mean": m, "std": sd, "seeds": {str(s): a for s, a in sorted(accs.items())}}
        cells.append(f"{m:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{m:.2f}")
      else:
        cells.append("")
    complete = [np.mean([v[t] for t in tasks]) * 100 for v in per_seed.values() if len(v) == len(tasks)]
    mean_cell = ""
    if complete:
      m, sd = sweep_report.seed_stats(complete)
      data[row]["mean over tasks"] = {"mean": m, "std": sd, "seeds": len(complete)}
      mean_cell = f"{m:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{m:.2f}"
    params = [x["trainable_params"] for rs in runs[row].values() for x in rs]
    data[row]["trainable_params"] = int(np.mean(params))
    lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean_cell} | {int(np.mean(params)):,} |")
  return lines, data


def diff_table(runs: dict) -> tuple[list[str], list[dict]]:
  diffs = sweep_report.paired_differences(runs, PAIRS)
  lines = ["| a - b | task | mean (points) | 95% interval | pairs |", "|---|---|---|---|---|"]
  for d in diffs:
    lo, hi = d["low"], d["high"]
    sig = "" if math.isnan(lo) or lo <= 0 <= hi else " *"
    lines.append(f"| {d['a']} - {d['b']} | {d['task']} | {d['mean']:+.2f}{sig} | [{lo:+.2f}, {hi:+.2f}] | {d['n']} |")
  return lines, diffs


def selection_from_runs(sweep_dir: str, row: str, tasks, stage1_lr: dict | None = None) -> dict:
  """A row's lr choices rebuilt from its finished runs in sweep_dir, in sweep.json's entry form:
  sweep.json keeps only its last invocation's choices, so a study run in parts would lose the
  earlier ones. val: every finished tune run's val200 (by its recorded lr); the chosen lr is
  the one its final runs trained at (the sweep's choice, tie rule included), else the
  sweep's rule (select_lr) over the tune runs; edge: a best value only at an end of the lrs
  tried. stage1_lr (task -> lr): a row that continues another's stage 1; its stage-2 lr is
  chosen among the tune runs at that stage-1 lr."""
  out = {}
  key = "stage1.lr" if stage1_lr is None else "stage2.lr"
  for t in tasks:
    val, metric = {}, None
    for path in glob.glob(os.path.join(sweep_dir, row, t, "tune_lr*", "results.json")):
      if ("_s2lr" in os.path.basename(os.path.dirname(path))) != (stage1_lr is not None):
        continue
      res = json.load(open(path))
      if stage1_lr is not None and not math.isclose(res["config"]["stage1.lr"], stage1_lr.get(t) or math.nan):
        continue
      metric, acc = sweep.val_accuracy(res)
      val[float(res["config"][key])] = acc
    if not val:
      continue
    val = dict(sorted(val.items()))
    finals = {float(json.load(open(p))["config"][key])
              for p in glob.glob(os.path.join(sweep_dir, row, t, "final_seed*", "results.json"))}
    chosen = finals.pop() if len(finals) == 1 else sweep.select_lr(val)
    entry = {"metric": metric, "val": {f"{k:g}": v for k, v in val.items()}, "lr": chosen,
             "edge": sweep.edge_extension(val) is not None and chosen in (min(val), max(val))}
    if stage1_lr is not None:
      entry.update({"lr": stage1_lr[t], "stage2_lr": chosen})
    out[t] = entry
  return out


def choice_table(selection: dict, rows, tasks) -> list[str]:
  lines = ["| row | task | tuned | val200 top-1 per value | chosen | on an edge |", "|---|---|---|---|---|---|"]
  for row in rows:
    for t in tasks:
      e = selection.get(row, {}).get(t)
      if not e or not e.get("val"):
        continue
      key = "stage2_lr" if "stage2_lr" in e else "lr"
      vals = ", ".join(f"{k}: {_pct(v)}" for k, v in sorted(e["val"].items(), key=lambda kv: float(kv[0])))
      tuned = "stage2.lr (stage 1 = dropout's, lr " + f"{e['lr']:g})" if key == "stage2_lr" else "stage1.lr"
      chosen = e.get(key)
      lines.append(f"| {row} | {t} | {tuned} | {vals} | {chosen:g} | {'yes' if e.get('edge') else 'no'} |")
  return lines


def stage2_table(main_out: str, tasks, rows=("dmlora", "dmlora_block")) -> tuple[list[str], dict]:
  """Per stage-2 lr (tune runs): val200 and how far the scales moved (std and max |.| of log
  alpha_l / alpha over the modules)."""
  data, lines = {}, ["| row | task | stage2.lr | val200 top-1 | stage-1-only val200 | std of log alpha_l | "
                     "max abs log(alpha_l / alpha) | stage-2 loss first -> last logged |",
                     "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    for t in tasks:
      paths = glob.glob(os.path.join(main_out, row, t, "tune_lr*_s2lr*", "results.json"))
      for path in sorted(paths, key=lambda p: float(re.search(r"_s2lr([^/]+)", p).group(1))):
        res = json.load(open(path))
        s2 = res["config"]["stage2.lr"]
        alpha = res["config"]["dmlora.alpha"]
        logs = np.log(np.array(list(res["scales"].values())) / alpha)
        # Its stage-1 source as the sweep names it (also for a run that trained its own stage 1
        # because the source kept no checkpoints, and so has no stage2.init_from).
        spec = sweep.RunSpec(row, t, "tune", res["config"]["stage1.lr"], stage2_lr=s2)
        src = os.path.join(spec.stage1_source().workdir(main_out), "results.json")
        base = json.load(open(src))["accuracy"]["val200"] if os.path.exists(src) else None
        curve = res.get("stage2_loss") or []
        loss = f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else ""
        data.setdefault(row, {}).setdefault(t, {})[f"{s2:g}"] = {
            "val200": res["accuracy"]["val200"], "stage1_val200": base, "std_log_alpha": float(logs.std()),
            "max_abs_log_ratio": float(np.abs(logs).max()), "stage2_loss": curve}
        lines.append(f"| {row} | {t} | {s2:g} | {_pct(res['accuracy']['val200'])} | {_pct(base)} | "
                     f"{logs.std():.4f} | {np.abs(logs).max():.4f} | {loss} |")
  return lines, data


def knob_table(knobs: dict, tasks) -> list[str]:
  lines = ["| variant (dropout row, stage 1) | " + " | ".join(tasks) + " | mean | chosen lr per task |",
           "|---|" + "---|" * (len(tasks) + 2)]
  for name, s in knobs["scores"].items():
    cells = [_pct(s["val200_best"].get(t)) + (" (edge)" if s["edge"].get(t) else "") for t in tasks]
    lrs = ", ".join(f"{s['lr'][t]:g}" for t in tasks if t in s["lr"])
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(s['mean'])} | {lrs} |")
  return lines


def plot_scales(runs: dict, tasks, path: str, seeds: int) -> bool:
  """log2(alpha_l / alpha) of the dmlora row, mean over seeds: modules x tasks."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if "dmlora" not in runs:
    return False
  mods = sorted({m for rs in runs["dmlora"].values() for x in rs for m in x["scales"]}, key=sweep_report._layer_key)
  grid = np.full((len(mods), len(tasks)), np.nan)
  for j, t in enumerate(tasks):
    for i, m in enumerate(mods):
      v = [np.log2(x["scales"][m] / x["config"]["dmlora.alpha"]) for x in runs["dmlora"].get(t, [])]
      if v:
        grid[i, j] = np.mean(v)
  lim = max(float(np.nanmax(np.abs(grid))), 1e-3)
  fig, ax = plt.subplots(figsize=(4.8, 1.6 + 0.2 * len(mods)))
  im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(mods)), [sweep_report._short(m) for m in mods], fontsize=6)
  ax.set_title(f"2S-LS: learned $\\log_2(\\alpha_l / \\alpha)$\n(dmlora row, mean over {seeds} seeds)", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


ALL_TASKS = ("cifar10", "cifar10_t5", "animal_mnist")


def method_knob_table(mknobs: dict) -> list[str]:
  lines = ["| method | variant | " + " | ".join(ALL_TASKS) + " | mean | chosen lr per task | chosen |",
           "|---|---|" + "---|" * (len(ALL_TASKS) + 3)]
  for m, k in mknobs.items():
    for name, s in k["scores"].items():
      cells = [_pct(s["val200_best"].get(t)) + (" (edge)" if s["edge"].get(t) else "") for t in ALL_TASKS]
      lrs = ", ".join(f"{s['lr'][t]:g}" for t in ALL_TASKS if t in s["lr"])
      lines.append(f"| {m} | {name} | " + " | ".join(cells) + f" | {_pct(s['mean'])} | {lrs} | "
                   f"{('yes (on the grid edge)' if k.get('edge') else 'yes') if name == k['chosen'] else ''} |")
  return lines


def plot_acc_vs_params(runs: dict, tasks, path: str) -> bool:
  """Mean test top-1 over the tasks against trainable parameters, one point per row that has
  every task (mean over its seeds), error bars the std over seeds of the mean over tasks."""
  import matplotlib
  matplotlib.use("Agg")
  pts = []
  for row, by_task in runs.items():
    if not all(t in by_task for t in tasks):
      continue
    per_seed = {}
    for t in tasks:
      for x in by_task[t]:
        per_seed.setdefault(x["_seed"], []).append(x["accuracy"]["test"])
    means = [100 * np.mean(v) for v in per_seed.values() if len(v) == len(tasks)]
    if means:
      params = np.mean([x["trainable_params"] for t in tasks for x in by_task[t]])
      pts.append((row, params, np.mean(means), np.std(means, ddof=1) if len(means) > 1 else 0.0))
  return sweep_report.draw_acc_vs_params(pts, path, "trainable parameters (head included)",
                                         f"test top-1 %, mean over {len(tasks)} task(s)")


def write(main_out: str, knobs: dict, times: dict, report_to: str, recipe: dict, rows, tasks,
          smoke: bool = False, seeds: int = 3, command: str = "", not_run: str = "",
          row_dirs: dict | None = None, method_knobs: dict | None = None, row_config: dict | None = None) -> None:
  RECIPE, ROWS, TASKS = recipe, rows, tasks
  runs = sweep_report.load_runs(main_out)
  dirs = {}
  # A comparison method at a non-default knob, or a row with its own recipe, has its own sweep dir.
  for row, d in (row_dirs or {}).items():
    runs.pop(row, None)
    runs.update({r: v for r, v in sweep_report.load_runs(d).items() if r == row})
    dirs[row] = d
  # Every choice from the runs themselves (sweep.json keeps its last invocation's only); a row
  # that continues another's stage 1 after that row.
  selection = {}
  for row in sorted(set(ROWS) | {sweep.STAGE1_FROM[r] for r in ROWS if r in sweep.STAGE1_FROM},
                    key=lambda r: r in sweep.STAGE1_FROM):
    src = sweep.STAGE1_FROM.get(row)
    s1 = None if src is None else {t: e["lr"] for t, e in selection.get(src, {}).items()}
    sel = selection_from_runs(dirs.get(row, main_out), row, TASKS, s1)
    if sel:
      selection[row] = sel
  name = "real_backbone_smoke" if smoke else "real_backbone"
  # A choice whose runs are not in this study dir stays as the previous results file has it.
  prev = os.path.join(report_to, "results", f"{name}.json")
  if os.path.exists(prev):
    for row, per_task in json.load(open(prev)).get("selection", {}).items():
      for task, sel in per_task.items():
        if task not in selection.get(row, {}) and sel.get("lr") is not None:
          selection.setdefault(row, {})[task] = sel
  os.makedirs(os.path.join(report_to, "results"), exist_ok=True)
  png = os.path.join(report_to, f"{name}_scales.png")
  has_plot = plot_scales(runs, TASKS, png, seeds)
  params_png = os.path.join(report_to, f"{name}_acc_vs_params.png")
  has_params_plot = plot_acc_vs_params({r: v for r, v in runs.items() if r in ROWS}, TASKS, params_png)
  t_lines, t_data = test_table(runs, ROWS, TASKS)
  d_lines, d_data = diff_table(runs)
  s_lines, s_data = stage2_table(main_out, TASKS)
  md = [f"# The real-backbone study{' (SMOKE: pipeline check, numbers mean nothing)' if smoke else ''}", "",
        f"Command: `{command or 'python benchmarks/study_real_backbone.py --out runs/study_real'}` "
        f"(run time {time_summary(times)}).",
        "Recipe: " + ", ".join(f"`{k}={v}`" for k, v in RECIPE.items()) + "; knobs chosen on val200: "
        + (", ".join(f"`{k}={v}`" for k, v in knobs["overrides"].items()) or "the defaults") + "."
        + "".join(f" Row `{r}` also: " + ", ".join(f"`{k}={v}`" for k, v in o.items()) + "."
                  for r, o in (row_config or {}).items()), "",
        *([f"**Scope of this run:** {not_run}", ""] if not_run else []),
        f"## Test top-1 (%), {seeds} seed{'s' if seeds != 1 else ''}", "",
        "train800val200 -> test, every choice made on val200 (train800 -> val200). Mean ± sample std over the "
        f"seeds; the mean over tasks is each seed's mean over the {len(TASKS)} tasks, then mean ± std over seeds.", ""]
  md += t_lines
  md += ["", "## Paired differences (test top-1 points)", "",
         "a - b over runs with the same task and seed (dmlora and dropout share their stage 1 exactly, so "
         "dmlora - dropout is 2S-LS alone). 95% t-interval of the mean difference (n - 1 df); * marks an "
         "interval that excludes 0.", ""]
  md += d_lines
  md += ["", "## Choices on val200", "", "### The method's knobs (dropout row = DMLoRA's stage 1)", ""]
  if knobs["scores"]:
    md += knob_table(knobs, [t for t in ALL_TASKS if any(t in s["val200_best"] for s in knobs["scores"].values())])
  else:
    md += ["Not run in this study directory (`--knobs`): the defaults stand."]
  md += ["", f"Chosen: {knobs['chosen']}.", ""]
  if method_knobs:
    md += ["### The comparison methods' own knobs (tune runs, val200)", "",
           "Each variant at its own best lr; a variant replaces the default only when its mean over the tasks beats "
           "the default's by more than the standard error of that mean. A choice at an end of a method's grid "
           "adds one variant past that end (as an lr grid is extended).", ""]
    md += method_knob_table(method_knobs) + [""]
  md += ["### Learning rates", ""]
  md += choice_table(selection, ROWS, TASKS)
  md += ["", "### 2S-LS: the stage-2 learning rate (tune runs)", ""]
  md += s_lines
  if has_plot:
    md += ["", f"![alpha_l heatmap]({os.path.basename(png)})"]
  if has_params_plot:
    md += ["", "## Accuracy against trainable parameters", "", f"![accuracy vs parameters]({os.path.basename(params_png)})"]
  with open(os.path.join(report_to, f"{name}.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  with open(os.path.join(report_to, "results", f"{name}.json"), "w") as f:
    json.dump({"recipe": RECIPE, "knobs": knobs, "selection": selection, "test": t_data, "paired": d_data,
               "stage2": s_data, "times_s": times, "sweep_dir": main_out,
               "method_knobs": method_knobs or {}, "row_dirs": row_dirs or {}, "row_config": row_config or {}},
              f, indent=2)
  print(f"wrote {os.path.join(report_to, name + '.md')}", flush=True)

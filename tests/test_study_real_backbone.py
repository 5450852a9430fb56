"""The real-backbone study keeps its finished runs in the repository (benchmarks/study_real_backbone.py
archive/restore): machine paths become placeholders and come back as the new machine's paths, and an
archive made with another backbone restores nothing."""

import hashlib
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import study_real_backbone as study  # noqa: E402  (benchmarks/study_real_backbone.py)


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def test_archive_then_restore_on_another_machine(tmp_path):
  a, b, arch, data = tmp_path / "a", tmp_path / "b", tmp_path / "arch", "/data/vtab1k"
  for out in (a, b):
    os.makedirs(out / "backbone")
    (out / "backbone" / "dinov2_s14.npz").write_bytes(b"same weights")
  bb_a = str(a / "backbone" / "dinov2_s14.npz")
  res = {"config": {"model.init_checkpoint": bb_a, "data.root": data, "stage1.lr": 0.003,
                    "stage2.init_from": str(a / "main" / "dropout" / "cifar10" / "tune_lr0.003"),
                    "model.variant": "S/14"},
         "accuracy": {"val200": 0.79}, "scales": {"x": 8.0}}
  _write(a / "main" / "dmlora" / "cifar10" / "tune_lr0.003_s2lr0.01" / "results.json", res)
  _write(a / "main" / "lora" / "cifar10" / "final_seed0" / "results.json", {"config": {}, "accuracy": {"test": 0.78}})
  _write(a / "times.json", {"main": 3600.0})
  assert study.archive(str(a), bb_a, data, str(arch)) == 2
  assert study.archive(str(a), bb_a, data, str(arch)) == 0  # unchanged: nothing rewritten
  text = (arch / "main" / "dmlora" / "cifar10" / "tune_lr0.003_s2lr0.01" / "results.json").read_text()
  assert str(tmp_path) not in text and "${BACKBONE}" in text and "${OUT}/main/dropout" in text

  bb_b = str(b / "backbone" / "dinov2_s14.npz")
  assert study.restore(str(b), bb_b, "/elsewhere/vtab1k", str(arch)) == 2
  back = json.load(open(b / "main" / "dmlora" / "cifar10" / "tune_lr0.003_s2lr0.01" / "results.json"))
  assert back["config"]["model.init_checkpoint"] == bb_b
  assert back["config"]["data.root"] == "/elsewhere/vtab1k"
  assert back["config"]["stage2.init_from"] == str(b / "main" / "dropout" / "cifar10" / "tune_lr0.003")
  assert back["accuracy"] == {"val200": 0.79} and back["scales"] == {"x": 8.0}
  assert json.load(open(b / "times.json")) == {"main": 3600.0}
  assert study.restore(str(b), bb_b, data, str(arch)) == 0  # present runs are never overwritten


def test_restore_refuses_another_backbone(tmp_path, capsys):
  a, b, arch = tmp_path / "a", tmp_path / "b", tmp_path / "arch"
  for out, w in ((a, b"weights one"), (b, b"weights two")):
    os.makedirs(out / "backbone")
    (out / "backbone" / "m.npz").write_bytes(w)
  _write(a / "main" / "lora" / "cifar10" / "final_seed0" / "results.json", {"config": {}, "accuracy": {"test": 0.7}})
  study.archive(str(a), str(a / "backbone" / "m.npz"), "/d", str(arch))
  assert study.restore(str(b), str(b / "backbone" / "m.npz"), "/d", str(arch)) == 0
  assert not (b / "main").exists()
  assert "another backbone" in capsys.readouterr().out


def _scores(mean_by_task):
  return {"val200_best": dict(mean_by_task), "lr": {t: 1e-3 for t in mean_by_task}, "edge": {},
          "mean": sum(mean_by_task.values()) / len(mean_by_task)}


def test_a_knob_variant_replaces_the_default_only_beyond_one_standard_error():
  base = {"cifar10": 0.79, "cifar10_t5": 0.88, "animal_mnist": 0.94}
  # The binomial standard error of base's mean over the 3 tasks at 200 images each, by hand.
  se = (sum(p * (1 - p) / 200 for p in base.values())) ** 0.5 / 3
  assert abs(se - 0.0135) < 1e-3
  near = {t: v + 0.8 * se for t, v in base.items()}
  far = {t: v + 1.2 * se for t, v in base.items()}
  assert study._choose({"base": _scores(base), "rank16": _scores(near)}, ("rank4", "base", "rank16")) == "base"
  assert study._choose({"base": _scores(base), "rank16": _scores(far)}, ("rank4", "base", "rank16")) == "rank16"
  # A variant missing a task has no mean and cannot be chosen; without base nothing is chosen.
  partial = _scores({"cifar10": 0.99})
  partial["mean"] = float("nan")
  assert study._choose({"base": _scores(base), "rank4": partial}, ("rank4", "base")) == "base"
  assert study._choose({"rank4": _scores(far)}, ("rank4", "base")) is None


def test_scores_read_the_tune_runs_of_a_whole_grid(tmp_path):
  for t, accs in (("cifar10", {3e-4: 0.6, 1e-3: 0.78, 3e-3: 0.78}), ("animal_mnist", {3e-4: 0.9, 1e-3: 0.95})):
    for lr, a in accs.items():
      _write(tmp_path / "dora" / t / f"tune_lr{lr:g}" / "results.json",
             {"config": {"stage1.lr": lr}, "accuracy": {"val200": a}})
  # A dmlora-style stage-2 tune run in the same folder is not a stage-1 grid point.
  _write(tmp_path / "dora" / "cifar10" / "tune_lr0.001_s2lr0.01" / "results.json",
         {"config": {"stage1.lr": 1e-3}, "accuracy": {"val200": 0.99}})
  sc = study._scores(str(tmp_path), "dora")
  assert sc["val200_best"] == {"cifar10": 0.78} and sc["lr"] == {"cifar10": 1e-3}  # tie: the smaller lr
  assert sc["edge"] == {"cifar10": False}
  assert sc["mean"] != sc["mean"]  # NaN: animal_mnist's grid is incomplete and cifar10_t5 absent
  assert study._scores(str(tmp_path), "ssf") is None


def test_backbone_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
  # archive() runs every --archive_every seconds; the 88 MB backbone is hashed once per version.
  calls = []
  real = study._sha256_of_file
  monkeypatch.setattr(study, "_sha256_of_file", lambda p: calls.append(p) or real(p))
  f = tmp_path / "m.npz"
  f.write_bytes(b"weights one")
  first = study._sha256(str(f))
  assert first == hashlib.sha256(b"weights one").hexdigest()
  assert study._sha256(str(f)) == first and len(calls) == 1
  f.write_bytes(b"weights two, longer")  # another size (and mtime): hashed again
  assert study._sha256(str(f)) == hashlib.sha256(b"weights two, longer").hexdigest() and len(calls) == 2


def test_run_time_is_kept_per_cpu_and_old_totals_stay_unattributed():
  import real_backbone_report as rep
  times = {"knobs": 360.0, "main": 7200.0}  # written before times were kept per CPU
  rep.add_time(times, "main", 1800.0, cpu="AMD EPYC")
  rep.add_time(times, "main", 1800.0, cpu="AMD EPYC")
  rep.add_time(times, "report", 36.0, cpu="Intel Xeon")
  assert times == {"knobs": 360.0, "main": {rep.UNRECORDED: 7200.0, "AMD EPYC": 3600.0},
                   "report": {"Intel Xeon": 36.0}}
  text = rep.time_summary(times)
  # 7200 + 360 unrecorded, 3600 EPYC, 36 Xeon: 11196 s = 3.1 h; largest part first.
  assert text == (f"3.1 h on {os.cpu_count()} CPU cores; by machine: {rep.UNRECORDED} 2.1 h, AMD EPYC 1.0 h, "
                  "Intel Xeon 0.0 h; by phase: knobs 0.1 h, main 3.0 h, report 0.0 h")


def test_stage2_table_finds_the_stage1_source_also_for_a_run_that_trained_its_own(tmp_path):
  import real_backbone_report
  main = tmp_path / "main"
  _write(str(main / "dropout" / "cifar10" / "tune_lr0.003" / "results.json"), {"accuracy": {"val200": 0.79}})
  def run(row, s2, init_from, val, scales):
    _write(str(main / row / "cifar10" / f"tune_lr0.003_s2lr{s2:g}" / "results.json"),
           {"accuracy": {"val200": val}, "scales": scales, "stage2_loss": [[126, 0.5], [175, 0.25]],
            "config": {"stage1.lr": 0.003, "stage2.lr": s2, "dmlora.alpha": 8.0, "stage2.init_from": init_from}})
  run("dmlora", 0.01, str(main / "dropout" / "cifar10" / "tune_lr0.003"), 0.80, {"a": 8.0, "b": 8.0 * math.e})
  run("dmlora_block", 0.1, "", 0.81, {"a": 4.0, "b": 16.0})  # trained its own stage 1: no init_from
  lines, data = real_backbone_report.stage2_table(str(main), ["cifar10"])
  assert data["dmlora"]["cifar10"]["0.01"]["stage1_val200"] == 0.79
  assert data["dmlora_block"]["cifar10"]["0.1"]["stage1_val200"] == 0.79
  # log(alpha_l / alpha): (0, 1) and (-log 2, log 2), by hand
  assert math.isclose(data["dmlora"]["cifar10"]["0.01"]["std_log_alpha"], 0.5)
  assert math.isclose(data["dmlora_block"]["cifar10"]["0.1"]["max_abs_log_ratio"], math.log(2))
  assert lines[-1].startswith("| dmlora_block | cifar10 | 0.1 | 81.00 | 79.00 |") and "0.500 -> 0.250" in lines[-1]


def test_a_row_with_its_own_recipe_sweeps_in_its_own_dir_with_its_overrides(tmp_path, monkeypatch):
  """ROW_CONFIG (full fine-tuning's head lr): that row alone gets the overrides, in its own
  sweep dir, and the other rows keep the main dir and the common recipe."""
  calls = []
  monkeypatch.setattr(study, "sweep", lambda out, rows, over, *a, **k: calls.append((out, tuple(rows), over)) or 0)
  _write(str(tmp_path / "knobs.json"), {"scores": {}, "overrides": {}, "chosen": "the defaults"})
  argv = ["--out", str(tmp_path), "--smoke", "--phase", "main", "--knobs", "none", "--method_knobs", "none"]
  assert study.main(argv + ["--rows", "lora,full"]) == 0
  by_dir = {os.path.relpath(out, tmp_path): (rows, over) for out, rows, over in calls}
  assert sorted(by_dir) == ["main", "main_head_lr_mult100_min_lr1e-7"]
  assert by_dir["main"][0] == ("lora",) and "stage1.head_lr_mult" not in by_dir["main"][1]
  assert by_dir["main_head_lr_mult100_min_lr1e-7"][0] == ("full",)
  assert by_dir["main_head_lr_mult100_min_lr1e-7"][1] == {**by_dir["main"][1], **study.ROW_CONFIG["full"]}
  assert study.ROW_CONFIG["full"]["stage1.head_lr_mult"] == "100"
  # A study of that row alone sweeps nothing in the main dir.
  calls.clear()
  assert study.main(argv + ["--rows", "full"]) == 0
  assert [(os.path.relpath(out, tmp_path), rows) for out, rows, _ in calls] == [("main_head_lr_mult100_min_lr1e-7", ("full",))]


def test_the_lr_choices_come_from_the_runs_not_from_the_last_sweep_json(tmp_path):
  """sweep.json keeps its last invocation's choices only (a study run in parts once lost the
  linear row's): the report rebuilds each choice from the runs, the final runs' lr first."""
  import real_backbone_report
  main = str(tmp_path / "main")
  def run(row, name, val=None, **config):
    _write(os.path.join(main, row, "cifar10", name, "results.json"),
           {"accuracy": {"val200": val} if val is not None else {"test": 0.5}, "config": config})
  # A tie between 1e-3 and its extension 3.33e-4 (run later): the sweep kept 1e-3 (first in its
  # grid order), and its final runs say so; sorted order alone would take 3.33e-4.
  for lr, val in ((1e-3, 0.9), (3e-3, 0.8), (1e-2, 0.7), (1e-3 / 3, 0.9)):
    run("lora", f"tune_lr{lr:g}", val, **{"stage1.lr": lr})
  for s in range(3):
    run("lora", f"final_seed{s}", **{"stage1.lr": 1e-3})
  # The stage-2 lr at the dropout row's chosen stage-1 lr only; a tune run at another is ignored.
  run("dropout", "tune_lr0.003", 0.8, **{"stage1.lr": 3e-3})
  run("dropout", "tune_lr0.001", 0.7, **{"stage1.lr": 1e-3})
  for s2, val in ((1e-4, 0.80), (1e-2, 0.82), (1e-1, 0.82)):
    run("dmlora", f"tune_lr0.003_s2lr{s2:g}", val, **{"stage1.lr": 3e-3, "stage2.lr": s2})
  run("dmlora", "tune_lr0.001_s2lr1", 0.99, **{"stage1.lr": 1e-3, "stage2.lr": 1.0})
  lora = real_backbone_report.selection_from_runs(main, "lora", ["cifar10", "cifar10_t5"])
  assert list(lora) == ["cifar10"] and lora["cifar10"]["lr"] == 1e-3 and lora["cifar10"]["edge"] is False
  assert lora["cifar10"]["val"] == {"0.000333333": 0.9, "0.001": 0.9, "0.003": 0.8, "0.01": 0.7}
  drop = real_backbone_report.selection_from_runs(main, "dropout", ["cifar10"])
  assert drop["cifar10"]["lr"] == 3e-3 and drop["cifar10"]["edge"] is True  # best at the largest lr tried
  dm = real_backbone_report.selection_from_runs(main, "dmlora", ["cifar10"], {"cifar10": 3e-3})
  assert dm["cifar10"]["lr"] == 3e-3 and dm["cifar10"]["stage2_lr"] == 1e-2 and "1" not in dm["cifar10"]["val"]
  lines = real_backbone_report.choice_table({"lora": lora, "dmlora": dm}, ["lora", "dmlora"], ["cifar10"])
  assert lines[2].endswith("| 0.001 | no |") and "stage 1 = dropout's, lr 0.003" in lines[3]


def test_a_method_knob_chosen_at_the_grid_edge_is_extended_once(tmp_path, monkeypatch):
  """DoRA's rank grid 4 / 8 / 16: rank 16 wins beyond one standard error, so rank 32 (one step
  past that end) runs and the choice is made again over all four; rank 2 never runs. A choice
  inside the grid runs no extension."""
  val = {"rank4": 0.85, "base": 0.87, "rank16": 0.89, "rank32": 0.95, "rank2": 0.99}
  main_out, calls = tmp_path / "main", []

  def fake_sweep(out, rows, over, extra, jobs, tasks, *a, **k):
    rank = over.get("dora.rank", "8")
    calls.append(rank)
    name = "base" if rank == "8" else f"rank{rank}"
    for t in tasks:
      for lr in study.LRS:  # the whole grid, its best at 1e-3
        acc = val[name] - (0.0 if lr == 1e-3 else 0.05)
        _write(os.path.join(out, "dora", t, f"tune_lr{lr:g}", "results.json"),
               {"config": {"stage1.lr": lr}, "accuracy": {"val200": acc}})
    return 0

  monkeypatch.setattr(study, "sweep", fake_sweep)
  r = study.method_knob_phase(str(tmp_path), str(main_out), {}, 2, ("dora",))["dora"]
  assert calls == ["4", "8", "16", "32"]
  assert r["extend"] == "rank32" and r["chosen"] == "rank32" and r["edge"]
  assert list(r["scores"]) == ["rank4", "base", "rank16", "rank32"]  # the knob's order
  assert r["overrides"] == {"dora.rank": "32"} and r["dir"].endswith(os.path.join("method_knobs", "dora_rank32"))
  assert json.load(open(tmp_path / "method_knobs.json"))["dora"]["chosen"] == "rank32"
  import real_backbone_report
  line = [x for x in real_backbone_report.method_knob_table({"dora": r}) if "| rank32 |" in x][0]
  assert line.endswith("| yes (on the grid edge) |") and "| 95.00 |" in line

  # Read again without running: the extension's runs still count; nothing trains.
  calls.clear()
  again = study.method_knob_phase(str(tmp_path), str(main_out), {}, 2, ("dora",), run=False)["dora"]
  assert calls == [] and again["chosen"] == "rank32"

  # Inside the grid (base wins): no extension runs, and the choice is not on an edge.
  val.update(rank16=0.86, rank32=0.99)
  calls.clear()
  other = tmp_path / "other"
  r = study.method_knob_phase(str(other), str(other / "main"), {}, 2, ("dora",))["dora"]
  assert calls == ["4", "8", "16"] and r["extend"] is None and r["chosen"] == "base" and not r["edge"]


def test_ssf_init_std_knob_chosen_at_its_bound_is_not_on_an_edge(tmp_path, monkeypatch):
  """SSF's knob: the identity start (init std 0) against the official 0.02. 0 winning is a
  choice at the end of the range, not at the edge of a grid that could be widened."""
  val = {"init0": 0.88, "base": 0.78}
  calls = []

  def fake_sweep(out, rows, over, extra, jobs, tasks, *a, **k):
    name = "init0" if over.get("ssf.init_std") == "0" else "base"
    calls.append(name)
    for t in tasks:
      for lr in study.ROW_LRS["ssf"]:
        _write(os.path.join(out, "ssf", t, f"tune_lr{lr:g}", "results.json"),
               {"config": {"stage1.lr": lr}, "accuracy": {"val200": val[name] - (0.0 if lr == 3e-3 else 0.05)}})
    return 0

  monkeypatch.setattr(study, "sweep", fake_sweep)
  r = study.method_knob_phase(str(tmp_path), str(tmp_path / "main"), {}, 2, ("ssf",))["ssf"]
  assert calls == ["init0", "base"] and r["extend"] is None
  assert r["chosen"] == "init0" and not r["edge"] and r["overrides"] == {"ssf.init_std": "0"}
  # The official default winning is at the other end, which could be widened: an edge.
  val.update(init0=0.70)
  r = study.method_knob_phase(str(tmp_path / "b"), str(tmp_path / "b" / "main"), {}, 2, ("ssf",))["ssf"]
  assert r["chosen"] == "base" and r["edge"]

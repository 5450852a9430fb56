"""The sweep driver: lr chosen on val200 only, final runs per seed, resume and skip, failures,
the grid extended at an edge, and the dmlora row continuing the dropout row's stage 1.

The end-to-end tests run one tiny sweep on the digits task of task_files.py (tiny/4 at 16 px,
one epoch per stage, 2-point grids, 2 seeds; the dmlora row brings in the dropout row), used
also by test_report.py through `tiny_sweep` (a second call finds every run finished and returns
at once). Tests that change a sweep directory work on a copy of it.
"""

import fcntl
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest

from dmlora_jax import config_base, sweep
from dmlora_jax.data import vtab_tasks
from task_files import vtab_root

LRS = (1e-5, 3e-3)  # far apart, so that val200 has a clear preference
TINY = [f"--config.data.root={vtab_root()}", "--config.model.variant=tiny/4", "--config.model.init_checkpoint=",
        "--config.data.image_size=16", "--config.data.num_workers=2", "--config.batch_size=32",
        "--config.stage1.epochs=1", "--config.stage1.warmup_epochs=0", "--config.stage2.epochs=1",
        "--config.dmlora.num_branches=3", "--config.dmlora.rank=2", "--config.log_every=1000",
        "--config.checkpoint_every=1000"]
STAGE2_LRS = (1e-3, 1e-1)
ROWS = ("dmlora",)  # brings in "dropout", whose stage 1 it continues; the others are the same code path
RAN = ("dropout", "dmlora")


def sweep_args(out) -> list[str]:
  return ["--out", str(out), "--tasks", "no_such_task,digits", "--lrs", ",".join(map(str, LRS)),
          "--stage2_lrs", ",".join(map(str, STAGE2_LRS)), "--extend_edges", "0",
          "--seeds", "2", "--rows", ",".join(ROWS)] + TINY


def tiny_sweep(tmp_path_factory) -> tuple[str, int]:
  """Runs (or finds) the one tiny sweep of the session; returns (sweep dir, exit status of the
  first run). Workers of pytest -n share it: the first one runs it, holding a lock."""
  from conftest import SHARED_TMP
  out = pathlib.Path(SHARED_TMP) / "tiny_sweep"
  out.mkdir(parents=True, exist_ok=True)
  first = out / "first_rc"
  with open(out.parent / "tiny_sweep.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not first.exists():
      rc = sweep.main(sweep_args(out))
      first.write_text(str(rc))
  return str(out), int(first.read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  return tiny_sweep(tmp_path_factory)


def _results(path):
  with open(os.path.join(path, "results.json")) as f:
    return json.load(f)


def _all_results(out):
  return {os.path.relpath(r, out): os.path.getmtime(os.path.join(r, "results.json"))
          for r, _, files in os.walk(out) if "results.json" in files}


# ---- end to end on the digits task ----

def test_lr_is_the_argmax_of_val200_over_the_tune_runs(swept):
  out, _ = swept
  row = "dropout"
  task = os.path.join(out, row, "digits")
  val = []
  for lr in LRS:
    res = _results(os.path.join(task, f"tune_lr{lr:g}"))
    assert set(res["accuracy"]) == {"val200"}  # tune runs never evaluate test
    assert res["config"]["data.protocol"] == "tune" and res["config"]["stage1.lr"] == lr
    val.append(res["accuracy"]["val200"])
  best = LRS[int(np.argmax(val))]  # np.argmax: first of equals, the sweep's tie rule too
  chosen = json.load(open(os.path.join(out, "sweep.json")))["selection"][row]["digits"]
  assert chosen["lr"] == best and chosen["metric"] == "val200"
  assert chosen["val"] == {f"{lr:g}": v for lr, v in zip(LRS, val)}
  for seed in (0, 1):
    res = _results(os.path.join(task, f"final_seed{seed}"))
    assert set(res["accuracy"]) == {"test"}
    assert res["config"]["data.protocol"] == "final"
    assert res["config"]["stage1.lr"] == best and res["config"]["seed"] == seed
    assert chosen["final"][str(seed)] == res["accuracy"]["test"]


def test_dmlora_continues_the_dropout_stage1_and_chooses_stage2_lr_on_val200(swept):
  out, _ = swept
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert summary["rows"] == ["dropout", "dmlora"] and summary["stage1_from"] == {"dmlora": "dropout"}
  lr = summary["selection"]["dropout"]["digits"]["lr"]
  chosen = summary["selection"]["dmlora"]["digits"]
  assert chosen["lr"] == lr and chosen["stage1_from"] == "dropout"
  val = []
  for s2 in STAGE2_LRS:
    wd = os.path.join(out, "dmlora", "digits", f"tune_lr{lr:g}_s2lr{s2:g}")
    res = _results(wd)
    assert set(res["accuracy"]) == {"val200"}
    assert res["config"]["stage2.lr"] == s2 and res["config"]["stage1.lr"] == lr
    assert res["config"]["stage2.init_from"] == os.path.join(out, "dropout", "digits", f"tune_lr{lr:g}")
    logged = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert {m["stage"] for m in logged} == {2}  # stage 1 was not trained again
    val.append(res["accuracy"]["val200"])
  assert chosen["stage2_lr"] == STAGE2_LRS[int(np.argmax(val))]
  for seed in (0, 1):
    res = _results(os.path.join(out, "dmlora", "digits", f"final_seed{seed}"))
    assert res["config"]["stage2.lr"] == chosen["stage2_lr"] and res["config"]["seed"] == seed
    assert res["config"]["stage2.init_from"] == os.path.join(out, "dropout", "digits", f"final_seed{seed}")


def test_the_row_sets_the_method_and_its_stages(swept):
  out, _ = swept
  res = _results(os.path.join(out, "dmlora", "digits", "final_seed0"))
  assert res["method"] == "dmlora" and res["stage2_steps"] == res["stage1_steps"] == 1000 // 32
  assert res["config"]["dmlora.drop_end"] == 0.5 and res["config"]["dmlora.num_branches"] == 3


def test_final_runs_keep_their_export_and_tune_runs_drop_theirs(swept):
  out, _ = swept
  for row in RAN:
    assert os.path.exists(os.path.join(out, row, "digits", "final_seed1", "merged.npz"))
  assert not os.path.exists(os.path.join(out, "dropout", "digits", f"tune_lr{LRS[0]:g}", "merged.npz"))


def test_a_failed_run_is_reported_and_the_sweep_goes_on(swept):
  out, rc = swept
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert rc == 1
  failed = [f["run"] for f in summary["failed"]]
  assert failed == [f"dropout/no_such_task tune lr={lr:g}" for lr in LRS]  # dmlora's runs are skipped
  assert summary["selection"]["dropout"]["no_such_task"]["lr"] is None
  assert summary["selection"]["dmlora"]["no_such_task"]["lr"] is None
  assert not os.path.exists(os.path.join(out, "dmlora", "no_such_task"))
  assert summary["selection"]["dropout"]["digits"]["lr"] in LRS  # the task after the failure still ran


def _copy(swept, tmp_path) -> str:
  return str(shutil.copytree(swept[0], tmp_path / "sweep"))


def test_second_invocation_skips_every_finished_run(swept, capsys, tmp_path):
  out = _copy(swept, tmp_path)
  before = _all_results(out)
  assert len(before) == (len(LRS) + 2) + (len(STAGE2_LRS) + 2)
  assert sweep.main(sweep_args(out)) == 1  # the missing task still fails
  text = capsys.readouterr().out
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert summary["counts"] == {"ran": 0, "skipped": len(before), "failed": len(LRS)}
  assert _all_results(out) == before  # nothing rewritten
  assert f"[1/{2 * (len(LRS) + 2) + 2 * (len(STAGE2_LRS) + 2)}]" in text and "skipped" in text


def test_unfinished_run_resumes_from_its_checkpoint(swept, tmp_path):
  out = _copy(swept, tmp_path)
  wd = os.path.join(out, "dropout", "digits", f"tune_lr{LRS[1]:g}")  # val200: a short evaluation
  old = _results(wd)
  metric_lines = len(open(os.path.join(wd, "metrics.jsonl")).readlines())
  os.remove(os.path.join(wd, "results.json"))  # as if killed after the last checkpoint
  sweep.main(sweep_args(out))
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert summary["counts"]["ran"] == 1
  new = _results(wd)
  assert new["accuracy"] == old["accuracy"]
  # Restored at the final step: no training step ran again.
  assert len(open(os.path.join(wd, "metrics.jsonl")).readlines()) == metric_lines


def test_a_stage1_source_without_checkpoints_is_trained_again_not_failed(swept, tmp_path, capsys):
  # A study restored from an archive has the dropout runs' results.json only; a dmlora run that
  # continues one of them trains its own stage 1 (same config and seed) and ends where the
  # run that continued the checkpoint ended.
  out = _copy(swept, tmp_path)
  src = os.path.join(out, "dropout", "digits", "final_seed1")
  wd = os.path.join(out, "dmlora", "digits", "final_seed1")
  old = _results(wd)
  shutil.rmtree(os.path.join(src, "checkpoints"))
  os.mkdir(os.path.join(src, "checkpoints"))  # an empty folder (as a read-only restore may leave) is none
  shutil.rmtree(wd)
  sweep.main(sweep_args(out))
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert summary["counts"]["ran"] == 1 and not any("digits" in f["run"] for f in summary["failed"])
  assert "kept no checkpoints" in capsys.readouterr().out
  new = _results(wd)
  assert "stage2.init_from" not in new["config"] or not new["config"]["stage2.init_from"]
  assert {json.loads(l)["stage"] for l in open(os.path.join(wd, "metrics.jsonl"))} == {1, 2}
  assert new["accuracy"] == old["accuracy"]


# ---- the pieces ----

def test_select_lr_takes_the_best_val_and_the_first_of_ties():
  assert sweep.select_lr({1e-3: 0.50, 3e-3: 0.71, 1e-2: 0.70}) == 3e-3
  assert sweep.select_lr({1e-3: 0.70, 3e-3: 0.71, 1e-2: 0.71}) == 3e-3
  with pytest.raises(sweep.SweepError):
    sweep.select_lr({})


def test_tune_run_with_a_test_accuracy_is_refused():
  assert sweep.val_accuracy({"accuracy": {"val200": 0.5}}) == ("val200", 0.5)
  with pytest.raises(sweep.SweepError, match="test"):
    sweep.val_accuracy({"accuracy": {"val200": 0.5, "test": 0.6}})


def test_a_run_is_the_base_config_the_command_line_and_its_row():
  c = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  spec = sweep.RunSpec("multibranch", "cifar", "final", 3e-3, 2)
  r = sweep.run_config(c, {"dmlora.targets": "query,value", "batch_size": "32", "method": "lora"}, spec)
  assert r.dmlora.targets == ("query", "value") and r.batch_size == 32
  assert r.method == "multibranch"  # the row wins over the command line
  assert (r.stage1.lr, r.seed, r.data.protocol, r.data.task) == (3e-3, 2, "final", "cifar")
  assert c.stage1.lr == 1e-3 and c.method == "dmlora"  # the base config is not modified
  with pytest.raises(config_base.ConfigError, match="dmlora.rank"):
    sweep.run_config(c, {"dmlora.rnak": "4"}, spec)


def test_a_finished_run_of_a_row_with_fixed_settings_is_not_stale():
  # dmlora_block fixes stage2.granularity=block; its results.json records the resolved config,
  # so a second sweep must find it the same run (it once refused every one as "stale").
  c = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  spec = sweep.RunSpec("dmlora_block", "cifar", "tune", 3e-3, 0, stage2_lr=0.1)
  wanted = sweep.run_config(c, {}, spec)
  recorded = json.loads(json.dumps(config_base.flatten(config_base.with_method_settings(wanted))))  # as the trainer records it
  assert recorded["stage2.granularity"] == "block" and wanted.stage2.granularity == "module"
  assert sweep.stale_keys({"config": recorded}, wanted) == []
  recorded["stage2.granularity"] = "module"  # a run that did not apply the row's setting is another run
  assert sweep.stale_keys({"config": recorded}, wanted) == ["stage2.granularity"]


def test_rows_differ_only_in_their_method():
  base = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  flat = {row: sweep.flatten(sweep.run_config(base, {}, sweep.RunSpec(row, "cifar", "tune", 1e-3)))
          for row in sweep.ROWS}
  for row, f in flat.items():
    assert f["method"] == row
    assert sorted(k for k in f if f[k] != flat["dmlora"][k]) == ([] if row == "dmlora" else ["method"])


def test_results_from_another_configuration_are_stale():
  c = sweep.run_config(sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar"), {}, sweep.RunSpec(
      "dmlora", "cifar", "tune", 1e-3))
  res = {"config": sweep.flatten(c)}
  assert sweep.stale_keys(res, c) == []
  res["config"]["data.root"] = "/elsewhere"  # moving the data is not a different run
  assert sweep.stale_keys(res, c) == []
  # A run finished before config.parallel and model.attention existed ran at their defaults.
  del res["config"]["parallel"], res["config"]["model.attention"], res["config"]["stage1.head_lr_mult"]
  assert sweep.stale_keys(res, c) == []
  c.stage1.head_lr_mult = 100.0  # ... and a run at another head lr is another run
  assert sweep.stale_keys(res, c) == ["stage1.head_lr_mult"]
  c.stage1.head_lr_mult = 1.0
  res["config"]["dmlora.rank"] = 4
  assert sweep.stale_keys(res, c) == ["dmlora.rank"]
  c.parallel = "jit"
  assert sweep.stale_keys(res, c) == ["dmlora.rank", "parallel"]


def test_an_extended_lr_and_the_same_lr_in_a_grid_are_one_run():
  # The study's AdaLoRA grid reached 2.7e-2 by extending 3e-3 twice (3e-3 * 3 * 3), then
  # named 0.027 outright: both run in tune_lr0.027, and the finished run is not stale.
  extended = 3e-3 * 3 * 3
  assert extended != 0.027 and sweep.fmt_lr(extended) == sweep.fmt_lr(0.027)
  base = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  done = {"config": sweep.flatten(sweep.run_config(base, {}, sweep.RunSpec("lora", "cifar", "tune", extended)))}
  assert sweep.stale_keys(done, sweep.run_config(base, {}, sweep.RunSpec("lora", "cifar", "tune", 0.027))) == []
  # ... while a neighbouring lr is another run
  assert sweep.stale_keys(done, sweep.run_config(base, {}, sweep.RunSpec("lora", "cifar", "tune", 0.0271))) == [
      "stage1.lr"]


def test_the_vtab1k_benchmark_is_the_19_tasks_of_the_registry():
  assert sweep.BENCHMARKS["vtab1k"].tasks == tuple(vtab_tasks.TASKS) and len(vtab_tasks.TASKS) == 19


def test_edge_extension_steps_out_by_the_grid_ratio():
  assert sweep.edge_extension({1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}) is None
  assert sweep.edge_extension({1e-3: 0.7, 3e-3: 0.6}) == pytest.approx(1e-3 / 3)
  assert sweep.edge_extension({1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}) == pytest.approx(1e-2 * 10 / 3)
  assert sweep.edge_extension({1e-3: 0.5}) == pytest.approx(3e-3)
  # A best value tied with an inner lr is no reason to go further out.
  assert sweep.edge_extension({1e-4: 0.7, 1e-3: 0.7, 1e-2: 0.6}) is None
  assert sweep.edge_extension({1e-4: 0.6, 1e-3: 0.7, 1e-2: 0.7}) is None


def _fake_runs(monkeypatch, peak_lr):
  """Replaces training: val200 top-1 peaks at peak_lr (log scale); every final run gives 0.5."""
  tried = []

  def fake(config, workdir):
    if config.data.protocol == "tune":
      tried.append(config.stage1.lr)
      return {"accuracy": {"val200": 1.0 - abs(math.log10(config.stage1.lr / peak_lr)) / 10}}
    return {"accuracy": {"test": 0.5}}

  monkeypatch.setattr(sweep, "_in_process", fake)
  return tried


def test_grid_grows_at_an_edge_until_the_best_lr_is_inside(tmp_path, monkeypatch):
  tried = _fake_runs(monkeypatch, peak_lr=0.1)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "lora", "--lrs", "1e-3,1e-2", "--seeds", "1",
          "--extend_edges", "3"] + TINY
  assert sweep.main(args) == 0
  assert tried == pytest.approx([1e-3, 1e-2, 0.1, 1.0])  # 0.1 on the edge, then 1.0 shows it is the peak
  chosen = json.load(open(os.path.join(tmp_path, "sweep.json")))["selection"]["lora"]["digits"]
  assert chosen["lr"] == pytest.approx(0.1) and chosen["edge"] is False


def test_a_choice_still_on_an_edge_is_said_loudly(tmp_path, monkeypatch, capsys):
  tried = _fake_runs(monkeypatch, peak_lr=1.0)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "lora", "--lrs", "1e-3,1e-2", "--seeds", "1",
          "--extend_edges", "1", "--row_lrs", "full=1e-5"] + TINY
  assert sweep.main(args) == 0
  assert tried == pytest.approx([1e-3, 1e-2, 0.1])
  chosen = json.load(open(os.path.join(tmp_path, "sweep.json")))["selection"]["lora"]["digits"]
  assert chosen["lr"] == pytest.approx(0.1) and chosen["edge"] is True
  assert "WARNING: lora/digits: the chosen lr=0.1 is still at the edge of the grid" in capsys.readouterr().out


def test_a_failed_grid_lr_is_not_rerun_as_an_extension_that_rounds_differently(tmp_path, monkeypatch):
  # Grid 3e-3, 9e-3, 2.7e-2 with 2.7e-2 failing: the best (9e-3) is then on the edge of what
  # was measured, and its extension 9e-3 * 3 = 0.026999999999999996 is the failed run again.
  tried = _fake_runs(monkeypatch, peak_lr=1.0)
  fake = sweep._in_process

  def failing(config, workdir):
    if math.isclose(config.stage1.lr, 2.7e-2):
      tried.append(config.stage1.lr)
      raise RuntimeError("diverged")
    return fake(config, workdir)

  monkeypatch.setattr(sweep, "_in_process", failing)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "lora", "--lrs", "3e-3,9e-3,2.7e-2", "--seeds", "1",
          "--extend_edges", "1"] + TINY
  sweep.main(args)
  assert tried == pytest.approx([3e-3, 9e-3, 2.7e-2])


def test_an_extension_the_trainer_would_refuse_is_not_run_and_the_reason_is_said(tmp_path, monkeypatch, capsys):
  # Below stage1.min_lr (the cosine's floor, 1e-5) a run is refused: the full row's study grid
  # once "extended" to 3.3e-6 twice per task, each run failing, and then blamed the edge on
  # the 2 extensions it never ran.
  tried = _fake_runs(monkeypatch, peak_lr=1e-7)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "full", "--lrs", "1e-3", "--seeds", "1",
          "--row_lrs", "full=1e-5,3e-5"] + TINY
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert tried == pytest.approx([1e-5, 3e-5])
  assert "cannot extend the grid to 3.33333e-06: config.stage1.min_lr=1e-05: must be in (0, stage1.lr=" in out
  assert "the chosen lr=1e-05 is still at the edge of the grid after 0 extension(s)" in out
  chosen = json.load(open(os.path.join(tmp_path, "sweep.json")))["selection"]["full"]["digits"]
  assert chosen["lr"] == pytest.approx(1e-5) and chosen["edge"] is True
  # With a lower floor the same grid extends (the study's full row: stage1.min_lr=1e-7).
  tried.clear()
  assert sweep.main(args[:1] + [str(tmp_path / "lower")] + args[2:] + ["--config.stage1.min_lr=1e-7"]) == 0
  assert tried == pytest.approx([1e-5, 3e-5, 1e-5 / 3, 1e-5 / 9])


def test_a_grid_value_the_trainer_would_refuse_fails_before_any_run(tmp_path, monkeypatch, capsys):
  tried = _fake_runs(monkeypatch, peak_lr=1e-5)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "lora,full", "--lrs", "1e-3", "--seeds", "1",
          "--row_lrs", "full=3e-6,1e-5"] + TINY
  assert sweep.main(args) == 2
  assert tried == [] and "error: config.stage1.min_lr=1e-05: must be in (0, stage1.lr=3e-06]" in capsys.readouterr().err


def test_a_row_grid_replaces_the_common_grid(tmp_path, monkeypatch):
  tried = _fake_runs(monkeypatch, peak_lr=3e-5)
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "full", "--lrs", "1e-3,1e-2", "--seeds", "1",
          "--row_lrs", "full=1e-5,3e-5,1e-4"] + TINY
  assert sweep.main(args) == 0
  assert tried == pytest.approx([1e-5, 3e-5, 1e-4])


def test_a_bad_row_grid_is_named(capsys):
  with pytest.raises(SystemExit):
    sweep.parse_args(["--out", "x", "--row_lrs", "fulll=1e-5"])
  assert "--row_lrs 'fulll=1e-5'" in capsys.readouterr().err


def test_jobs_run_isolated_trainings_side_by_side_with_their_own_logs(tmp_path, capsys):
  # Tune runs only: the two that run side by side are the point (a third, final run would add
  # a process start and a compile to the suite and nothing to the check).
  args = ["--out", str(tmp_path), "--tasks", "digits", "--rows", "lora", "--lrs", "1e-3,3e-3", "--tune_only",
          "--extend_edges", "0", "--isolate", "--jobs", "2", "--config.data.source=demo"] + TINY
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert "Sweep: 1 row(s) x 1 task(s) x (2 lr, tune only) = 2 runs in" in out
  lines = [l for l in out.splitlines() if l.startswith("[")]
  # The second tune run started before the first one finished: two at a time (which of the
  # two says "running" first is up to the scheduler).
  assert {l.split(": running")[0] for l in lines[:2]} == {"[1/2] lora/digits tune lr=0.001",
                                                         "[2/2] lora/digits tune lr=0.003"}
  assert "stage 1  loss" not in out  # a run's progress goes to its own log
  for name in ("tune_lr0.001", "tune_lr0.003"):
    log = open(os.path.join(tmp_path, "lora", "digits", name, "train.log")).read()
    assert "dmlora_jax: method=lora" in log
  summary = json.load(open(os.path.join(tmp_path, "sweep.json")))
  assert summary["counts"] == {"ran": 2, "skipped": 0, "failed": 0} and summary["finished"]
  with pytest.raises(SystemExit):
    sweep.parse_args(["--out", "x", "--jobs", "2"])  # --jobs needs --isolate

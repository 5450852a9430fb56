"""The sweep driver: lr chosen on val200 only, final runs per seed, resume and skip, failures.

The end-to-end tests run one tiny sweep on the shared cifar10 task (tiny/4 at 16 px, one
epoch per stage, a 2-point lr grid, 2 seeds), shared with test_report.py through
`tiny_sweep` (a second call finds every run finished and returns at once).
"""

import json
import os

import numpy as np
import pytest

from dmlora_jax import sweep
from trainer_utils import VTAB_ROOT

LRS = (1e-5, 3e-3)  # far apart, so that val200 has a clear preference
TINY = [f"--config.data.root={VTAB_ROOT}", "--config.model.variant=tiny/4", "--config.model.init_checkpoint=",
        "--config.data.image_size=16", "--config.data.num_workers=2", "--config.batch_size=32",
        "--config.stage1.epochs=1", "--config.stage1.warmup_epochs=0", "--config.stage2.epochs=1",
        "--config.dmlora.num_branches=3", "--config.dmlora.rank=2", "--config.log_every=1000",
        "--config.checkpoint_every=1000"]
ROWS = ("dmlora",)  # one row keeps the test fast; the others are the same code path


def sweep_args(out) -> list[str]:
  return ["--out", str(out), "--tasks", "no_such_task,cifar10", "--lrs", ",".join(map(str, LRS)),
          "--seeds", "2", "--rows", ",".join(ROWS)] + TINY


def tiny_sweep(tmp_path_factory) -> tuple[str, int]:
  """Runs (or finds) the shared tiny sweep; returns (sweep dir, exit status of the first run)."""
  out = tmp_path_factory.getbasetemp() / "tiny_sweep"
  first = out / "first_rc"
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


# ---- end to end on the shared cifar10 task ----

@pytest.mark.parametrize("row", ROWS)
def test_lr_is_the_argmax_of_val200_over_the_tune_runs(swept, row):
  out, _ = swept
  task = os.path.join(out, row, "cifar10")
  val = []
  for lr in LRS:
    res = _results(os.path.join(task, f"tune_lr{lr:g}"))
    assert set(res["accuracy"]) == {"val200"}  # tune runs never evaluate test
    assert res["config"]["data.protocol"] == "tune" and res["config"]["stage1.lr"] == lr
    val.append(res["accuracy"]["val200"])
  best = LRS[int(np.argmax(val))]  # np.argmax: first of equals, the sweep's tie rule too
  chosen = json.load(open(os.path.join(out, "sweep.json")))["selection"][row]["cifar10"]
  assert chosen["lr"] == best and chosen["metric"] == "val200"
  assert chosen["val"] == {f"{lr:g}": v for lr, v in zip(LRS, val)}
  for seed in (0, 1):
    res = _results(os.path.join(task, f"final_seed{seed}"))
    assert set(res["accuracy"]) == {"test"}
    assert res["config"]["data.protocol"] == "final"
    assert res["config"]["stage1.lr"] == best and res["config"]["seed"] == seed
    assert chosen["final"][str(seed)] == res["accuracy"]["test"]


def test_the_row_sets_the_method_and_its_stages(swept):
  out, _ = swept
  res = _results(os.path.join(out, "dmlora", "cifar10", "final_seed0"))
  assert res["method"] == "dmlora" and res["stage2_steps"] == res["stage1_steps"] == 1000 // 32
  assert res["config"]["dmlora.drop_end"] == 0.5 and res["config"]["dmlora.num_branches"] == 3


def test_ablation_rows_differ_only_in_what_their_names_say():
  base = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  got = {row: sweep.run_config(base, {}, sweep.RunSpec(row, "cifar", "tune", 1e-3)) for row in sweep.DEFAULT_ROWS}
  assert (got["lora"].method, got["lora"].stage2.epochs) == ("lora", 0)
  assert (got["multibranch"].method, got["multibranch"].dmlora.drop_end, got["multibranch"].stage2.epochs) == (
      "dmlora", 0.0, 0)
  assert (got["dropout"].method, got["dropout"].dmlora.drop_end, got["dropout"].stage2.epochs) == ("dmlora", 0.5, 0)
  assert (got["dmlora"].method, got["dmlora"].dmlora.drop_end, got["dmlora"].stage2.epochs) == ("dmlora", 0.5, 10)
  flat = {row: sweep.flatten(c) for row, c in got.items()}
  diff = lambda a, b: sorted(k for k in flat[a] if flat[a][k] != flat[b][k])
  assert diff("dropout", "dmlora") == ["stage2.epochs"]
  assert diff("multibranch", "dropout") == ["dmlora.drop_end"]  # drop_start is 0 in both


def test_final_runs_keep_their_export_and_tune_runs_drop_theirs(swept):
  out, _ = swept
  for row in ROWS:
    assert os.path.exists(os.path.join(out, row, "cifar10", "final_seed1", "merged.npz"))
    assert not os.path.exists(os.path.join(out, row, "cifar10", f"tune_lr{LRS[0]:g}", "merged.npz"))


def test_a_failed_run_is_reported_and_the_sweep_goes_on(swept):
  out, rc = swept
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert rc == 1
  failed = [f["run"] for f in summary["failed"]]
  assert failed == [f"{row}/no_such_task tune lr={lr:g}" for row in ROWS for lr in LRS]
  assert summary["selection"]["dmlora"]["no_such_task"]["lr"] is None
  assert not os.path.exists(os.path.join(out, "dmlora", "no_such_task", "final_seed0"))
  assert summary["selection"]["dmlora"]["cifar10"]["lr"] in LRS  # the task after the failure still ran


def test_second_invocation_skips_every_finished_run(swept, capsys):
  out, _ = swept
  before = _all_results(out)
  assert len(before) == len(ROWS) * (len(LRS) + 2)
  assert sweep.main(sweep_args(out)) == 1  # the missing task still fails
  text = capsys.readouterr().out
  summary = json.load(open(os.path.join(out, "sweep.json")))
  assert summary["counts"] == {"ran": 0, "skipped": len(before), "failed": len(ROWS) * len(LRS)}
  assert _all_results(out) == before  # nothing rewritten
  assert f"[1/{len(ROWS) * 2 * (len(LRS) + 2)}]" in text and "skipped" in text


def test_unfinished_run_resumes_from_its_checkpoint(swept):
  out, _ = swept
  wd = os.path.join(out, "dmlora", "cifar10", f"tune_lr{LRS[1]:g}")  # val200: a short evaluation
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


def test_overrides_are_typed_and_misspelt_keys_named():
  c = sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar")
  spec = sweep.RunSpec("multibranch", "cifar", "final", 3e-3, 2)
  r = sweep.run_config(c, {"dmlora.targets": "query,value", "batch_size": "32", "dmlora.rescale": "false",
                           "dmlora.drop_end": "0.3"}, spec)
  assert r.dmlora.targets == ("query", "value") and r.batch_size == 32 and r.dmlora.rescale is False
  # The row wins over the command line: multibranch never drops a branch.
  assert r.dmlora.drop_end == 0.0 and r.stage2.epochs == 0
  assert (r.stage1.lr, r.seed, r.data.protocol, r.data.task) == (3e-3, 2, "final", "cifar")
  assert c.stage1.lr == 1e-3  # the base config is not modified
  with pytest.raises(sweep.SweepError, match="dmlora.rank"):
    sweep.run_config(c, {"dmlora.rnak": "4"}, spec)


def test_results_from_another_configuration_are_stale():
  c = sweep.run_config(sweep.load_config(sweep.BENCHMARKS["vtab1k"], "cifar"), {}, sweep.RunSpec(
      "dmlora", "cifar", "tune", 1e-3))
  res = {"config": sweep.flatten(c)}
  assert sweep.stale_keys(res, c) == []
  res["config"]["data.root"] = "/elsewhere"  # moving the data is not a different run
  assert sweep.stale_keys(res, c) == []
  res["config"]["dmlora.rank"] = 4
  assert sweep.stale_keys(res, c) == ["dmlora.rank"]


def test_every_row_is_documented_and_runs_one_method():
  for name, over in sweep.ROWS.items():
    assert over["method"] in ("dmlora", "lora", "full", "linear"), name
    assert f'"{name}"' in open(sweep.__file__).read()
  assert len(sweep.VTAB1K_TASKS) == 19 and len(set(sweep.VTAB1K_TASKS)) == 19

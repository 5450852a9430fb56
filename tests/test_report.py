"""The report: table numbers against results.json, both averages, quoted rows, the plots."""

import csv
import json
import os
import statistics

import pytest

from dmlora_jax import report
from dmlora_jax.data import vtab_tasks
from test_sweep import ROWS, tiny_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _csv(path):
  with open(path) as f:
    return {r["method"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  out, _ = tiny_sweep(tmp_path_factory)
  return out, report.report(out)


def test_table_numbers_are_mean_and_std_of_the_final_runs(reported):
  out, files = reported
  table = _csv(files["csv"])
  for row in ROWS:
    accs = []
    for seed in (0, 1):
      with open(os.path.join(out, row, "digits", f"final_seed{seed}", "results.json")) as f:
        accs.append(100 * json.load(f)["accuracy"]["test"])
    assert float(table[row]["digits"]) == pytest.approx(statistics.mean(accs), abs=1e-4)
    assert float(table[row]["digits std"]) == pytest.approx(statistics.stdev(accs), abs=1e-4)
    assert table[row]["seeds"] == "2"
    # digits is not a VTAB-1k task: its own column, no VTAB task, in no mean.
    assert table[row]["cifar"] == "" and table[row]["Natural mean"] == ""
    assert table[row]["mean over tasks (19 vtab1k tasks)"] == ""
  assert "no_such_task" not in next(iter(table.values()))  # failed runs leave no column


def test_quoted_baselines_sit_beside_our_rows_with_both_averages_labelled(reported):
  _, files = reported
  table = _csv(files["csv"])
  lora = table["LoRA (NOAH's) (quoted)"]
  assert lora["mean of group means (Natural/Specialized/Structured)"] == "74.6000"
  assert lora["mean over tasks (19 vtab1k tasks)"] == "72.3000"
  assert lora["source"].startswith("published")
  assert sum(m.endswith("(quoted)") for m in table) == len(report.QUOTED_VTAB1K)
  md = open(files["md"]).read()
  assert "mean of group means" in md and "mean over tasks" in md and "RepAdapter (quoted)" in md
  assert "± " in md and "digits" in md


def test_report_writes_the_three_plots_as_png(reported):
  _, files = reported
  for name in ("scales.png", "drop_schedule.png", "acc_vs_params.png"):
    with open(files[name], "rb") as f:
      assert f.read(8) == PNG, name
    assert os.path.getsize(files[name]) > 5_000, name


def test_drop_curve_follows_the_schedule_and_is_zero_in_stage_2():
  cfg = {"method": "dmlora", "dmlora.drop_schedule": "linear", "dmlora.drop_start": 0.0, "dmlora.drop_end": 0.5}
  t, p = report.drop_curve(cfg, 11, 3)
  assert len(t) == 14 and p[0] == 0.0 and p[5] == pytest.approx(0.25) and p[10] == pytest.approx(0.5)
  assert list(p[11:]) == [0.0, 0.0, 0.0]
  assert not report.drop_curve({**cfg, "method": "lora"}, 11, 0)[1].any()


def _fake_run(root, row, task, seed, acc, params=1000):
  d = os.path.join(root, row, task, f"final_seed{seed}")
  os.makedirs(d)
  cfg = {"method": "dmlora", "dmlora.drop_schedule": "linear", "dmlora.drop_start": 0.0, "dmlora.drop_end": 0.5}
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump({"accuracy": {"test": acc}, "trainable_params": params, "steps": 20, "stage1_steps": 16,
               "stage2_steps": 4, "config": cfg,
               "scales": {f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query": 8.0 + i
                          for i in range(3)}}, f)


def test_group_means_and_both_averages_on_a_full_vtab_table(tmp_path):
  # Task i has accuracy (50 + i)% with seeds +-1: means 50..68, std sqrt(2).
  for i, task in enumerate(tuple(vtab_tasks.TASKS)):
    for seed, d in ((0, -0.01), (1, 0.01)):
      _fake_run(tmp_path, "dmlora", task, seed, 0.50 + i / 100 + d)
  _fake_run(tmp_path, "dmlora", "digits", 0, 0.99)  # outside VTAB: in no mean
  for task in tuple(vtab_tasks.TASKS)[1:]:  # a row missing one Natural task
    _fake_run(tmp_path, "lora", task, 0, 0.40)
  files = report.report(str(tmp_path))
  r = _csv(files["csv"])["dmlora"]
  assert float(r["dtd"]) == pytest.approx(52.0) and float(r["dtd std"]) == pytest.approx(2 ** 0.5, abs=1e-4)
  nat, spe, stru = 53.0, 58.5, 64.5  # means of 50..56, 57..60, 61..68
  assert float(r["Natural mean"]) == pytest.approx(nat)
  assert float(r["Specialized mean"]) == pytest.approx(spe)
  assert float(r["Structured mean"]) == pytest.approx(stru)
  assert float(r["mean of group means (Natural/Specialized/Structured)"]) == pytest.approx((nat + spe + stru) / 3)
  assert float(r["mean over tasks (19 vtab1k tasks)"]) == pytest.approx(59.0)
  assert float(r["digits"]) == pytest.approx(99.0)
  lora = _csv(files["csv"])["lora"]
  assert lora["cifar"] == "" and lora["Natural mean"] == "" and float(lora["Structured mean"]) == pytest.approx(40)
  assert lora["mean of group means (Natural/Specialized/Structured)"] == ""
  assert lora["mean over tasks (19 vtab1k tasks)"] == "" and lora["dtd std"] == ""  # one seed: no std


def test_report_command_names_a_missing_sweep(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 2
  assert "no finished final run" in capsys.readouterr().err


def test_paired_differences_are_per_task_and_pooled_with_t_intervals(tmp_path):
  # dmlora - lora per (task, seed): task a: +1, +2, +3 points; task b: -1, 0, +1 points.
  for seed, (da, db) in enumerate(((1, -1), (2, 0), (3, 1))):
    _fake_run(tmp_path, "lora", "a", seed, 0.50)
    _fake_run(tmp_path, "dmlora", "a", seed, 0.50 + da / 100)
    _fake_run(tmp_path, "lora", "b", seed, 0.60)
    _fake_run(tmp_path, "dmlora", "b", seed, 0.60 + db / 100)
  got = {(d["task"]): d for d in report.paired_differences(report.load_runs(str(tmp_path)), [("dmlora", "lora")])}
  # task a: mean 2, sample std 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732.
  assert got["a"]["mean"] == pytest.approx(2.0) and got["a"]["n"] == 3
  assert got["a"]["high"] - got["a"]["mean"] == pytest.approx(4.303 / 3 ** 0.5, rel=1e-4)
  assert got["b"]["mean"] == pytest.approx(0.0)
  # pooled: 1, 2, 3, -1, 0, 1: mean 1, sample std sqrt(2), n 6: t(0.975, 5) = 2.571.
  pooled = got["all tasks"]
  assert pooled["mean"] == pytest.approx(1.0) and pooled["n"] == 6
  assert pooled["high"] - pooled["mean"] == pytest.approx(2.571 * 2 ** 0.5 / 6 ** 0.5, rel=1e-4)
  md = open(report.report(str(tmp_path))["md"]).read()
  assert "| dmlora - lora | a | +2.00 |" in md


def test_labels_of_coinciding_points_are_stacked_not_overlaid():
  # The real-backbone plot's case: three rows with the same parameter count within 0.12 points
  # of each other, one row at that count 1.6 points higher, and two rows far away in parameters.
  points = [("lora", 225_070, 88.58, 0.4), ("multibranch", 887_980, 88.27, 0.1),
            ("dropout", 887_980, 86.56, 0.1), ("dmlora", 887_980, 86.61, 0.2),
            ("dmlora_block", 887_980, 86.68, 0.1), ("full", 21_549_064, 86.58, 0.9),
            ("linear", 3_850, 80.34, 0.4)]
  offsets = dict(zip([p[0] for p in points], report.label_offsets(points, step=9.0)))
  # by accuracy within the cluster: dmlora_block on its point's line, dmlora one below, dropout two
  assert offsets["dmlora_block"] == (5.0, 4.0)
  assert offsets["dmlora"] == (5.0, -5.0)
  assert offsets["dropout"] == (5.0, -14.0)
  # 1.6 points above the cluster (range 8.24, so 4% is 0.33) and 2 decades apart: no shift
  for row in ("lora", "multibranch", "full", "linear"):
    assert offsets[row] == (5.0, 4.0), row

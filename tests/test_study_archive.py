"""The real-backbone study keeps its finished runs in the repository (benchmarks/study_real_backbone.py
archive/restore): machine paths become placeholders and come back as the new machine's paths, and an
archive made with another backbone restores nothing."""

import json
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

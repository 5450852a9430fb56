"""The benchmark command on the tiny variant: every field of the JSON is there and sane."""

import json
import math
import os
import sys

from conftest import REPO
from dmlora_jax import bench

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import targets  # noqa: E402  (benchmarks/targets.py)

FIELDS = ("train_images_per_s", "eval_images_per_s", "compile_s", "peak_memory_bytes", "trainable_params",
          "total_params", "step_flops", "achieved_flops_per_s")


def test_bench_json_has_every_field_with_sane_values(tmp_path):
  path = tmp_path / "bench.json"
  bench.main(["--variant", "tiny/4", "--image_size", "16", "--batch_size", "4", "--steps", "2",
              "--eval_steps", "1", "--methods", "full,linear,lora,dmlora", "--num_branches", "2", "--rank", "2",
              "--per_branch_lora", "0", "--matmul_size", "128", "--in_process", "1", f"--json={path}"])
  res = json.loads(path.read_text())
  rows = res["methods"]
  assert set(rows) == {"full", "linear", "lora", "dmlora"}
  for name, m in rows.items():
    for f in FIELDS:
      assert isinstance(m[f], (int, float)) and math.isfinite(m[f]) and m[f] > 0, (name, f, m[f])
    assert isinstance(m["trainable_params"], int) and isinstance(m["total_params"], int)
    assert len(m["train_step_times_s"]) == 2
    faults = m["train_step_minor_faults"]
    assert len(faults) == 2 and all(isinstance(f, int) and f >= 0 for f in faults), (name, faults)
    assert m["achieved_flops_per_s"] == m["step_flops"] / m["train_step_s"]
  assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
  for name in ("linear", "lora", "dmlora"):
    assert rows[name]["trainable_params"] < rows[name]["total_params"]
  assert rows["linear"]["trainable_params"] < rows["lora"]["trainable_params"]
  # LoRA defaults to DMLoRA's total rank (K * r = 4): the same adapter parameter count.
  assert rows["lora"]["rank"] == 4 and rows["lora"]["trainable_params"] == rows["dmlora"]["trainable_params"]
  # Skipping frozen weight gradients shows in XLA's FLOP count.
  assert rows["lora"]["step_flops"] < rows["full"]["step_flops"]

  d = rows["dmlora"]
  assert d["merged_eval_images_per_s"] > 0 and d["plain_eval_images_per_s"] > 0
  assert d["merged_is_plain_program"] is True
  assert d["programs"]["merged"]["compiled_hlo_sha256"] == d["programs"]["plain"]["compiled_hlo_sha256"]
  assert d["programs"]["unmerged_adapter"]["compiled_hlo_sha256"] != d["programs"]["plain"]["compiled_hlo_sha256"]
  assert res["matmul"]["flops_per_s"] > 0
  assert res["hardware"]["cpu_count"] >= 1
  assert "targets" not in res  # the project's goals live in benchmarks/targets.py, not in the library
  # ... which reads this JSON: the targets whose rows were measured, each with its verdict.
  got = targets.targets(res, res["settings"]["rank"])
  assert set(got) >= {"merged_is_plain_program", "dmlora_step_over_lora_step", "merged_eval_over_plain_eval"}
  assert got["merged_is_plain_program"]["holds"] is True
  assert got["dmlora_step_over_lora_step"]["value"] == d["train_step_s"] / rows["lora"]["train_step_s"]

"""The benchmark command on the tiny variant: every field of the JSON is there and sane."""

import json
import math
import os
import sys

from conftest import REPO
from dmlora_jax import bench

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import targets  # noqa: E402  (benchmarks/targets.py)

FIELDS = ("train_images_per_s", "eval_images_per_s", "compile_s", "eval_compile_s", "peak_memory_bytes", "trainable_params",
          "total_params", "step_flops", "achieved_flops_per_s")


def test_bench_json_has_every_field_with_sane_values(tmp_path):
  path = tmp_path / "bench.json"
  bench.main(["--variant", "tiny/4", "--image_size", "16", "--per_device_batch", "4", "--steps", "2",
              "--eval_steps", "1", "--methods", "full,linear,lora,dmlora", "--num_branches", "2", "--rank", "2",
              "--per_branch_lora", "0", "--matmul_size", "128", "--in_process", "1", "--logits_images", "2",
              f"--json={path}", f"--markdown={tmp_path / 'bench.md'}"])
  res = json.loads(path.read_text())
  assert res["settings"]["batch_size"] == 4  # --per_device_batch 4 x 1 CPU device
  assert (tmp_path / "bench.md").read_text().startswith("| row |")
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
  # Skipping frozen weight gradients shows in XLA's FLOP count of the compiled step; the
  # linear probe backprops through nothing.
  assert rows["lora"]["step_flops"] < rows["full"]["step_flops"]
  assert rows["linear"]["step_flops"] < rows["lora"]["step_flops"]

  for m in rows.values():  # no peak FLOP/s is known for a CPU
    assert m["chip_peak_flops_per_s"] is None and m["fraction_of_peak"] is None

  d = rows["dmlora"]
  # The merged params on the plain ViT give the unmerged adapter's logits (float32 here).
  assert d["logits_images"] == 2 and d["merged_logits_max_abs_diff"] <= 1e-5 * max(1.0, d["logits_max_abs"])
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


def test_peak_flops_by_device_kind():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert bench.peak_flops("TPU v5 lite") == 197e12 and bench.peak_flops("TPU v5p") == 459e12
  assert bench.peak_flops("TPU v6 lite") == 918e12 and bench.peak_flops("TPU v4") == 275e12
  assert bench.peak_flops("cpu") is None


def test_combine_joins_one_method_per_file(tmp_path):
  # benchmarks/accelerator.sh measures each method in its own process, then joins the JSONs.
  def one(name):
    m = {"num_branches": 0, "rank": 0, "dtype": "bfloat16", "remat": False, "trainable_params": 1, "total_params": 2,
         "train_images_per_s": 1.0, "train_step_s": 1.0, "eval_images_per_s": 1.0, "compile_s": 1.0,
         "step_flops": 1e9, "achieved_flops_per_s": 1e9, "fraction_of_peak": 0.5, "peak_memory_bytes": 2**20}
    r = {"command": f"bench --methods {name}", "settings": {"methods": name}, "methods": {name: m},
         "matmul": {"n": 8, "median_s": 1.0, "flops_per_s": 2e9}, "hardware": {"devices": ["d"], "backend": "gpu"}}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(r))
    return str(p)
  out = tmp_path / "all.json"
  res = bench.main(["--combine", f"{one('full')},{one('lora')}", f"--json={out}", f"--markdown={tmp_path / 'all.md'}"])
  assert list(res["methods"]) == ["full", "lora"] and len(res["runs"]) == 2
  assert json.loads(out.read_text())["methods"].keys() == {"full", "lora"}
  assert "| lora |" in (tmp_path / "all.md").read_text() and "50.0%" in (tmp_path / "all.md").read_text()

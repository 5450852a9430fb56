"""The speed targets of the benchmark issue, checked on a `python -m dmlora_jax.bench` JSON.

  python benchmarks/targets.py benchmarks/results/cpu_s16_224_b32.json

These are this project's goals for its CPU step (and the PyTorch figure it set out to beat),
not properties of the library, so they live here with the results rather than in the bench.
"""

import json
import sys

PEER_LORA_IMAGES_PER_S = 8.96  # timm + PEFT LoRA, ViT-S/16 224 px, batch 32, 2 threads (../shared/PERF_NOTES.md)


def targets(res: dict, r: int) -> dict:
  """The issue's targets, each {value, target, holds} where the rows it needs were measured."""
  m = res["methods"]
  out = {}

  def add(name, value, target, holds):
    out[name] = {"value": value, "target": target, "holds": bool(holds)}

  if "dmlora" in m:
    for row in (f"lora_r{r}", "lora"):
      if row in m:
        v = m["dmlora"]["train_step_s"] / m[row]["train_step_s"]
        add(f"dmlora_step_over_{row}_step", v, "<= 1.05", v <= 1.05)
  if "full" in m:
    for row in ("lora", f"lora_r{r}", "dmlora"):
      if row in m:
        v = m[row]["train_step_s"] / m["full"]["train_step_s"]
        add(f"{row}_step_over_full_step", v, "<= 0.72", v <= 0.72)
    if "dmlora" in m:
      v = m["dmlora"]["peak_memory_bytes"] / m["full"]["peak_memory_bytes"]
      add("dmlora_peak_memory_over_full", v, "< 1", v < 1)
  if "dmlora" in m:
    d = m["dmlora"]
    v = d["merged_over_plain_eval"]
    add("merged_eval_over_plain_eval", v, "within 0.97..1.03", 0.97 <= v <= 1.03)
    add("merged_is_plain_program", d["merged_is_plain_program"], "true", d["merged_is_plain_program"])
    v = d["achieved_flops_per_s"] / res["matmul"]["flops_per_s"]
    add("dmlora_train_flops_over_matmul", v, ">= 0.60", v >= 0.60)
    st = res["settings"]
    if (st["variant"], st["image_size"], st["batch_size"]) == ("S/16", 224, 32):  # the peer's workload only
      add("dmlora_train_images_per_s", d["train_images_per_s"], f">= {PEER_LORA_IMAGES_PER_S} (PyTorch+PEFT LoRA)",
          d["train_images_per_s"] >= PEER_LORA_IMAGES_PER_S)
  return out


def table(out: dict) -> str:
  lines = ["| target | value | wanted | holds |", "| --- | --- | --- | --- |"]
  for k, t in out.items():
    v = t["value"]
    shown = f"{v:.3f}" if not isinstance(v, bool) else str(v)
    lines.append(f"| {k} | {shown} | {t['target']} | {'yes' if t['holds'] else 'NO'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print("usage: python benchmarks/targets.py BENCH_JSON", file=sys.stderr)
    return 2
  with open(argv[0]) as f:
    res = json.load(f)
  print(table(targets(res, res["settings"]["rank"])))
  return 0


if __name__ == "__main__":
  sys.exit(main())

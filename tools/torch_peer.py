"""The PyTorch peer of `python -m dmlora_jax.bench`, for a same-machine comparison.

timm vit_small_patch16_224 (random init, nothing downloaded) + PEFT LoRA, the setting of
../shared/PERF_NOTES.md: r=8 on timm's fused `qkv` Linear (alpha 8), head trainable,
AdamW, batch 32, 224 px, 2 threads; plus full fine-tuning and inference (torch.no_grad).
Rows are timed round-robin (one step of each in turn), medians, like the JAX bench.

Needs torch, timm and peft, which dmlora_jax does not depend on:

  /path/to/torch-env/bin/python tools/torch_peer.py --steps 5 --json=benchmarks/results/torch_peer.json
"""

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--num_classes", type=int, default=100)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--json", default="")
  a = ap.parse_args()

  import peft
  import timm
  import torch
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)

  def vit():
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=a.num_classes)

  x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
  y = torch.randint(0, a.num_classes, (a.batch_size,))
  lora = peft.get_peft_model(vit(), peft.LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=["qkv"],
                                                    modules_to_save=["head"]))
  full = vit()
  infer = vit().eval()

  def trainer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def step():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())

  def inference():
    with torch.no_grad():
      infer(x)

  rows = {"lora": trainer(lora), "full": trainer(full), "inference": (inference, 0, 0)}
  times = {k: [] for k in rows}
  for i in range(a.steps + 1):  # the first round is warm-up
    for name, (fn, _, _) in rows.items():
      t = time.perf_counter()
      fn()
      if i:
        times[name].append(time.perf_counter() - t)
  res = {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
         "threads": a.threads, "cpu": platform.processor(), "load_average_1_5_15": list(os.getloadavg()),
         "settings": vars(a), "rows": {}}
  for name, (_, trainable, total) in rows.items():
    med = statistics.median(times[name])
    res["rows"][name] = {"images_per_s": a.batch_size / med, "step_s": med, "times_s": times[name],
                         "trainable_params": trainable, "total_params": total}
    print(f"{name:10s} {a.batch_size / med:7.2f} img/s  (median {med:.3f} s of {len(times[name])})")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()

r"""Input-pipeline throughput: decode + RGB + bicubic resize, and train_batches.

  python benchmarks/bench_pipeline.py [--root ../shared/data/vtab1k] [--task cifar10] \
      [--size 224] [--workers 2] [--batch 64]

Reports images/s of decoding the task's train800val200 split at --size (all cores via the
thread pool, and one thread) and of iterating train_batches over the cached split.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dmlora_jax import config_base, data  # noqa: E402
from dmlora_jax.data import folder, images  # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(REPO), "shared", "data", "vtab1k")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default=DEFAULT_ROOT)
  p.add_argument("--task", default="cifar10")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--workers", type=int, default=images.cpu_count())
  p.add_argument("--batch", type=int, default=64)
  a = p.parse_args(argv)
  c = config_base.get_base_config().data
  c.root, c.task, c.image_size = a.root, a.task, a.size
  _, srcs = folder.splits(c, ("train800val200",))
  refs = srcs["train800val200"].refs
  out = {}
  for workers in sorted({1, a.workers}):
    t = time.perf_counter()
    imgs = images.decode_files(refs, a.size, workers)
    dt = time.perf_counter() - t
    out[f"decode_resize_{workers}w"] = len(refs) / dt
    print(f"decode+resize to {a.size}px, {workers} thread(s): {len(refs) / dt:,.0f} images/s "
          f"({len(refs)} images in {dt:.2f}s, {imgs.nbytes / 2**20:.0f} MiB cached)")
  split = data.Split("train800val200", imgs, srcs["train800val200"].labels, len(refs))
  n, t = 0, time.perf_counter()
  for epoch in range(3):
    for b in data.train_batches(split, a.batch, 0, epoch):
      n += len(b["label"])
  dt = time.perf_counter() - t
  out["train_batches"] = n / dt
  print(f"train_batches (batch {a.batch}, {a.size}px, uint8 gather): {n / dt:,.0f} images/s")
  return out


if __name__ == "__main__":
  main()

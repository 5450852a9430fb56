"""How far does SSF's random initialisation move a pre-trained backbone before any training?

SSF (ssf.py) starts every scale at gamma ~ N(1, std^2) and every shift at beta ~ N(0, std^2),
std = config.ssf.init_std (0.02, the official code's). On a supervised ViT-B that is a small
perturbation; this script measures it on the study's backbone. It runs the frozen backbone
on val200 images of one task (never test) twice, plain and with a freshly initialised SSF at
each std, and reports per image the cosine between the two pre-head features (the class
token after the final LayerNorm), the relative distance ||f_ssf - f|| / ||f||, and the
accuracy of a nearest-class-mean probe fitted on train800 features (the head a linear probe
would start from). std 0 is the identity and must give cosine 1.

    python benchmarks/ssf_init_drift.py --backbone runs/study_real/backbone/dinov2_s14.npz \
        --task ../shared/data/vtab1k/cifar10 --stds 0,0.002,0.005,0.02 --seeds 0,1,2

About 3 min on the 2-core VM (S/14 at 112 px, 200 + 800 images per std and seed).
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmlora_jax import npz, vit  # noqa: E402
from dmlora_jax.data import folder, images  # noqa: E402
from dmlora_jax.data.normalize import normalize  # noqa: E402
from dmlora_jax.pytrees import flatten, unflatten  # noqa: E402


def features_fn(variant: str, base: dict, std: float | None, seed: int, size: int):
  """A function images -> (N, D) pre-head features of the backbone `base` (flat params, as
  loaded once by `load_backbone`), with SSF at `std` (None: none), its SSF leaves drawn from
  `seed`. The head is the identity (D classes)."""
  kw = {} if std is None else {"ssf": True, "ssf_init_std": std}
  cfg = vit.parse_variant(variant, 1, gelu_approximate=False, **kw)
  cfg = dataclasses.replace(cfg, num_classes=cfg.width)
  model = vit.ViT(cfg)
  flat = flatten(model.init(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32))["params"])
  flat.update({k: v for k, v in base.items() if k in flat})  # the backbone; SSF's leaves keep their init
  flat["head/kernel"] = np.eye(cfg.width, dtype=np.float32)
  flat["head/bias"] = np.zeros((cfg.width,), np.float32)
  params = unflatten(flat)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return lambda x: np.concatenate([np.asarray(apply(params, x[i:i + 50])) for i in range(0, len(x), 50)])


def load_backbone(variant: str, path: str, size: int) -> dict:
  """The backbone's flat params for the plain model at `size` (position grid resampled), read once."""
  model = vit.ViT(vit.parse_variant(variant, 1, gelu_approximate=False))
  params, _ = npz.load_pretrained(model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))["params"], path)
  return {k: v for k, v in flatten(params).items() if not k.startswith("head/")}


def ncm_accuracy(train_f, train_y, f, y) -> float:
  """Nearest class mean on L2-normalised features (cosine), fitted on train."""
  def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  classes = np.unique(train_y)
  means = unit(np.stack([unit(train_f[train_y == c]).mean(0) for c in classes]))
  return float((classes[np.argmax(unit(f) @ means.T, axis=1)] == y).mean())


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--backbone", required=True, help="the study's backbone .npz (public ViT layout)")
  ap.add_argument("--task", required=True, help="a VTAB-1k task folder (train800.txt, val200.txt)")
  ap.add_argument("--variant", default="S/14")
  ap.add_argument("--image_size", type=int, default=112)
  ap.add_argument("--normalization", default="imagenet")
  ap.add_argument("--stds", default="0,0.002,0.005,0.02")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--json", default="", help="write the numbers here too")
  a = ap.parse_args(argv)
  for path in (a.backbone, os.path.join(a.task, "val200.txt")):
    if not os.path.exists(path):
      raise SystemExit(f"error: {path} not found")

  def load(split):
    refs, y = folder.read_list(os.path.join(a.task, f"{split}.txt"), a.task)
    x = images.decode_files(refs, a.image_size, images.cpu_count(), desc=split)
    return np.asarray(normalize(x, a.normalization)), y

  (xt, yt), (xv, yv) = load("train800"), load("val200")
  base = load_backbone(a.variant, a.backbone, a.image_size)
  plain = features_fn(a.variant, base, None, 0, a.image_size)
  ft, fv = plain(xt), plain(xv)
  rows = [{"std": None, "seed": None, "ncm_val200": ncm_accuracy(ft, yt, fv, yv)}]
  print(f"plain backbone: nearest-class-mean val200 {100 * rows[0]['ncm_val200']:.1f}%", flush=True)
  for std in (float(s) for s in a.stds.split(",")):
    for seed in (int(s) for s in a.seeds.split(",")):
      f = features_fn(a.variant, base, std, seed, a.image_size)
      gt, gv = f(xt), f(xv)
      cos = (gv * fv).sum(1) / np.linalg.norm(gv, axis=1) / np.linalg.norm(fv, axis=1)
      rel = np.linalg.norm(gv - fv, axis=1) / np.linalg.norm(fv, axis=1)
      row = {"std": std, "seed": seed, "cos_median": float(np.median(cos)), "cos_min": float(cos.min()),
             "rel_dist_median": float(np.median(rel)), "ncm_val200": ncm_accuracy(gt, yt, gv, yv)}
      rows.append(row)
      print(f"init_std {std:g} seed {seed}: cosine to the plain features median {row['cos_median']:.3f} "
            f"(min {row['cos_min']:.3f}), relative distance median {row['rel_dist_median']:.3f}, "
            f"nearest-class-mean val200 {100 * row['ncm_val200']:.1f}%", flush=True)
  if a.json:
    with open(a.json, "w") as fh:
      json.dump({"backbone": os.path.basename(a.backbone), "task": os.path.basename(os.path.normpath(a.task)),
                 "variant": a.variant, "image_size": a.image_size, "rows": rows}, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

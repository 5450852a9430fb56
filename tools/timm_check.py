"""Checks that a merged export loads in timm and gives the adapter model's logits.

Needs torch + timm, which dmlora_jax does not depend on, so it runs in two steps, possibly
in two environments:

  python -m tools.timm_check write /tmp/timmcheck          # dmlora_jax env: random DMLoRA
                                                           # model, its logits, merged.npz
  /path/to/torch-env/bin/python -m tools.timm_check check /tmp/timmcheck  # timm env

timm reads the export with timm.models.load_checkpoint (its vit_jax .npz loader).
Measured 2026-11-27, timm 1.0.31 / torch 2.14.1 CPU: max |logit difference| 4.8e-07 (tanh
GELU) and 7.2e-07 (exact GELU) on a 2-block model with branches on all six projections.
"""

import functools
import os
import sys

GEOMETRY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)


def write(out: str) -> None:
  import jax
  import numpy as np
  from dmlora_jax import dmlora, npz, vit
  from dmlora_jax.config_base import ALL_TARGETS
  from dmlora_jax.merge import merge_params
  from dmlora_jax.pytrees import flatten, unflatten
  os.makedirs(out, exist_ok=True)
  x = np.asarray(jax.random.normal(jax.random.key(5), (4, 16, 16, 3)))
  np.save(os.path.join(out, "x.npy"), x)
  for tag, approx in (("tanh", True), ("exact", False)):
    model = vit.ViT(vit.parse_variant("tiny/4", 10, gelu_approximate=approx),
                    dmlora.AdapterSpec(num_branches=3, rank=2, targets=ALL_TARGETS))
    params = model.init(jax.random.key(0), x[:1])["params"]
    keys = jax.random.split(jax.random.key(1), len(flatten(params)))
    params = unflatten({k: 0.3 * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, flatten(params).items())})
    np.save(os.path.join(out, f"logits_{tag}.npy"), np.asarray(model.apply({"params": params}, x)))
    npz.save_npz(os.path.join(out, f"merged_{tag}.npz"), merge_params(params))
  print(f"wrote {out}")


def check(out: str) -> None:
  import numpy as np
  import timm
  import torch
  from timm.models import load_checkpoint
  from timm.models.vision_transformer import VisionTransformer
  x = torch.from_numpy(np.load(os.path.join(out, "x.npy"))).permute(0, 3, 1, 2).float()
  worst = 0.0
  for tag in ("tanh", "exact"):
    act = functools.partial(torch.nn.GELU, approximate="tanh") if tag == "tanh" else torch.nn.GELU
    m = VisionTransformer(**GEOMETRY, act_layer=act).eval()
    load_checkpoint(m, os.path.join(out, f"merged_{tag}.npz"))
    with torch.no_grad():
      diff = float(np.abs(m(x).numpy() - np.load(os.path.join(out, f"logits_{tag}.npy"))).max())
    print(f"{tag} GELU: timm {timm.__version__} logits vs dmlora_jax adapter logits, max |diff| = {diff:.2e}")
    worst = max(worst, diff)
  sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
    sys.exit(__doc__)
  {"write": write, "check": check}[sys.argv[1]](sys.argv[2])

"""The study's real backbone through the safetensors path: the DINOv2-small ViT-S/14 that
../shared/tools/get_real_backbone.sh writes as .npz, converted to timm's naming, must load in
the project with the same logits as the .npz, and in timm with the same logits as the project.

  bash ../shared/tools/get_real_backbone.sh /tmp/backbone                      # .npz, 37x37 grid
  python -m tools.real_backbone_check write /tmp/backbone/dinov2_s14.npz /tmp/rbc   # dmlora_jax env
  /path/to/torch-env/bin/python -m tools.real_backbone_check check /tmp/rbc           # torch env

`write` saves dinov2_s14.safetensors (timm naming, the backbone without its all-zero head), an
input batch (4 images, 518 px, the checkpoint's native grid, so that neither side resamples
the position embedding), and the project's features (the final-normed class token, through an
identity head) from both files (they must be identical: same arrays, same program).
`check` builds timm's VisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12,
num_heads=6, exact GELU, no head), loads the safetensors file with timm.models.load_checkpoint, runs it
in float64 and prints the largest difference. Exit status 1 above 1e-5 relative to the
logits' scale. The last measurement is in the README's "Checkpoints in and out".
"""

import os
import sys


def write(npz_path: str, out: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dmlora_jax import npz, timm_format, vit
  from dmlora_jax.pytrees import flatten
  os.makedirs(out, exist_ok=True)
  flat = npz.load_npz(npz_path)
  st = os.path.join(out, "dinov2_s14.safetensors")
  backbone = {k: v for k, v in flat.items() if not k.startswith("head/")}  # its head is all zeros
  timm_format.save_safetensors(st, timm_format.from_public(backbone))
  x = np.asarray(jax.random.uniform(jax.random.key(0), (4, 518, 518, 3), minval=-2.0, maxval=2.0))
  np.save(os.path.join(out, "x.npy"), x)
  model = vit.ViT(vit.parse_variant("S/14", 384, gelu_approximate=False))  # identity head: the features
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 518, 518, 3)))["params"]
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  apply = jax.jit(model.apply)
  logits = {}
  for name, path in (("npz", npz_path), ("safetensors", st)):
    params, _ = npz.load_pretrained(init, path)
    params["head"] = {"kernel": np.eye(384, dtype=np.float32), "bias": np.zeros(384, np.float32)}
    logits[name] = np.asarray(apply({"params": params}, jnp.asarray(x)))
  a, b = (flatten(npz.load_pretrained(init, p)[0]) for p in (npz_path, st))
  same = all(np.array_equal(a[k], b[k]) for k in a if not k.startswith("head/"))
  diff = float(np.abs(logits["npz"] - logits["safetensors"]).max())
  print(f"params identical from .npz and .safetensors: {same}; max |feature diff| = {diff:.1e}")
  np.save(os.path.join(out, "logits.npy"), logits["safetensors"])
  if not same or diff:
    sys.exit(1)


def check(out: str) -> None:
  import numpy as np
  import timm
  import torch
  from timm.models import load_checkpoint
  from timm.models.vision_transformer import VisionTransformer
  want = np.load(os.path.join(out, "logits.npy"))
  m = VisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                        num_classes=0, act_layer=torch.nn.GELU)  # no head: the pooled features
  load_checkpoint(m, os.path.join(out, "dinov2_s14.safetensors"))
  m = m.double().eval()
  x = torch.from_numpy(np.load(os.path.join(out, "x.npy"))).permute(0, 3, 1, 2).double()
  with torch.no_grad():
    got = m(x).numpy()
  diff, scale = float(np.abs(got - want).max()), float(np.abs(got).max())
  print(f"timm {timm.__version__} (float64) vs dmlora_jax (float32) on the real ViT-S/14: max |feature diff| "
        f"{diff:.2e}, max |feature| {scale:.2f}, relative {diff / scale:.1e}")
  sys.exit(0 if diff <= 1e-5 * max(1.0, scale) else 1)


if __name__ == "__main__":
  if len(sys.argv) >= 4 and sys.argv[1] == "write":
    write(sys.argv[2], sys.argv[3])
  elif len(sys.argv) == 3 and sys.argv[1] == "check":
    check(sys.argv[2])
  else:
    sys.exit(__doc__)

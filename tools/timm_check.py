"""Checks that the exports load in timm and PEFT and give the adapted model's logits.

Needs torch, timm and peft, which dmlora_jax does not depend on, so it runs in two steps,
possibly in two environments:

  python -m tools.timm_check write /tmp/timmcheck                         # dmlora_jax env
  /path/to/torch-env/bin/python -m tools.timm_check check /tmp/timmcheck  # torch env

`write` makes a random DMLoRA model (3 branches of rank 2 on all six projections, a distinct
alpha_l per module) of each family and writes its adapted (unmerged) logits, the exports a run
writes (merged.npz for the plain family, merged.safetensors, adapter/) and the base weights in
timm's naming (base.safetensors). `check` builds timm's VisionTransformer of the same family
and compares its logits with:
  - merged.npz through timm.models.load_checkpoint (timm's vit_jax .npz loader; plain family);
  - merged.safetensors through timm.models.load_checkpoint;
  - base.safetensors + peft.PeftModel.from_pretrained(model, adapter/), unmerged;
and writes what PEFT gave (peft_logits.npy) beside them. Exit status 1 if any |diff| > 1e-4.
tests/fixtures/peft/ holds a `write` + `check` output of the plain and dinov2_reg families
(tests/test_peft_export.py).

A third pair checks the other direction on what the Hugging Face hub cache holds: every timm
ViT there (models--timm--*, model.safetensors + config.json) runs in timm, then loads in the
project through model.variant=auto and must give the same logits:

  /path/to/torch-env/bin/python -m tools.timm_check hub-timm /tmp/hubcheck [HF_HUB_CACHE]
  python -m tools.timm_check hub-check /tmp/hubcheck

Measured 2026-12-06, timm 1.0.31 / peft 0.21.2 / torch 2.14.1 CPU: see the README's
"Checkpoints in and out".
"""

import os
import sys

GEOMETRY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
# family -> (dmlora_jax ViTConfig fields, timm VisionTransformer arguments as text)
FAMILIES = {
    "plain_tanh": (dict(gelu_approximate=True), "act_layer=tanh_gelu"),
    "plain": (dict(gelu_approximate=False), ""),
    "dinov2_reg": (dict(gelu_approximate=False, layer_scale=True, num_registers=2, no_embed_class=True),
                   "init_values=1e-5, reg_tokens=2, no_embed_class=True"),
    "clip": (dict(pre_norm=True, activation="quick_gelu", patch_bias=False, layer_norm_eps=1e-5),
             "pre_norm=True, act_layer=quick_gelu, norm_layer=nn.LayerNorm"),
    "gap": (dict(gelu_approximate=False, pool="avg"), "global_pool=avg"),
    "map": (dict(gelu_approximate=False, pool="map"), "global_pool=map"),
    "dora": (dict(gelu_approximate=False), ""),  # DoRA on the plain family (PEFT use_dora)
    "adalora": (dict(gelu_approximate=False), ""),  # AdaLoRA on the plain family (PEFT ADALORA)
}


def write(out: str, families=tuple(FAMILIES)) -> None:
  import jax
  import numpy as np
  from dmlora_jax import dmlora, npz, peft_export, timm_format, vit
  from dmlora_jax.config_base import ALL_TARGETS
  from dmlora_jax.merge import merge_params
  from dmlora_jax.pytrees import flatten, unflatten
  os.makedirs(out, exist_ok=True)
  x = np.asarray(jax.random.normal(jax.random.key(5), (4, 16, 16, 3)))
  np.save(os.path.join(out, "x.npy"), x)
  for i, tag in enumerate(families):
    d = os.path.join(out, tag)
    os.makedirs(d, exist_ok=True)
    spec = (dmlora.AdapterSpec(num_branches=1, rank=2, targets=ALL_TARGETS, dora=True) if tag == "dora" else
            dmlora.AdapterSpec(num_branches=1, rank=3, targets=ALL_TARGETS, adalora=True) if tag == "adalora" else
            dmlora.AdapterSpec(num_branches=3, rank=2, targets=ALL_TARGETS))
    model = vit.ViT(vit.parse_variant("tiny/4", 10, **FAMILIES[tag][0]), spec)
    params = model.init(jax.random.key(0), x[:1])["params"]
    keys = jax.random.split(jax.random.key(1 + i), len(flatten(params)))
    params = unflatten({k: (0.3 * jax.random.normal(kk, v.shape) + (1.0 if k.endswith(("/scale", "magnitude")) else 0.0))
                        for kk, (k, v) in zip(keys, flatten(params).items())})
    np.save(os.path.join(d, "logits.npy"), np.asarray(model.apply({"params": params}, x)))
    npz.save_npz(os.path.join(d, "params.npz"), params)  # the adapted model, for the fixture test
    merged = {k: np.asarray(v) for k, v in flatten(merge_params(params)).items()}
    if tag.startswith("plain"):
      npz.save_npz(os.path.join(d, "merged.npz"), unflatten(merged))
    timm_format.save_safetensors(os.path.join(d, "merged.safetensors"), timm_format.from_public(merged))
    base = {k: np.asarray(v) for k, v in flatten(params).items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
    timm_format.save_safetensors(os.path.join(d, "base.safetensors"), timm_format.from_public(base))
    peft_export.export_peft(params, os.path.join(d, "adapter"))
  print(f"wrote {out}: {', '.join(families)}")


def _timm_model(tag):
  import functools
  import torch.nn as nn
  from timm.models.vision_transformer import VisionTransformer
  kw = {"plain_tanh": dict(act_layer=functools.partial(nn.GELU, approximate="tanh")), "plain": {}, "dora": {}, "adalora": {},
        "dinov2_reg": dict(init_values=1e-5, reg_tokens=2, no_embed_class=True),
        "clip": dict(pre_norm=True, act_layer="quick_gelu", norm_layer=nn.LayerNorm),
        "gap": dict(global_pool="avg"), "map": dict(global_pool="map")}[tag]
  return VisionTransformer(**GEOMETRY, **kw).eval()


def check(out: str) -> None:
  import numpy as np
  import peft
  import timm
  import torch
  from peft import PeftModel
  from timm.models import load_checkpoint
  x = torch.from_numpy(np.load(os.path.join(out, "x.npy"))).permute(0, 3, 1, 2).float()
  worst = 0.0
  print(f"timm {timm.__version__}, peft {peft.__version__}, torch {torch.__version__}")
  for tag in sorted(t for t in FAMILIES if os.path.isdir(os.path.join(out, t))):
    d = os.path.join(out, tag)
    want = np.load(os.path.join(d, "logits.npy"))
    results = {}
    for export in ("merged.npz", "merged.safetensors"):
      if os.path.exists(os.path.join(d, export)):
        m = _timm_model(tag)
        load_checkpoint(m, os.path.join(d, export))
        with torch.no_grad():
          results[export] = m(x).numpy()
    m = _timm_model(tag)
    load_checkpoint(m, os.path.join(d, "base.safetensors"))
    m = PeftModel.from_pretrained(m, os.path.join(d, "adapter")).eval()
    with torch.no_grad():
      results["adapter (PEFT, unmerged)"] = m(x).numpy()
    np.save(os.path.join(d, "peft_logits.npy"), results["adapter (PEFT, unmerged)"])
    for what, got in results.items():
      diff = float(np.abs(got - want).max())
      worst = max(worst, diff)
      print(f"{tag:10s} {what:26s} max |logit diff| vs dmlora_jax = {diff:.2e}")
  sys.exit(0 if worst < 1e-4 else 1)


def hub_timm(out: str, cache: str = "") -> None:
  """torch env: timm's logits for every timm ViT in the hub cache, and what the project must be
  told that the weights cannot say (heads, activation, LayerNorm eps)."""
  import glob
  import json
  os.environ["HF_HUB_OFFLINE"] = "1"
  if cache:
    os.environ["HF_HUB_CACHE"] = cache
  import numpy as np
  import timm
  import torch
  from huggingface_hub import constants
  from timm.models.vision_transformer import VisionTransformer
  os.makedirs(out, exist_ok=True)
  found = []
  for snap in sorted(glob.glob(os.path.join(constants.HF_HUB_CACHE, "models--timm--*", "snapshots", "*"))):
    path = os.path.join(snap, "model.safetensors")
    if not (os.path.exists(path) and os.path.exists(os.path.join(snap, "config.json"))):
      continue
    repo = "timm/" + snap.split("models--timm--")[1].split(os.sep)[0]
    try:
      m = timm.create_model("hf-hub:" + repo, pretrained=True)
    except Exception as e:
      print(f"{repo}: timm cannot build it ({type(e).__name__}); skipped")
      continue
    if not isinstance(m, VisionTransformer):
      print(f"{repo}: {type(m).__name__}, not a VisionTransformer; skipped")
      continue
    size = m.pretrained_cfg["input_size"][1:]
    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    with torch.no_grad():
      logits = m.double().eval()(torch.from_numpy(x).double()).numpy()
    act = m.blocks[0].mlp.act
    tag = repo.replace("/", "--")
    np.save(os.path.join(out, f"{tag}_x.npy"), x)
    np.save(os.path.join(out, f"{tag}_logits.npy"), logits)
    found.append({"repo": repo, "path": path, "tag": tag, "num_heads": m.blocks[0].attn.num_heads,
                  "activation": "quick_gelu" if "Quick" in type(act).__name__ else "gelu",
                  "gelu_approximate": getattr(act, "approximate", "none") == "tanh",
                  "layer_norm_eps": m.blocks[0].norm1.eps, "image_size": list(size)})
    print(f"{repo}: timm {timm.__version__} logits written")
  with open(os.path.join(out, "hub.json"), "w") as f:
    json.dump(found, f, indent=1)
  print(f"{len(found)} timm ViT(s) in {constants.HF_HUB_CACHE}")


def hub_check(out: str) -> None:
  """dmlora_jax env: each of hub_timm's models through model.variant=auto, against timm."""
  import json
  import jax.numpy as jnp
  import numpy as np
  from dmlora_jax import config_base, setup, vit
  worst = 0.0
  for e in json.load(open(os.path.join(out, "hub.json"))):
    want = np.load(os.path.join(out, f"{e['tag']}_logits.npy"))
    c = config_base.get_base_config()
    c.model.variant, c.model.init_checkpoint, c.model.num_heads = "auto", e["path"], e["num_heads"]
    c.model.activation, c.model.gelu_approximate = e["activation"], e["gelu_approximate"]
    c.model.layer_norm_eps, c.data.image_size = e["layer_norm_eps"], e["image_size"][0]
    model = vit.ViT(setup.vit_config(c, want.shape[1]))
    params, _ = setup.init_params(model, c, e["image_size"][0])
    x = np.load(os.path.join(out, f"{e['tag']}_x.npy")).transpose(0, 2, 3, 1)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    worst = max(worst, diff / max(scale, 1.0))
    print(f"{e['repo']}: max |logit diff| vs timm {diff:.2e} (max |logit| {scale:.2f})")
  sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
  commands = ("write", "check", "hub-timm", "hub-check")
  if len(sys.argv) < 3 or sys.argv[1] not in commands:
    sys.exit(__doc__)
  if sys.argv[1] == "write":
    write(sys.argv[2], tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else tuple(FAMILIES))
  elif sys.argv[1] == "check":
    check(sys.argv[2])
  elif sys.argv[1] == "hub-timm":
    hub_timm(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
  else:
    hub_check(sys.argv[2])

"""Writes tests/fixtures/torch/: tiny ViTs of each family that dmlora_jax loads, made and run
by timm and transformers themselves, with an input batch and their logits.

Run once, in an environment with torch, timm and transformers (not dmlora_jax's own):

  /path/to/torch-env/bin/python tools/make_torch_fixtures.py tests/fixtures/torch

The fixtures were generated with the versions recorded in versions.json (2026-12-06: torch
2.14.1 CPU, timm 1.0.31, transformers 5.25.0, safetensors 0.8.0). tests/test_torch_fixtures.py
checks the project against them without torch. Every parameter is redrawn from a seeded normal
(not the libraries' init, where LayerScale starts at 1e-5 and would hide a mistake), and the
logits are computed in float64 from the float32 weights that the files hold.

Families (timm's constructor arguments; geometry 16 px, patch 4, width 32, depth 2, 2 heads):
  plain       the original ViT (class token, position embedding over all tokens)
  dinov2_reg  LayerScale + 2 register tokens + patch-only position embedding (timm's DINOv2-reg)
  clip        pre-norm, quick-GELU, no patch bias, LayerNorm eps 1e-5 (timm's CLIP image tower)
  gap         mean patch token with fc_norm, no final norm
  map         attention pooling (timm's AttentionPoolLatent; SigLIP)
and transformers' own: hf_vit (ViTForImageClassification, transformers 5 naming) and
hf_dinov2_reg (Dinov2WithRegistersModel: its features, which a ViT with an identity head gives).
"""

import json
import os
import sys

import numpy as np

GEOMETRY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
NUM_CLASSES = 5


def timm_families():
  import torch.nn as nn
  return {
      "plain": dict(),
      "dinov2_reg": dict(init_values=1e-5, reg_tokens=2, no_embed_class=True),
      "clip": dict(pre_norm=True, act_layer="quick_gelu", norm_layer=nn.LayerNorm),
      "gap": dict(global_pool="avg"),
      "map": dict(global_pool="map"),
  }


def _redraw(model, seed):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if _is_norm_weight(name) else 0.0))


def _is_norm_weight(name):
  return name.endswith(".weight") and any(n in name for n in ("norm", "layernorm", "layer_norm"))


def _logits(model, x):
  import torch
  model = model.double().eval()
  with torch.no_grad():
    out = model(torch.from_numpy(x).double())
  out = getattr(out, "logits", None) if not isinstance(out, torch.Tensor) else out
  return out


def main(out: str) -> None:
  import safetensors
  import timm
  import torch
  import transformers
  from safetensors.torch import save_file
  os.makedirs(out, exist_ok=True)
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)  # NCHW
  arrays = {"x_nchw": x}
  meta = {"versions": {"torch": torch.__version__, "timm": timm.__version__,
                       "transformers": transformers.__version__, "safetensors": safetensors.__version__},
          "geometry": GEOMETRY, "num_classes": NUM_CLASSES, "families": {}}
  for i, (name, kw) in enumerate(timm_families().items()):
    model = timm.models.vision_transformer.VisionTransformer(**GEOMETRY, num_classes=NUM_CLASSES, **kw)
    _redraw(model, seed=i)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"{name}.safetensors"))
    arrays[f"logits_{name}"] = _logits(model, x).numpy()
    meta["families"][name] = {"library": "timm", "kwargs": {k: str(v) for k, v in kw.items()}}

  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTForImageClassification
  hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
  vit = ViTForImageClassification(ViTConfig(**hf, intermediate_size=64, num_labels=NUM_CLASSES,
                                            hidden_act="gelu", layer_norm_eps=1e-6))
  _redraw(vit, seed=10)
  vit.save_pretrained(os.path.join(out, "hf_vit"), safe_serialization=True)
  arrays["logits_hf_vit"] = _logits(vit, x).numpy()
  meta["families"]["hf_vit"] = {"library": "transformers", "class": "ViTForImageClassification"}

  dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**hf, mlp_ratio=2, num_register_tokens=2,
                                                            layerscale_value=1e-5))
  _redraw(dino, seed=11)
  dino.save_pretrained(os.path.join(out, "hf_dinov2_reg"), safe_serialization=True)
  dino = dino.double().eval()
  with torch.no_grad():
    arrays["logits_hf_dinov2_reg"] = dino(torch.from_numpy(x).double()).pooler_output.numpy()
  meta["families"]["hf_dinov2_reg"] = {"library": "transformers", "class": "Dinov2WithRegistersModel",
                                       "output": "pooler_output (final LayerNorm of the class token)"}
  for d in ("hf_vit", "hf_dinov2_reg"):  # keep the weights and config.json only
    for f in os.listdir(os.path.join(out, d)):
      if f not in ("model.safetensors", "config.json"):
        os.remove(os.path.join(out, d, f))
  np.savez(os.path.join(out, "logits.npz"), **arrays)
  with open(os.path.join(out, "versions.json"), "w") as f:
    json.dump(meta, f, indent=1)
  print(f"wrote {out}: {sorted(meta['families'])}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/torch")

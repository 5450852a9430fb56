"""The adapter itself, for the PyTorch side: a Hugging Face PEFT LoRA on timm's ViT.

    adapter/adapter_config.json + adapter/adapter_model.safetensors
    peft.PeftModel.from_pretrained(timm_vit, "adapter")  -> the adapted model, before merging

A DMLoRA branch set is exactly one LoRA of rank K*r: x (alpha_l / r) sum_k A_k B_k is
x A_cat B_cat with A_cat = [A_1 ... A_K] (d_in, K*r) and B_cat = [B_1; ...; B_K] (K*r, d_out).
The per-module alpha_l / r is folded into B, and lora_alpha equals the rank, so that PEFT's
scale lora_alpha / r is 1. timm fuses q, k and v into one `attn.qkv` Linear: the adapted ones
among them become one block-structured LoRA of rank (targets among q, k, v) * K * r, whose B
is zero outside each target's output rows (rank_pattern / alpha_pattern say so for `qkv`).
The trained head goes in `modules_to_save`. DoRA (dora.py) is PEFT's `use_dora`: its
magnitude vector per output unit is PEFT's `lora_magnitude_vector`, and since each output row
of the fused qkv belongs to one of q, k, v, DoRA on each equals DoRA on the fused Linear.
AdaLoRA (adalora.py) is PEFT's ADALORA adapter (`_adalora_adapter`).

What is exact: the adapted logits in evaluation (all branches, no dropout), given the same base
weights. What is not carried: branch dropout and the drop schedule (a training-time thing: PEFT
trains this as one LoRA), and the separate alpha_l (folded into B; stage 2 cannot be resumed
from the adapter). Methods without branches (full, linear) have no adapter to write.
"""

import json
import os
import re
import tempfile

import numpy as np

from dmlora_jax import dmlora, merge, timm_format
from dmlora_jax.pytrees import flatten

# this model's projection -> timm's Linear, inside blocks.N.
TIMM_MODULE = {"query": "attn.qkv", "key": "attn.qkv", "value": "attn.qkv", "out": "attn.proj",
               "Dense_0": "mlp.fc1", "Dense_1": "mlp.fc2"}
QKV = ("query", "key", "value")
PREFIX = "base_model.model."
_MODULE = re.compile(r"Transformer/encoderblock_(\d+)/(?:MultiHeadDotProductAttention_1|MlpBlock_3)/(\w+)$")


def _fused(flat, module):
  """(A_cat (d_in, K*r), B_cat scaled (K*r, d_out)) of one adapted module, in float32."""
  a = np.asarray(flat[f"{module}/{dmlora.LORA_A}"], np.float32)
  b = np.asarray(flat[f"{module}/{dmlora.LORA_B}"], np.float32)
  k, d_in, r = a.shape
  scale = np.float32(np.exp(np.float64(flat[f"{module}/{dmlora.LORA_LOG_SCALE}"])) / r)
  return dmlora.fused_a(a), b.reshape(k * r, -1) * scale


def _add_head(flat, sd) -> None:
  """The trained head as PEFT's modules_to_save entry (torch's (out, in) weight)."""
  if "head/kernel" in flat:
    sd[PREFIX + "head.weight"] = np.ascontiguousarray(np.asarray(flat["head/kernel"], np.float32).T)
    sd[PREFIX + "head.bias"] = np.asarray(flat["head/bias"], np.float32)


def peft_adapter(params) -> tuple[dict[str, np.ndarray], dict]:
  """(adapter_model state dict, adapter_config) of a DMLoRA param tree. Raises FormatError
  when there is nothing to export or the model has parts timm's ViT lacks."""
  flat = flatten(params)
  if any(k.startswith("pre_logits/") for k in flat):
    raise timm_format.FormatError("no PEFT adapter: timm's ViT has no pre_logits layer (merged.npz holds the model)")
  modules = merge.adapted_modules(params)
  if not modules:
    raise timm_format.FormatError("no PEFT adapter: this method has no branches (merged.npz holds the model)")
  by_linear: dict[str, dict[str, str]] = {}  # timm Linear -> {our projection: module path}
  for m in modules:
    match = _MODULE.search(m)
    if not match or match.group(2) not in TIMM_MODULE:
      raise timm_format.FormatError(f"no PEFT adapter: {m} has no timm counterpart")
    block, proj = match.groups()
    by_linear.setdefault(f"blocks.{block}.{TIMM_MODULE[proj]}", {})[proj] = m
  if any(k.endswith("/" + dmlora.ADALORA_E) for k in flat):
    return _adalora_adapter(flat, by_linear)
  use_dora = any(k.endswith("/" + dmlora.DORA_MAGNITUDE) for k in flat)
  sd, ranks = {}, {}
  for linear, projs in sorted(by_linear.items()):
    if linear.endswith("attn.qkv"):
      parts = [(QKV.index(p), *_fused(flat, projs[p])) for p in QKV if p in projs]
      d = parts[0][1].shape[0]
      a = np.concatenate([pa for _, pa, _ in parts], axis=1)  # (d, n * K * r)
      b = np.zeros((a.shape[1], 3 * d), np.float32)
      col = 0
      for j, _, pb in parts:
        b[col:col + pb.shape[0], j * d:(j + 1) * d] = pb
        col += pb.shape[0]
      members = [projs.get(p, re.sub(r"/\w+$", "/" + p, next(iter(projs.values())))) for p in QKV]
    else:
      (module,) = projs.values()
      a, b = _fused(flat, module)
      members = [module]
    if use_dora:  # PEFT's magnitude per output row; a q/k/v without DoRA keeps ||W||_c (an identity)
      sd[f"{PREFIX}{linear}.lora_magnitude_vector"] = np.concatenate([
          np.asarray(flat[f"{m}/{dmlora.DORA_MAGNITUDE}"], np.float32) if f"{m}/{dmlora.DORA_MAGNITUDE}" in flat
          else np.linalg.norm(np.asarray(flat[f"{m}/kernel"], np.float32).reshape(d, -1), axis=0) for m in members])
    sd[f"{PREFIX}{linear}.lora_A.weight"] = np.ascontiguousarray(a.T)  # (rank, in), torch's (out, in)
    sd[f"{PREFIX}{linear}.lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, rank)
    ranks[linear.split(".", 2)[2]] = a.shape[1]
  _add_head(flat, sd)
  names = sorted(ranks)
  default = max(set(ranks.values()), key=list(ranks.values()).count)
  pattern = {n.split(".")[-1]: r for n, r in ranks.items() if r != default}
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
      "r": default, "lora_alpha": default, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
      "target_modules": r"blocks\.\d+\.(" + "|".join(re.escape(n) for n in names) + ")",
      "modules_to_save": ["head"] if "head/kernel" in flat else None,
      "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": use_dora,
      "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
      "auto_mapping": {"base_model_class": "VisionTransformer", "parent_library": "timm.models.vision_transformer"},
  }
  return sd, config


def _adalora_adapter(flat, by_linear) -> tuple[dict[str, np.ndarray], dict]:
  """AdaLoRA as PEFT's ADALORA adapter: lora_A (R, in) = P^T, lora_E (R, 1), lora_B (out, R) = Q^T
  per timm Linear (q/k/v block-structured on the fused qkv, R = their ranks summed). PEFT starts
  every module at init_r rows (the largest R); rank_pattern (True for the module's R rows)
  resizes each to its R on load, and its scale stays lora_alpha / (init_r + 1e-5) (PEFT keeps
  ranknum at init_r through the resize): lora_alpha = 1, and each module's own
  alpha / (r + 1e-5) * (init_r + 1e-5) is folded into Lambda.
  Pruned triplets travel as Lambda_i = 0."""
  sd, pattern = {}, {}
  for linear, projs in sorted(by_linear.items()):
    order = [p for p in QKV if p in projs] if linear.endswith("attn.qkv") else list(projs)
    ps, es, qs, cols = [], [], [], []
    for p in order:
      m = projs[p]
      a, q, e = (np.asarray(flat[f"{m}/{leaf}"], np.float64)[0] if leaf != dmlora.ADALORA_E else
                 np.asarray(flat[f"{m}/{leaf}"], np.float64) for leaf in (dmlora.LORA_A, dmlora.LORA_B, dmlora.ADALORA_E))
      scale = np.exp(np.float64(flat[f"{m}/{dmlora.LORA_LOG_SCALE}"])) / (e.shape[0] + 1e-5)
      ps.append(a), es.append(e * scale), qs.append(q), cols.append(QKV.index(p) if p in QKV else 0)
    rank = sum(e.shape[0] for e in es)
    d_out = qs[0].shape[1]
    b = np.zeros((rank, d_out * (3 if linear.endswith("attn.qkv") else 1)))
    row = 0
    for j, q in zip(cols, qs):
      b[row:row + q.shape[0], j * d_out:(j + 1) * d_out] = q
      row += q.shape[0]
    sd[f"{PREFIX}{linear}.lora_A"] = np.concatenate(ps, axis=1).T.astype(np.float32)
    sd[f"{PREFIX}{linear}.lora_E"] = np.concatenate(es)[:, None]  # times (init_r + 1e-5) below
    sd[f"{PREFIX}{linear}.lora_B"] = b.T.astype(np.float32)
    pattern[f"{linear}.lora_E"] = rank
  _add_head(flat, sd)
  init_r = max(pattern.values())
  for n in pattern:
    key = f"{PREFIX}{n}"
    sd[key] = (sd[key] * (init_r + 1e-5)).astype(np.float32)
  names = sorted({n.split(".", 2)[2].rsplit(".", 1)[0] for n in pattern})
  config = {
      "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
      "r": init_r, "init_r": init_r, "target_r": init_r, "lora_alpha": 1, "total_step": 1,
      "rank_pattern": {n: [True] * r + [False] * (init_r - r) for n, r in pattern.items()},
      "target_modules": r"blocks\.\d+\.(" + "|".join(re.escape(n) for n in names) + ")",
      "modules_to_save": ["head"] if "head/kernel" in flat else None, "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True,
      "auto_mapping": {"base_model_class": "VisionTransformer", "parent_library": "timm.models.vision_transformer"},
  }
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}, config


def export_peft(params, out_dir: str) -> str:
  """Writes out_dir/adapter_config.json and out_dir/adapter_model.safetensors (atomically)."""
  sd, config = peft_adapter(params)
  os.makedirs(out_dir, exist_ok=True)
  timm_format.save_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), sd)
  fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json.tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(config, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "adapter_config.json"))
  return out_dir

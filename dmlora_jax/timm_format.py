"""ViT params in timm's naming (`.safetensors`), to and from the public layout; transformers'
ViT naming in (through timm's).

timm's `VisionTransformer` state dict, for the plain family this model implements (class
token, learned position embedding that includes the class position, pre-LN blocks, final
`norm`, linear `head`):

  cls_token (1, 1, D)                 <-> cls
  pos_embed (1, N, D)                 <-> Transformer/posembed_input/pos_embedding
  patch_embed.proj.weight (D, C, p, p) <-> embedding/kernel (p, p, C, D)
  blocks.i.norm1 / norm2              <-> encoderblock_i/LayerNorm_0 / LayerNorm_2 (weight = scale)
  blocks.i.attn.qkv.weight (3D, D)    <-> query/key/value kernels (D, H, D/H), split in q, k, v order
  blocks.i.attn.proj.weight (D, D)    <-> out/kernel (H, D/H, D)
  blocks.i.mlp.fc1 / fc2              <-> MlpBlock_3/Dense_0 / Dense_1 (weight = kernel.T)
  norm                                <-> Transformer/encoder_norm
  head.weight (C, D)                  <-> head/kernel (D, C)

Reading uses the `safetensors` package's NumPy API (no torch). Parts of other ViT families
(LayerScale `ls1.gamma`, register tokens, `norm_pre`, `fc_norm`, a MAP head) are not in this
model yet and are refused in one line; so is a file in neither naming.
"""

import os
import re
import tempfile
from typing import Mapping

import numpy as np

ENC = "Transformer/encoderblock_{}/"
ATT = ENC + "MultiHeadDotProductAttention_1/"
# timm names this model has no part for (another ViT family's), and what they are.
UNSUPPORTED = {"ls1.gamma": "LayerScale", "ls2.gamma": "LayerScale", "reg_token": "register tokens",
               "norm_pre": "a pre-norm", "fc_norm": "mean pooling with fc_norm", "attn_pool": "a MAP head"}


class FormatError(ValueError):
  """A checkpoint in a naming or family that cannot be mapped."""


def _reader(sd: Mapping[str, np.ndarray], where: str, naming: str):
  """(take, check_rest): take(name) reads one array (a missing one is an error that names it
  and the naming); check_rest(ignore) refuses any key that no take() read."""
  used = set()

  def take(name):
    if name not in sd:
      raise FormatError(f"{where}: {name} is missing ({naming} has it)")
    used.add(name)
    return np.asarray(sd[name])

  def check_rest(ignore=()):
    extra = sorted(set(sd) - used - set(ignore))
    if extra:
      raise FormatError(f"{where}: {extra[0]} has no place in this ViT" +
                        (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return take, check_rest


def is_timm(keys) -> bool:
  return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _depth(keys) -> int:
  ids = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
  if ids != set(range(len(ids))):
    raise FormatError(f"timm blocks are not numbered 0..N-1: {sorted(ids)}")
  return len(ids)


def to_public(sd: Mapping[str, np.ndarray], num_heads: int, where: str = "checkpoint") -> dict[str, np.ndarray]:
  """timm state dict -> {public name: array}. num_heads splits the fused qkv into heads."""
  for k in sd:
    for part, what in UNSUPPORTED.items():
      if f".{part}." in f".{k}.":
        raise FormatError(f"{where}: {k} is {what}, which this ViT does not implement yet")
  out = {}
  take, check_rest = _reader(sd, where, "a timm ViT with class token and linear head")
  out["cls"] = take("cls_token")
  out["Transformer/posembed_input/pos_embedding"] = take("pos_embed")
  out["embedding/kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
  out["embedding/bias"] = take("patch_embed.proj.bias")
  d = out["cls"].shape[-1]
  if d % num_heads:
    raise FormatError(f"{where}: width {d} is not divisible by {num_heads} heads (model.variant)")
  hd = d // num_heads
  for i in range(_depth(sd)):
    b, e, a = f"blocks.{i}.", ENC.format(i), ATT.format(i)
    for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[e + dst + "/scale"] = take(b + src + ".weight")
      out[e + dst + "/bias"] = take(b + src + ".bias")
    w, bias = take(b + "attn.qkv.weight"), take(b + "attn.qkv.bias")
    for j, name in enumerate(("query", "key", "value")):
      out[a + name + "/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd)
      out[a + name + "/bias"] = bias[j * d:(j + 1) * d].reshape(num_heads, hd)
    out[a + "out/kernel"] = take(b + "attn.proj.weight").T.reshape(num_heads, hd, d)
    out[a + "out/bias"] = take(b + "attn.proj.bias")
    for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[e + "MlpBlock_3/" + dst + "/kernel"] = take(b + f"mlp.{src}.weight").T
      out[e + "MlpBlock_3/" + dst + "/bias"] = take(b + f"mlp.{src}.bias")
  out["Transformer/encoder_norm/scale"] = take("norm.weight")
  out["Transformer/encoder_norm/bias"] = take("norm.bias")
  if "head.weight" in sd:
    out["head/kernel"] = take("head.weight").T
    out["head/bias"] = take("head.bias")
  check_rest()
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_public(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{public name: array} of a plain ViT (no adapter leaves) -> timm state dict."""
  extra = [k for k in flat if k.startswith("pre_logits/")]
  if extra:
    raise FormatError(f"{extra[0]}: timm's ViT has no pre_logits layer in this naming")
  f = {k: np.asarray(v) for k, v in flat.items()}
  sd = {"cls_token": f["cls"], "pos_embed": f["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": f["embedding/bias"]}
  depth = len({m.group(1) for k in f if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
  for i in range(depth):
    b, e, a = f"blocks.{i}.", ENC.format(i), ATT.format(i)
    for dst, src in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      sd[b + dst + ".weight"] = f[e + src + "/scale"]
      sd[b + dst + ".bias"] = f[e + src + "/bias"]
    qkv = [f[a + n + "/kernel"] for n in ("query", "key", "value")]
    d = qkv[0].shape[0]
    sd[b + "attn.qkv.weight"] = np.concatenate([k.reshape(d, -1).T for k in qkv], axis=0)
    sd[b + "attn.qkv.bias"] = np.concatenate([f[a + n + "/bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[b + "attn.proj.weight"] = f[a + "out/kernel"].reshape(-1, d).T
    sd[b + "attn.proj.bias"] = f[a + "out/bias"]
    for dst, src in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      sd[b + f"mlp.{dst}.weight"] = f[e + "MlpBlock_3/" + src + "/kernel"].T
      sd[b + f"mlp.{dst}.bias"] = f[e + "MlpBlock_3/" + src + "/bias"]
  sd["norm.weight"] = f["Transformer/encoder_norm/scale"]
  sd["norm.bias"] = f["Transformer/encoder_norm/bias"]
  if "head/kernel" in f:
    sd["head.weight"] = f["head/kernel"].T
    sd["head.bias"] = f["head/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# Hugging Face transformers ViT (ViTModel / ViTForImageClassification) -> timm names.
_HF_PREFIX = "vit."
_HF_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def is_hf_vit(keys) -> bool:
  return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys)


def hf_to_timm(sd: Mapping[str, np.ndarray], where: str = "checkpoint") -> dict[str, np.ndarray]:
  """transformers' ViT naming -> timm's (q, k, v fused in that order; `classifier` = head).
  DINOv2's naming (layer_scale, mask_token) is another family: refused in one line."""
  out = {}
  strip = lambda k: k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k
  s = {strip(k): v for k, v in sd.items()}
  for k in s:
    if "layer_scale" in k or k.endswith("mask_token") or "register_tokens" in k:
      raise FormatError(f"{where}: {k} belongs to DINOv2's naming (LayerScale, registers), which this ViT "
                        "does not implement yet")

  take, check_rest = _reader(s, where, "a transformers ViT")
  out["cls_token"] = take("embeddings.cls_token")
  out["pos_embed"] = take("embeddings.position_embeddings")
  for p in ("weight", "bias"):
    out[f"patch_embed.proj.{p}"] = take(f"embeddings.patch_embeddings.projection.{p}")
    out[f"norm.{p}"] = take(f"layernorm.{p}")
  blocks = {int(m.group(1)) for k in s if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  for i in sorted(blocks):
    src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
    for p in ("weight", "bias"):
      out[dst + f"attn.qkv.{p}"] = np.concatenate(
          [take(src + f"attention.attention.{n}.{p}") for n in ("query", "key", "value")])
      for hf, timm in _HF_BLOCK.items():
        out[dst + f"{timm}.{p}"] = take(src + f"{hf}.{p}")
  if "classifier.weight" in s:
    out["head.weight"], out["head.bias"] = take("classifier.weight"), take("classifier.bias")
  # ViTModel's pooler (dense + tanh on the class token) is dropped, as pre_logits is for .npz.
  check_rest(ignore=("pooler.dense.weight", "pooler.dense.bias"))
  return out


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:  # header/format errors of an unreadable file
    raise FormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def save_safetensors(path: str, sd: Mapping[str, np.ndarray]) -> None:
  """Writes atomically (temp + rename), like the .npz export."""
  from safetensors.numpy import save_file
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".safetensors.tmp")
  os.close(fd)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

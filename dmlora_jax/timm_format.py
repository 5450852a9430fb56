"""ViT params in timm's naming (`.safetensors`), to and from the public layout; transformers'
ViT naming in (through timm's).

timm's `VisionTransformer` state dict and this model's names:

  cls_token (1, 1, D)                 <-> cls
  reg_token (1, R, D)                 <-> registers
  pos_embed (1, N, D)                 <-> Transformer/posembed_input/pos_embedding
  patch_embed.proj.weight (D, C, p, p) <-> embedding/kernel (p, p, C, D)   [.bias: absent in CLIP]
  norm_pre                            <-> Transformer/norm_pre
  blocks.i.norm1 / norm2              <-> encoderblock_i/LayerNorm_0 / LayerNorm_2 (weight = scale)
  blocks.i.attn.qkv.weight (3D, D)    <-> query/key/value kernels (D, H, D/H), split in q, k, v order
  blocks.i.attn.proj.weight (D, D)    <-> out/kernel (H, D/H, D)
  blocks.i.ls1.gamma / ls2.gamma      <-> encoderblock_i/ls1 / ls2
  blocks.i.mlp.fc1 / fc2              <-> MlpBlock_3/Dense_0 / Dense_1 (weight = kernel.T)
  norm / fc_norm                      <-> Transformer/encoder_norm / fc_norm
  attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}
                                      <-> MAPHead_0/{probe, query, key+value, out, LayerNorm_0, Dense_0/1}
  head.weight (C, D)                  <-> head/kernel (D, C)

Which of these a file has says which ViT family it is (`infer_model`); what the keys cannot
say (the head count of a fused qkv, quick-GELU, LayerNorm eps, whether the position embedding
covers the class token when its grid is not square) is config. transformers' ViT and DINOv2
(with or without registers) namings come in through timm's. Reading uses the `safetensors`
package's NumPy API (no torch).
"""

import logging
import os
import re
import tempfile
from typing import Mapping

import numpy as np

ENC = "Transformer/encoderblock_{}/"
ATT = ENC + "MultiHeadDotProductAttention_1/"
MAP = "MAPHead_0/"


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
  out = {}
  take, check_rest = _reader(sd, where, "a timm ViT with class token and linear head")
  out["cls"] = take("cls_token")
  if "reg_token" in sd:
    out["registers"] = take("reg_token")
  out["Transformer/posembed_input/pos_embedding"] = take("pos_embed")
  out["embedding/kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
  if "patch_embed.proj.bias" in sd:
    out["embedding/bias"] = take("patch_embed.proj.bias")
  d = out["cls"].shape[-1]
  if d % num_heads:
    raise FormatError(f"{where}: width {d} is not divisible by {num_heads} heads (model.variant)")
  hd = d // num_heads
  for src, dst in (("norm_pre", "Transformer/norm_pre"), ("norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
    if src + ".weight" in sd:
      out[dst + "/scale"], out[dst + "/bias"] = take(src + ".weight"), take(src + ".bias")
  for i in range(_depth(sd)):
    b, e, a = f"blocks.{i}.", ENC.format(i), ATT.format(i)
    for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[e + dst + "/scale"] = take(b + src + ".weight")
      out[e + dst + "/bias"] = take(b + src + ".bias")
    for ls in ("ls1", "ls2"):
      if b + ls + ".gamma" in sd:
        out[e + ls] = take(b + ls + ".gamma")
    w, bias = take(b + "attn.qkv.weight"), take(b + "attn.qkv.bias")
    for j, name in enumerate(("query", "key", "value")):
      out[a + name + "/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd)
      out[a + name + "/bias"] = bias[j * d:(j + 1) * d].reshape(num_heads, hd)
    out[a + "out/kernel"] = take(b + "attn.proj.weight").T.reshape(num_heads, hd, d)
    out[a + "out/bias"] = take(b + "attn.proj.bias")
    for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[e + "MlpBlock_3/" + dst + "/kernel"] = take(b + f"mlp.{src}.weight").T
      out[e + "MlpBlock_3/" + dst + "/bias"] = take(b + f"mlp.{src}.bias")
  if "attn_pool.latent" in sd:
    out[MAP + "probe"] = take("attn_pool.latent")
    a = MAP + "MultiHeadDotProductAttention_0/"
    q, kv = take("attn_pool.q.weight"), take("attn_pool.kv.weight")
    qb, kvb = take("attn_pool.q.bias"), take("attn_pool.kv.bias")
    for name, w, bias in (("query", q, qb), ("key", kv[:d], kvb[:d]), ("value", kv[d:], kvb[d:])):
      out[a + name + "/kernel"] = w.T.reshape(d, num_heads, hd)
      out[a + name + "/bias"] = bias.reshape(num_heads, hd)
    out[a + "out/kernel"] = take("attn_pool.proj.weight").T.reshape(num_heads, hd, d)
    out[a + "out/bias"] = take("attn_pool.proj.bias")
    out[MAP + "LayerNorm_0/scale"], out[MAP + "LayerNorm_0/bias"] = take("attn_pool.norm.weight"), take("attn_pool.norm.bias")
    for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[MAP + "MlpBlock_0/" + dst + "/kernel"] = take(f"attn_pool.mlp.{src}.weight").T
      out[MAP + "MlpBlock_0/" + dst + "/bias"] = take(f"attn_pool.mlp.{src}.bias")
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
        "patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1)}
  if "registers" in f:
    sd["reg_token"] = f["registers"]
  if "embedding/bias" in f:
    sd["patch_embed.proj.bias"] = f["embedding/bias"]
  for dst, src in (("norm_pre", "Transformer/norm_pre"), ("norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
    if src + "/scale" in f:
      sd[dst + ".weight"], sd[dst + ".bias"] = f[src + "/scale"], f[src + "/bias"]
  depth = len({m.group(1) for k in f if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
  for i in range(depth):
    b, e, a = f"blocks.{i}.", ENC.format(i), ATT.format(i)
    for dst, src in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      sd[b + dst + ".weight"] = f[e + src + "/scale"]
      sd[b + dst + ".bias"] = f[e + src + "/bias"]
    for ls in ("ls1", "ls2"):
      if e + ls in f:
        sd[b + ls + ".gamma"] = f[e + ls]
    qkv = [f[a + n + "/kernel"] for n in ("query", "key", "value")]
    d = qkv[0].shape[0]
    sd[b + "attn.qkv.weight"] = np.concatenate([k.reshape(d, -1).T for k in qkv], axis=0)
    sd[b + "attn.qkv.bias"] = np.concatenate([f[a + n + "/bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[b + "attn.proj.weight"] = f[a + "out/kernel"].reshape(-1, d).T
    sd[b + "attn.proj.bias"] = f[a + "out/bias"]
    for dst, src in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      sd[b + f"mlp.{dst}.weight"] = f[e + "MlpBlock_3/" + src + "/kernel"].T
      sd[b + f"mlp.{dst}.bias"] = f[e + "MlpBlock_3/" + src + "/bias"]
  if MAP + "probe" in f:
    sd["attn_pool.latent"] = f[MAP + "probe"]
    a = MAP + "MultiHeadDotProductAttention_0/"
    d = f[MAP + "probe"].shape[-1]
    w = {n: f[a + n + "/kernel"].reshape(d, -1).T for n in ("query", "key", "value")}
    b = {n: f[a + n + "/bias"].reshape(-1) for n in ("query", "key", "value")}
    sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = w["query"], b["query"]
    sd["attn_pool.kv.weight"] = np.concatenate([w["key"], w["value"]], axis=0)
    sd["attn_pool.kv.bias"] = np.concatenate([b["key"], b["value"]])
    sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"] = f[a + "out/kernel"].reshape(-1, d).T, f[a + "out/bias"]
    sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"] = f[MAP + "LayerNorm_0/scale"], f[MAP + "LayerNorm_0/bias"]
    for dst, src in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      sd[f"attn_pool.mlp.{dst}.weight"] = f[MAP + "MlpBlock_0/" + src + "/kernel"].T
      sd[f"attn_pool.mlp.{dst}.bias"] = f[MAP + "MlpBlock_0/" + src + "/bias"]
  if "head/kernel" in f:
    sd["head.weight"] = f["head/kernel"].T
    sd["head.bias"] = f["head/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# Hugging Face transformers' ViT and DINOv2 (with or without registers) -> timm names. Files on
# the hub come in two namings: transformers 4's (encoder.layer.N.attention.attention.query,
# intermediate.dense, ...) and transformers 5's (layers.N.attention.q_proj, mlp.fc1, ...).
_HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")
_HF_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)")
_HF_BLOCK = {  # per-layer name (either transformers version) -> timm's, under blocks.N.
    "layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}


def is_hf_vit(keys) -> bool:
  return any(k.split("embeddings.")[0] in ("",) + _HF_PREFIXES and "embeddings.patch_embeddings." in k for k in keys)


def hf_to_timm(sd: Mapping[str, np.ndarray], where: str = "checkpoint") -> dict[str, np.ndarray]:
  """transformers' ViT / DINOv2 / DINOv2-with-registers naming -> timm's.

  q, k, v are fused in that order; LayerScale's lambda1 is timm's gamma; ViT's `classifier` is
  the head. DINOv2 with registers adds its position embedding to the class token and the
  patches but not the registers: the class token's row is folded into the class token and the
  rest is a patch-only position embedding (timm's no_embed_class, as timm's own conversion of
  these weights does). Dropped, each with a reason: mask_token (masked pre-training only),
  ViTModel's pooler (dense + tanh, as pre_logits is for .npz) and DINOv2's classifier (it reads
  the class token and the mean patch token together, which no timm ViT head does).
  """
  s = {}
  for k, v in sd.items():
    for pre in _HF_PREFIXES:
      if k.startswith(pre):
        k = k[len(pre):]
    s[k] = v
  for k in s:
    if ".weights_in." in k or ".weights_out." in k:
      raise FormatError(f"{where}: {k} is a SwiGLU MLP (DINOv2-giant), which this ViT does not implement")
  take, check_rest = _reader(s, where, "a transformers ViT or DINOv2")
  out = {}
  cls, pos = take("embeddings.cls_token"), take("embeddings.position_embeddings")
  if "embeddings.register_tokens" in s:
    out["reg_token"] = take("embeddings.register_tokens")
    cls, pos = cls + pos[:, :1], pos[:, 1:]
  out["cls_token"], out["pos_embed"] = cls, pos
  for p in ("weight", "bias"):
    out[f"patch_embed.proj.{p}"] = take(f"embeddings.patch_embeddings.projection.{p}")
    out[f"norm.{p}"] = take(f"layernorm.{p}")
  layers = {}  # i -> {name inside the layer: full key}
  for k in s:
    if m := _HF_LAYER.fullmatch(k):
      layers.setdefault(int(m.group(1)), {})[m.group(2)] = k
  if sorted(layers) != list(range(len(layers))):
    raise FormatError(f"{where}: transformers layers are not numbered 0..N-1: {sorted(layers)}")
  for i, names in layers.items():
    dst, qkv = f"blocks.{i}.", {}
    for n, key in names.items():
      mod, _, leaf = n.rpartition(".")
      t = _HF_BLOCK.get(mod)
      if t is None:
        continue  # left for check_rest to name
      if t in ("ls1", "ls2"):
        out[dst + t + ".gamma"] = take(key)
      elif t in ("q", "k", "v"):
        qkv[(t, leaf)] = take(key)
      else:
        out[dst + f"{t}.{leaf}"] = take(key)
    for leaf in ("weight", "bias"):
      if not all((t, leaf) in qkv for t in "qkv"):
        raise FormatError(f"{where}: layer {i} lacks one of its query/key/value {leaf}s")
      out[dst + f"attn.qkv.{leaf}"] = np.concatenate([qkv[(t, leaf)] for t in "qkv"])
  d = cls.shape[-1]
  if "classifier.weight" in s:
    w = take("classifier.weight")
    if w.shape[1] == d:
      out["head.weight"], out["head.bias"] = w, take("classifier.bias")
    else:
      logging.info("%s: dropping classifier %s (DINOv2's head on [class token, mean patch token])", where, w.shape)
      take("classifier.bias")
  check_rest(ignore=("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token"))
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

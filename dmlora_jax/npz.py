"""Reading and writing ViT params as .npz in the public checkpoint naming.

Keys are '/'-joined parameter paths (`Transformer/encoderblock_0/.../query/kernel`), the
format of the google-research/vision_transformer checkpoints, which timm's `.npz` loader
and vit_jax read.
"""

import hashlib
import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmlora_jax import checkpoint_source, timm_format, vit
from dmlora_jax.pytrees import flatten, unflatten

POSEMB = "Transformer/posembed_input/pos_embedding"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model (or cannot be read)."""


def load_npz(path: str) -> dict[str, np.ndarray]:
  """A .npz checkpoint as a flat {name: array} dict. Older checkpoints that wrap the
  params in 'opt/target/' are unwrapped."""
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile/pickle/format errors, all unreadable files
    raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  prefix = "opt/target/"
  if any(k.startswith(prefix) for k in flat):
    flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def load_checkpoint(path: str, num_heads: int) -> dict[str, np.ndarray]:
  """A base checkpoint as {public name: array}: `.npz` in the public naming, or `.safetensors`
  in timm's ViT naming (the fused qkv split into num_heads heads) or transformers' ViT naming;
  hf-hub:ORG/NAME is downloaded first (checkpoint_source.resolve)."""
  try:
    path = checkpoint_source.resolve(path)
  except checkpoint_source.SourceError as e:
    raise CheckpointError(str(e)) from None
  if not path.endswith(".safetensors"):
    return load_npz(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  try:
    sd = timm_format.load_safetensors(path)
    if timm_format.is_timm(sd):
      return timm_format.to_public(sd, num_heads, where=path)
    if timm_format.is_hf_vit(sd):
      return timm_format.to_public(timm_format.hf_to_timm(sd, where=path), num_heads, where=path)
  except timm_format.FormatError as e:
    raise CheckpointError(str(e)) from e
  if any(k.startswith("Transformer/") for k in sd):
    return sd  # the public naming, stored as safetensors
  raise CheckpointError(f"{path}: unknown layout (first keys {sorted(sd)[:3]}); expected timm's ViT naming "
                        "(cls_token, pos_embed, patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...), transformers' ViT "
                        "naming (vit.embeddings.cls_token, vit.encoder.layer.N.attention.attention.query.weight, ...) "
                        "or the public one (Transformer/encoderblock_N/...)")


def save_npz(path: str, params: Mapping[str, Any]) -> None:
  """Writes params (nested or flat) as an uncompressed .npz, atomically (temp + rename),
  so an interrupted export never leaves a half-written file under the final name."""
  flat = params if all(isinstance(k, str) and not isinstance(v, Mapping) for k, v in params.items()) \
      else flatten(params)
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def fingerprint(flat: Mapping[str, np.ndarray]) -> str:
  """A content hash of a flat param dict (names, shapes, dtypes, bytes)."""
  h = hashlib.sha256()
  for k in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[k]))
    h.update(f"{k}|{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def resample_posemb(posemb_1xNxD: np.ndarray, new_tokens: int, num_prefix: int = 1) -> np.ndarray:
  """Resizes the patch-grid part of a position embedding to a new square grid.

  The first `num_prefix` rows (the class token, registers; 0 when the embedding covers the
  patches only) are kept; the square grid after them is resized bilinearly (half-pixel centres,
  as torch's align_corners=False; antialiased when shrinking) to the new square grid.
  """
  prefix, grid = posemb_1xNxD[:, :num_prefix], posemb_1xNxD[:, num_prefix:]
  old, new = int(round(np.sqrt(grid.shape[1]))), int(round(np.sqrt(new_tokens - num_prefix)))
  if old * old != grid.shape[1] or new * new != new_tokens - num_prefix:
    raise CheckpointError(f"{POSEMB}: cannot resample a non-square token grid "
                          f"({grid.shape[1]} -> {new_tokens - num_prefix} patches)")
  d = grid.shape[-1]
  g = jnp.asarray(grid.reshape(old, old, d), jnp.float32)
  g = jax.image.resize(g, (new, new, d), method="bilinear")
  out = np.concatenate([prefix, np.asarray(g).reshape(1, new * new, d).astype(posemb_1xNxD.dtype)], axis=1)
  logging.info("Resampled %s from %dx%d to %dx%d", POSEMB, old, old, new, new)
  return out


# Model leaves that only one ViT family has -> the config field that adds or removes them.
FAMILY_FIELDS = (("registers", "model.num_registers"), ("/ls1", "model.layer_scale"), ("/ls2", "model.layer_scale"),
                 ("norm_pre/", "model.pre_norm"), ("fc_norm/", "model.pool=avg"), ("MAPHead_0/", "model.pool=map"), ("encoder_norm/", "model.pool"),
                 ("embedding/bias", "model.patch_bias"))


def _field_hint(name: str) -> str:
  for part, field in FAMILY_FIELDS:
    if part in name:
      return f"check {field}"
  return "check model.variant and model.representation_size"


def load_pretrained(init_params: Mapping[str, Any], path: str, posemb_prefix: int = 1) -> tuple[dict, str]:
  """Fills the model's base (non-adapter) params from a checkpoint.

  init_params is the model's freshly initialised tree: it decides names and shapes.
  - a name missing on either side, or a shape mismatch, is an error that names the first
    offending parameter and both shapes;
  - the head keeps its fresh init when the checkpoint's class count differs or it has none;
  - pre_logits is dropped when the model has none;
  - the position embedding is resampled when the token grid differs (its first
    `posemb_prefix` rows, the class token's and the registers', are kept).
  Adapter leaves (and SSF's, VPT's: vit.ADDED_LEAVES) keep their init. Returns (params, fingerprint of the checkpoint).
  """
  model = flatten(init_params)
  ckpt = load_checkpoint(path, num_heads=next(
      v.shape[1] for k, v in model.items() if k.endswith("MultiHeadDotProductAttention_1/query/kernel")))
  fp = fingerprint(ckpt)
  base = {k: v for k, v in model.items() if k.rsplit("/", 1)[-1] not in vit.ADDED_LEAVES}
  has_pre_logits = any(k.startswith("pre_logits/") for k in base)
  out = dict(model)
  for k in sorted(set(ckpt) - set(base)):
    if k.startswith("pre_logits/") and not has_pre_logits:
      logging.info("Dropping %s (the model has no pre_logits layer)", k)
      continue
    raise CheckpointError(f"{path}: parameter {k} {ckpt[k].shape} is not in the model ({_field_hint(k)})")
  for k, v in base.items():
    if k not in ckpt and k.startswith("head/"):
      logging.info("Keeping the fresh %s (the checkpoint has no head: a backbone only)", k)
      continue
    if k not in ckpt:
      raise CheckpointError(f"{path}: parameter {k} (model shape {tuple(v.shape)}) is missing "
                            f"from the checkpoint ({_field_hint(k)})")
    a = ckpt[k]
    if a.shape != tuple(v.shape):
      if k == POSEMB and a.ndim == 3 and a.shape[2] == v.shape[2]:
        a = resample_posemb(a, v.shape[1], posemb_prefix)
      elif k.startswith("head/") and a.shape[:-1] == tuple(v.shape[:-1]):
        logging.info("Replacing %s: checkpoint has %d classes, model %d", k, a.shape[-1], v.shape[-1])
        continue
      else:
        raise CheckpointError(f"{path}: shape mismatch for {k}: checkpoint {a.shape} vs model "
                              f"{tuple(v.shape)}")
    out[k] = jnp.asarray(a, dtype=v.dtype)
  return unflatten(out), fp

"""Where a base checkpoint comes from, and what model it describes.

`resolve(name)`: a local path as it is, or `hf-hub:ORG/NAME[@REVISION]` downloaded through
`huggingface_hub` into its cache (model.safetensors, and config.json where the repository has
one). Offline, or without the package, the error says which file to place where.

`describe(path)`: the ViT that a checkpoint file holds, read from its array names and shapes
(headers only, no weights loaded) and from a transformers `config.json` beside it:
width, depth, MLP width, patch size, registers, LayerScale, pre-norm, patch bias, pooling,
whether the position embedding covers the class token, and the head count where the file
says it (the public .npz layout and config.json do; timm's fused qkv does not). This is what
`model.variant=auto` builds; what the file cannot say is an error that names the field to set.
"""

import json
import os
import re
import zipfile

import numpy as np

HUB = "hf-hub:"
HUB_FILE = "model.safetensors"


class SourceError(ValueError):
  """A checkpoint that cannot be found, fetched or described; one line."""


def resolve(name: str) -> str:
  """The local path of a checkpoint name (hf-hub: names are downloaded into the HF cache)."""
  if not name.startswith(HUB):
    return name
  repo, _, revision = name[len(HUB):].partition("@")
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
    raise SourceError(f"model.init_checkpoint={name!r}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
  try:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
  except ImportError:
    raise SourceError(f"{name}: hf-hub: names need the huggingface_hub package (pip install huggingface_hub), "
                      f"or download {HUB_FILE} from https://huggingface.co/{repo} and give its path") from None
  try:
    path = hf_hub_download(repo, HUB_FILE, revision=revision or None)
  except LocalEntryNotFoundError:
    from huggingface_hub import constants
    raise SourceError(f"{name}: cannot download {HUB_FILE} (offline, or HF_HUB_OFFLINE is set) and it is not in the "
                      f"cache {constants.HF_HUB_CACHE}: download https://huggingface.co/{repo}/resolve/"
                      f"{revision or 'main'}/{HUB_FILE} on a connected machine and set model.init_checkpoint to "
                      "its path (with its config.json beside it)") from None
  except Exception as e:  # no such repository or file, no access, ...
    raise SourceError(f"{name}: cannot fetch {HUB_FILE}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
  try:  # transformers repositories describe the model (heads, eps, activation) in config.json
    hf_hub_download(repo, "config.json", revision=revision or None)
  except Exception:  # config.json is optional (absent, or offline): describe() names what is missing
    pass
  return path


def _shapes(path: str) -> dict[str, tuple]:
  """{array name: shape} from a file's header, without reading the arrays."""
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
      return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  out = {}
  with zipfile.ZipFile(path) as z:  # .npz: each member's .npy header
    for name in z.namelist():
      with z.open(name) as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, _ = read(f)
      out[name[:-4] if name.endswith(".npy") else name] = tuple(shape)
  return out


def _hf_config(path: str) -> dict:
  cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.exists(cfg):
    return {}
  with open(cfg) as f:
    c = json.load(f)
  return c if "hidden_size" in c else {}  # a transformers config (timm's has no hidden_size)


def describe(path: str) -> dict:
  """ViTConfig fields of a checkpoint file (see the module docstring). Keys absent from the
  result are for the config to say: num_heads when the file cannot tell."""
  from dmlora_jax import timm_format
  try:
    shapes = _shapes(path)
  except Exception as e:
    raise SourceError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  hf = _hf_config(path)
  if timm_format.is_hf_vit(shapes):
    shapes = {k: v.shape for k, v in timm_format.hf_to_timm(
        {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, where=path).items()}
  if timm_format.is_timm(shapes):
    return _describe_timm(shapes, hf, path)
  if "embedding/kernel" in shapes:
    return _describe_public(shapes, path)
  raise SourceError(f"{path}: cannot tell its model from its keys (first {sorted(shapes)[:3]}); "
                    "set model.variant (e.g. B/16) and the family fields instead of model.variant=auto")


def _grid_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _describe_timm(s: dict, hf: dict, path: str) -> dict:
  d, p = s["cls_token"][-1], s["patch_embed.proj.weight"][-1]
  depth = len({m.group(1) for k in s if (m := re.match(r"blocks\.(\d+)\.", k))})
  regs = s["reg_token"][1] if "reg_token" in s else 0
  n_pos = s["pos_embed"][1]
  out = dict(width=d, depth=depth, mlp_dim=s["blocks.0.mlp.fc1.weight"][0], patch_size=p, num_registers=regs,
             layer_scale="blocks.0.ls1.gamma" in s, pre_norm="norm_pre.weight" in s,
             patch_bias="patch_embed.proj.bias" in s,
             pool="map" if "attn_pool.latent" in s else "avg" if "fc_norm.weight" in s else "token",
             no_embed_class=_grid_square(n_pos) and not _grid_square(n_pos - 1 - regs))
  if hf:
    out["num_heads"] = hf["num_attention_heads"]
    out["layer_norm_eps"] = float(hf.get("layer_norm_eps", 1e-6))
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new"):
      raise SourceError(f"{path}: config.json's hidden_act={act!r} is not an activation this ViT has")
    out["activation"] = "quick_gelu" if act == "quick_gelu" else "gelu"
    out["gelu_approximate"] = act in ("gelu_pytorch_tanh", "gelu_new")
  return out


def _describe_public(s: dict, path: str) -> dict:
  q = s["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
  depth = len({m.group(1) for k in s if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
  regs = s["registers"][1] if "registers" in s else 0
  n_pos = s["Transformer/posembed_input/pos_embedding"][1]
  return dict(width=q[0], num_heads=q[1], depth=depth, mlp_dim=s["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][1],
              patch_size=s["embedding/kernel"][0], num_registers=regs,
              layer_scale="Transformer/encoderblock_0/ls1" in s, pre_norm="Transformer/norm_pre/scale" in s,
              patch_bias="embedding/bias" in s,
              pool="map" if "MAPHead_0/probe" in s else "avg" if "fc_norm/scale" in s else "token",
              no_embed_class=_grid_square(n_pos) and not _grid_square(n_pos - 1 - regs),
              representation_size=s["pre_logits/kernel"][1] if "pre_logits/kernel" in s else 0)

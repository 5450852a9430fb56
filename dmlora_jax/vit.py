"""A Flax (linen) ViT whose parameter tree is the public checkpoint layout.

Names and shapes are those of the google-research/vision_transformer checkpoints:

    embedding/{kernel (P,P,3,D), bias}, cls (1,1,D),
    Transformer/posembed_input/pos_embedding (1, 1+N, D),
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1/
        {query,key,value}/{kernel (D,H,Dh), bias (H,Dh)}, out/{kernel (H,Dh,D), bias (D)},
    LayerNorm_2, MlpBlock_3/Dense_{0,1}/{kernel, bias},
    Transformer/encoder_norm, [pre_logits], head.

Other ViT families add (each a ViTConfig field, off by default): `registers` (1, R, D) after
the class token; `encoderblock_{i}/ls1`, `ls2` (D,) LayerScale; `Transformer/norm_pre`; `fc_norm`
(mean pooling, in place of `encoder_norm`); `MAPHead_0/{probe, MultiHeadDotProductAttention_0,
LayerNorm_0, MlpBlock_0}` (attention pooling, big_vision's names); a position embedding over the patches only
(no_embed_class); no `embedding/bias`; quick-GELU; another LayerNorm eps.

With an `AdapterSpec`, every targeted projection also holds the DMLoRA leaves `lora_a`
(K, d_in, r), `lora_b` (K, r, d_out) and `lora_log_scale` () = log alpha_l, in its matrix
view; the stored kernels keep their checkpoint shapes. With ViTConfig.scan_layers the blocks
run under nn.scan and their params are stacked over depth under `Transformer/encoderblock`
(layout.py converts; everything outside the step keeps the layout above). Without one, the same code is a
plain ViT (no adapter code runs), which is what a merged export is run with. The comparison
methods SSF (`ssf_scale`, `ssf_shift` beside every kernel and LayerNorm scale: ssf.py) and
VPT-deep (`Transformer/vpt_prompts`: vpt.py) are ViTConfig switches, off by default.

The module reads top-down: the model (ViT), its parts, then the projection helpers. The
computation is laid out for speed on XLA (CPU in particular): the patch embedding is a
reshape + matmul, q/k/v are one fused matmul, and attention runs as batched matmuls over
(batch*heads, tokens, head_dim) with the 1/sqrt(head_dim) scale on q; the kernels with a
hand-written backward pass and the LayerNorm fold are in kernels.py, with their reasons.
"""

import dataclasses
import math
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmlora_jax import adalora, dmlora, dora, kernels, layout, ssf, vpt

# name -> (width, depth, heads, mlp_dim)
VARIANTS = {
    "tiny": (32, 2, 2, 64),  # for tests
    "mini": (96, 4, 3, 384),  # for demos and CPU studies
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


LN_EPS = 1e-6
# Leaf names that the methods add and no public checkpoint has: loading and merging skip them.
ADDED_LEAVES = dmlora.ADAPTER_LEAVES + ssf.LEAVES + vpt.LEAVES

# model.remat: what the backward pass of an encoder block keeps from the forward pass.
# none: everything (fastest, most memory); full: only the block's input (recompute the block);
# dots: the outputs of the matmuls with no batch dimension (the projections: q/k/v, out,
# the MLP), recomputing the attention matmuls, softmax, GELU and LayerNorms.
REMAT = ("none", "full", "dots")


def remat_policy(value) -> str:
  """model.remat as one of REMAT; the booleans of configs before the policies (and their
  command-line spellings) are aliases: True = full, False = none."""
  if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
    value = value.lower() in ("true", "1", "yes")
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in REMAT:
    raise ValueError(f"model.remat={value!r} is not one of {', '.join(REMAT)} (or True/False: full/none)")
  return value


def _remat(block_cls, policy: str, prevent_cse: bool = True):
  if policy == "none":
    return block_cls
  saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
  return nn.remat(block_cls, policy=saveable, prevent_cse=prevent_cse)


ACTIVATIONS = ("gelu", "quick_gelu")
POOLS = ("token", "avg", "map")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  num_classes: int
  representation_size: int = 0  # 0 = no pre_logits
  gelu_approximate: bool = True
  dtype: str = "float32"
  remat: str = "none"  # REMAT: none | full | dots (True/False: full/none, as configs before the policies)
  scan_layers: bool = False  # the blocks under nn.scan, params stacked over depth (layout.py)
  drop_path: float = 0.0  # stochastic depth of the last block; linear from 0 over depth (timm)
  # Other ViT families (timm's names in brackets); the defaults are the original ViT.
  layer_scale: bool = False  # a learned per-channel scale on each residual branch (ls1, ls2: DINOv2, CaiT)
  num_registers: int = 0  # register tokens after the class token (reg_token: DINOv2-reg)
  no_embed_class: bool = False  # the position embedding covers the patches only (no_embed_class)
  pre_norm: bool = False  # a LayerNorm before the first block (norm_pre: CLIP)
  activation: str = "gelu"  # MLP activation: gelu | quick_gelu (x * sigmoid(1.702 x): OpenAI CLIP)
  pool: str = "token"  # token: class token | avg: mean patch token, then fc_norm | map: attention pooling (MAPHead)
  patch_bias: bool = True  # the patch embedding's bias (CLIP has none)
  layer_norm_eps: float = LN_EPS  # 1e-6 (ViT, DINOv2); OpenAI CLIP uses 1e-5
  # The comparison methods' own modules (methods.py turns them on; a merged export runs without).
  ssf: bool = False  # SSF scale and shift after every linear layer, LayerNorm and the patch embedding (ssf.py)
  ssf_init_std: float = 0.02  # gamma ~ N(1, std^2), beta ~ N(0, std^2); 0 = the identity
  vpt_prompts: int = 0  # VPT-deep: prompt tokens at every block's input (vpt.py); 0 = none
  attention: str = "auto"  # kernels.ATTENTION: which attention implementation (per backend)

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy(self.remat))
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"model.drop_path must be in [0, 1), got {self.drop_path}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool must be one of {POOLS}, got {self.pool!r}")
    if self.num_registers < 0:
      raise ValueError(f"model.num_registers must be >= 0, got {self.num_registers}")
    if self.vpt_prompts < 0:
      raise ValueError(f"vpt.num_prompts must be >= 0, got {self.vpt_prompts}")

  @property
  def ssf_std(self) -> float | None:
    """The SSF init std of every modulated module, or None without SSF."""
    return self.ssf_init_std if self.ssf else None

  @property
  def num_prefix(self) -> int:
    """Tokens before the patches: the class token and the registers."""
    return 1 + self.num_registers

  @property
  def posemb_prefix(self) -> int:
    """Rows of the position embedding before the patch grid."""
    return 0 if self.no_embed_class else self.num_prefix

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def parse_variant(variant: str, num_classes: int, **kwargs) -> ViTConfig:
  """'B/16' -> ViTConfig(width=768, depth=12, heads=12, mlp=3072, patch=16, ...)."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"model.variant {variant!r} is not NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)} (e.g. 'B/16', 'S/14', 'tiny/4')")
  width, depth, heads, mlp = VARIANTS[m.group(1)]
  return ViTConfig(width, depth, heads, mlp, int(m.group(2)), num_classes, **kwargs)


class ViT(nn.Module):
  """ViT classifier on the class token (pool="token") or the mean patch token (pool="avg").

  __call__(images_BxHxWx3 float, branch_masks=None, train=False) -> logits (B, num_classes).
  branch_masks: (depth, len(adapter.targets), K) keep multipliers; None = all branches, no
  rescale (evaluation). train=True enables drop-path (cfg.drop_path > 0 needs a 'drop_path'
  rng).
  """
  cfg: ViTConfig
  adapter: dmlora.AdapterSpec | None = None

  @nn.compact
  def __call__(self, images, branch_masks=None, train: bool = False):
    c = self.cfg
    b, hh, ww, ch = images.shape
    p = c.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    gh, gw = hh // p, ww // p
    # Patch embedding as reshape + matmul: same maths as the stride-P conv, faster on CPU.
    patches = images.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
    emb = Embedding(c, name="embedding")(patches, ch)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
    prefix = [cls]
    if c.num_registers:
      prefix.append(self.param("registers", nn.initializers.zeros, (1, c.num_registers, c.width)))
    x = jnp.concatenate([jnp.broadcast_to(t, (b,) + t.shape[1:]).astype(emb.dtype) for t in prefix] + [emb], axis=1)
    x = Transformer(c, self.adapter, name="Transformer")(x.astype(jnp.float32), branch_masks, train)
    if c.pool == "avg":
      x = LayerNorm(c.layer_norm_eps, c.ssf_std, name="fc_norm")(x[:, c.num_prefix:].mean(axis=1))
    elif c.pool == "map":
      x = MAPHead(c, name="MAPHead_0")(x[:, c.num_prefix:])  # over the patch tokens, as timm
    else:
      x = x[:, 0]
    if c.representation_size:
      x = jnp.tanh(nn.Dense(c.representation_size, name="pre_logits")(x))
    return nn.Dense(c.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead, timm's AttentionPoolLatent): a learned
  probe token attends over the patch tokens, then a residual MLP on the LayerNorm of the result.
  Part of the frozen backbone (SigLIP); no adapter branches."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.cfg
    b, _, d = x_BxTxD.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    y = _MAPAttention(c, name="MultiHeadDotProductAttention_0")(jnp.broadcast_to(probe, (b, 1, d)), x_BxTxD)
    y = y + MlpBlock(c, None, name="MlpBlock_0")(LayerNorm(c.layer_norm_eps, c.ssf_std, name="LayerNorm_0")(y), None)
    return y[:, 0]


class _MAPAttention(nn.Module):
  """Cross-attention of the probe (B, 1, D) over the tokens (B, T, D), public q/k/v/out names."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, q_Bx1xD, x_BxTxD):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    d, h, dh = c.width, c.num_heads, c.head_dim
    proj = {n: Projection((d,), (h, dh), ssf_std=c.ssf_std, name=n)() for n in ("query", "key", "value")}
    out = Projection((h, dh), (d,), ssf_std=c.ssf_std, name="out")()

    def heads(y, src):  # (B, N, D) -> (B, H, N, Dh)
      z = _dense(src, proj[y], None, dt)
      return z.reshape(src.shape[0], src.shape[1], h, dh).transpose(0, 2, 1, 3)

    q, k, v = heads("query", q_Bx1xD), heads("key", x_BxTxD), heads("value", x_BxTxD)
    a = jax.nn.softmax((jnp.einsum("bhqe,bhke->bhqk", q, k) / math.sqrt(dh)).astype(jnp.float32), axis=-1)
    o = jnp.einsum("bhqk,bhke->bhqe", a.astype(dt), v).transpose(0, 2, 1, 3).reshape(q_Bx1xD.shape[0], -1, h * dh)
    return _dense(o, out, None, dt).astype(jnp.float32)


class Embedding(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, patches_BxNxF, channels):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    p = c.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, channels, c.width)).reshape(p * p * channels, c.width)
    bias = self.param("bias", nn.initializers.zeros, (c.width,)) if c.patch_bias else None
    y = jnp.dot(patches_BxNxF.astype(dt), kernel.astype(dt))
    if bias is not None:
      y = y + bias.astype(dt)
    if c.ssf:
      y = ssf.apply(y, *ssf.declare(self, (c.width,), c.ssf_init_std))
    return y


class PosEmbed(nn.Module):
  """Adds the learned position embedding to the tokens after the first `skip` (0: all)."""
  skip: int = 0

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1] - self.skip, x.shape[2]))
    if not self.skip:
      return x + pos
    return jnp.concatenate([x[:, :self.skip], x[:, self.skip:] + pos], axis=1)


class Transformer(nn.Module):
  cfg: ViTConfig
  adapter: dmlora.AdapterSpec | None

  @nn.compact
  def __call__(self, x, masks, train: bool = False):
    c = self.cfg
    x = PosEmbed(c.num_prefix - c.posemb_prefix, name="posembed_input")(x)
    if c.pre_norm:
      x = LayerNorm(c.layer_norm_eps, c.ssf_std, name="norm_pre")(x)
    rates = [c.drop_path * i / max(c.depth - 1, 1) if train else 0.0 for i in range(c.depth)]
    if c.scan_layers:
      if c.vpt_prompts:
        raise ValueError("model.scan_layers does not run VPT-deep's per-block prompts; use model.scan_layers=false")
      x = self._scanned(x, masks, rates)
    else:
      prompts = None
      if c.vpt_prompts:  # VPT-deep: block i reads its own prompts after the prefix tokens
        prompts = self.param(vpt.PROMPTS, vpt.uniform_init(vpt.init_bound(c.patch_size, c.width)),
                             (c.depth, c.vpt_prompts, c.width))
      block_cls = _remat(EncoderBlock, c.remat)
      for i in range(c.depth):
        m = None if masks is None else masks[i]
        if prompts is not None:
          x = vpt.insert(x, prompts[i], c.num_prefix, replace=i > 0)
        x = block_cls(c, self.adapter, drop_path=rates[i], name=f"encoderblock_{i}")(x, m)
      if prompts is not None:
        x = vpt.remove(x, c.vpt_prompts, c.num_prefix)
    if c.pool == "avg":  # timm: the final norm becomes fc_norm, after pooling
      return x
    return LayerNorm(c.layer_norm_eps, c.ssf_std, name="encoder_norm")(x)

  def _scanned(self, x, masks, rates):
    """The blocks as one nn.scan over depth: one block body compiled once, its params stacked
    on a leading depth axis under `encoderblock` (layout.py converts to and from the public
    encoderblock_{i}). What differs per block is a scanned input: the block's (num_targets,
    K) slice of the branch masks and, with drop-path on, its rate (a traced scalar, so the
    same body serves every rate)."""
    c = self.cfg
    xs = (masks, jnp.asarray(rates, jnp.float32) if any(rates) else None)
    block_cls = _remat(_ScannedBlock, c.remat, prevent_cse=False)  # scan already keeps XLA from merging the recompute
    scan = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "drop_path": True},
                   in_axes=0, length=c.depth)
    x, _ = scan(c, self.adapter, name=layout.STACKED)(x, xs)
    return x


class EncoderBlock(nn.Module):
  cfg: ViTConfig
  adapter: dmlora.AdapterSpec | None
  drop_path: float = 0.0  # this block's rate; 0 or deterministic = identity

  @nn.compact
  def __call__(self, x, masks, rate=None):
    """rate: this block's drop-path rate as a traced scalar (under scan), else self.drop_path."""
    rate = self.drop_path if rate is None else rate
    y, affine = self._norm("LayerNorm_0", x)
    y = MultiHeadDotProductAttention(self.cfg, self.adapter, name="MultiHeadDotProductAttention_1")(y, masks, affine)
    x = x + self._drop_path(self._layer_scale("ls1", y.astype(x.dtype)), rate)
    y, affine = self._norm("LayerNorm_2", x)
    y = MlpBlock(self.cfg, self.adapter, name="MlpBlock_3")(y, masks, affine)
    return x + self._drop_path(self._layer_scale("ls2", y.astype(x.dtype)), rate)

  def _layer_scale(self, name, y_BxTxD):
    """LayerScale as its own leaf (not folded into out / Dense_1, so LoRA there stays exact)."""
    if not self.cfg.layer_scale:
      return y_BxTxD
    gamma = self.param(name, nn.initializers.constant(1e-5), (y_BxTxD.shape[-1],))  # timm's init_values
    return y_BxTxD * gamma.astype(y_BxTxD.dtype)

  def _norm(self, name, x):
    """(LayerNorm output, None), or in float32 compute (x_hat, (scale, bias)) for the next
    projections to fold in: measured faster in float32 on XLA CPU, slower in bfloat16. Not
    with SSF: its trainable scale folded into the kernels would make training form
    kernel-sized gradients (the cost of full fine-tuning) to reduce them to (D,)."""
    eps, std = self.cfg.layer_norm_eps, self.cfg.ssf_std
    if jnp.dtype(self.cfg.dtype) == jnp.float32 and std is None:  # SSF: a trainable affine, not folded
      return LayerNorm(eps, std, name=name)(x, affine=False)
    return LayerNorm(eps, std, name=name)(x), None

  def _drop_path(self, y_BxTxD, rate):
    """Per-example stochastic depth of a residual branch, kept ones scaled by 1/(1-rate).
    A python rate of 0 is the identity; a traced one (scan) always draws (rate 0 keeps all)."""
    if isinstance(rate, (int, float)) and rate <= 0.0:
      return y_BxTxD
    keep = jax.random.bernoulli(self.make_rng("drop_path"), 1.0 - rate, (y_BxTxD.shape[0], 1, 1))
    scale = (1.0 - rate) if isinstance(rate, (int, float)) else (1.0 - rate).astype(y_BxTxD.dtype)
    return y_BxTxD * keep.astype(y_BxTxD.dtype) / scale


class _ScannedBlock(EncoderBlock):
  """An EncoderBlock in nn.scan's (carry, xs) -> (carry, ys) form; the same submodule names."""

  def __call__(self, x, xs):
    masks, rate = xs
    return super().__call__(x, masks, rate), None


class MultiHeadDotProductAttention(nn.Module):
  cfg: ViTConfig
  adapter: dmlora.AdapterSpec | None

  @nn.compact
  def __call__(self, x_BxTxD, masks, ln_affine=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, d = x_BxTxD.shape
    h, dh = c.num_heads, c.head_dim
    mask = {n: _mask_for(self.adapter, masks, n) for n in ("query", "key", "value", "out")}
    projs = {}
    for name in ("query", "key", "value"):
      proj = Projection((d,), (h, dh), _adapter_for(self.adapter, name), c.ssf_std, name=name)()
      projs[name] = kernels.fold_affine(proj, ln_affine, mask[name])
    projs["out"] = Projection((h, dh), (d,), _adapter_for(self.adapter, "out"), c.ssf_std, name="out")()

    # One fused matmul for the frozen q/k/v kernels; the adapters add their low-rank parts.
    w_qkv = jnp.concatenate([projs[n][0] for n in ("query", "key", "value")], axis=1)
    b_qkv = jnp.concatenate([projs[n][1] for n in ("query", "key", "value")])
    qkv = jnp.dot(x_BxTxD.astype(dt), w_qkv.astype(dt)) + b_qkv.astype(dt)
    if c.ssf:  # the official code's one (3D,) scale and shift after its fused qkv
      qkv = ssf.apply(qkv, *(jnp.concatenate([projs[n][3][i].reshape(-1) for n in ("query", "key", "value")])
                             for i in (0, 1)))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    qkv = [q, k, v]
    for i, name in enumerate(("query", "key", "value")):
      lora = projs[name][2]
      if lora is not None:
        qkv[i] = qkv[i] + dmlora.lora_delta(x_BxTxD, *lora, mask_K=mask[name], dtype=dt)

    def heads(y):  # (B, T, H*Dh) -> (B*H, T, Dh)
      return y.reshape(b, t, h, dh).transpose(0, 2, 1, 3).reshape(b * h, t, dh)

    q, k, v = (heads(y) for y in qkv)
    # Scaling q (B*H*T*Dh values, fused into the head transpose) instead of the logits
    # (B*H*T*T values, a separate pass on CPU) saves one pass over the largest tensor.
    q = q * jnp.asarray(1.0 / math.sqrt(dh), dt)
    o = kernels.attention_fn(c.attention)(q, k, v)
    o = o.reshape(b, h, t, dh).transpose(0, 2, 1, 3).reshape(b, t, h * dh)
    return _dense(o, projs["out"], mask["out"], dt)


class MlpBlock(nn.Module):
  cfg: ViTConfig
  adapter: dmlora.AdapterSpec | None

  @nn.compact
  def __call__(self, x_BxTxD, masks, ln_affine=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    d = x_BxTxD.shape[-1]

    mask0 = _mask_for(self.adapter, masks, "Dense_0")
    p0 = Projection((d,), (c.mlp_dim,), _adapter_for(self.adapter, "Dense_0"), c.ssf_std, name="Dense_0")()
    p0 = kernels.fold_affine(p0, ln_affine, mask0)
    p1 = Projection((c.mlp_dim,), (d,), _adapter_for(self.adapter, "Dense_1"), c.ssf_std, name="Dense_1")()
    y = _activation(c)(_dense(x_BxTxD, p0, mask0, dt))
    return _dense(y, p1, _mask_for(self.adapter, masks, "Dense_1"), dt)


class Projection(nn.Module):
  """Declares one projection's params (checkpoint shapes) and returns its matrix view.

  Returns (kernel (d_in, d_out), bias (d_out,), lora, ssf) where lora is None or the tuple
  (lora_a, lora_b, lora_log_scale) and ssf is None or the SSF (scale, shift) of the output,
  declared here with ssf_std and applied by the parent to the output (ssf.py). The parent
  does the maths, so that projections that share an input can be fused into one matmul.
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  adapter: dmlora.AdapterSpec | None = None
  ssf_std: float | None = None  # SSF on this projection's output (its init std); None = none

  @nn.compact
  def __call__(self):
    d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=tuple(range(len(self.in_shape))),
                                                               out_axis=tuple(range(len(self.in_shape), len(self.in_shape) + len(self.out_shape)))),
                        (*self.in_shape, *self.out_shape))
    bias = self.param("bias", nn.initializers.zeros, self.out_shape)
    if self.ssf_std is not None:
      if self.adapter is not None:
        raise ValueError("SSF and DMLoRA branches on one projection are not a method of methods.py")
      gamma, beta = ssf.declare(self, self.out_shape, self.ssf_std)
      return kernel.reshape(d_in, d_out), bias.reshape(d_out), None, (gamma.reshape(d_out), beta.reshape(d_out))
    lora = None
    if self.adapter is not None:
      k, r = self.adapter.num_branches, self.adapter.rank
      if self.adapter.adalora:  # its own initialisers: declared in its branch below
        return self._adalora(kernel, bias, d_in, d_out, r)
      a = self.param(dmlora.LORA_A, dmlora.lora_a_init(self.adapter.init), (k, d_in, r))
      b = self.param(dmlora.LORA_B, nn.initializers.zeros, (k, r, d_out))
      s = self.param(dmlora.LORA_LOG_SCALE, nn.initializers.constant(math.log(self.adapter.alpha)), ())
      lora = (a, b, s)
      if self.adapter.dora:  # W' = m (W + s A B) / ||.||_c as the kernel (set to ||W||_c after loading)
        m = self.param(dmlora.DORA_MAGNITUDE, nn.initializers.ones, (d_out,))
        return dora.effective_kernel(kernel.reshape(d_in, d_out), a, b, s, m), bias.reshape(d_out), None, None
    return kernel.reshape(d_in, d_out), bias.reshape(d_out), lora, None

  def _adalora(self, kernel, bias, d_in, d_out, r):
    """W' = W + (alpha / r) P diag(Lambda) Q as the kernel; P, Q ~ N(0, 0.02^2), Lambda = 0 (PEFT)."""
    a = self.param(dmlora.LORA_A, nn.initializers.normal(0.02), (1, d_in, r))
    b = self.param(dmlora.LORA_B, nn.initializers.normal(0.02), (1, r, d_out))
    e = self.param(dmlora.ADALORA_E, nn.initializers.zeros, (r,))
    s = self.param(dmlora.LORA_LOG_SCALE, nn.initializers.constant(math.log(self.adapter.alpha)), ())
    return adalora.effective_kernel(kernel.reshape(d_in, d_out), a, b, e, s), bias.reshape(d_out), None, None


def _adapter_for(adapter, name):
  return adapter if adapter is not None and name in adapter.targets else None


def _mask_for(adapter, masks, name):
  """The (K,) keep multipliers of target `name` from a block's (num_targets, K) masks."""
  if masks is None or _adapter_for(adapter, name) is None:
    return None
  return masks[list(adapter.targets).index(name)]


def _dense(x, proj, mask, dtype):
  kernel, bias, lora, scale_shift = proj
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
  if lora is not None:
    y = y + dmlora.lora_delta(x, *lora, mask_K=mask, dtype=dtype)
  if scale_shift is not None:
    y = ssf.apply(y, *scale_shift)
  return y


def _activation(c: ViTConfig) -> Callable:
  if c.activation == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if c.gelu_approximate:
    return kernels.gelu_tanh
  return lambda x: jax.nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
  """LayerNorm in float32 with the checkpoint's eps; the names are scale and bias.

  With affine=False it returns (x_hat, (scale, bias)): the normalised input and the affine
  left unapplied, for the projections that read it to fold in (`fold_affine`). With ssf_std,
  the SSF scale and shift of the output are declared here and folded into that (D,) affine.
  """
  eps: float = LN_EPS
  ssf_std: float | None = None

  @nn.compact
  def __call__(self, x, affine: bool = True):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    if self.ssf_std is not None:
      scale, bias = ssf.fold(scale, bias, *ssf.declare(self, (d,), self.ssf_std))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    x_hat = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if not affine:
      return x_hat, (scale, bias)
    return x_hat * scale + bias

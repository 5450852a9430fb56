"""Kernels of the ViT laid out for XLA on CPU, each with the reason it exists.

Each is mathematically the textbook operation (tests/test_model.py checks values and
gradients against the plain formulas and a NumPy ViT); they differ in what is kept for the
backward pass or where work happens, which is what the CPU step time depends on
(benchmarks/README.md):

- `gelu_tanh`: the tanh GELU with a backward pass that keeps only its input.
- `attention`: softmax(q k^T) v that normalises the (N, T, Dh) output instead of the
  (N, T, T) weights, with a backward pass built on rowsum(dO * O).
- `fold_affine`: a LayerNorm's scale and bias folded into the projection that reads it
  (weight-sized work instead of activation-sized).
On GPU and TPU, XLA's own fusions make these choices matter less; they stay correct there.

Attention is the one kernel with a better implementation per backend, so the model asks
`attention_fn(config.model.attention)` for it (see ATTENTION): `auto` is this CPU kernel on
CPU, `jax.nn.dot_product_attention` on GPU (JAX's pick: XLA in jax 0.10.2; `cudnn` forces
cuDNN's fused attention) and Pallas flash attention on TPU where the token count needs no
padding. None of the GPU/TPU choices has been run on a GPU or TPU yet. Every choice is
the same softmax(q k^T) v; tests/test_kernels.py checks each one that runs on CPU (Pallas in
its interpreter) against NumPy, values and gradients.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from dmlora_jax import config_base, dmlora
from dmlora_jax.config_base import ConfigError


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """tanh-approximate GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), that saves only x.

  Autodiff of the formula keeps x^2, x^3 and tanh(.) of the (B, T, mlp_dim) activation for
  the backward pass, so XLA CPU writes and re-reads several activation-sized tensors; here
  the forward is one elementwise pass and the backward recomputes tanh from x in one pass.
  """
  return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
  return jax.nn.gelu(x, approximate=True), x


def _gelu_tanh_bwd(x, g):
  c = math.sqrt(2.0 / math.pi)
  x2 = x * x
  t = jnp.tanh(c * (x + 0.044715 * x2 * x))
  dt = c * (1.0 + 3 * 0.044715 * x2)
  return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@jax.custom_vjp
def attention(q_NxTxD: jax.Array, k_NxTxD: jax.Array, v_NxTxD: jax.Array) -> jax.Array:
  """softmax(q k^T) v over (batch*heads, tokens, head_dim), softmax in float32.

  The forward pass keeps the unnormalised e = exp(s - max s) and divides the (N, T, Dh)
  output by the row sums instead of the (N, T, T) weights, which saves a pass over the
  largest tensor. The backward pass uses rowsum(P * dP) = rowsum(dO * O), so that the
  (N, T, T) gradient is one elementwise pass over the dO V^T product.
  """
  return _attention_fwd(q_NxTxD, k_NxTxD, v_NxTxD)[0]


def _attention_fwd(q, k, v):
  s = jnp.einsum("nqd,nkd->nqk", q, k).astype(jnp.float32)
  e = jnp.exp(s - s.max(-1, keepdims=True))
  r = 1.0 / e.sum(-1, keepdims=True)  # (N, T, 1)
  o = (jnp.einsum("nqk,nkd->nqd", e.astype(v.dtype), v).astype(jnp.float32) * r).astype(v.dtype)
  return o, (q, k, v, e, r, o)


def _attention_bwd(res, do):
  q, k, v, e, r, o = res
  dt = v.dtype
  do_r = (do.astype(jnp.float32) * r).astype(dt)  # dO / rowsum
  dv = jnp.einsum("nqk,nqd->nkd", e.astype(dt), do_r)  # P^T dO
  dp_r = jnp.einsum("nqd,nkd->nqk", do_r, v).astype(jnp.float32)  # (dO V^T) / rowsum
  delta_r = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True) * r
  ds = (e * (dp_r - delta_r)).astype(dt)  # P * (dP - rowsum(dO * O))
  dq = jnp.einsum("nqk,nkd->nqd", ds, k)
  dk = jnp.einsum("nqk,nqd->nkd", ds, q)
  return dq, dk, dv


attention.defvjp(_attention_fwd, _attention_bwd)


def fold_affine(proj, scale_bias, mask):
  """A projection of (x_hat * scale + bias) rewritten as a projection of x_hat.

  x W + b with x = x_hat * g + beta is x_hat (g[:, None] W) + (beta W + b), and an adapter's
  x A m B is x_hat (g[:, None] A) m B + beta A m B. The rewrite costs weight-sized work
  instead of activation-sized: applied to the (B, T, D) activation, XLA CPU wrote g and beta
  out at activation shape for its fused kernels, forward and backward (benchmarks/README.md).
  """
  if scale_bias is None:
    return proj
  kernel, bias, lora, scale_shift = proj
  g, beta = scale_bias
  bias = bias + beta @ kernel
  kernel = g[:, None] * kernel
  if lora is not None:
    a, b, s = lora
    bias = bias + dmlora.lora_delta(beta[None], a, b, s, mask_K=mask)[0]
    lora = (a * g[None, :, None], b, s)
  return kernel, bias, lora, scale_shift


# ---- attention implementations: (N, T, Dh) x3 -> (N, T, Dh), q already scaled ----

def _xla_attention(q, k, v):
  """The textbook formula, JAX's own XLA path (autodiff gives the backward pass)."""
  return _dot_product_attention(q, k, v, "xla")


def _dot_product_attention(q, k, v, implementation=None):
  """jax.nn.dot_product_attention on (N, T, 1, Dh): N = batch*heads as its batch, one head.
  implementation=None lets JAX pick: in jax 0.10.2 that is still XLA (JAX's own TODO to select
  cuDNN automatically); `cudnn` asks for cuDNN's fused attention (float16/bfloat16)."""
  o = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0,
                                   implementation=implementation)
  return o[:, :, 0]


FLASH_BLOCK = 128  # the Pallas TPU kernel's default block along the tokens


def _pallas_tpu_flash(q, k, v):
  """Pallas flash attention (jax.experimental.pallas.ops.tpu.flash_attention) on (N, 1, T, Dh).

  The kernel tiles the tokens in blocks of FLASH_BLOCK: a token count that is not a multiple
  (197 for ViT-B/16 at 224 px) is padded, and the padding is kept out of every real row's
  softmax by segment ids (real tokens are segment 1, padding segment 0)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  n, t, _ = q.shape
  pad = -t % FLASH_BLOCK
  seg = None
  if pad:
    ids = jnp.broadcast_to((jnp.arange(t + pad) < t).astype(jnp.int32), (n, t + pad))
    seg = fa.SegmentIds(q=ids, kv=ids)
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0)))[:, None] for x in (q, k, v))
  return fa.flash_attention(q, k, v, segment_ids=seg, sm_scale=1.0)[:, 0, :t]


def _tpu_auto(q, k, v):
  """TPU default: flash attention where the tokens fill its blocks exactly, else XLA (padding
  197 tokens to 256 makes the attention products 1.7x larger; which is faster there is unmeasured)."""
  if q.shape[1] % FLASH_BLOCK == 0:
    return _pallas_tpu_flash(q, k, v)
  return _xla_attention(q, k, v)


# name -> (function, the backends it runs on; None = any)
ATTENTION_IMPLS: dict[str, tuple[Callable, tuple[str, ...] | None]] = {
    "cpu_kernel": (attention, None),  # the custom-VJP kernel above (plain jnp: runs anywhere)
    "xla": (_xla_attention, None),
    "dot_product_attention": (_dot_product_attention, None),  # JAX picks (XLA in jax 0.10.2)
    "cudnn": (lambda q, k, v: _dot_product_attention(q, k, v, "cudnn"), ("gpu",)),
    "pallas_tpu_flash": (_pallas_tpu_flash, ("tpu",)),
}
AUTO = {"cpu": "cpu_kernel", "gpu": "dot_product_attention", "tpu": "tpu_auto"}
ATTENTION = ("auto",) + tuple(ATTENTION_IMPLS)
assert ATTENTION == config_base.ATTENTION, (ATTENTION, config_base.ATTENTION)


def attention_fn(name: str = "auto", backend: str | None = None) -> Callable:
  """The attention function of config.model.attention on `backend` (default: JAX's default
  backend). A name that cannot run there is a one-line ConfigError naming both."""
  backend = backend or jax.default_backend()
  if name not in ATTENTION:
    raise ConfigError(f"config.model.attention={name!r} is not one of {', '.join(ATTENTION)}")
  if name == "auto":
    choice = AUTO.get(backend, "xla")
    return _tpu_auto if choice == "tpu_auto" else ATTENTION_IMPLS[choice][0]
  fn, backends = ATTENTION_IMPLS[name]
  if backends is not None and backend not in backends:
    raise ConfigError(f"config.model.attention={name!r} cannot run on the {backend} backend "
                      f"(it runs on {', '.join(backends)}); use auto, cpu_kernel, xla or dot_product_attention")
  return fn

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
"""

import math

import jax
import jax.numpy as jnp

from dmlora_jax import dmlora


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
  kernel, bias, lora = proj
  g, beta = scale_bias
  bias = bias + beta @ kernel
  kernel = g[:, None] * kernel
  if lora is not None:
    a, b, s = lora
    bias = bias + dmlora.lora_delta(beta[None], a, b, s, mask_K=mask)[0]
    lora = (a * g[None, :, None], b, s)
  return kernel, bias, lora

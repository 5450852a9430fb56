"""The CPU kernels of kernels.py against the plain formulas: values and gradients. Also every
attention implementation of config.model.attention that runs on CPU against NumPy, and the
one-line refusal of those that cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import dmlora, kernels
from dmlora_jax.config_base import ConfigError


def test_gelu_tanh_custom_vjp_matches_autodiff_of_the_formula():
  # kernels.gelu_tanh saves only x for the backward pass (a speed change, benchmarks/README.md);
  # its value and gradient must be those of jax.nn.gelu(approximate=True).
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32)
  ref = lambda x: jnp.sum(jnp.sin(x) * jax.nn.gelu(x, approximate=True))
  got = lambda x: jnp.sum(jnp.sin(x) * kernels.gelu_tanh(x))
  np.testing.assert_array_equal(kernels.gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  np.testing.assert_allclose(jax.grad(got)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-5)


def test_attention_custom_vjp_matches_autodiff_of_softmax_attention():
  # kernels.attention defers the softmax normalisation and has a hand-written backward pass;
  # value and gradients must be those of softmax(q k^T) v, here with large logits (stability).

  def ref(q, k, v):
    w = jax.nn.softmax(jnp.einsum("nqd,nkd->nqk", q, k), axis=-1)
    return jnp.einsum("nqk,nkd->nqd", w, v)

  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q, k, v = (4.0 * jax.random.normal(key, (6, 17, 8)) for key in (kq, kk, kv))
  g = jax.random.normal(kg, (6, 17, 8))
  np.testing.assert_allclose(kernels.attention(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  got = jax.vjp(kernels.attention, q, k, v)[1](g)
  want = jax.vjp(ref, q, k, v)[1](g)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()), err_msg=f"d{name}")


def test_folded_layernorm_affine_matches_applying_it_values_and_gradients():
  # The encoder blocks fold each LayerNorm's scale and bias into the projection that reads
  # it (kernels.fold_affine). Value and every gradient (x_hat, scale, bias, kernel, bias, A, B,
  # alpha) must equal those of the projection of x_hat * scale + bias, with a branch mask.
  ks = jax.random.split(jax.random.key(3), 9)
  k_br, d_in, r, d_out = 3, 6, 2, 5
  x_hat = jax.random.normal(ks[0], (4, 7, d_in))
  args = (jax.random.normal(ks[1], (d_in,)) + 1.0, jax.random.normal(ks[2], (d_in,)),  # g, beta
          jax.random.normal(ks[3], (d_in, d_out)), jax.random.normal(ks[4], (d_out,)),  # W, b
          jax.random.normal(ks[5], (k_br, d_in, r)), jax.random.normal(ks[6], (k_br, r, d_out)),
          jnp.asarray(3.0))
  mask = jnp.asarray([1.0, 0.0, 2.0])
  g_out = jax.random.normal(ks[7], (4, 7, d_out))

  def applied(x_hat, g, beta, w, b, a, bb, s):
    x = x_hat * g + beta
    return x @ w + b + dmlora.lora_delta(x, a, bb, s, mask_K=mask)

  def folded(x_hat, g, beta, w, b, a, bb, s):
    w2, b2, (a2, bb2, s2), ss = kernels.fold_affine((w, b, (a, bb, s), None), (g, beta), mask)
    assert ss is None
    return x_hat @ w2 + b2 + dmlora.lora_delta(x_hat, a2, bb2, s2, mask_K=mask)

  np.testing.assert_allclose(folded(x_hat, *args), applied(x_hat, *args), rtol=1e-5, atol=1e-5)
  want = jax.vjp(applied, x_hat, *args)[1](g_out)
  got = jax.vjp(folded, x_hat, *args)[1](g_out)
  names = ("x_hat", "scale", "bias", "kernel", "proj_bias", "lora_a", "lora_b", "lora_log_scale")
  for name, a, b in zip(names, got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()), err_msg=name)
  # Without an affine the projection is returned as it is.
  proj = (args[2], args[3], None, None)
  assert kernels.fold_affine(proj, None, None) is proj


def _numpy_attention_and_vjp(q, k, v, g):
  """softmax(q k^T) v and the gradients of sum(g * it) w.r.t. q, k, v, in float64 NumPy."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  s = q @ k.transpose(0, 2, 1)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = g @ v.transpose(0, 2, 1)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  return p @ v, (ds @ k, ds.transpose(0, 2, 1) @ q, p.transpose(0, 2, 1) @ g)


def _check_attention(fn, n=3, t=17, d=8):
  kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
  q, k, v = (3.0 * jax.random.normal(key, (n, t, d)) for key in (kq, kk, kv))
  g = jax.random.normal(kg, (n, t, d))
  want, grads = _numpy_attention_and_vjp(q, k, v, g)
  out, vjp = jax.vjp(fn, q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for name, a, b in zip("qkv", vjp(g), grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("name", ["auto", "cpu_kernel", "xla", "dot_product_attention"])
def test_each_attention_that_runs_on_cpu_matches_numpy_values_and_gradients(name):
  _check_attention(kernels.attention_fn(name, "cpu"))


def test_pallas_tpu_flash_attention_in_the_interpreter_matches_numpy_with_padded_tokens():
  # 17 tokens are padded to one block of 128; segment ids keep the padding out of the softmax.
  from jax.experimental.pallas import tpu as pltpu
  with pltpu.force_tpu_interpret_mode():
    _check_attention(kernels.attention_fn("pallas_tpu_flash", "tpu"), n=1)


def test_auto_attention_picks_per_backend():
  assert kernels.attention_fn("auto", "cpu") is kernels.attention
  assert kernels.attention_fn("auto", "gpu") is kernels._dot_product_attention
  assert kernels.attention_fn("auto", "tpu") is kernels._tpu_auto
  assert kernels.attention_fn("auto") is kernels.attention  # the tests run on CPU


@pytest.mark.parametrize("name,backend", [("cudnn", "cpu"), ("pallas_tpu_flash", "cpu"), ("pallas_tpu_flash", "gpu"),
                                          ("cudnn", "tpu")])
def test_attention_that_cannot_run_on_the_backend_is_one_line_naming_both(name, backend):
  with pytest.raises(ConfigError) as e:
    kernels.attention_fn(name, backend)
  msg = str(e.value)
  assert f"config.model.attention={name!r} cannot run on the {backend} backend" in msg and "\n" not in msg

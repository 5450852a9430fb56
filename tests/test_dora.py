"""DoRA (method=dora): W' = m (W + s A B) / ||W + s A B||_c with the norm detached, m starting
at the loaded kernel's column norms. Checked against the formula in NumPy on the independent
NumPy ViT, its gradient against the norm-as-a-constant formulation, its merge, its PEFT export
(PEFT's DoRA maths in NumPy), and its ViT-B/16 parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_vit
from dmlora_jax import config_base, dmlora, merge, methods, npz, peft_export, setup, timm_format, vit
from dmlora_jax.pytrees import flatten, unflatten
from test_peft_export import _peft_apply
from test_timm_format import timm_forward
from trainer_utils import tiny_config

TARGETS = ("query", "value", "Dense_1")


def _model(targets=TARGETS, num_classes=10):
  return vit.ViT(vit.parse_variant("tiny/4", num_classes, gelu_approximate=False),
                 dmlora.AdapterSpec(num_branches=1, rank=2, alpha=3.0, targets=targets, dora=True))


def _random_params(model, seed=1):
  x = jnp.zeros((1, 16, 16, 3))
  params = model.init(jax.random.key(0), x)["params"]
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {}
  for kk, (k, v) in zip(keys, flat.items()):
    r = np.asarray(0.3 * jax.random.normal(kk, v.shape), np.float32)
    out[k] = r + 1.0 if k.endswith(("/scale", "/" + dmlora.DORA_MAGNITUDE)) else r
  out = {k: (np.float32(np.log(3.0)) if k.endswith(dmlora.LORA_LOG_SCALE) else v) for k, v in out.items()}
  return unflatten(out)


def _numpy_dora_kernels(flat):
  """The public-layout base params with every DoRA module's kernel replaced by its W'."""
  out = {k: np.asarray(v, np.float64) for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  for k in flat:
    if k.endswith("/" + dmlora.DORA_MAGNITUDE):
      mod = k[: -len(dmlora.DORA_MAGNITUDE) - 1]
      w = np.asarray(flat[mod + "/kernel"], np.float64)
      a = np.asarray(flat[mod + "/lora_a"], np.float64)[0]
      b = np.asarray(flat[mod + "/lora_b"], np.float64)[0]
      s = np.exp(np.float64(flat[mod + "/lora_log_scale"])) / a.shape[-1]
      v = w.reshape(a.shape[0], -1) + s * a @ b
      out[mod + "/kernel"] = (np.asarray(flat[k], np.float64) * v / np.linalg.norm(v, axis=0)).reshape(w.shape)
  return out


def test_dora_forward_is_the_papers_formula_on_an_independent_vit():
  model = _model()
  params = _random_params(model)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 16, 3)), np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  want = numpy_vit.forward(_numpy_dora_kernels(flatten(params)), x, patch=4, num_heads=2, depth=2, approximate=False)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_the_norm_is_detached_as_in_peft():
  """The gradient equals that of a plain ViT whose kernels are m (W + s A B) / n with each n
  computed aside as a constant, and differs from the one where n follows B."""
  model = _model(("query",))
  params = _random_params(model)
  x = jnp.asarray(jax.random.normal(jax.random.key(2), (2, 16, 16, 3)))
  mods = [f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query" for i in (0, 1)]
  flat = {k: jnp.asarray(v) for k, v in flatten(params).items()}
  s = 1.5  # alpha / r = 3 / 2

  def v_of(mod, b):
    return flat[mod + "/kernel"].reshape(32, 32) + s * flat[mod + "/lora_a"][0] @ b[0]

  norms = {mod: jnp.linalg.norm(v_of(mod, flat[mod + "/lora_b"]), axis=0) for mod in mods}
  plain = vit.ViT(model.cfg)

  def dora_loss(b):
    return jnp.sum(model.apply({"params": unflatten(dict(flat, **{mods[0] + "/lora_b": b}))}, x) ** 2)

  def plain_loss(b, detached=True):
    f = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
    for mod in mods:
      v = v_of(mod, b if mod == mods[0] else flat[mod + "/lora_b"])
      n = norms[mod] if detached else jnp.linalg.norm(v, axis=0)
      f[mod + "/kernel"] = (flat[mod + "/dora_magnitude"] * v / n).reshape(32, 2, 16)
    return jnp.sum(plain.apply({"params": unflatten(f)}, x) ** 2)

  b = flat[mods[0] + "/lora_b"]
  np.testing.assert_allclose(dora_loss(b), plain_loss(b), rtol=1e-5)
  g = jax.grad(dora_loss)(b)
  np.testing.assert_allclose(g, jax.grad(plain_loss)(b), rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(g - jax.grad(lambda b: plain_loss(b, False))(b)).max()) > 1e-2


def test_magnitudes_start_at_the_loaded_kernels_column_norms_and_the_model_at_the_pretrained_one(tmp_path):
  plain = vit.ViT(vit.parse_variant("tiny/4", 10))
  base = plain.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)))["params"]
  base = unflatten({k: np.asarray(v) + 0.1 for k, v in flatten(base).items()})
  npz.save_npz(str(tmp_path / "base.npz"), base)
  c = config_base.resolve(tiny_config(method="dora", **{"model.init_checkpoint": str(tmp_path / "base.npz")}))
  s = setup.build(c, 10)
  flat = flatten(s.params)
  mod = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value"
  np.testing.assert_allclose(flat[mod + "/dora_magnitude"], np.linalg.norm(flatten(base)[mod + "/kernel"].reshape(32, 32), axis=0),
                             rtol=1e-6)
  x = jnp.asarray(jax.random.normal(jax.random.key(3), (2, 16, 16, 3)))
  np.testing.assert_allclose(s.model.apply({"params": s.params}, x), plain.apply({"params": base}, x), atol=1e-5)
  assert set(flatten(s.trainable)) >= {mod + "/dora_magnitude", mod + "/lora_a", mod + "/lora_b"}


def test_dora_merges_into_a_plain_vit_and_exports_as_peft_dora():
  model = _model()
  params = _random_params(model)
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 16, 16, 3)), np.float32)
  adapted = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  merged = merge.merge_params(params)
  np.testing.assert_allclose(vit.ViT(model.cfg).apply({"params": merged}, jnp.asarray(x)), adapted, atol=1e-5)
  sd, config = peft_export.peft_adapter(params)
  assert config["use_dora"] and sd["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector"].shape == (96,)
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  base = timm_format.from_public({k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES})
  timm_sd = _peft_apply(base, sd, config)  # W + B A (lora_alpha = r) ...
  for key, m in sd.items():  # ... then PEFT's DoRA: m * V / ||V|| per output row of torch's (out, in)
    if key.endswith("lora_magnitude_vector"):
      name = key[len("base_model.model."):-len(".lora_magnitude_vector")] + ".weight"
      v = timm_sd[name]
      timm_sd[name] = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(timm_forward(timm_sd, x.transpose(0, 3, 1, 2)), adapted, atol=1e-5)


@pytest.mark.parametrize("method,want", [("lora", 294_912), ("dora", 294_912 + 12 * 2 * 768)])
def test_vit_b16_trainable_counts_match_the_papers(method, want):
  """LoRA's 0.29 M (q and v, rank 8, head excluded, as the LoRA/DoRA ViT tables count them);
  DoRA adds one magnitude per output unit of each adapted projection: 0.31 M."""
  c = config_base.get_base_config()
  c.method = method
  for blk in ("dmlora", "dora"):
    c[blk].targets, c[blk].rank = ("query", "value"), 8
  model = vit.ViT(vit.parse_variant("B/16", 100), methods.get(method).adapter(c))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  n = sum(int(np.prod(v.shape)) for k, v in flatten(shapes).items()
          if k.rsplit("/", 1)[-1] in (dmlora.LORA_A, dmlora.LORA_B, dmlora.DORA_MAGNITUDE))
  assert n == want and round(n / 1e6, 2) == {"lora": 0.29, "dora": 0.31}[method]

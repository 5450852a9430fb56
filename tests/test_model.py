"""The model issue's specification: layout, merge, masks, LoRA as K=1, NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpy_vit
from dmlora_jax import dmlora, merge, schedules, vit
from dmlora_jax.config_base import ALL_TARGETS
from dmlora_jax.merge import adapted_modules, merge_params
from dmlora_jax.pytrees import flatten, unflatten

IMG = 16


def make(adapter=None, num_classes=5, variant="tiny/4", seed=0, **kw):
  cfg = vit.parse_variant(variant, num_classes, **kw)
  model = vit.ViT(cfg, adapter)
  params = model.init(jax.random.key(seed), jnp.zeros((1, IMG, IMG, 3)))["params"]
  return model, params


def randomize(params, seed=1, scale=0.3):
  """Every leaf random and non-zero (B included, scales distinct per module)."""
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {}
  for key, (k, v) in zip(keys, sorted(flat.items())):
    if k.endswith(dmlora.LORA_LOG_SCALE):  # alpha_l in [0.5, 4], distinct per module
      out[k] = jnp.log(jax.random.uniform(key, (), minval=0.5, maxval=4.0))
    else:
      out[k] = scale * jax.random.normal(key, v.shape, v.dtype)
  return unflatten(out)


def images(n=3, seed=2):
  return jax.random.normal(jax.random.key(seed), (n, IMG, IMG, 3))


def test_param_names_and_shapes_are_the_checkpoint_layout():
  _, p = make(dmlora.AdapterSpec(num_branches=3, rank=2, targets=ALL_TARGETS))
  flat = flatten(p)
  blk = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
  assert flat[f"{blk}/query/kernel"].shape == (32, 2, 16)
  assert flat[f"{blk}/query/bias"].shape == (2, 16)
  assert flat[f"{blk}/out/kernel"].shape == (2, 16, 32)
  assert flat[f"{blk}/out/lora_a"].shape == (3, 32, 2)  # (K, d_in, r) of the matrix view
  assert flat[f"{blk}/out/lora_b"].shape == (3, 2, 32)
  assert flat["embedding/kernel"].shape == (4, 4, 3, 32)
  assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
  assert flat["Transformer/encoderblock_0/MlpBlock_3/Dense_1/lora_b"].shape == (3, 2, 32)
  assert len(adapted_modules(p)) == 2 * 6
  # B starts at zero, A does not, scales start at alpha (stored as log alpha).
  assert not np.any(flat[f"{blk}/query/lora_b"]) and np.all(flat[f"{blk}/query/lora_a"] != 0)
  assert float(flat[f"{blk}/query/lora_log_scale"]) == pytest.approx(np.log(8.0))


@pytest.mark.parametrize("variant,num_classes,expected", [
    ("B/16", 1000, 86_567_656),  # ViT-B/16 224 px, the published parameter count
    ("S/16", 1000, 22_050_664),
])
def test_variant_parameter_counts_match_published_models(variant, num_classes, expected):
  cfg = vit.parse_variant(variant, num_classes)
  shapes = jax.eval_shape(lambda: vit.ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected


def test_unknown_variant_error_lists_the_known_names():
  with pytest.raises(ValueError, match="model.variant 'X/16'"):
    vit.parse_variant("X/16", 10)


def test_merged_matches_adapter_logits():
  adapter = dmlora.AdapterSpec(num_branches=3, rank=2, targets=ALL_TARGETS)
  model, params = make(adapter)
  params = randomize(params)
  assert all(np.all(np.abs(v) > 0) for k, v in flatten(params).items() if k.endswith("lora_b"))
  x = images()
  adapted = model.apply({"params": params}, x)
  plain, _ = make(None)
  merged = merge_params(params)
  assert set(flatten(merged)) == set(flatten(make(None)[1]))  # plain-ViT names, no adapter leaves
  merged_logits = plain.apply({"params": merged}, x)
  np.testing.assert_allclose(merged_logits, adapted, atol=1e-5)
  # The adapter matters: without it the logits are far off.
  base = {k: v for k, v in flatten(params).items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  assert np.abs(plain.apply({"params": unflatten(base)}, x) - adapted).max() > 1e-2


def test_merge_is_float32_for_bf16_storage():
  a = jax.random.normal(jax.random.key(0), (2, 8, 3)).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (2, 3, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (8, 2, 4)).astype(jnp.bfloat16)
  params = {"m": {"kernel": w, "lora_a": a, "lora_b": b, "lora_log_scale": jnp.log(jnp.float32(5.0))}}
  got = merge_params(params)["m"]["kernel"]
  a64, b64, w64 = (np.asarray(t, np.float64) for t in (a, b, w))
  alpha = float(jnp.exp(jnp.log(jnp.float32(5.0))))  # 5 up to float32 rounding of log/exp
  want = w64.reshape(8, 8) + alpha / 3 * sum(a64[k] @ b64[k] for k in range(2))
  assert got.dtype == jnp.bfloat16 and got.shape == (8, 2, 4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want.reshape(8, 2, 4), jnp.float32).astype(jnp.bfloat16)))


def test_dropped_branch_gets_zero_grad_and_one_compilation_serves_all_masks():
  adapter = dmlora.AdapterSpec(num_branches=4, rank=2)
  model, params = make(adapter)
  params = randomize(params)
  x = images()

  @jax.jit
  def grads(params, masks):
    return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, masks) ** 2))(params)

  depth, ntgt, k = 2, 3, 4
  m1 = np.ones((depth, ntgt, k), np.float32)
  m1[0, 1, 2] = 0.0  # block 0, key, branch 2 dropped
  m1[1, 0, 0] = 0.0  # block 1, query, branch 0
  m2 = np.ones_like(m1) * 2.0
  m2[1, 2, 3] = 0.0
  g1, g2 = grads(params, jnp.asarray(m1)), grads(params, jnp.asarray(m2))
  assert grads._cache_size() == 1  # the same compiled function ran both masks

  def check(g, masks):
    flat = flatten(g)
    for i in range(depth):
      for t, name in enumerate(adapter.targets):
        mod = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{name}"
        for leaf in ("lora_a", "lora_b"):
          gk = np.asarray(flat[f"{mod}/{leaf}"])
          for br in range(k):
            if masks[i, t, br] == 0:
              assert np.all(gk[br] == 0.0), (mod, leaf, br)
            else:
              assert np.abs(gk[br]).max() > 0, (mod, leaf, br)

  check(g1, m1)
  check(g2, m2)


def _numpy_inputs(params):
  return {k: np.asarray(v) for k, v in flatten(params).items()
          if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}


def test_plain_vit_matches_independent_numpy_forward():
  model, params = make(None, num_classes=7)
  params = randomize(params)
  x = images()
  got = model.apply({"params": params}, x)
  want = numpy_vit.forward(_numpy_inputs(params), np.asarray(x), patch=4, num_heads=2, depth=2)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_exact_gelu_on_request_matches_numpy_erf():
  model, params = make(None, gelu_approximate=False)
  params = randomize(params, scale=0.6)
  x = images()
  got = model.apply({"params": params}, x)
  flat = _numpy_inputs(params)
  want = numpy_vit.forward(flat, np.asarray(x), 4, 2, 2, approximate=False)
  tanh = numpy_vit.forward(flat, np.asarray(x), 4, 2, 2, approximate=True)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(want - tanh).max() > 1e-4  # the two GELUs are distinguishable here


def test_k1_model_equals_lora_by_hand_in_numpy():
  adapter = dmlora.AdapterSpec(num_branches=1, rank=3, alpha=6.0, targets=("query", "value", "Dense_0"))
  model, params = make(adapter)
  params = randomize(params)
  flat = flatten(params)
  lora = {}
  for mod in adapted_modules(params):
    a, b = np.asarray(flat[mod + "/lora_a"])[0], np.asarray(flat[mod + "/lora_b"])[0]
    lora[mod] = (a, b, float(np.exp(flat[mod + "/lora_log_scale"])))
  x = images()
  got = model.apply({"params": params}, x)
  want = numpy_vit.forward(_numpy_inputs(params), np.asarray(x), 4, 2, 2, lora=lora)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # And a kept-branch mask of 1 is the same as no mask (LoRA is p = 0).
  np.testing.assert_allclose(model.apply({"params": params}, x, jnp.ones((2, 3, 1))), got, atol=1e-6)


def test_multibranch_model_with_a_drawn_keep_mask_equals_numpy_by_hand():
  # K = 3 branches on q, v and Dense_0, a keep mask drawn as in training (p = 0.5, min_active 1,
  # rescaled): the ViT equals the NumPy ViT whose kernels are W + (alpha_l / r) sum_k m_k A_k B_k,
  # with the rescale 1/q written out by hand: q = (1 - p) + p^K / K at min_active = 1.
  k, p = 3, 0.5
  adapter = dmlora.AdapterSpec(num_branches=k, rank=2, alpha=6.0, targets=("query", "value", "Dense_0"))
  model, params = make(adapter)
  params = randomize(params)
  u = jax.random.uniform(jax.random.key(5), (2, 3, k))
  masks = np.asarray(schedules.masks_from_uniform(u, p, min_active=1, rescale=True))
  q = (1 - p) + p ** k / k
  kept = (masks > 0)
  assert kept.any() and (~kept).any() and np.all(kept.sum(-1) >= 1)
  np.testing.assert_allclose(masks[kept], 1 / q, rtol=1e-6)
  flat = flatten(params)
  lora = {}
  for mod in adapted_modules(params):
    block = int(mod.split("encoderblock_")[1].split("/")[0])
    t = adapter.targets.index(mod.rsplit("/", 1)[-1])
    lora[mod] = (np.asarray(flat[mod + "/lora_a"]), np.asarray(flat[mod + "/lora_b"]),
                 float(np.exp(flat[mod + "/lora_log_scale"])), kept[block, t] / q)
  x = images()
  got = model.apply({"params": params}, x, jnp.asarray(masks))
  want = numpy_vit.forward(_numpy_inputs(params), np.asarray(x), 4, 2, 2, lora=lora)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # The mask matters: with every branch kept and unscaled the output is another one.
  assert np.abs(np.asarray(model.apply({"params": params}, x)) - want).max() > 1e-2


def test_pre_logits_layer_matches_numpy_when_configured():
  model, params = make(None, representation_size=16)
  assert flatten(params)["pre_logits/kernel"].shape == (32, 16)
  assert flatten(params)["head/kernel"].shape == (16, 5)
  params = randomize(params)
  x = images()
  want = numpy_vit.forward(_numpy_inputs(params), np.asarray(x), 4, 2, 2)
  np.testing.assert_allclose(model.apply({"params": params}, x), want, atol=1e-4)


def test_bf16_compute_and_remat_switches_stay_close_to_float32():
  adapter = dmlora.AdapterSpec(num_branches=2, rank=2)
  _, params = make(adapter)
  params = randomize(params, scale=0.2)
  x = images()
  # Jitted: one compile per model instead of eager dispatch of every op.
  ref, remat, bf16 = (jax.jit(make(adapter, **kw)[0].apply)({"params": params}, x)
                      for kw in ({}, {"remat": True}, {"dtype": "bfloat16"}))
  np.testing.assert_allclose(remat, ref, atol=1e-6)
  assert bf16.dtype == jnp.bfloat16 or bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16, np.float32), ref, atol=0.1 * np.abs(ref).max() + 0.05)


def test_drop_path_acts_in_training_only_and_follows_its_rng():
  _, params = make(None)
  params = randomize(params)
  x = images(n=8)
  plain = make(None)[0].apply({"params": params}, x)
  model = make(None, drop_path=0.5)[0]
  np.testing.assert_array_equal(model.apply({"params": params}, x), plain)  # eval: identity
  a = model.apply({"params": params}, x, train=True, rngs={"drop_path": jax.random.key(0)})
  b = model.apply({"params": params}, x, train=True, rngs={"drop_path": jax.random.key(1)})
  a2 = model.apply({"params": params}, x, train=True, rngs={"drop_path": jax.random.key(0)})
  np.testing.assert_array_equal(a, a2)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  # Per example: block 0 has rate 0, block 1 rate 0.5, so some examples keep their output
  # (up to the 1/(1-p) rescale of kept branches) and differ from the eval output.
  assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3
  with pytest.raises(ValueError, match="model.drop_path"):
    vit.parse_variant("tiny/4", 5, drop_path=1.0)


def test_a_bfloat16_step_stays_near_the_float32_step_and_the_merge_stays_float32():
  """model.dtype=bfloat16: bf16 matmuls, float32 params, LayerNorm statistics, softmax, logits,
  loss, masks and scales. The adapter gradients of one step stay within 5% of the float32
  step's (relative L2 over all of them) and within 15% for every leaf (measured: 0.4% to 9.7%,
  the largest on a query branch, through the softmax), and the merge of the bf16 run's params
  is float32 like the checkpoint."""
  adapter = dmlora.AdapterSpec(num_branches=3, rank=2, targets=("query", "value", "Dense_1"))
  _, params = make(adapter)
  params = randomize(params, scale=0.2)
  x, labels = images(n=8), jnp.arange(8) % 5
  masks = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 3, 3)) * 1.5, jnp.float32)

  def grads(dtype):
    model = make(adapter, dtype=dtype)[0]

    def loss(p):
      logits = model.apply({"params": p}, x, masks)
      assert logits.dtype == jnp.float32
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return flatten(jax.jit(jax.grad(loss))(params))

  g32, g16 = grads("float32"), grads("bfloat16")
  keys = [k for k in g32 if k.endswith(("lora_a", "lora_b"))]
  for k in keys:
    assert g16[k].dtype == jnp.float32
    if not float(jnp.linalg.norm(g32[k])):  # all of this module's branches dropped: exactly 0 in bf16 too
      assert not float(jnp.abs(g16[k]).max()), k
      continue
    rel = float(jnp.linalg.norm(g16[k] - g32[k]) / jnp.linalg.norm(g32[k]))
    assert rel < 0.15, (k, rel)
  a, b = (jnp.concatenate([g[k].ravel() for k in keys]) for g in (g16, g32))
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.05
  assert all(v.dtype == jnp.float32 for v in flatten(merge.merge_params(params)).values())

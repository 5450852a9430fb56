"""Parameter-masked branch updates: AdamW that leaves a dropped branch exactly as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmlora_jax import optimizers

B1, B2, EPS = 0.9, 0.999, 1e-8


def _units(tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: 1 if optimizers.path_str(p).endswith("lora_a") else 0, tree)


def _matrices(tree):
  return jax.tree.map(lambda v: v.ndim >= 2, tree)


def _tree(rng):
  return {"m": {"lora_a": jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}}


def _bits(x) -> bytes:
  return np.asarray(x).tobytes()


def test_without_masks_it_is_optax_adamw_step_for_step():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  sched = optax.warmup_cosine_decay_schedule(1e-4, 1e-2, 2, 8, 1e-4)
  ours = optimizers.masked_adamw(sched, weight_decay=0.1, decay_mask=_matrices, unit_ndim=_units)
  ref = optax.adamw(sched, weight_decay=0.1, mask=_matrices)
  s_ours, s_ref, p_ours, p_ref = ours.init(params), ref.init(params), params, params
  for _ in range(6):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(s_ours.counts["m"]["lora_a"], [6, 6, 6])


def _numpy_adamw(p, g, m, v, count, lr, wd):
  """One torch.optim.AdamW step of a parameter whose own step count becomes `count`, in float64."""
  p, g, m, v = (np.asarray(t, np.float64) for t in (p, g, m, v))
  p = p * (1 - lr * wd)
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  m_hat, v_hat = m / (1 - B1 ** count), v / (1 - B2 ** count)
  return p - lr * m_hat / (np.sqrt(v_hat) + EPS), m, v


def test_kept_branch_gets_numpy_adamw_and_dropped_branch_stays_bit_identical():
  rng = np.random.default_rng(1)
  params = _tree(rng)
  lr, wd = 3e-3, 0.05
  tx = optimizers.masked_adamw(lr, weight_decay=wd, decay_mask=_matrices, unit_ndim=_units)
  state = tx.init(params)
  # A history in which the branches were kept different numbers of times: counts 2, 0, 5.
  mu = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32), params)
  nu = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) * 0.01, jnp.float32), params)
  counts = {"m": {"lora_a": jnp.asarray([2, 0, 5], jnp.int32)},
            "head": {"kernel": jnp.int32(7), "bias": jnp.int32(7)}}
  state = state._replace(count=jnp.int32(7), counts=counts, mu=mu, nu=nu)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
  keep = {"m": {"lora_a": jnp.asarray([True, False, True])}, "head": {"kernel": True, "bias": True}}
  updates, new = tx.update(grads, state, params, keep=keep)
  got = optimizers.apply_kept_updates(params, updates, keep)

  a = "m", "lora_a"
  leaf = lambda t: t[a[0]][a[1]]
  # Dropped branch 1: parameter, both moments and its step count are the same bits.
  assert _bits(leaf(got)[1]) == _bits(leaf(params)[1])
  assert _bits(leaf(new.mu)[1]) == _bits(leaf(mu)[1]) and _bits(leaf(new.nu)[1]) == _bits(leaf(nu)[1])
  np.testing.assert_array_equal(leaf(new.counts), [3, 0, 6])
  # Kept branches 0 and 2: AdamW with their own counts (3 and 6), weight decay included.
  for k, c in ((0, 3), (2, 6)):
    want_p, want_m, want_v = _numpy_adamw(leaf(params)[k], leaf(grads)[k], leaf(mu)[k], leaf(nu)[k], c, lr, wd)
    np.testing.assert_allclose(leaf(got)[k], want_p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(leaf(new.mu)[k], want_m, rtol=1e-6)
    np.testing.assert_allclose(leaf(new.nu)[k], want_v, rtol=1e-6)
  # The bias is not decayed (decay_mask: matrices only); its count is the optimizer's.
  want_b, _, _ = _numpy_adamw(params["head"]["bias"], grads["head"]["bias"], mu["head"]["bias"],
                              nu["head"]["bias"], 8, lr, 0.0)
  np.testing.assert_allclose(got["head"]["bias"], want_b, rtol=1e-6, atol=1e-7)
  assert int(new.count) == 8


def test_a_never_kept_branch_is_not_divided_by_zero():
  params = {"lora_a": jnp.ones((2, 3, 1))}
  tx = optimizers.masked_adamw(1e-2, unit_ndim=lambda t: {"lora_a": 1})
  state = tx.init(params)
  updates, state = tx.update({"lora_a": jnp.ones((2, 3, 1))}, state, params, keep={"lora_a": jnp.asarray([False, True])})
  assert np.all(np.isfinite(updates["lora_a"])) and not np.any(updates["lora_a"][0])
  np.testing.assert_array_equal(state.counts["lora_a"], [0, 1])


def test_apply_kept_updates_keeps_a_negative_zero():
  params = {"b": jnp.asarray([[-0.0, 1.0]])}
  out = optimizers.apply_kept_updates(params, {"b": jnp.zeros((1, 2))}, {"b": jnp.asarray([False])})
  assert _bits(out["b"]) == _bits(params["b"])
  assert _bits(optax.apply_updates(params, {"b": jnp.zeros((1, 2))})["b"]) != _bits(params["b"])  # why it exists


def test_share_per_block_sums_a_blocks_updates_and_leaves_the_rest():
  g = {"Transformer": {"encoderblock_0": {"q": {"s": jnp.float32(1.0)}, "v": {"s": jnp.float32(2.0)}},
                      "encoderblock_1": {"q": {"s": jnp.float32(5.0)}}},
       "head": {"bias": jnp.asarray([3.0])}}
  out, _ = optimizers.share_per_block(optimizers.encoder_block).update(g, optax.EmptyState())
  assert float(out["Transformer"]["encoderblock_0"]["q"]["s"]) == 3.0
  assert float(out["Transformer"]["encoderblock_0"]["v"]["s"]) == 3.0
  assert float(out["Transformer"]["encoderblock_1"]["q"]["s"]) == 5.0
  np.testing.assert_array_equal(out["head"]["bias"], [3.0])


def test_update_without_params_is_a_clear_error():
  tx = optimizers.masked_adamw(1e-3)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


def _close_steps(got, want, before):
  """The steps taken (after - before) agree to float32's bias correction (1 - 0.999 in float32
  is 1.3e-5 off, so a step of 0.3 is off by ~2e-6)."""
  np.testing.assert_allclose(np.asarray(got, np.float64) - before, want - np.asarray(before, np.float64), rtol=1e-4)


def test_head_lr_mult_scales_only_the_heads_adamw_step():
  """stage1.head_lr_mult: the head takes AdamW at lr * mult, every other trained leaf at lr
  (checked by hand against NumPy AdamW on the first step of a run without warm-up)."""
  from dmlora_jax import config_base, methods

  c = config_base.get_base_config()
  c.method, c.stage1.lr, c.stage1.warmup_epochs, c.stage1.weight_decay, c.stage1.head_lr_mult = "full", 1e-2, 0, 0.1, 30.0
  rng = np.random.default_rng(3)
  params = {"Transformer": {"encoderblock_0": {"MlpBlock_3": {"Dense_0": {
                "kernel": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}}}},
            "head": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
  tx, sched = optimizers.make_optimizer(methods.get("full"), 1, 10, config_base.resolve(c))
  updates, _ = tx.update(grads, tx.init(params), params)
  got = optax.apply_updates(params, updates)
  assert float(sched(0)) == pytest.approx(1e-2)
  zeros = np.zeros((4, 6))
  dense = ("Transformer", "encoderblock_0", "MlpBlock_3", "Dense_0", "kernel")
  leaf = lambda t: t[dense[0]][dense[1]][dense[2]][dense[3]][dense[4]]
  want, _, _ = _numpy_adamw(leaf(params), leaf(grads), zeros, zeros, 1, 1e-2, 0.1)
  _close_steps(leaf(got), want, leaf(params))
  want_head, _, _ = _numpy_adamw(params["head"]["kernel"], grads["head"]["kernel"], np.zeros((4, 5)),
                                 np.zeros((4, 5)), 1, 0.3, 0.1)
  _close_steps(got["head"]["kernel"], want_head, params["head"]["kernel"])
  # The default (1) leaves the head with everything else.
  c.stage1.head_lr_mult = 1.0
  tx, _ = optimizers.make_optimizer(methods.get("full"), 1, 10, config_base.resolve(c))
  updates, _ = tx.update(grads, tx.init(params), params)
  want_head, _, _ = _numpy_adamw(params["head"]["kernel"], grads["head"]["kernel"], np.zeros((4, 5)),
                                 np.zeros((4, 5)), 1, 1e-2, 0.1)
  _close_steps(optax.apply_updates(params, updates)["head"]["kernel"], want_head, params["head"]["kernel"])


def test_head_lr_mult_must_be_positive():
  from dmlora_jax import config_base

  c = config_base.get_base_config()
  c.stage1.head_lr_mult = 0.0
  with pytest.raises(ValueError, match="stage1.head_lr_mult"):
    config_base.resolve(c)

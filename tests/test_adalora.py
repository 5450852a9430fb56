"""AdaLoRA (method=adalora): the SVD-form update on an independent NumPy ViT, PEFT's budget
schedule and rank allocator re-written in NumPy from PEFT's RankAllocator, the orthogonality
term, and a tiny run whose merge is exact and whose final rank pattern meets the budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpy_vit
from dmlora_jax import adalora, config_base, dmlora, merge, trainer, vit
from dmlora_jax.pytrees import flatten, unflatten
from trainer_utils import tiny_config


def _model(targets=("query", "value", "Dense_0"), r=3):
  return vit.ViT(vit.parse_variant("tiny/4", 10, gelu_approximate=False),
                 dmlora.AdapterSpec(num_branches=1, rank=r, alpha=5.0, targets=targets, adalora=True))


def test_the_update_is_w_plus_alpha_over_r_p_diag_lambda_q_on_an_independent_vit():
  model = _model()
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  assert all(not v.any() for k, v in flat.items() if k.endswith(dmlora.ADALORA_E))  # Lambda starts at 0 (PEFT)
  rng = np.random.default_rng(0)
  flat = {k: (rng.standard_normal(v.shape).astype(np.float32) * 0.3 + (1.0 if k.endswith("/scale") else 0.0)
              if not k.endswith(dmlora.LORA_LOG_SCALE) else v) for k, v in flat.items()}
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  got = np.asarray(model.apply({"params": unflatten(flat)}, jnp.asarray(x)))
  ref = {k: v.astype(np.float64) for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  for k in flat:
    if k.endswith(dmlora.ADALORA_E):
      mod = k[: -len(dmlora.ADALORA_E) - 1]
      p, q, e = flat[mod + "/lora_a"][0], flat[mod + "/lora_b"][0], flat[k]
      w = ref[mod + "/kernel"]
      ref[mod + "/kernel"] = (w.reshape(p.shape[0], -1) + 5.0 / (3 + 1e-5) * (p * e) @ q).reshape(w.shape)
  want = numpy_vit.forward(ref, x, patch=4, num_heads=2, depth=2, approximate=False)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  merged = merge.merge_params(unflatten(flat))
  np.testing.assert_allclose(vit.ViT(model.cfg).apply({"params": merged}, jnp.asarray(x)), got, atol=1e-5)


def _peft_budget(step, init_b, target_b, total, tinit, tfinal, delta_t):
  """PEFT's RankAllocator.budget_schedule, verbatim in its logic."""
  if step <= tinit:
    return init_b, False
  if step > total - tfinal:
    return target_b, True
  mul = 1 - (step - tinit) / (total - tfinal - tinit)
  return int((init_b - target_b) * (mul ** 3) + target_b), step % delta_t == 0


def test_the_budget_follows_peft_schedule():
  s = adalora.Schedule(init_r=12, target_r=8, total=100, tinit=10, tfinal=20, delta_t=5)
  for step in range(1, 101):
    b, m = s.budget(jnp.int32(step), 6)
    pb, pm = _peft_budget(step, 72, 48, 100, 10, 20, 5)
    assert int(b) == pb, step
    # PEFT masks at the budget steps and, once, at total - tfinal (force_mask); after that it
    # applies the fixed rank pattern every step (the transform's final phase, not `remask`)
    assert bool(m) == ((pm and step <= 80) or step == 80), step


def _tree(rng, r=4):
  mods = {}
  for i, (d_in, d_out) in enumerate(((6, 5), (4, 7))):
    mods[f"m{i}"] = {dmlora.LORA_A: rng.standard_normal((1, d_in, r)).astype(np.float32),
                     dmlora.LORA_B: rng.standard_normal((1, r, d_out)).astype(np.float32),
                     dmlora.ADALORA_E: rng.standard_normal((r,)).astype(np.float32)}
  return mods


def test_the_allocator_prunes_what_peft_rank_allocator_prunes():
  """Two modules, r=4, budget 8 -> 4 over 10 steps; sgd(0) inside so that only the masking moves
  Lambda. Every step's masked Lambda equals a NumPy RankAllocator's (EMA sensitivity x uncertainty,
  triplet score E + mean A + mean B, kthvalue threshold, masked_fill)."""
  rng = np.random.default_rng(1)
  params = _tree(rng)
  sched = adalora.Schedule(init_r=4, target_r=2, total=10, tinit=2, tfinal=3, delta_t=1, orth_reg_weight=0.0)
  tx = adalora.adalora_tx(optax.sgd(0.0), sched)
  state = tx.init(params)
  ipt = {m: {k: np.zeros_like(v) for k, v in l.items()} for m, l in params.items()}
  unc = {m: {k: np.zeros_like(v) for k, v in l.items()} for m, l in params.items()}
  p = {m: {k: v.copy() for k, v in l.items()} for m, l in params.items()}
  fixed = None
  for step in range(1, 11):
    grads = _tree(rng)
    upd, state = tx.update(grads, state, jax.tree.map(jnp.asarray, p))
    got = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), p, upd)
    for m in p:  # NumPy RankAllocator.update_ipt
      for k in p[m]:
        now = np.abs(p[m][k] * grads[m][k])
        ipt[m][k] = 0.85 * ipt[m][k] + 0.15 * now
        unc[m][k] = 0.85 * unc[m][k] + 0.15 * np.abs(now - ipt[m][k])
    score = {m: (ipt[m][dmlora.ADALORA_E] * unc[m][dmlora.ADALORA_E]
                 + (ipt[m][dmlora.LORA_A] * unc[m][dmlora.LORA_A])[0].mean(0)
                 + (ipt[m][dmlora.LORA_B] * unc[m][dmlora.LORA_B])[0].mean(1)) for m in p}
    budget, mask_now = _peft_budget(step, 8, 4, 10, 2, 3, 1)
    if step > 10 - 3 and step != 7:
      keep = fixed
    elif mask_now or step == 7:
      allv = np.concatenate([score[m] for m in sorted(p)])
      thr = np.sort(allv)[8 - budget - 1] if 8 - budget > 0 else -np.inf
      keep = {m: score[m] > thr for m in p}
      if step == 7:
        fixed = keep
    else:
      keep = {m: np.ones(4, bool) for m in p}
    for m in p:
      want = np.where(keep[m], p[m][dmlora.ADALORA_E], 0.0)
      np.testing.assert_allclose(got[m][dmlora.ADALORA_E], want, atol=1e-7, err_msg=f"step {step} {m}")
      p[m] = {k: np.asarray(v) for k, v in got[m].items()}
  assert sum(int((p[m][dmlora.ADALORA_E] != 0).sum()) for m in p) == 4  # the target budget


def test_the_orthogonality_term_is_peft_mean_of_frobenius_norms():
  rng = np.random.default_rng(2)
  params = _tree(rng)
  want = np.mean([np.linalg.norm(l[dmlora.LORA_A][0].T @ l[dmlora.LORA_A][0] - np.eye(4)) for l in params.values()]
                 + [np.linalg.norm(l[dmlora.LORA_B][0] @ l[dmlora.LORA_B][0].T - np.eye(4)) for l in params.values()])
  np.testing.assert_allclose(float(adalora.orth_penalty(params)), want, rtol=1e-5)


def test_a_tiny_adalora_run_ends_at_its_budget_and_merges_exactly(tmp_path):
  c = config_base.resolve(tiny_config(method="adalora", epochs=2, **{
      "adalora.rank": 4, "adalora.target_rank": 2, "adalora.delta_t": 2, "stage1.lr": 3e-3}))
  res = trainer.train_and_evaluate(c, str(tmp_path))
  assert res["trainable_params"] > 0 and 0.0 <= res["accuracy"]["test"] <= 1.0
  _, task, s, params = trainer._restored_params(c, str(tmp_path), need_eval=True)
  e = [np.asarray(v) for k, v in flatten(params).items() if k.endswith(dmlora.ADALORA_E)]
  assert len(e) == 6 and sum(int((v != 0).sum()) for v in e) == 2 * len(e)  # the target budget, exactly
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  plain = vit.ViT(s.model.cfg)
  np.testing.assert_allclose(plain.apply({"params": merge.merge_params(params)}, x),
                             s.model.apply({"params": params}, x), atol=1e-5)

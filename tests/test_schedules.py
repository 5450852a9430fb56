"""Drop schedules p(t) and branch masks."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import schedules


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_schedule_hits_its_endpoints_and_grows(shape):
  total = 101
  p = np.array([float(schedules.drop_probability(t, total, shape, 0.1, 0.6)) for t in range(total)])
  assert p[0] == pytest.approx(0.1, abs=1e-7) and p[-1] == pytest.approx(0.6, abs=1e-7)
  assert np.all(np.diff(p) >= -1e-7)
  assert float(schedules.drop_probability(10_000, total, shape, 0.1, 0.6)) == pytest.approx(0.6)


def test_schedule_values_match_their_formulas_by_hand():
  total = 11  # t = step / 10
  assert float(schedules.drop_probability(5, total, "linear", 0.0, 0.4)) == pytest.approx(0.2)
  assert float(schedules.drop_probability(2, total, "cosine", 0.0, 0.4)) == pytest.approx(
      0.4 * (1 - math.cos(math.pi * 0.2)) / 2, abs=1e-6)
  # step, 4 plateaus: t in [0, .25) -> 0, [.25, .5) -> 1/3, [.5, .75) -> 2/3, [.75, 1] -> 1
  got = [float(schedules.drop_probability(s, total, "step", 0.0, 0.3, num_plateaus=4)) for s in range(11)]
  np.testing.assert_allclose(got, [0, 0, 0, .1, .1, .2, .2, .2, .3, .3, .3], atol=1e-6)
  for s in (0, 7, 10):
    assert float(schedules.drop_probability(s, total, "constant", 0.1, 0.3)) == pytest.approx(0.3)


def test_schedule_step_is_traced_no_recompile():
  f = jax.jit(lambda s: schedules.drop_probability(s, 100, "cosine", 0.0, 0.5))
  vals = [float(f(jnp.int32(s))) for s in (0, 50, 99)]
  assert f._cache_size() == 1
  assert vals[0] == 0.0 and vals[1] == pytest.approx(0.25, abs=0.02) and vals[2] == pytest.approx(0.5)


def test_bad_schedule_arguments_are_errors_that_name_them():
  with pytest.raises(ValueError, match="drop_schedule"):
    schedules.drop_probability(0, 10, "exp", 0.0, 0.5)
  with pytest.raises(ValueError, match="drop_end"):
    schedules.drop_probability(0, 10, "linear", 0.0, 1.0)
  with pytest.raises(ValueError, match="min_active"):
    schedules.branch_masks(jax.random.key(0), 0.5, (3, 4), min_active=5)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_mean_keep_rate_is_one_minus_p_and_modules_are_independent(p):
  n = 20_000 * 4
  m = schedules.branch_masks(jax.random.key(1), p, (20_000, 4), min_active=0, rescale=False)
  rate = float(jnp.mean(m))
  assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
  # Independent across modules: the draws of two modules are uncorrelated.
  corr = np.corrcoef(np.asarray(m[:, 0]), np.asarray(m[:, 1]))[0, 1]
  assert abs(corr) < 0.03


def test_inverted_dropout_rescale_keeps_expectation_one():
  p = 0.4
  m = schedules.branch_masks(jax.random.key(2), p, (50_000, 4), min_active=0, rescale=True)
  vals = np.unique(np.asarray(m))
  np.testing.assert_allclose(vals, [0.0, 1 / (1 - p)], rtol=1e-6)
  assert abs(float(m.mean()) - 1.0) < 0.01


def test_min_active_holds_even_at_high_drop_rate():
  m = schedules.branch_masks(jax.random.key(3), 0.95, (5_000, 4), min_active=2, rescale=False)
  kept = np.asarray(m).sum(-1)
  assert kept.min() >= 2
  assert np.mean(kept == 2) > 0.9  # mostly exactly the forced two at p = 0.95
  # The forced branches are spread over all positions, not always the first ones.
  assert np.asarray(m).mean(0).min() > 0.4


def test_masks_differ_by_key_and_repeat_for_same_key():
  a = schedules.branch_masks(jax.random.key(4), 0.5, (12, 3, 4))
  b = schedules.branch_masks(jax.random.key(4), 0.5, (12, 3, 4))
  c = schedules.branch_masks(jax.random.key(5), 0.5, (12, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


def _enumerate_outcomes(k: int, p: float, min_active: int):
  """Every outcome of the mask draw with its probability, as uniform draws that produce it.

  An outcome is the Bernoulli(1 - p) keep pattern b (2^K of them, probability
  (1-p)^N p^(K-N), N kept) and, when N < min_active, which min_active - N of the dropped
  branches the forcing turns back on: the dropped draws are i.i.d. below p, so that choice
  is uniform over the C(K - N, min_active - N) subsets. Draws: kept ones in [p, 1), forced
  ones just below p, the other dropped ones further below.
  """
  draws, weights = [], []
  for bits in itertools.product((0, 1), repeat=k):
    n = sum(bits)
    prob = (1 - p) ** n * p ** (k - n)
    if prob == 0.0:
      continue
    dropped = [i for i in range(k) if not bits[i]]
    need = max(min_active - n, 0)
    subsets = list(itertools.combinations(dropped, need))
    for forced in subsets:
      u = [p + (1 - p) * (0.3 + 0.05 * i) if bits[i] else p * ((0.9 if i in forced else 0.4) - 0.02 * i)
           for i in range(k)]
      draws.append(u)
      weights.append(prob / len(subsets))
  return np.asarray(draws, np.float32), np.asarray(weights, np.float64)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("min_active", [0, 1, 2])
def test_rescaled_masks_are_unbiased_by_exact_enumeration(k, p, min_active):
  if min_active > k:
    with pytest.raises(ValueError, match="min_active"):
      schedules.masks_from_uniform(jnp.zeros((1, k)), p, min_active)
    return
  u, w = _enumerate_outcomes(k, p, min_active)
  assert w.sum() == pytest.approx(1.0, abs=1e-12)
  m = np.asarray(schedules.masks_from_uniform(jnp.asarray(u), p, min_active, rescale=True), np.float64)
  kept = (m > 0).astype(np.float64)
  assert np.all(kept.sum(-1) >= min_active)  # every outcome honours min_active
  np.testing.assert_allclose(w @ m, np.ones(k), atol=2e-6)  # E[m_k] = 1 for every branch
  # The keep probability used for the rescale is the enumerated one.
  np.testing.assert_allclose(w @ kept, float(schedules.keep_probability(p, k, min_active)), atol=1e-6)


def test_dividing_by_one_minus_p_would_be_biased_where_min_active_binds():
  # The numbers: (1 - p + p^K / K) / (1 - p) at min_active = 1.
  for p, want in ((0.5, 1.03125), (0.75, 1.31640625)):
    u, w = _enumerate_outcomes(4, p, 1)
    kept = np.asarray(schedules.masks_from_uniform(jnp.asarray(u), p, 1, rescale=False), np.float64)
    assert w @ kept[:, 0] / (1 - p) == pytest.approx(want, rel=1e-6)

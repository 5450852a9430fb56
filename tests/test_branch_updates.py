"""A dropped branch takes no part in the step: through the real pmapped train step, its
lora_a, lora_b, Adam moments and step count are bit-identical afterwards, and over a run each
branch's step count is the number of steps in which it was kept."""

import jax
import numpy as np
import optax
import pytest

from dmlora_jax import config_base, partition, setup, steps
from dmlora_jax.pytrees import flatten

TARGETS = ("query", "key", "value")
K, DEPTH, STEPS = 3, 2, 30


def _bits(x) -> bytes:
  return np.asarray(x).tobytes()


@pytest.fixture(scope="module")
def run():
  """STEPS steps of the trainer's stage-1 step (tiny ViT, constant p = 0.6, min_active 1) on
  random images; the host state before and after every step, and the step's masks."""
  c = config_base.get_base_config()
  c.model.variant, c.dmlora.num_branches, c.dmlora.rank = "tiny/4", K, 2
  c.dmlora.drop_schedule, c.dmlora.drop_end, c.dmlora.min_active = "constant", 0.6, 1
  c.stage1.lr, c.stage1.epochs, c.stage1.warmup_epochs, c.stage1.weight_decay = 1e-2, 1, 0, 0.1
  c.data.image_size = 16
  s = setup.build(config_base.resolve(c), 5)
  plan = setup.Plan(steps_per_epoch=STEPS, stage1_steps=STEPS, stage2_steps=0)
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.2).astype(x.dtype), s.trainable)  # B != 0
  tx, _ = s.optimizer(1, plan)
  sc = s.step_config(1, plan)
  assert sc.uses_masks and sc.mask_shape == (DEPTH, len(TARGETS), K) and sc.drop_end == 0.6
  fn = steps.pmap_train_step(steps.make_train_step(s.model, tx, sc))
  state = steps.replicate(s.host_state(1, plan, trainable))
  history = []
  for i in range(STEPS):
    batch = {"image": rng.integers(0, 256, (1, 8, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, (1, 8)).astype(np.int32)}
    before = steps.unreplicate(state.replace(frozen=None))
    state, metrics = fn(state, batch, jax.random.fold_in(jax.random.key(7), i))
    history.append((before, steps.unreplicate(state.replace(frozen=None)), np.asarray(metrics["masks"])[0]))
  return history


def _branch_state(host) -> tuple[dict, object]:
  adam = host.opt_state.inner_states[partition.BRANCHES].inner_state
  return flatten(host.trainable), adam


def _paths(i, t):
  mod = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{t}"
  return f"{mod}/lora_a", f"{mod}/lora_b"


def test_dropped_branches_are_bit_identical_after_the_step(run):
  n_dropped = 0
  for before, after, masks in run:
    p0, s0 = _branch_state(before)
    p1, s1 = _branch_state(after)
    m0, v0, c0 = flatten(s0.mu), flatten(s0.nu), flatten(s0.counts)
    m1, v1, c1 = flatten(s1.mu), flatten(s1.nu), flatten(s1.counts)
    for i in range(DEPTH):
      for j, t in enumerate(TARGETS):
        for k in range(K):
          if masks[i, j, k] > 0:
            continue
          n_dropped += 1
          for leaf in _paths(i, t):
            assert _bits(p1[leaf][k]) == _bits(p0[leaf][k]), (leaf, k)
            assert _bits(m1[leaf][k]) == _bits(m0[leaf][k]) and _bits(v1[leaf][k]) == _bits(v0[leaf][k]), (leaf, k)
            assert c1[leaf][k] == c0[leaf][k]
  assert n_dropped > 0.4 * STEPS * DEPTH * len(TARGETS) * K  # p = 0.6 (min_active 1 forces some back)


def test_kept_branches_move_and_count_one_step(run):
  moved = 0
  for before, after, masks in run:
    p0, s0 = _branch_state(before)
    p1, s1 = _branch_state(after)
    c0, c1 = flatten(s0.counts), flatten(s1.counts)
    for i in range(DEPTH):
      for j, t in enumerate(TARGETS):
        for k in np.flatnonzero(masks[i, j] > 0):
          for leaf in _paths(i, t):
            assert c1[leaf][k] == c0[leaf][k] + 1
            moved += not np.array_equal(p1[leaf][k], p0[leaf][k])
  assert moved > 0 and moved == sum(2 * int((m > 0).sum()) for _, _, m in run)  # every kept leaf moved


def test_each_branch_step_count_is_the_number_of_steps_it_was_kept(run):
  kept = sum((m > 0).astype(int) for _, _, m in run)  # (depth, targets, K)
  _, adam = _branch_state(run[-1][1])
  counts = flatten(adam.counts)
  for i in range(DEPTH):
    for j, t in enumerate(TARGETS):
      for leaf in _paths(i, t):
        np.testing.assert_array_equal(counts[leaf], kept[i, j])
  assert kept.min() < STEPS and kept.max() > 0  # the counts really differ from the step count
  assert int(adam.count) == STEPS  # the lr schedule's own step runs on every step
  head = flatten(run[-1][1].opt_state.inner_states[partition.HEAD].inner_state.counts)
  head = [v for v in head.values() if not isinstance(v, optax.MaskedNode)]
  assert len(head) == 2 and all(int(v) == STEPS for v in head)  # the head is never dropped


def test_every_module_keeps_min_active_branches_and_masks_change_per_step(run):
  # At least one branch must be kept per module (min_active = 1), and the masks differ across steps.
  for _, _, m in run:
    assert np.all((m > 0).sum(-1) >= 1)
  assert len({m.tobytes() for _, _, m in run}) > 1

"""Batching specs: deterministic order, process sharding, eval coverage, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import data


def make_split(n: int, size: int = 2) -> data.Split:
  images = np.zeros((n, size, size, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256  # pixel encodes the index: batches can be traced
  images[:, 0, 0, 1] = np.arange(n) // 256
  return data.Split("s", images, np.arange(n, dtype=np.int32), n)


def ids(batch) -> np.ndarray:
  return batch["image"][:, 0, 0, 0].astype(int) + 256 * batch["image"][:, 0, 0, 1].astype(int)


def test_steps_per_epoch_drops_remainder():
  assert data.steps_per_epoch(1000, 64) == 15
  assert data.steps_per_epoch(64, 64) == 1
  assert data.steps_per_epoch(63, 64) == 0


def test_same_seed_same_order_and_epoch_changes_it():
  s = make_split(100)
  a = [ids(b) for b in data.train_batches(s, 10, seed=42, epoch=3)]
  b = [ids(b) for b in data.train_batches(s, 10, seed=42, epoch=3)]
  c = [ids(b) for b in data.train_batches(s, 10, seed=42, epoch=4)]
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  assert not np.array_equal(np.concatenate(a), np.concatenate(c))
  # the order is exactly default_rng([seed, epoch]).permutation, and labels travel with images
  np.testing.assert_array_equal(np.concatenate(a), np.random.default_rng([42, 3]).permutation(100))
  for batch in data.train_batches(s, 10, 42, 3):
    np.testing.assert_array_equal(batch["label"], ids(batch))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32


def test_train_drops_remainder_and_visits_each_example_at_most_once():
  s = make_split(103)
  got = np.concatenate([ids(b) for b in data.train_batches(s, 10, 0, 0)])
  assert len(got) == 100 and len(set(got)) == 100


def test_two_processes_partition_each_global_batch():
  s = make_split(50)
  single = list(data.train_batches(s, 8, 7, 1))
  p0 = list(data.train_batches(s, 8, 7, 1, process_index=0, process_count=2))
  p1 = list(data.train_batches(s, 8, 7, 1, process_index=1, process_count=2))
  assert len(single) == len(p0) == len(p1) == 6
  for g, a, b in zip(single, p0, p1):
    assert a["image"].shape[0] == b["image"].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([ids(a), ids(b)]), ids(g))


@pytest.mark.parametrize("n,batch,procs", [(23, 8, 1), (23, 8, 2), (7, 8, 2), (24, 6, 3), (1, 4, 2)])
def test_eval_covers_each_example_once_with_padding(n, batch, procs):
  s = make_split(n)
  seen, counts = [], []
  for p in range(procs):
    batches = list(data.eval_batches(s, batch, p, procs))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == batch // procs
      m = b["mask"].astype(bool)
      assert b["mask"].dtype == np.float32
      np.testing.assert_array_equal(b["label"][m], ids(b)[m])
      seen.extend(ids(b)[m].tolist())
  assert len(set(counts)) == 1  # every process runs the same number of eval steps
  assert counts[0] == -(-(-(-n // procs)) // (batch // procs))
  assert sorted(seen) == list(range(n))


def test_eval_of_a_process_shard_matches_the_whole_split():
  full = make_split(11)
  shard = data.Split("s", full.images[1::2], full.labels[1::2], 11, shard_index=1, shard_count=2)
  a = [ids(b)[b["mask"] > 0] for b in data.eval_batches(full, 4, 1, 2)]
  b = [ids(b)[b["mask"] > 0] for b in data.eval_batches(shard, 4, 1, 2)]
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  np.testing.assert_array_equal(np.concatenate(a), [1, 3, 5, 7, 9])


def test_normalize_modes_match_formulas_and_jit():
  x = np.array([[[[0, 128, 255]]]], np.uint8)
  got = jax.jit(data.normalize, static_argnums=1)(jnp.asarray(x), "imagenet")
  want = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got)[0, 0, 0], want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(data.normalize(x, "inception"))[0, 0, 0], [-1.0, 128 / 127.5 - 1, 1.0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="'clip'"):
    data.normalize(x, "clip")


def test_prefetch_yields_everything_in_order_and_reraises():
  assert list(data.prefetch(iter(range(20)), size=2)) == list(range(20))

  def broken():
    yield 1
    raise RuntimeError("boom")

  it = data.prefetch(broken())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


def test_prefetch_closed_early_leaves_no_producer_thread_running():
  import threading
  import time

  def slow():
    for i in range(1000):
      time.sleep(0.01)  # the producer is busy when the consumer stops
      yield i

  before = set(threading.enumerate())
  it = data.prefetch(slow(), size=2)
  assert next(it) == 0
  it.close()
  assert set(threading.enumerate()) - before == set()

"""Deterministic train batches, padded eval batches, and a background prefetcher.

Every process computes the same global permutation from (seed, epoch) and takes its
contiguous slice of each global batch, so no coordination is needed and a resumed run
replays exactly the same batches.
"""

import queue
import threading
from typing import Iterator

import numpy as np

from dmlora_jax.data.split import Split, shard_size


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch <= 0:
    raise ValueError(f"global batch must be positive, got {global_batch}")
  return num_examples // global_batch


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
  return global_batch // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The global example order of one epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(split: Split, global_batch: int, seed: int, epoch: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """One epoch of {'image': uint8 (B/P, S, S, 3), 'label': int32 (B/P,)} for this process."""
  if split.shard_count != 1 or len(split.labels) != split.num_examples_global:
    raise ValueError(f"train split {split.name} must hold all examples on every process")
  local = _local_batch(global_batch, process_count)
  perm = epoch_permutation(split.num_examples_global, seed, epoch)
  for step in range(steps_per_epoch(split.num_examples_global, global_batch)):
    start = step * global_batch + process_index * local
    idx = perm[start:start + local]
    yield {"image": split.images[idx], "label": split.labels[idx]}


def num_eval_batches(num_examples_global: int, global_batch: int, process_count: int) -> int:
  """Batches every process yields: enough for the largest strided shard."""
  local = _local_batch(global_batch, process_count)
  largest = shard_size(num_examples_global, 0, process_count)
  return -(-largest // local)


def eval_batches(split: Split, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """{'image', 'label', 'mask'} batches covering each example once over all processes.

  Process p evaluates examples p::process_count; the last batches are padded with mask 0.
  """
  local = _local_batch(global_batch, process_count)
  if split.shard_count == process_count and split.shard_index == process_index:
    images, labels = split.images, split.labels
  elif split.shard_count == 1:
    images, labels = split.images[process_index::process_count], split.labels[process_index::process_count]
  else:
    raise ValueError(f"split {split.name} holds shard {split.shard_index}/{split.shard_count}, "
                     f"not shard {process_index}/{process_count}")
  n = len(labels)
  for b in range(num_eval_batches(split.num_examples_global, global_batch, process_count)):
    lo, hi = min(b * local, n), min((b + 1) * local, n)
    k = hi - lo
    image = np.zeros((local,) + images.shape[1:], np.uint8)
    label = np.zeros((local,), np.int32)
    mask = np.zeros((local,), np.float32)
    image[:k], label[:k], mask[:k] = images[lo:hi], labels[lo:hi], 1.0
    yield {"image": image, "label": label, "mask": mask}


_DONE = object()


def prefetch(iterator, size: int = 2) -> Iterator:
  """Runs `iterator` in a background thread, keeping up to `size` items ready.

  Exceptions are re-raised in the consumer; closing the generator stops the thread.
  """
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def run():
    try:
      for item in iterator:
        if not put((item, None)):
          return
      put((_DONE, None))
    except BaseException as e:  # handed to the consumer
      put((_DONE, e))

  t = threading.Thread(target=run, daemon=True)
  t.start()
  try:
    while True:
      item, err = q.get()
      if item is _DONE:
        if err is not None:
          raise err
        return
      yield item
  finally:
    stop.set()
    # Wait for the producer to leave whatever it is doing (a device_put, say): a daemon
    # thread still inside native code when the interpreter exits aborts the process.
    t.join(timeout=30)

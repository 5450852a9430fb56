"""`build_task`: config.data -> a Task of decoded, resized splits held in RAM."""

import time

from absl import logging
import numpy as np

from dmlora_jax.data import demo, fgvc, folder, tfds_source
from dmlora_jax.data.split import DataError, Split, Task

SOURCES = {"vtab1k_folder": folder.splits, "fgvc_json": fgvc.splits, "tfds": tfds_source.splits,
           "demo": demo.splits}

# protocol -> (split trained on, split evaluated); test is never touched by 'tune'.
PROTOCOLS = {"final": ("train800val200", "test"), "tune": ("train800", "val200")}


def _materialize(source, num_classes: int, shard_index: int, shard_count: int, size: int,
                 num_workers: int, where: str) -> Split:
  t0 = time.time()
  imgs, labels, n_global = source.load(shard_index, shard_count, size, num_workers)
  labels = np.asarray(labels)
  if n_global == 0:
    raise DataError(f"{where}: split {source.name} is empty")
  bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
  if bad.size:  # sources that derive labels (tfds, demo) are checked here
    raise DataError(f"{where}: split {source.name} example {shard_index + bad[0] * shard_count} has label "
                    f"{labels[bad[0]]} outside [0, {num_classes}) ({bad.size} such example(s))")
  logging.info("%s: %s holds %d of %d examples at %d px (%.1fs, %.0f MiB)", where, source.name,
               len(labels), n_global, size, time.time() - t0, imgs.nbytes / 2**20)
  return Split(source.name, imgs, labels.astype(np.int32), int(n_global), shard_index, shard_count)


def _counted(source, size: int, where: str) -> Split | None:
  """A split with its global count and no examples (nothing decoded); None if uncountable."""
  n = source.count()
  if n is None:
    return None
  if n == 0:
    raise DataError(f"{where}: split {source.name} is empty")
  return Split(source.name, np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32), int(n))


def build_task(cfg, process_index: int = 0, process_count: int = 1, decode_train: bool = True,
               decode_eval: bool = True) -> Task:
  """Reads config.data (source, root, task, protocol, image_size, ...) into a Task.

  The train split is held whole by every process; the eval split is decoded per process,
  examples process_index::process_count only. decode_train/decode_eval=False give that split
  with its example count only (no images), where the source can count without decoding
  (export and eval need the train count, not its images).
  """
  if cfg.source not in SOURCES:
    raise DataError(f"unknown config.data.source {cfg.source!r}; expected one of {', '.join(SOURCES)}")
  if cfg.protocol not in PROTOCOLS:
    raise DataError(f"unknown config.data.protocol {cfg.protocol!r}; expected final or tune")
  if cfg.image_size <= 0:
    raise DataError(f"config.data.image_size must be positive, got {cfg.image_size}")
  names = PROTOCOLS[cfg.protocol]
  num_classes, srcs = SOURCES[cfg.source](cfg, names)
  if num_classes < 1:
    raise DataError(f"{cfg.source}:{cfg.task}: no classes found (num_classes={num_classes})")
  train_name, eval_name = list(srcs)  # sources return (train, eval) in this order
  where = f"{cfg.source}:{cfg.task}"
  workers = max(1, int(cfg.num_workers))

  def split(source, shard_index: int, shard_count: int, decode: bool) -> Split:
    counted = None if decode else _counted(source, cfg.image_size, where)
    if counted is not None:
      return counted
    return _materialize(source, num_classes, shard_index, shard_count, cfg.image_size, workers, where)

  train = split(srcs[train_name], 0, 1, decode_train)
  ev = split(srcs[eval_name], process_index, process_count, decode_eval)
  return Task(cfg.task, num_classes, train, {eval_name: ev})

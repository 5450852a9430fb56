"""VTAB-1k tasks straight from TensorFlow Datasets, read through tf.data.

tf.data decodes the records; the derived labels (vtab_tasks) are computed on the numpy
examples, and the images are resized with the same PIL bicubic code as the folder source,
so both sources give the same pixels for the same data.
"""

import dataclasses

from absl import logging
import numpy as np

from dmlora_jax.data import images, vtab_tasks
from dmlora_jax.data.split import DataError, one_line


def _tfds():
  """Imports TFDS lazily (TensorFlow takes seconds to import) and keeps TF off accelerators."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")  # the JAX trainer owns the GPUs
  except (RuntimeError, ValueError):
    pass  # already initialised: nothing to hide
  import tensorflow_datasets as tfds
  return tfds


def prepare_hint(tfds_name: str, data_dir: str) -> str:
  dd = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"prepare it once (needs internet; diabetic_retinopathy needs a manual download): "
          f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}'{dd}).download_and_prepare()\"")


def get_builder(task: vtab_tasks.VtabTask, data_dir: str = ""):
  """The TFDS builder at the pinned version (or the documented fallback version)."""
  tfds = _tfds()
  names = [task.tfds_name] + ([task.fallback_tfds_name] if task.fallback_tfds_name else [])
  err = None
  for i, name in enumerate(names):
    try:
      b = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # unknown version, missing module...: reported below in one line
      err = e
      continue
    if i:
      logging.warning("TFDS cannot build %s here (%s); using %s instead", task.tfds_name, one_line(err), name)
    return b
  raise DataError(f"task {task.name}: cannot build TFDS dataset {task.tfds_name}: {one_line(err)}")


def split_counts(builder) -> dict:
  """Example counts of the TFDS splits known to the builder (empty when unprepared/mocked)."""
  try:
    return {k: int(v.num_examples) for k, v in builder.info.splits.items()}
  except Exception:  # info of an unprepared builder may have no splits at all
    return {}


@dataclasses.dataclass
class TfdsSplit:
  name: str
  task: vtab_tasks.VtabTask
  builder: object
  split: str  # TFDS split string
  data_dir: str = ""

  def dataset(self, shard_index: int = 0, shard_count: int = 1):
    """-> (tf.data.Dataset of this shard in file order, global example count or None)."""
    try:
      ds = self.builder.as_dataset(split=self.split, shuffle_files=False)
    except Exception as e:
      raise DataError(f"task {self.task.name}: TFDS {self.task.tfds_name} split {self.split!r} is not "
                      f"available in {self.data_dir or 'the TFDS default data dir'} ({one_line(e)[:300]}); "
                      f"{prepare_hint(self.task.tfds_name, self.data_dir)}") from None
    n = int(ds.cardinality())
    if shard_count > 1:
      ds = ds.shard(shard_count, shard_index)
    return ds, (n if n >= 0 else None)

  def count(self) -> int | None:
    return self.dataset()[1]

  def examples(self, shard_index: int = 0, shard_count: int = 1):
    """Yields (native uint8 image after the task's conversion, label) in a fixed order."""
    tfds = _tfds()
    ds, _ = self.dataset(shard_index, shard_count)
    for ex in tfds.as_numpy(ds):
      yield self.task.image_fn(ex["image"]), self.label(ex, -1)

  def label(self, ex: dict, index: int) -> int:
    try:
      return self.task.label_fn(ex)
    except Exception as e:  # malformed example (e.g. inconsistent object lists)
      where = f"example {index}" if index >= 0 else "an example"
      raise DataError(f"task {self.task.name}: cannot compute the label of {where} of TFDS split "
                      f"{self.split!r}: {type(e).__name__}: {one_line(e)}") from None

  def load(self, shard_index: int, shard_count: int, size: int, num_workers: int):
    tfds = _tfds()
    ds, n_global = self.dataset(shard_index, shard_count)
    labels = []

    # Labels are computed here, in order; the conversion and the resize run in the pool.
    def stream():
      for ex in tfds.as_numpy(ds):
        labels.append(self.label(ex, shard_index + len(labels) * shard_count))
        yield ex["image"]

    count = images.shard_count_of(n_global, shard_index, shard_count)
    imgs = images.resize_stream(stream(), size, num_workers, desc=f"{self.task.name}/{self.name}",
                                count=count, convert=self.task.image_fn)
    if n_global is None:  # unknown cardinality: only unsharded loads can count it
      if shard_count > 1:
        raise DataError(f"task {self.task.name}: cannot shard split {self.split!r} of unknown size")
      n_global = len(labels)
    return imgs, np.asarray(labels, np.int64), n_global


def splits(cfg, names: tuple[str, ...]) -> tuple[int, dict]:
  if cfg.task not in vtab_tasks.TASKS:
    raise DataError(f"config.data.task={cfg.task!r} is not a VTAB-1k task; the tfds source knows: "
                    f"{', '.join(vtab_tasks.TASKS)}")
  task = vtab_tasks.TASKS[cfg.task]
  builder = get_builder(task, cfg.tfds_data_dir)
  strings = task.split_strings(split_counts(builder))
  num_classes = int(cfg.num_classes) if cfg.num_classes > 0 else task.num_classes
  return num_classes, {n: TfdsSplit(n, task, builder, strings[n], cfg.tfds_data_dir) for n in names}

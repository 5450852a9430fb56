"""Input data for VTAB-1k and FGVC: four sources, one in-RAM Task, deterministic batches.

  task = data.build_task(config.data, process_index, process_count)
  for batch in data.prefetch(data.train_batches(task.train, 64, seed, epoch, pi, pc)): ...

Sources (config.data.source): vtab1k_folder (NOAH layout), fgvc_json (VPT layout), tfds
(TensorFlow Datasets) and demo (scikit-learn's bundled digits). See the README section "Preparing VTAB-1k and FGVC".
"""

from dmlora_jax.data.batching import eval_batches, epoch_permutation, num_eval_batches, prefetch, \
  steps_per_epoch, train_batches
from dmlora_jax.data.build import build_task
from dmlora_jax.data.normalize import normalize
from dmlora_jax.data.split import DataError, Split, Task

__all__ = ["DataError", "Split", "Task", "build_task", "epoch_permutation", "eval_batches", "normalize",
           "num_eval_batches", "prefetch", "steps_per_epoch", "train_batches"]

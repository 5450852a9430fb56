"""Top-1 accuracy of a model on the eval splits of a task, over all devices of all processes."""

import jax
import numpy as np

from dmlora_jax import data, steps


class Evaluator:
  """The compiled eval step of one model: all branches, no rescale (or a plain merged ViT)."""

  def __init__(self, model, normalization: str, batch_size: int, devices=None, parallel: str = "pmap"):
    self.par = steps.parallel(parallel, devices if parallel == "pmap" else None)
    self.batch_size = batch_size
    self._step = self.par.eval_step(steps.make_eval_step(model, normalization))

  def replicate_params(self, params: dict):
    """Params on the host -> the device state the eval step reads (every leaf in `frozen`)."""
    return self.par.put_state(steps.TrainState(step=np.int32(0), trainable={}, frozen=params, opt_state=()))

  def __call__(self, state_dev, evals: dict[str, data.Split]) -> dict[str, float]:
    """{split name: top-1} of a device state (a train state or replicate_params(...))."""
    out = {}
    for name, split in evals.items():
      correct = total = 0.0
      for b in data.eval_batches(split, self.batch_size, jax.process_index(), jax.process_count()):
        c, n = self._step(state_dev, self.par.put_batch(b))
        correct += float(self.par.first(c))
        total += float(self.par.first(n))
      if int(total) != split.num_examples_global:
        raise RuntimeError(f"evaluation of {name} covered {int(total)} of {split.num_examples_global} examples")
      out[name] = correct / total
    return out

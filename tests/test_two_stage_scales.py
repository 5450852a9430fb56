"""2S-LS learns: the stage-2 optimizer recovers known per-layer scales of a teacher from a
wrong start, alpha_l stays positive, and the per-block granularity ties a block's scales."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmlora_jax import config_base, dmlora, methods, optimizers, partition, setup
from dmlora_jax.pytrees import flatten, join, unflatten

ALPHA = 4.0
TARGETS = ("query", "value", "out", "Dense_0")


def _config(granularity: str, lr: float):
  c = config_base.get_base_config()
  c.model.variant, c.dmlora.num_branches, c.dmlora.rank, c.dmlora.alpha = "tiny/4", 2, 2, ALPHA
  c.dmlora.targets = TARGETS
  c.stage2.lr, c.stage2.granularity = lr, granularity
  c.data.image_size = 16
  return c


def _teacher_and_student(c, teacher_log_ratio):
  """Random frozen backbone and branches; the teacher's log alpha_l = log alpha + ratio(module),
  the student's start at log alpha (the end of stage 1)."""
  s = setup.build(config_base.resolve(c), 6)
  model, params = s.model, s.params
  rng = np.random.default_rng(0)
  flat = {k: (rng.standard_normal(v.shape) * (0.3 if k.endswith(("lora_a", "lora_b")) else 0.5)).astype(np.float32)
          if not k.endswith(dmlora.LORA_LOG_SCALE) else v for k, v in flatten(params).items()}
  student = unflatten(flat)
  teacher = unflatten({k: (np.float32(math.log(ALPHA) + teacher_log_ratio(k)) if k.endswith(dmlora.LORA_LOG_SCALE)
                           else v) for k, v in flat.items()})
  return model, teacher, student


def _stage2(c, model, teacher, student, steps=300):
  """Distils the teacher's predictions into the student's scales with the trainer's stage-2
  optimizer (only the scales move). Returns the student's params and the loss per step."""
  x = jax.random.normal(jax.random.key(1), (64, 16, 16, 3))
  target = jax.nn.softmax(model.apply({"params": teacher}, x))
  method = methods.get(c.method)
  trainable, frozen = partition.split(student, method.owned)
  tx, _ = optimizers.make_optimizer(method, 2, steps, config_base.resolve(c))

  def kl(tr):
    logp = jax.nn.log_softmax(model.apply({"params": join(frozen, tr)}, x))
    return jnp.sum(target * (jnp.log(target) - logp), -1).mean()

  @jax.jit
  def step(tr, opt):
    loss, g = jax.value_and_grad(kl)(tr)
    u, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, u), opt, loss

  opt, losses = tx.init(trainable), []
  for _ in range(steps):
    trainable, opt, loss = step(trainable, opt)
    losses.append(float(loss))
  return join(frozen, trainable), np.array(losses)


def _log_scales(params):
  return {k: float(v) for k, v in flatten(params).items() if k.endswith(dmlora.LORA_LOG_SCALE)}


def test_stage2_recovers_per_module_scales_from_a_wrong_start():
  c = _config("module", lr=0.05)
  # Known, different scales: alpha_l / alpha between e^-0.6 and e^0.6 across the 8 modules.
  ratios = np.linspace(-0.6, 0.6, 2 * len(TARGETS))
  order = {}
  model, teacher, student = _teacher_and_student(c, lambda k: ratios[order.setdefault(k, len(order))])
  learned, losses = _stage2(c, model, teacher, student)
  want, got = _log_scales(teacher), _log_scales(learned)
  err = max(abs(got[k] - want[k]) for k in want)
  assert err < 0.05, (err, {k.split("/", 2)[-1]: (round(want[k] - math.log(ALPHA), 3), round(got[k] - math.log(ALPHA), 3))
                            for k in want})  # alpha_l within 5% of the teacher's
  assert losses[-1] < 1e-3 * losses[0]  # the stage-2 loss falls
  assert np.all(np.exp(list(got.values())) > 0)
  # Only the scales moved.
  for k, v in flatten(student).items():
    if not k.endswith(dmlora.LORA_LOG_SCALE):
      np.testing.assert_array_equal(flatten(learned)[k], v, err_msg=k)


def test_block_granularity_ties_a_blocks_scales_and_recovers_per_block_scales():
  c = _config("block", lr=0.05)
  per_block = {"encoderblock_0": -0.5, "encoderblock_1": 0.4}
  model, teacher, student = _teacher_and_student(
      c, lambda k: next(v for b, v in per_block.items() if f"/{b}/" in k))
  learned, losses = _stage2(c, model, teacher, student)
  got = _log_scales(learned)
  for block, ratio in per_block.items():
    vals = [v for k, v in got.items() if f"/{block}/" in k]
    assert len(vals) == len(TARGETS) and len(set(vals)) == 1  # one scale per block, stored per module
    assert abs(vals[0] - math.log(ALPHA) - ratio) < 0.05
  assert losses[-1] < 1e-3 * losses[0]


def test_one_tenth_of_the_stage1_lr_cannot_move_the_scales():
  # The paper's stage-2 lr (stage1.lr / 10 = 1e-4) as a log-scale lr: Adam moves a parameter
  # by about lr per step, so 300 steps move log alpha_l by at most ~0.03.
  c = _config("module", lr=1e-4)
  model, teacher, student = _teacher_and_student(c, lambda k: 0.5)
  learned, _ = _stage2(c, model, teacher, student)
  moved = max(abs(v - math.log(ALPHA)) for v in _log_scales(learned).values())
  assert 0 < moved <= 300 * 1e-4 * 1.01


def test_a_zero_alpha_cannot_be_stored_as_a_log_scale():
  with pytest.raises(ValueError, match="dmlora.alpha"):
    dmlora.AdapterSpec(alpha=0.0)

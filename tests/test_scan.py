"""config.model.scan_layers and config.model.remat (issue 15, "big models compile and fit"):
the scanned model is the unrolled one with its block params stacked (layout.py), so logits,
a real train step and the merge agree, and the public layout is kept at the edges; the remat
policies and their boolean aliases, and the fingerprints of runs made before either key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_model import IMG, images, randomize
from dmlora_jax import config_base, dmlora, layout, merge, schedules, setup, steps, vit
from dmlora_jax.config_base import ALL_TARGETS
from dmlora_jax.pytrees import flatten, join, unflatten

AD = dmlora.AdapterSpec(num_branches=3, rank=2, targets=ALL_TARGETS)


def make(adapter=None, **kw):
  """test_model.make with a jitted init (a fraction of the time of an eager one)."""
  model = vit.ViT(vit.parse_variant("tiny/4", 5, **kw), adapter)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))["params"]


def shapes(adapter=None, **kw):
  model = vit.ViT(vit.parse_variant("tiny/4", 5, **kw), adapter)
  return jax.tree.map(np.shape, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))["params"])


def test_stack_is_the_scanned_models_tree_and_unstack_inverts_it():
  _, public = make(AD)
  scanned = shapes(AD, scan_layers=True)
  stacked = layout.stack(jax.tree.map(np.asarray, public))
  assert jax.tree.map(np.shape, stacked) == scanned
  assert layout.is_stacked(stacked) and not layout.is_stacked(public)
  # a per-block scale per module stays one value per block: (depth,) under the stack
  assert stacked["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_1"][dmlora.LORA_LOG_SCALE].shape == (2,)
  back = flatten(layout.unstack(stacked))
  assert back.keys() == flatten(public).keys()
  assert all(np.array_equal(back[k], v) for k, v in flatten(public).items())
  # a tree with a stacked frozen part and public trainable leaves stacks to the whole
  frozen = {k: v for k, v in flatten(stacked).items() if not k.endswith(dmlora.LORA_A)}
  trainable = {k: v for k, v in flatten(public).items() if k.endswith(dmlora.LORA_A)}
  mixed = layout.stack(unflatten({**frozen, **trainable}))
  assert jax.tree.map(np.shape, mixed) == scanned


@pytest.mark.parametrize("adapter", [None, AD])
def test_scanned_logits_equal_the_unrolled_ones(adapter):
  model, params = make(adapter)
  params = randomize(params)
  x = images()
  masks = schedules.branch_masks(jax.random.key(3), 0.5, (2, len(ALL_TARGETS), 3), 1, True)
  sp = layout.stack(params)
  for m in ((None, masks) if adapter else (None,)):
    ref = jax.jit(model.apply)({"params": params}, x, m)
    for remat in (("none", "full", "dots") if m is not None or not adapter else ("none",)):
      scanned = vit.ViT(dataclasses.replace(model.cfg, scan_layers=True, remat=remat), adapter)
      got = jax.jit(scanned.apply)({"params": sp}, x, m)
      np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"remat={remat}, masks={m is not None}")
  if adapter:  # the masks reach each block's own slice: other masks, other logits
    assert not np.allclose(jax.jit(scanned.apply)({"params": sp}, x, masks),
                           jax.jit(scanned.apply)({"params": sp}, x, None), atol=1e-4)


def _setup(scan: bool, **over):
  c = config_base.get_base_config()
  c.model.variant, c.dmlora.num_branches, c.dmlora.rank, c.dmlora.targets = "tiny/4", 3, 2, ALL_TARGETS
  c.dmlora.drop_schedule, c.dmlora.drop_end = "constant", 0.5
  c.stage1.lr, c.stage1.epochs, c.stage1.warmup_epochs = 1e-2, 1, 0
  c.data.image_size, c.model.scan_layers = 16, scan
  for k, v in over.items():
    config_base.override(c, k, v)
  return setup.build(config_base.resolve(c), 5)


@pytest.mark.parametrize("method,stage", [("dmlora", 1), ("dmlora_block", 2)])
def test_one_train_step_and_the_merge_agree_scanned_and_unrolled(method, stage):
  """The real step of steps.py (stage 1: branch masks on, AdamW; stage 2: 2S-LS with one
  alpha per block): the trainable leaves after one step, and the merge of the result, equal the
  unrolled model's; the trainable leaves (what checkpoints hold) are public in both."""
  ref = _setup(False, method=method)
  c = ref.config.copy_and_resolve_references()
  c.model.scan_layers = True
  s = dataclasses.replace(ref, config=c, model=setup.build_model(c, 5, ref.adapter))
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.2).astype(x.dtype), ref.trainable)
  # the same starting point (a scanned init draws other numbers): the unrolled run's params
  assert not layout.is_stacked(s.trainable) and layout.is_stacked(s.device_frozen())
  plan = setup.Plan(steps_per_epoch=4, stage1_steps=4, stage2_steps=4)
  batch = {"image": rng.integers(0, 256, (1, 8, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, 5, (1, 8)).astype(np.int32)}
  out = {}
  for name, su in (("unrolled", ref), ("scanned", s)):
    tx, _ = su.optimizer(stage, plan)
    sc = su.step_config(stage, plan)
    assert sc.uses_masks == (stage == 1)
    fn = steps.pmap_train_step(steps.make_train_step(su.model, tx, sc))
    state, metrics = fn(steps.replicate(su.host_state(stage, plan, trainable, step=4 * (stage - 1))), batch,
                        jax.random.key(7))
    out[name] = (flatten(steps.unreplicate(state.trainable)), float(np.asarray(metrics["loss"])[0]))
  (a, la), (b, lb) = out["unrolled"], out["scanned"]
  assert la == pytest.approx(lb, abs=1e-6)
  assert a.keys() == b.keys()
  moved = [k for k in a if not np.array_equal(a[k], flatten(trainable)[k])]
  assert moved  # the step did something
  if stage == 2:  # only the scales move, one value per block: the modules of a block alike
    assert all(k.endswith(dmlora.LORA_LOG_SCALE) for k in moved)
    blk = {k: a[k] - flatten(trainable)[k] for k in moved if "encoderblock_1/" in k}
    assert len(blk) > 1 and np.allclose(list(blk.values()), list(blk.values())[0], atol=1e-7)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
  # the merge: public layout from both, equal; a stacked tree merges to the same
  ma = flatten(merge.merge_params(join(ref.frozen, unflatten(a))))
  mb = flatten(merge.merge_params(layout.stack(join(ref.frozen, unflatten(b)))))
  assert ma.keys() == mb.keys() and not any("encoderblock/" in k for k in ma)
  for k in ma:
    np.testing.assert_allclose(mb[k], ma[k], atol=1e-6, err_msg=k)


def test_drop_path_under_scan_uses_each_blocks_rate():
  """Drop-path is supported under scan (a scanned per-block rate): training draws, follows its
  rng, and evaluation is deterministic and equals the unrolled model's."""
  model, params = make(None, drop_path=0.5)
  params = randomize(params)  # the head starts at zero
  scanned = vit.ViT(dataclasses.replace(model.cfg, scan_layers=True))
  sp, x = layout.stack(params), images()
  train = jax.jit(lambda k: scanned.apply({"params": sp}, x, train=True, rngs={"drop_path": k}))
  a, b, a2 = train(jax.random.key(0)), train(jax.random.key(1)), train(jax.random.key(0))
  assert not np.allclose(a, b) and np.array_equal(a, a2)
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": sp}, x), jax.jit(model.apply)({"params": params}, x),
                             atol=1e-5)


def test_remat_policies_aliases_and_one_line_errors():
  assert [vit.remat_policy(v) for v in (True, False, "true", "0", "none", "full", "dots")] == [
      "full", "none", "full", "none", "none", "full", "dots"]
  with pytest.raises(ValueError, match="model.remat"):
    vit.parse_variant("tiny/4", 5, remat="sometimes")
  c = config_base.get_base_config()
  c.model.remat = "sometimes"
  with pytest.raises(config_base.ConfigError, match=r"^config\.model\.remat='sometimes' is not one of none, full, dots"):
    config_base.validate(c)
  c.model.remat = True  # a config file from before the policies still sets a boolean
  config_base.validate(c)


def test_fingerprints_of_runs_before_the_policies_and_scan_are_kept():
  """Pinned: the stage-1 fingerprints of the base config with remat False / True as computed
  before model.remat took a policy and model.scan_layers existed (commit 60a6327)."""
  def fp(**over):
    c = config_base.get_base_config()
    for k, v in over.items():
      setattr(c.model, k, v)
    return config_base.stage1_fingerprint(c)
  assert fp() == fp(remat=False) == fp(remat="none") == "b2fe198cdd696563"
  assert fp(remat=True) == fp(remat="full") == "999a600468c592c0"
  assert fp(remat="dots") != fp() and fp(scan_layers=True) != fp()
  from dmlora_jax import sweep
  old = {"config": {k: v for k, v in config_base.flatten(config_base.get_base_config()).items()
                    if k != "model.scan_layers"}}
  old["config"]["model.remat"] = False
  assert sweep.stale_keys(old, config_base.get_base_config()) == []
  c = config_base.get_base_config()
  c.model.remat = "dots"
  assert sweep.stale_keys(old, c) == ["model.remat"]

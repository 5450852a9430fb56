"""The trainer's specification, on tiny models and the digits task of task_files.py (CPU)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from dmlora_jax import config_base, methods, npz, optimizers, partition, setup, steps, trainer, training
from dmlora_jax.data import images as data_images
from dmlora_jax.pytrees import flatten
from trainer_utils import make_trainer, tiny_config


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  """One real run: random init, DMLoRA on all six projections, both stages."""
  wd = str(tmp_path_factory.mktemp("learn"))
  c = tiny_config(epochs=8, stage2_epochs=1, image_size=16, **{
      "stage1.lr": 3e-3, "dmlora.targets": ("query", "key", "value", "out", "Dense_0", "Dense_1")})
  return wd, c, trainer.train_and_evaluate(c, wd)


def test_run_learns_from_random_init_on_the_digits(learned):
  _, _, res = learned
  # 10 classes, 797 test images: chance is 10% (std 1.1%).
  assert res["accuracy"]["test"] > 0.30, res["accuracy"]
  assert set(res["accuracy"]) == {"test"}  # final protocol: never val200, and test only once


def test_run_leaves_results_export_checkpoints_and_logs(learned):
  wd, c, res = learned
  on_disk = json.load(open(os.path.join(wd, "results.json")))
  assert on_disk["accuracy"] == res["accuracy"]
  for k in ("method", "config", "trainable_params", "total_params", "steps", "wall_time_s", "scales"):
    assert k in on_disk, k
  assert on_disk["config"]["dmlora.num_branches"] == 3 and on_disk["method"] == "dmlora"
  assert on_disk["steps"] == 9 * (1000 // 32)
  assert len(on_disk["scales"]) == 2 * 6
  # Trainable = branches (2 blocks x 6 targets x 3 x 2 x (d_in + d_out)) + scales + head.
  n_branch = 2 * 3 * 2 * ((32 + 32) * 4 + (32 + 64) + (64 + 32))
  assert on_disk["trainable_params"] == n_branch + 12 + (32 * 10 + 10)
  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps_saved[-1] == on_disk["steps"]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert lines and {"loss", "lr", "drop_p", "images_per_s", "step", "stage"} <= set(lines[-1])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tensorboard")))
  # The export is a plain ViT in the public layout, head included, no adapter leaves.
  exported = npz.load_npz(os.path.join(wd, "merged.npz"))
  assert "head/kernel" in exported and exported["head/kernel"].shape == (32, 10)
  assert not any("lora" in k for k in exported)


def test_checkpoints_are_adapter_sized(learned):
  wd, _, res = learned
  ckdir = os.path.join(wd, "checkpoints", str(res["steps"]))
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckdir) for f in fs)
  backbone_bytes = 4 * (res["total_params"] - res["trainable_params"])
  # trainable leaves + two Adam moments of them, no backbone (plus small orbax metadata).
  assert size < 4 * 3 * res["trainable_params"] + 200_000
  assert backbone_bytes > 50_000


def _watch(monkeypatch):
  """Counts decoded images, optimizers built and train steps made."""
  seen = {"decoded": [], "optimizers": 0, "train_steps": 0}
  real_decode, real_opt, real_step = data_images.decode_files, optimizers.make_optimizer, steps.make_train_step

  def decode(refs, *a, **k):
    seen["decoded"].append(len(refs))
    return real_decode(refs, *a, **k)

  def opt(*a, **k):
    seen["optimizers"] += 1
    return real_opt(*a, **k)

  def step(*a, **k):
    seen["train_steps"] += 1
    return real_step(*a, **k)

  monkeypatch.setattr(data_images, "decode_files", decode)
  monkeypatch.setattr(optimizers, "make_optimizer", opt)
  monkeypatch.setattr(steps, "make_train_step", step)
  return seen


def test_eval_mode_on_merged_export_matches_training_accuracy(learned, monkeypatch, tmp_path):
  wd, c, res = learned
  wd = shutil.copytree(wd, tmp_path / "copy")  # eval writes eval.json: not into the module's run
  seen = _watch(monkeypatch)
  acc = trainer.evaluate_checkpoint(c, str(wd))
  assert len(seen["decoded"]) == 1  # the eval split only; the train split is counted, not decoded
  assert seen["optimizers"] == seen["train_steps"] == 0  # a plain model and an evaluator only
  assert acc["test"] == pytest.approx(res["accuracy"]["test"], abs=1.5e-3)  # <= 1 image of 797 flips


def test_export_mode_rewrites_the_same_merged_npz_without_decoding_images(learned, monkeypatch, tmp_path):
  wd, c, _ = learned
  wd = shutil.copytree(wd, tmp_path / "copy")
  before = npz.load_npz(os.path.join(wd, "merged.npz"))
  os.remove(os.path.join(wd, "merged.npz"))
  seen = _watch(monkeypatch)
  trainer.export_from_checkpoint(c, str(wd))
  assert seen["decoded"] == []  # export needs the train split's count (resume checks), not its images
  assert seen["optimizers"] == seen["train_steps"] == 0
  after = npz.load_npz(os.path.join(wd, "merged.npz"))
  assert set(before) == set(after)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])
  # merged.safetensors: the same weights in timm's naming (fused qkv, (out, in) weights).
  heads = before["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
  timm = npz.load_checkpoint(os.path.join(wd, "merged.safetensors"), heads)
  assert set(timm) == set(after) and all(np.array_equal(timm[k], after[k]) for k in after)
  # adapter/: the branches as PEFT LoRAs, one per adapted timm Linear of each block.
  adapter = json.load(open(os.path.join(wd, "adapter", "adapter_config.json")))
  lora = load_file(os.path.join(wd, "adapter", "adapter_model.safetensors"))
  d = c.dmlora
  rank = sum(t in ("query", "key", "value") for t in d.targets) * d.num_branches * d.rank
  assert lora["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape[0] == rank == adapter["rank_pattern"]["qkv"]
  assert lora["base_model.model.blocks.0.mlp.fc2.lora_A.weight"].shape[0] == d.num_branches * d.rank == adapter["r"]


def _one_batch(t: training.Trainer):
  return next(t.batches(0, 0))


def _randomized(trainable):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype), trainable)


def _drop_config(**over):
  return tiny_config(stage2_epochs=1, **{"dmlora.drop_start": 0.5, "dmlora.drop_end": 0.5, **over})


@pytest.mark.parametrize("train_head", [False, True])
def test_stage2_changes_only_the_scales_and_optionally_the_head(tmp_path, train_head):
  t = make_trainer(_drop_config(**{"stage2.train_head": train_head}), str(tmp_path))
  trainable = _randomized(t.s.trainable)
  state = steps.replicate(t.s.host_state(2, t.plan, trainable, step=t.plan.stage1_steps), t.devices)
  fn = t.train_step(2)[0]
  for i in range(2):
    state, _ = fn(state, _one_batch(t), jax.random.key(i))
  after = flatten(steps.unreplicate(state.trainable))
  for k, v in flatten(trainable).items():
    lab = partition.label_of(k)
    changed = not np.array_equal(after[k], v)
    should = lab == partition.SCALE or (train_head and lab == partition.HEAD)
    assert changed == should, (k, lab, changed)


@pytest.fixture(scope="module")
def drop_trainer(tmp_path_factory):
  return make_trainer(_drop_config(), str(tmp_path_factory.mktemp("run")))


def test_frozen_leaves_are_bit_identical_after_training(drop_trainer):
  t = drop_trainer
  trainable = _randomized(t.s.trainable)
  state = steps.replicate(t.s.host_state(1, t.plan, trainable), t.devices)
  fn = t.train_step(1)[0]
  for i in range(3):
    state, _ = fn(state, _one_batch(t), jax.random.key(i))
  frozen_after = flatten(steps.unreplicate(state.frozen))
  for k, v in flatten(t.s.frozen).items():
    np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
  # ... and the trained ones did move.
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(steps.unreplicate(state.trainable)),
                                                       jax.tree.leaves(trainable)))


def _step_flops(method, tmp_path, **over):
  """FLOPs of the stage-1 step's program as JAX lowers it (before XLA's optimizations: the
  gradients it asks for, not what XLA might remove later; no compile needed)."""
  t = make_trainer(tiny_config(method=method, image_size=16, **{"model.variant": "mini/4", **over}),
                   str(tmp_path / method))
  state = steps.replicate(t.s.host_state(1, t.plan), t.devices)
  cost = t.train_step(1)[0].lower(state, _one_batch(t), jax.random.key(0)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_stage1_step_program_skips_frozen_weight_gradients(tmp_path):
  full = _step_flops("full", tmp_path)
  dml = _step_flops("dmlora", tmp_path)
  linear = _step_flops("linear", tmp_path)
  # Backprop through a frozen layer costs its input gradient only (~1 forward), not the
  # weight gradient too (~1 more): a PEFT step is ~2/3 of a full step (0.69 here).
  assert dml < 0.75 * full, (dml, full)
  assert linear < dml


def test_partition_rules_cover_every_leaf_exactly_once(drop_trainer):
  labels = flatten(partition.labels(drop_trainer.s.params))
  assert set(labels.values()) == {"frozen", "branches", "head", "scale"}
  assert labels["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/lora_log_scale"] == "scale"
  assert labels["Transformer/encoderblock_0/LayerNorm_0/scale"] == "frozen"
  with pytest.raises(ValueError, match="parameter Transformer/extra/thing matches 0 partition rules"):
    partition.label_of("Transformer/extra/thing")


def test_batch_not_divisible_by_devices_is_a_one_line_error():
  with pytest.raises(config_base.ConfigError, match="batch_size=30 is not divisible by the 4 devices"):
    training.check_batch(30, 4)


@pytest.mark.parametrize("name,k,drop,stage2", [
    ("lora", 1, False, False), ("multibranch", 3, False, False), ("dropout", 3, True, False),
    ("dmlora", 3, True, True), ("full", 0, False, False), ("linear", 0, False, False)])
def test_each_method_builds_the_adapter_dropout_and_stages_its_table_entry_says(tmp_path, name, k, drop, stage2):
  c = config_base.resolve(tiny_config(method=name, stage2_epochs=5))
  s = setup.build(c, 10)
  plan = s.plan(1000)
  assert (s.adapter.num_branches if s.adapter else 0) == k
  assert (plan.stage2_steps > 0) == stage2
  assert s.step_config(1, plan).uses_masks == drop
  assert not s.step_config(2, plan).uses_masks if stage2 else True
  # The trained leaves are the ones the table names, and only those are in the train state.
  labels = {partition.label_of(p) for p in flatten(s.trainable)}
  assert labels == set(methods.METHODS[name].owned)


def test_frozen_weights_carry_no_optimizer_state(drop_trainer):
  t = drop_trainer
  for stage in (1, 2):
    opt = t.s.host_state(stage, t.plan).opt_state
    n_opt = setup.count(opt)
    # Adam keeps two moments per owned leaf, plus step counters (one per branch of each
    # lora_a/lora_b leaf: 2 blocks x 3 targets x 2 leaves x K=3, and a few per leaf/label).
    n_counters = 2 * 3 * 2 * 3 + 64
    assert n_opt <= 2 * setup.count(t.s.trainable) + n_counters, (stage, n_opt)
    assert setup.count(t.s.frozen) > n_opt
    shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(opt)}
    assert (32, 2, 16) not in shapes  # a q/k/v kernel shape

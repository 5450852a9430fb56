"""The trainer issue's specification, on tiny models and the shared cifar10 task (CPU)."""

import json
import os

import jax
import numpy as np
import pytest

from dmlora_jax import npz, partition, steps, trainer
from dmlora_jax.data import images as data_images
from dmlora_jax.merge import flatten
from trainer_utils import tiny_config


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  """One real run: random init, DMLoRA on all six projections, both stages."""
  wd = str(tmp_path_factory.mktemp("learn"))
  c = tiny_config(epochs=8, stage2_epochs=1, image_size=32, **{
      "stage1.lr": 3e-3, "dmlora.targets": ("query", "key", "value", "out", "Dense_0", "Dense_1")})
  return wd, c, trainer.train_and_evaluate(c, wd)


def test_run_learns_from_random_init_on_shared_cifar10(learned):
  _, _, res = learned
  # 10 balanced classes, 1,000 test images: chance is 10% (std 0.95%).
  assert res["accuracy"]["test"] > 0.20, res["accuracy"]
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


def test_eval_mode_on_merged_export_matches_training_accuracy(learned, monkeypatch):
  wd, c, res = learned
  decoded = []
  real = data_images.decode_files
  monkeypatch.setattr(data_images, "decode_files", lambda refs, *a, **k: decoded.append(len(refs)) or real(refs, *a, **k))
  acc = trainer.evaluate_checkpoint(c, wd)
  assert len(decoded) == 1  # the eval split only; the train split is counted, not decoded
  assert acc["test"] == pytest.approx(res["accuracy"]["test"], abs=1.5e-3)  # <= 1 image of 1,000 flips


def test_export_mode_rewrites_the_same_merged_npz_without_decoding_images(learned, monkeypatch):
  wd, c, _ = learned
  before = npz.load_npz(os.path.join(wd, "merged.npz"))
  os.remove(os.path.join(wd, "merged.npz"))
  decoded = []
  real = data_images.decode_files
  monkeypatch.setattr(data_images, "decode_files", lambda refs, *a, **k: decoded.append(len(refs)) or real(refs, *a, **k))
  trainer.export_from_checkpoint(c, wd)
  assert decoded == []  # export needs the train split's count (resume checks), not its images
  after = npz.load_npz(os.path.join(wd, "merged.npz"))
  assert set(before) == set(after)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


@pytest.fixture(scope="module")
def run_obj(tmp_path_factory):
  c = tiny_config(stage2_epochs=1, **{"dmlora.drop_start": 0.5, "dmlora.drop_end": 0.5})
  return trainer.Run(c, str(tmp_path_factory.mktemp("run")))


def _one_batch(run):
  b = next(run.batches(0, 0))
  return b


def _randomized_trainable(run):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype), run.trainable)


@pytest.mark.parametrize("train_head", [False, True])
def test_stage2_changes_only_the_scales_and_optionally_the_head(run_obj, train_head):
  run = run_obj
  run.config.unlock()
  run.config.stage2.train_head = train_head
  run._compiled.clear()
  trainable = _randomized_trainable(run)
  state = steps.replicate(run.host_state(2, trainable, step=run.plan.stage1_steps), run.devices)
  fn = run.train_step(2)[0]
  for i in range(2):
    state, _ = fn(state, _one_batch(run), jax.random.key(i))
  after = flatten(steps.unreplicate(state.trainable))
  before = flatten(trainable)
  for k, v in before.items():
    lab = partition.label_of(k)
    changed = not np.array_equal(after[k], v)
    should = lab == partition.SCALE or (train_head and lab == partition.HEAD)
    assert changed == should, (k, lab, changed)
  run._compiled.clear()


def test_frozen_leaves_are_bit_identical_after_training(run_obj):
  run = run_obj
  state = steps.replicate(run.host_state(1, _randomized_trainable(run)), run.devices)
  fn = run.train_step(1)[0]
  for i in range(3):
    state, _ = fn(state, _one_batch(run), jax.random.key(i))
  frozen_after = flatten(steps.unreplicate(state.frozen))
  for k, v in flatten(run.frozen).items():
    np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
  # ... and the trained ones did move.
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(steps.unreplicate(state.trainable)),
                                                       jax.tree.leaves(_randomized_trainable(run))))


def _step_flops(method, tmp_path, **over):
  c = tiny_config(method=method, image_size=16, **{"model.variant": "mini/4", **over})
  run = trainer.Run(c, str(tmp_path / method))
  state = steps.replicate(run.host_state(1), run.devices)
  fn = run.train_step(1)[0]
  compiled = fn.lower(state, _one_batch(run), jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_compiled_stage1_step_skips_frozen_weight_gradients(tmp_path):
  full = _step_flops("full", tmp_path)
  dml = _step_flops("dmlora", tmp_path)
  linear = _step_flops("linear", tmp_path)
  # Backprop through a frozen layer costs its input gradient only (~1 forward), not the
  # weight gradient too (~1 more): a PEFT step is ~2/3 of a full step.
  assert dml < 0.75 * full, (dml, full)
  assert linear < dml


def test_partition_rules_cover_every_leaf_exactly_once(run_obj):
  labels = flatten(partition.labels(run_obj.params))
  assert set(labels.values()) == {"frozen", "branches", "head", "scale"}
  assert labels["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/lora_log_scale"] == "scale"
  assert labels["Transformer/encoderblock_0/LayerNorm_0/scale"] == "frozen"
  with pytest.raises(ValueError, match="parameter Transformer/extra/thing matches 0 partition rules"):
    partition.label_of("Transformer/extra/thing")


def test_batch_not_divisible_by_devices_is_a_one_line_error():
  c = tiny_config(batch_size=30)
  with pytest.raises(trainer.ConfigError, match="batch_size=30 is not divisible by the 4 devices"):
    trainer._check_batch(c, 4)


def test_lora_method_is_k1_without_dropout_or_stage2(tmp_path):
  c = tiny_config(method="lora", stage2_epochs=5)
  spec = trainer.adapter_spec(c)
  assert spec.num_branches == 1 and spec.rank == 2
  run = trainer.Run(c, str(tmp_path))
  assert run.plan.stage2_steps == 0
  assert not run.step_config(1).uses_masks


def test_frozen_weights_carry_no_optimizer_state(run_obj):
  run = run_obj
  for stage in (1, 2):
    opt = run.host_state(stage).opt_state
    n_opt = trainer.count(opt)
    # Adam keeps two moments per owned leaf, plus step counters (one per branch of each
    # lora_a/lora_b leaf: 2 blocks x 3 targets x 2 leaves x K=3, and a few per leaf/label).
    n_counters = 2 * 3 * 2 * 3 + 64
    assert n_opt <= 2 * trainer.count(run.trainable) + n_counters, (stage, n_opt)
    assert trainer.count(run.frozen) > n_opt
    shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(opt)}
    assert (32, 2, 16) not in shapes  # a q/k/v kernel shape

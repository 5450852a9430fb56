"""The 19 VTAB-1k TFDS definitions under tfds.testing.mock_data, and the preparation tool."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dmlora_jax import config_base, data
from dmlora_jax.data import prepare_vtab1k, tfds_source, vtab_tasks

ALL = list(vtab_tasks.TASKS)
MOCK = dict(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE)


def cfg(task, **kw):
  c = config_base.get_base_config().data
  c.source, c.task, c.image_size, c.num_workers = "tfds", task, 16, 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_the_table_has_19_tasks_in_three_groups():
  assert len(ALL) == 19
  assert {g: len(v) for g, v in vtab_tasks.GROUPS.items()} == {"Natural": 7, "Specialized": 4, "Structured": 8}


@pytest.mark.parametrize("name", ALL)
def test_split_strings_parse_and_resolve_to_800_200_and_disjoint_sets(name):
  task = vtab_tasks.TASKS[name]
  sizes = vtab_tasks.TFDS_SPLIT_SIZES[task.dataset]
  strings = task.split_strings()
  resolved = {}
  for split, spec in strings.items():
    ri = tfds.core.ReadInstruction.from_spec(spec)  # raises on a malformed spec
    infos = {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()}
    resolved[split] = {(a.splitname, i) for a in ri.to_absolute(infos)
                       for i in range(a.from_ or 0, sizes[a.splitname] if a.to is None else a.to)}
  assert len(resolved["train800"]) == 800 and len(resolved["val200"]) == 200
  assert resolved["train800val200"] == resolved["train800"] | resolved["val200"]
  assert not resolved["train800"] & resolved["val200"]
  assert not resolved["train800val200"] & resolved["test"]
  assert len(resolved["test"]) > 200


def test_split_strings_match_the_protocol_numbers():
  s = lambda n: vtab_tasks.TASKS[n].split_strings()
  assert s("cifar")["val200"] == "train[45000:45200]"
  assert s("caltech101")["val200"] == "train[2754:2954]"  # 90 * 3060 // 100
  assert s("oxford_iiit_pet")["val200"] == "train[2944:3144]"  # 80 % rule
  assert s("eurosat") == {"train800": "train[:800]", "val200": "train[16200:16400]",
                          "train800val200": "train[:800]+train[16200:16400]", "test": "train[21600:]"}
  assert s("dsprites_ori")["test"] == "train[663552:]" and s("clevr_dist")["test"] == "validation"
  assert s("smallnorb_ele")["val200"] == "test[:200]" and s("smallnorb_ele")["test"] == "test[50%:]"
  assert s("dtd")["train800val200"] == "train[:800]+validation[:200]"
  # counts from a prepared builder take precedence over the catalog sizes
  assert vtab_tasks.TASKS["svhn"].split_strings({"train": 1000})["val200"] == "train[900:1100]"


@pytest.fixture(scope="module")
def mock_examples():
  """6 mock examples of each TFDS dataset (train800 split), generated once."""
  out = {}
  with tfds.testing.mock_data(**MOCK):
    for name in ALL:
      task = vtab_tasks.TASKS[name]
      if task.dataset not in out:
        split = tfds_source.TfdsSplit("train800", task, tfds_source.get_builder(task), "train[:800]")
        out[task.dataset] = list(tfds.as_numpy(split.dataset()[0]))
  return out


def realistic(name: str, ex: dict, i: int) -> dict:
  """Mock object lists are random-length and mutually inconsistent; real scenes are not.

  CLEVR scenes hold 3..10 objects and KITTI's per-object fields have one length: shape the
  mock examples like that (values stay the mock's) before applying the label function.
  """
  if name.startswith("clevr") or name == "kitti":
    ex = dict(ex)
    objs = ex["objects"]
    k = min(len(v) for v in objs.values())
    if name.startswith("clevr"):
      k = min(k, 3 + i % 8)
    ex["objects"] = {key: v[:k] for key, v in objs.items()}
  return ex


@pytest.mark.parametrize("name", ALL)
def test_label_function_maps_mock_examples_into_range(name, mock_examples):
  task = vtab_tasks.TASKS[name]
  exs = mock_examples[task.dataset]
  labels = [task.label_fn(realistic(name, ex, i)) for i, ex in enumerate(exs)]
  assert len(labels) == 6 and all(0 <= l < task.num_classes for l in labels), labels
  img = task.image_fn(exs[0]["image"])
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] in (1, 3)


def tf_first_below(thrs, dist) -> int:
  """task_adaptation's `tf.reduce_max(tf.where((thrs - dist) < 0))`, as an independent reference."""
  return int(tf.reduce_max(tf.where((np.asarray(thrs) - dist) < 0)))


def test_derived_labels_match_task_adaptation_tf_code():
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = int(rng.integers(3, 11))
    coords = rng.uniform(7.0, 11.0, (n, 3)).astype(np.float32)
    ex = {"objects": {"size": np.zeros(n), "pixel_coords": coords}}
    assert vtab_tasks.clevr_count(ex) == n - 3
    assert vtab_tasks.clevr_dist(ex) == tf_first_below([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], coords[:, 2].min())
    types = rng.integers(0, 8, n)
    loc = rng.uniform(0, 40, (n, 3)).astype(np.float32)
    z = tf.gather(loc[:, 2], tf.where(types < 3))
    dist = tf.reduce_min(tf.concat([z, tf.constant([[1000.0]])], axis=0))
    kitti = vtab_tasks.kitti_dist({"objects": {"type": types, "location": loc}})
    assert kitti == tf_first_below([-100.0, 8.0, 20.0, 999.0], dist)
  assert vtab_tasks.kitti_dist({"objects": {"type": np.array([5]), "location": np.ones((1, 3))}}) == 3  # no vehicle
  x = np.arange(32)
  loc = [vtab_tasks.TASKS["dsprites_loc"].label_fn({"label_x_position": v}) for v in x]
  want = tf.cast(tf.math.floordiv(tf.cast(x, tf.float32), 32 / 16), tf.int64).numpy()
  np.testing.assert_array_equal(loc, want)
  o = np.arange(40)
  ori = [vtab_tasks.TASKS["dsprites_ori"].label_fn({"label_orientation": v}) for v in o]
  np.testing.assert_array_equal(ori, tf.cast(tf.math.floordiv(tf.cast(o, tf.float32), 40 / 16), tf.int64).numpy())
  assert max(ori) == 15 and np.bincount(ori).min() >= 2
  np.testing.assert_array_equal(vtab_tasks.dsprites_image(np.array([[[0]], [[1]]], np.uint8))[:, 0, 0], [0, 255])


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("clevr_count", "kitti")])
def test_tfds_source_builds_every_task_under_mock_data(name):
  with tfds.testing.mock_data(**MOCK):
    task = data.build_task(cfg(name))
  assert task.num_classes == vtab_tasks.TASKS[name].num_classes
  assert task.train.images.shape == (6, 16, 16, 3) and task.train.images.dtype == np.uint8
  assert ((task.train.labels >= 0) & (task.train.labels < task.num_classes)).all()
  assert list(task.evals) == ["test"]


def test_tfds_source_rejects_unrealistic_mock_examples_with_one_line_errors():
  # raw mock CLEVR scenes hold ~30-50 objects -> count labels far above 7: refused, not trained on
  with tfds.testing.mock_data(**MOCK):
    with pytest.raises(data.DataError, match=r"label \d+ outside \[0, 8\)"):
      data.build_task(cfg("clevr_count"))
    # raw mock KITTI objects have fields of different lengths
    with pytest.raises(data.DataError, match="cannot compute the label of example 0"):
      data.build_task(cfg("kitti"))


def test_tfds_eval_shards_partition_the_split():
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    whole = data.build_task(cfg("svhn")).evals["test"]
    parts = [data.build_task(cfg("svhn"), p, 2).evals["test"] for p in range(2)]
  assert [len(p.labels) for p in parts] == [4, 3] and parts[0].num_examples_global == 7
  np.testing.assert_array_equal(parts[1].images, whole.images[1::2])
  np.testing.assert_array_equal(parts[0].labels, whole.labels[0::2])


def test_unprepared_dataset_gives_a_one_line_hint(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg("dtd", tfds_data_dir=str(tmp_path)))
  msg = str(e.value)
  assert "\n" not in msg and "download_and_prepare" in msg and "internet" in msg and str(tmp_path) in msg
  with pytest.raises(data.DataError, match="not a VTAB-1k task"):
    data.build_task(cfg("cifar10"))


def round_trip(tmp_path, name: str, fmt: str):
  out = str(tmp_path / "vtab")
  with tfds.testing.mock_data(**MOCK):
    assert prepare_vtab1k.main(["--out", out, "--tasks", name, "--format", fmt]) == 0
    from_tfds = data.build_task(cfg(name, image_size=32))
  assert sorted(os.listdir(os.path.join(out, name))) == sorted(
      [".complete", "images", "train800.txt", "val200.txt", "train800val200.txt", "test.txt"]
      + (["classes.txt"] if name == "cifar" else []))
  from_folder = data.build_task(cfg(name, source="vtab1k_folder", root=out, image_size=32))
  assert from_folder.num_classes == from_tfds.num_classes
  pairs = [(from_folder.train, from_tfds.train), (from_folder.evals["test"], from_tfds.evals["test"])]
  for a, b in pairs:
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.shape == b.images.shape
  return pairs


@pytest.mark.parametrize("name", ["cifar", "dsprites_loc", "smallnorb_ele"])
def test_prepare_tool_lossless_round_trips_exactly_to_the_tfds_source(tmp_path, name):
  for a, b in round_trip(tmp_path, name, "png"):
    np.testing.assert_array_equal(a.images, b.images)


def test_prepare_tool_jpeg_round_trips_up_to_jpeg_loss(tmp_path):
  for a, b in round_trip(tmp_path, "cifar", "jpg"):
    err = np.abs(a.images.astype(int) - b.images.astype(int)).mean()
    wrong = np.abs(a.images.astype(int) - np.roll(b.images, 1, axis=0).astype(int)).mean()
    assert err < 6 and wrong > 5 * err, (err, wrong)  # q95 loss on noise, far below a mismatch


def test_prepare_tool_skips_complete_tasks_and_recovers_from_interruption(tmp_path, capsys):
  out = str(tmp_path)
  os.makedirs(os.path.join(out, ".svhn.tmp", "images"))  # leftovers of a killed run
  os.makedirs(os.path.join(out, "svhn"))  # a folder without the completion marker
  with tfds.testing.mock_data(**MOCK):
    assert prepare_vtab1k.main(["--out", out, "--tasks", "svhn"]) == 0
    mtime = os.path.getmtime(os.path.join(out, "svhn", ".complete"))
    assert prepare_vtab1k.main(["--out", out, "--tasks", "svhn"]) == 0
  assert "already complete, skipped" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(out, "svhn", ".complete")) == mtime
  assert sorted(os.listdir(out)) == ["svhn"]
  assert len(open(os.path.join(out, "svhn", "test.txt")).readlines()) == 6
  assert prepare_vtab1k.main(["--out", out, "--tasks", "nope"]) == 2

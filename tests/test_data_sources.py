"""Folder (NOAH), JSON (VPT/FGVC) and demo sources on generated files and on the digits
tasks of task_files.py (real images from scikit-learn)."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from dmlora_jax import config_base, data
from dmlora_jax.data import demo, images

from task_files import digits_split, fgvc_root, vtab_root

SPLITS = ("train800", "val200", "train800val200", "test")


def cfg(**kw):
  c = config_base.get_base_config().data
  c.image_size, c.num_workers = 16, 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def color_image(i: int, size=(20, 12)) -> np.ndarray:
  rng = np.random.default_rng(i)
  return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_task(root, name="mytask", n=(6, 3, 9, 5), num_labels=4, ext="png"):
  """A small NOAH-layout task with lossless PNGs (named .jpg like the layout; PIL sniffs content)."""
  path = os.path.join(root, name)
  arrays = {}
  for split, count in zip(SPLITS, n):
    os.makedirs(os.path.join(path, "images", split))
    lines = []
    for i in range(count):
      a = color_image(hash((split, i)) % 10_000)
      rel = f"images/{split}/{i:06d}.jpg"
      Image.fromarray(a).save(os.path.join(path, rel), "PNG")
      lines.append(f"{rel} {i % num_labels}\n")
      arrays[(split, i)] = a
    with open(os.path.join(path, f"{split}.txt"), "w") as f:
      f.writelines(lines)
  return path, arrays


def bicubic(a: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))


# --- the digits task in the VTAB-1k layout ---

def test_folder_task_final_and_tune_read_every_list_with_exact_pixels():
  task = data.build_task(cfg(root=vtab_root(), task="digits", image_size=8))
  assert task.num_classes == 10  # lines of classes.txt
  assert task.train.images.shape == (1000, 8, 8, 3) and task.train.images.dtype == np.uint8
  assert list(task.evals) == ["test"] and task.evals["test"].num_examples_global == 797
  imgs, labels = digits_split("test")
  np.testing.assert_array_equal(task.evals["test"].labels, labels)
  # 8 px: no resize; grey tiled to RGB, exact pixels.
  np.testing.assert_array_equal(task.evals["test"].images, np.repeat(imgs[..., None], 3, -1))
  np.testing.assert_array_equal(task.train.labels, digits_split("train800val200")[1])
  tune = data.build_task(cfg(root=vtab_root(), task="digits", protocol="tune"))
  assert tune.train.num_examples_global == 800 and list(tune.evals) == ["val200"]
  assert tune.evals["val200"].num_examples_global == 200


def test_eval_split_is_decoded_per_process_shard():
  shards = [data.build_task(cfg(root=vtab_root(), task="digits", protocol="tune"), p, 2).evals["val200"]
            for p in range(2)]
  whole = data.build_task(cfg(root=vtab_root(), task="digits", protocol="tune")).evals["val200"]
  assert [len(s.labels) for s in shards] == [100, 100]
  np.testing.assert_array_equal(shards[1].images, whole.images[1::2])
  seen = []
  for p, s in enumerate(shards):
    for b in data.eval_batches(s, 64, p, 2):
      seen.extend(b["label"][b["mask"] > 0].tolist())
  assert sorted(seen) == sorted(whole.labels.tolist())


def test_fgvc_layout_digits_map_class_ids_to_sorted_labels():
  task = data.build_task(cfg(source="fgvc_json", root=fgvc_root(), task="cub", image_size=8))
  assert task.num_classes == 200  # CUB's class count
  assert task.train.num_examples_global == 1000 and task.evals["test"].num_examples_global == 300
  # ids 100..109 in sorted order are labels 0..9: the digit itself.
  want = np.concatenate([digits_split("train800")[1], digits_split("val200")[1]])
  np.testing.assert_array_equal(np.sort(task.train.labels), np.sort(want))


# --- generated folder tasks ---

def test_generated_task_pixels_labels_and_class_count(tmp_path):
  _, arrays = write_task(tmp_path)
  task = data.build_task(cfg(root=str(tmp_path), task="mytask"))
  assert task.num_classes == 4  # max label + 1 (no table entry, no classes.txt)
  np.testing.assert_array_equal(task.train.labels, np.arange(9) % 4)
  np.testing.assert_array_equal(task.evals["test"].images[2], bicubic(arrays[("test", 2)], 16))
  assert data.build_task(cfg(root=str(tmp_path), task="mytask", num_classes=7)).num_classes == 7


def test_vtab_table_sets_class_count_for_the_19_folders(tmp_path):
  write_task(tmp_path, name="dtd", num_labels=4)
  assert data.build_task(cfg(root=str(tmp_path), task="dtd")).num_classes == 47


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_every_image_mode_becomes_the_rgb_that_pil_gives(tmp_path, mode):
  rgb = color_image(1)
  if mode == "I;16":
    grey16 = (np.arange(20 * 12, dtype=np.uint16).reshape(12, 20) * 273)  # spans 0..65k
    img = Image.fromarray(grey16)
    assert img.mode == "I;16"
    want = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1)
  else:
    img = Image.fromarray(rgb).convert(mode)
    want = np.asarray(img.convert("RGB")) if mode != "RGBA" else rgb
  path = os.path.join(tmp_path, "x.png" if mode != "CMYK" else "x.jpg")
  img.save(path)
  got = images.load_file(images.ImageRef(path, "list.txt", 1), 0)
  assert got.shape == (12, 20, 3) and got.dtype == np.uint8
  if mode == "CMYK":  # lossy JPEG: compare loosely
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 12
  else:
    np.testing.assert_array_equal(got, want)
  if mode == "L":
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_16bit_grey_keeps_the_top_8_bits_over_the_full_range():
  a = np.array([[0, 65535, 32768]], np.uint16)
  img = Image.fromarray(a)
  assert img.mode == "I;16"
  got = np.asarray(images.to_rgb(img))
  np.testing.assert_array_equal(got[0, :, 0], [0, 255, 128])


# --- bad input: each gives its one-line error ---

def one_line_error(excinfo) -> str:
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_truncated_image_names_file_list_and_line(tmp_path):
  path, _ = write_task(tmp_path)
  bad = os.path.join(path, "images", "test", "000003.jpg")
  Image.fromarray(color_image(3, (64, 64))).save(bad, "JPEG")
  with open(bad, "r+b") as f:
    f.truncate(os.path.getsize(bad) // 2)
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=str(tmp_path), task="mytask"))
  msg = one_line_error(e)
  assert bad in msg and f"{os.path.join(path, 'test.txt')}:4" in msg


def test_undecodable_image_error_names_file_list_and_line(tmp_path):
  path, _ = write_task(tmp_path)
  bad = os.path.join(path, "images", "train800val200", "000000.jpg")
  with open(bad, "wb") as f:
    f.write(b"not an image at all")
  with pytest.raises(data.DataError, match=r"000000\.jpg.*train800val200\.txt:1"):
    data.build_task(cfg(root=str(tmp_path), task="mytask"))


def test_label_out_of_range_names_label_file_and_line(tmp_path):
  path, _ = write_task(tmp_path, name="dtd")
  with open(os.path.join(path, "test.txt"), "a") as f:
    f.write("images/test/000000.jpg 47\n")
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=str(tmp_path), task="dtd"))
  msg = one_line_error(e)
  assert "label 47 outside [0, 47)" in msg and f"{os.path.join(path, 'test.txt')}:6" in msg


def test_negative_label_error_names_label_file_and_line(tmp_path):
  path, _ = write_task(tmp_path)
  with open(os.path.join(path, "train800val200.txt"), "a") as f:
    f.write("images/test/000000.jpg -1\n")
  with pytest.raises(data.DataError, match=r"label -1 outside .*train800val200\.txt:10"):
    data.build_task(cfg(root=str(tmp_path), task="mytask"))


def test_missing_images_are_listed_up_front(tmp_path):
  path, _ = write_task(tmp_path)
  for i in range(7):
    os.remove(os.path.join(path, "images", "train800val200", f"{i:06d}.jpg"))
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=str(tmp_path), task="mytask"))
  msg = one_line_error(e)
  assert msg.startswith("7 image(s)") and "000004.jpg" in msg and "000005.jpg" not in msg  # first few
  assert msg.endswith("and 2 more") and "train800val200.txt:1" in msg


def test_missing_root_lists_what_exists(tmp_path):
  write_task(tmp_path)
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=os.path.join(tmp_path, "nope"), task="mytask"))
  assert "does not exist" in one_line_error(e) and "mytask/" in str(e.value)


def test_missing_task_lists_task_folders(tmp_path):
  write_task(tmp_path)
  write_task(tmp_path, name="other")
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=str(tmp_path), task="cifar"))
  msg = one_line_error(e)
  assert "'cifar' not found" in msg and "mytask, other" in msg


def test_empty_split_is_an_error_naming_the_split(tmp_path):
  path, _ = write_task(tmp_path)
  open(os.path.join(path, "test.txt"), "w").close()
  with pytest.raises(data.DataError, match="split test is empty"):
    data.build_task(cfg(root=str(tmp_path), task="mytask"))


@pytest.mark.parametrize("line", ["images/test/000000.jpg", "images/test/000000.jpg cat", "7"])
def test_malformed_line_names_file_and_line(tmp_path, line):
  path, _ = write_task(tmp_path)
  with open(os.path.join(path, "train800val200.txt"), "a") as f:
    f.write("\n" + line + "\n")
  with pytest.raises(data.DataError) as e:
    data.build_task(cfg(root=str(tmp_path), task="mytask"))
  assert f"{os.path.join(path, 'train800val200.txt')}:11: malformed line" in one_line_error(e)


def test_unknown_source_and_protocol_are_named_with_the_choices():
  with pytest.raises(data.DataError, match="'hdf5'"):
    data.build_task(cfg(source="hdf5"))
  with pytest.raises(data.DataError, match="'best'"):
    data.build_task(cfg(source="demo", protocol="best"))


# --- FGVC JSON (VPT layout) ---

def write_fgvc(root, name="cub", image_dir="images", ids=(3, 10, 42), n=(6, 3, 4)):
  path = os.path.join(root, name)
  arrays = {}
  for split, count in zip(("train", "val", "test"), n):
    entries = {}
    for i in range(count):
      rel = f"{ids[i % len(ids)]:03d}.cls/{split}_{i}.jpg"
      full = os.path.join(path, image_dir, rel)
      os.makedirs(os.path.dirname(full), exist_ok=True)
      a = color_image(hash((name, split, i)) % 10_000)
      Image.fromarray(a).save(full, "PNG")
      entries[rel] = ids[i % len(ids)]
      arrays[(split, i)] = a
    with open(os.path.join(path, f"{split}.json"), "w") as f:
      json.dump(entries, f)
  return path, arrays


def test_fgvc_final_and_tune_with_sorted_label_mapping(tmp_path):
  _, arrays = write_fgvc(tmp_path, ids=(42, 3, 10))
  task = data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub"))
  assert task.num_classes == 200
  assert task.train.num_examples_global == 9 and list(task.evals) == ["test"]
  # ids 42, 3, 10 -> sorted 3, 10, 42 -> labels 2, 0, 1
  np.testing.assert_array_equal(task.train.labels, [2, 0, 1, 2, 0, 1, 2, 0, 1])
  np.testing.assert_array_equal(task.evals["test"].images[1], bicubic(arrays[("test", 1)], 16))
  tune = data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub", protocol="tune"))
  assert tune.train.num_examples_global == 6 and tune.evals["val"].num_examples_global == 3


def test_fgvc_sets_find_images_in_their_own_folders(tmp_path):
  write_fgvc(tmp_path, name="stanford_dogs", image_dir="Images")
  write_fgvc(tmp_path, name="stanford_cars", image_dir="")
  assert data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="stanford_dogs")).num_classes == 120
  assert data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="stanford_cars")).num_classes == 196
  # a root that is itself the dataset folder
  t = data.build_task(cfg(source="fgvc_json", root=os.path.join(tmp_path, "stanford_cars"), task=""))
  assert t.num_classes == 3  # unknown set: distinct class ids


def test_fgvc_errors_name_the_set_file_and_entry(tmp_path):
  path, _ = write_fgvc(tmp_path)
  with pytest.raises(data.DataError, match=r"'nabirds' not found.*cub"):
    data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="nabirds"))
  os.remove(os.path.join(path, "images", "003.cls", "test_0.jpg"))
  with pytest.raises(data.DataError, match=r"1 image\(s\).*test_0\.jpg .*test\.json entry 1"):
    data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub"))
  with open(os.path.join(path, "val.json"), "w") as f:
    json.dump({"a.jpg": "three"}, f)
  with pytest.raises(data.DataError, match=r"val\.json: entry 1 .*'three'"):
    data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub"))
  with open(os.path.join(path, "val.json"), "w") as f:
    json.dump({}, f)
  with pytest.raises(data.DataError, match="split val is empty"):
    data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub", protocol="tune"))
  with pytest.raises(data.DataError, match=r"3 distinct class ids, more than the 2 classes"):
    data.build_task(cfg(source="fgvc_json", root=str(tmp_path), task="cub", num_classes=2))


# --- demo ---

def test_demo_split_sizes_pixels_and_no_test_in_tune():
  from sklearn.datasets import load_digits
  d = load_digits()
  task = data.build_task(cfg(source="demo", task="digits", image_size=8))
  assert task.num_classes == 10
  assert task.train.num_examples_global == 1000 and task.evals["test"].num_examples_global == 797
  idx = demo.split_indices(1797)
  assert len(set(idx["train800val200"]) & set(idx["test"])) == 0
  np.testing.assert_array_equal(task.train.labels, d.target[idx["train800val200"]])
  want = np.round(d.images[idx["test"][0]] * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(task.evals["test"].images[0], np.repeat(want[..., None], 3, -1))
  tune = data.build_task(cfg(source="demo", task="digits", protocol="tune"))
  assert list(tune.evals) == ["val200"] and tune.train.num_examples_global == 800
  assert tune.evals["val200"].num_examples_global == 200

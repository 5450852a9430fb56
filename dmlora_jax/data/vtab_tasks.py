"""The registry of the 19 VTAB-1k tasks: folder name, class count, group, TFDS name/version,
split strings, labels. (The FGVC sets are in fgvc.DATASETS.)

Facts follow google-research/task_adaptation (the README section "Preparing VTAB-1k and
FGVC" says where this table departs from ../shared/PROTOCOL.md). Label functions are numpy functions of one
TFDS example (as yielded by `tfds.as_numpy`) and mirror the TF originals exactly.
"""

import dataclasses
from typing import Callable

import numpy as np

SPLITS = ("train800", "val200", "train800val200", "test")

# Example counts of the TFDS splits (TFDS catalog), used when a builder's info has none
# (e.g. under tfds.testing.mock_data) to resolve the percentage rules to example indices.
TFDS_SPLIT_SIZES = {
    "cifar100": {"train": 50000, "test": 10000},
    "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn_cropped": {"train": 73257, "test": 26032},
    "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat/rgb": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection/btgraham-300": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites": {"train": 737280},
    "smallnorb": {"train": 24300, "test": 24300},
}


def _pct(counts: dict, split: str, percent: int) -> int:
  return percent * counts[split] // 100


def val_split(counts: dict) -> dict:
  """Official validation split: val200 = validation[:200]."""
  del counts
  return {"train800": "train[:800]", "val200": "validation[:200]",
          "train800val200": "train[:800]+validation[:200]", "test": "test"}


def carve_train(val_percent: int, test: str | None = None) -> Callable[[dict], dict]:
  """val200 = train[n:n+200] with n = val_percent * |train| // 100; test as given or `test`."""
  def fn(counts: dict) -> dict:
    n = _pct(counts, "train", val_percent)
    t = test.format(**{f"n{p}": _pct(counts, "train", p) for p in (80, 90)}) if test else "test"
    return {"train800": "train[:800]", "val200": f"train[{n}:{n + 200}]",
            "train800val200": f"train[:800]+train[{n}:{n + 200}]", "test": t}
  return fn


def smallnorb_splits(counts: dict) -> dict:
  del counts
  return {"train800": "train[:800]", "val200": "test[:200]",
          "train800val200": "train[:800]+test[:200]", "test": "test[50%:]"}


def _first_below(thresholds, value: float) -> int:
  """Index of the last threshold strictly below `value` (tf.reduce_max(tf.where(thrs < v)));
  -1 when none is, which the range check then reports."""
  idx = np.nonzero(np.asarray(thresholds, np.float64) - value < 0)[0]
  return int(idx.max()) if idx.size else -1


def label(ex: dict) -> int:
  return int(ex["label"])


def clevr_count(ex: dict) -> int:
  return int(np.size(ex["objects"]["size"])) - 3  # CLEVR scenes hold 3..10 objects


def clevr_dist(ex: dict) -> int:
  dist = float(np.min(ex["objects"]["pixel_coords"][:, 2]))
  return _first_below([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], dist)


def kitti_dist(ex: dict) -> int:
  """Closest Car/Van/Truck (type < 3) depth; 1000 when there is none (the 4th class)."""
  obj = ex["objects"]
  z = np.asarray(obj["location"])[:, 2][np.asarray(obj["type"]) < 3]
  dist = float(np.min(np.concatenate([z, [1000.0]])))
  return _first_below([-100.0, 8.0, 20.0, 999.0], dist)


def binned(key: str, original: int, classes: int) -> Callable[[dict], int]:
  factor = np.float32(original / classes)  # TF divides in float32
  return lambda ex: int(np.floor_divide(np.float32(ex[key]), factor))


def field(key: str) -> Callable[[dict], int]:
  return lambda ex: int(ex[key])


def identity_image(a: np.ndarray) -> np.ndarray:
  return a


def dsprites_image(a: np.ndarray) -> np.ndarray:
  """dSprites pixels are 0/1: scale to 0/255 (saturating, so other values cannot wrap)."""
  return np.minimum(a.astype(np.int32) * 255, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class VtabTask:
  name: str  # NOAH folder name
  tfds_name: str  # name:version pattern
  num_classes: int
  group: str
  splits: Callable[[dict], dict]  # TFDS split sizes -> split strings of SPLITS
  label_fn: Callable[[dict], int] = label
  image_fn: Callable[[np.ndarray], np.ndarray] = identity_image  # grey is tiled later
  fallback_tfds_name: str = ""  # used (with a warning) when the pinned version cannot be built

  @property
  def dataset(self) -> str:
    return self.tfds_name.split(":")[0]

  def split_strings(self, counts: dict | None = None) -> dict:
    sizes = dict(TFDS_SPLIT_SIZES.get(self.dataset, {}))
    sizes.update(counts or {})
    return self.splits(sizes)


TASKS = {t.name: t for t in [
    VtabTask("cifar", "cifar100:3.*.*", 100, "natural", carve_train(90)),
    VtabTask("caltech101", "caltech101:3.*.*", 102, "natural", carve_train(90)),
    VtabTask("dtd", "dtd:3.*.*", 47, "natural", val_split),
    VtabTask("oxford_flowers102", "oxford_flowers102:2.*.*", 102, "natural", val_split),
    # TFDS >= 4.9 only builds 4.0.0 ("fix corrupt images, add head boxes"; same labels/splits).
    VtabTask("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", 37, "natural", carve_train(80),
             fallback_tfds_name="oxford_iiit_pet:4.*.*"),
    VtabTask("svhn", "svhn_cropped:3.*.*", 10, "natural", carve_train(90)),
    VtabTask("sun397", "sun397/tfds:4.*.*", 397, "natural", val_split),
    VtabTask("patch_camelyon", "patch_camelyon:2.*.*", 2, "specialized", val_split),
    VtabTask("eurosat", "eurosat/rgb:2.*.*", 10, "specialized", carve_train(60, "train[{n80}:]")),
    VtabTask("resisc45", "resisc45:3.*.*", 45, "specialized", carve_train(60, "train[{n80}:]")),
    VtabTask("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
             "specialized", val_split),
    VtabTask("clevr_count", "clevr:3.*.*", 8, "structured", carve_train(90, "validation"), clevr_count),
    VtabTask("clevr_dist", "clevr:3.*.*", 6, "structured", carve_train(90, "validation"), clevr_dist),
    VtabTask("dmlab", "dmlab:2.0.1", 6, "structured", val_split),
    VtabTask("kitti", "kitti:3.1.0", 4, "structured", val_split, kitti_dist),
    VtabTask("dsprites_loc", "dsprites:2.*.*", 16, "structured", carve_train(80, "train[{n90}:]"),
             binned("label_x_position", 32, 16), dsprites_image),
    VtabTask("dsprites_ori", "dsprites:2.*.*", 16, "structured", carve_train(80, "train[{n90}:]"),
             binned("label_orientation", 40, 16), dsprites_image),
    VtabTask("smallnorb_azi", "smallnorb:2.*.*", 18, "structured", smallnorb_splits, field("label_azimuth")),
    VtabTask("smallnorb_ele", "smallnorb:2.*.*", 9, "structured", smallnorb_splits, field("label_elevation")),
]}

# The three groups, each in the order of published tables (the sweep and the report use it).
GROUPS = {g.capitalize(): tuple(n for n, t in TASKS.items() if t.group == g)
          for g in ("natural", "specialized", "structured")}

"""The 5 FGVC sets in the VPT layout: <dataset dir>/{train,val,test}.json + an image folder.

`<dataset dir>` is `config.data.root/<task>` (task = cub | nabirds | oxford_flowers |
stanford_dogs | stanford_cars, or any other folder in this layout), or `config.data.root`
itself when it directly holds train.json. JSON files map relative image paths to class ids;
ids are mapped to contiguous labels in sorted order over all three files.
"""

import dataclasses
import json
import os

import numpy as np

from dmlora_jax.data import sources
from dmlora_jax.data.images import ImageRef
from dmlora_jax.data.split import DataError, one_line


@dataclasses.dataclass(frozen=True)
class FgvcSet:
  name: str
  num_classes: int
  image_dir: str  # relative to the dataset dir ('' = the dataset dir itself)


DATASETS = {d.name: d for d in [
    FgvcSet("cub", 200, "images"),
    FgvcSet("nabirds", 555, "images"),
    FgvcSet("oxford_flowers", 102, ""),
    FgvcSet("stanford_dogs", 120, "Images"),
    FgvcSet("stanford_cars", 196, ""),
]}

# protocol -> (train files, eval split name, eval file)
PROTOCOLS = {"final": (("train", "val"), "test", "test"), "tune": (("train",), "val", "val")}


def dataset_dir(root: str, task: str) -> str:
  sources.require_dir(root, "config.data.root")
  path = os.path.join(root, task) if task else root
  if task and os.path.isfile(os.path.join(path, "train.json")):
    return path
  if os.path.isfile(os.path.join(root, "train.json")):  # root is itself the dataset folder
    return root
  sets = [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "train.json"))]
  raise DataError(f"FGVC dataset {task!r} not found: no {os.path.join(path, 'train.json')}; folders "
                  f"under {root} with train.json: {', '.join(sets) or '<none>'}; everything there: "
                  f"{sources.listing(root)}")


def read_json(path: str) -> list[tuple[str, int]]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path} not found; {os.path.dirname(path)} holds: "
                    f"{sources.listing(os.path.dirname(path))}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({one_line(e)})") from None
  if not isinstance(data, dict):
    raise DataError(f"{path}: expected a JSON object {{\"relative/path.jpg\": class_id}}, got {type(data).__name__}")
  out = []
  for i, (rel, cid) in enumerate(data.items(), 1):
    if isinstance(cid, bool) or not isinstance(cid, int):
      raise DataError(f"{path}: entry {i} ({rel!r}) has class id {cid!r}; expected an integer")
    out.append((rel, cid))
  return out


def splits(cfg, names_unused=None) -> tuple[int, dict]:
  """-> (num_classes, {train split name: FileSplit, eval split name: FileSplit})."""
  if cfg.protocol not in PROTOCOLS:
    raise DataError(f"unknown protocol {cfg.protocol!r}; expected final or tune")
  path = dataset_dir(cfg.root, cfg.task)
  spec = DATASETS.get(cfg.task)
  image_dir = os.path.join(path, spec.image_dir) if spec else path
  files = {n: os.path.join(path, f"{n}.json") for n in ("train", "val", "test")}
  entries = {n: read_json(f) for n, f in files.items()}
  ids = sorted({cid for e in entries.values() for _, cid in e})
  to_label = {cid: i for i, cid in enumerate(ids)}
  if cfg.num_classes > 0:
    num_classes, why = int(cfg.num_classes), "config.data.num_classes"
  elif spec:
    num_classes, why = spec.num_classes, f"FGVC set {spec.name}"
  else:
    num_classes, why = len(ids), "distinct class ids in the JSON files"
  if len(ids) > num_classes:
    raise DataError(f"{path}: the JSON files hold {len(ids)} distinct class ids, more than the "
                    f"{num_classes} classes ({why}); labels would fall outside [0, {num_classes})")
  train_files, eval_name, eval_file = PROTOCOLS[cfg.protocol]

  def make(name: str, parts) -> sources.FileSplit:
    refs, labels = [], []
    for part in parts:
      for i, (rel, cid) in enumerate(entries[part], 1):
        refs.append(ImageRef(os.path.join(image_dir, rel), files[part], i, json=True))
        labels.append(to_label[cid])
    if not refs:
      raise DataError(f"split {name} is empty: {', '.join(files[p] for p in parts)} list no images")
    sources.check_exist(refs, ", ".join(files[p] for p in parts))
    return sources.FileSplit(name, refs, np.asarray(labels, np.int32))

  train_name = "+".join(train_files)
  return num_classes, {train_name: make(train_name, train_files), eval_name: make(eval_name, (eval_file,))}

"""The NOAH VTAB-1k folder layout: <root>/<task>/{train800,val200,train800val200,test}.txt.

Each list line is "images/<split>/NNNNNN.jpg <label>", relative to the task folder.
"""

import os

import numpy as np

from dmlora_jax.data import sources, vtab_tasks
from dmlora_jax.data.images import ImageRef
from dmlora_jax.data.split import DataError


def read_list(path: str, base: str) -> tuple[list, np.ndarray]:
  """Parses a list file -> ([ImageRef], int32 labels); malformed lines name file:line."""
  refs, labels = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, raw in enumerate(f, 1):
      line = raw.strip()
      if not line:
        continue
      rel, _, lab = line.rpartition(" ")  # rpartition: paths may contain spaces
      rel = rel.strip()
      try:
        value = int(lab)
      except ValueError:
        value = None
      if not rel or value is None:
        raise DataError(f"{path}:{lineno}: malformed line {line!r}; expected '<image path> <integer label>'")
      refs.append(ImageRef(os.path.join(base, rel), path, lineno))
      labels.append(value)
  return refs, np.asarray(labels, np.int64)


def check_labels(refs, labels: np.ndarray, num_classes: int, why: str) -> None:
  bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
  if bad.size:
    r = refs[bad[0]]
    raise DataError(f"label {labels[bad[0]]} outside [0, {num_classes}) ({why}) for {r.path} "
                    f"at {r.where} ({bad.size} such line(s))")


def task_dir(root: str, task: str) -> str:
  sources.require_dir(root, "config.data.root")
  path = os.path.join(root, task)
  if not task or not os.path.isdir(path):
    tasks = [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "train800.txt"))]
    raise DataError(f"task {task!r} not found under config.data.root={root}; task folders there "
                    f"(with train800.txt): {', '.join(tasks) or '<none>'}; everything there: "
                    f"{sources.listing(root)}")
  return path


def read_classes(path: str) -> list[str] | None:
  f = os.path.join(path, "classes.txt")
  if not os.path.isfile(f):
    return None
  with open(f, encoding="utf-8") as fh:
    return [l.strip() for l in fh if l.strip()]


def splits(cfg, names: tuple[str, ...]) -> tuple[int, dict]:
  """-> (num_classes, {name: FileSplit}) for the requested list files.

  num_classes: config.data.num_classes if > 0, else the VTAB table for the 19 tasks, else the
  line count of classes.txt if present, else max label + 1 over all list files present.
  """
  path = task_dir(cfg.root, cfg.task)
  lists = {}
  for name in vtab_tasks.SPLITS:
    f = os.path.join(path, f"{name}.txt")
    if os.path.isfile(f):
      lists[name] = read_list(f, path)
    elif name in names:
      raise DataError(f"list file {f} not found; {path} holds: {sources.listing(path)}")
  if cfg.num_classes > 0:
    num_classes, why = int(cfg.num_classes), "config.data.num_classes"
  elif cfg.task in vtab_tasks.TASKS:
    num_classes, why = vtab_tasks.TASKS[cfg.task].num_classes, f"VTAB-1k task {cfg.task}"
  elif read_classes(path):
    num_classes, why = len(read_classes(path)), f"{os.path.join(path, 'classes.txt')}"
  else:
    all_labels = np.concatenate([l for _, l in lists.values()] or [np.zeros(0, np.int64)])
    num_classes, why = int(all_labels.max(initial=-1)) + 1, "max label + 1 of the list files"
  out = {}
  for name in names:
    refs, labels = lists[name]
    if not refs:
      raise DataError(f"split {name} is empty: {os.path.join(path, name + '.txt')} lists no images")
    check_labels(refs, labels, num_classes, why)
    sources.check_exist(refs, os.path.join(path, f"{name}.txt"))
    out[name] = sources.FileSplit(name, refs, labels.astype(np.int32))
  return num_classes, out

r"""Writes VTAB-1k tasks from TFDS in the NOAH folder layout.

  python -m dmlora_jax.data.prepare_vtab1k --out data/vtab-1k [--tasks cifar,dtd] [--data_dir ~/tensorflow_datasets]

For each task: <out>/<task>/{train800,val200,train800val200,test}.txt ("images/<split>/NNNNNN.jpg
<label>"), the JPEG files (native resolution, quality 95, 4:4:4 chroma; `--format png` writes lossless
.png files instead, same layout), classes.txt when TFDS names the
classes, and a `.complete` marker. A task is written into <out>/.<task>.tmp and renamed when
done, so an interrupted run leaves no half task behind; re-running skips complete tasks.
The TFDS datasets must be prepared already (downloading them needs internet).
"""

import argparse
import os
import shutil
import sys
import time

from dmlora_jax.data import images, tfds_source, vtab_tasks
from dmlora_jax.data.split import DataError

MARKER = ".complete"
JPEG_QUALITY = 95

def is_complete(out: str, task: str) -> bool:
  return os.path.isfile(os.path.join(out, task, MARKER))

def write_task(task: vtab_tasks.VtabTask, out: str, data_dir: str = "", quality: int = JPEG_QUALITY,
               fmt: str = "jpg", log=print) -> str:
  """Writes one task folder (atomically, via a temp folder); returns its path."""
  final = os.path.join(out, task.name)
  tmp = os.path.join(out, f".{task.name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted run
  builder = tfds_source.get_builder(task, data_dir)
  strings = task.split_strings(tfds_source.split_counts(builder))
  for split in vtab_tasks.SPLITS:
    os.makedirs(os.path.join(tmp, "images", split))
    src = tfds_source.TfdsSplit(split, task, builder, strings[split], data_dir)
    lines, t0 = [], time.time()
    for i, (img, label) in enumerate(src.examples()):
      rel = f"images/{split}/{i:06d}.{fmt}"
      if fmt == "png":
        images.array_to_rgb(img).save(os.path.join(tmp, rel), "PNG")
      else:
        images.array_to_rgb(img).save(os.path.join(tmp, rel), "JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps colour detail
      lines.append(f"{rel} {label}\n")
      if (i + 1) % 1000 == 0:
        log(f"  {task.name}/{split}: {i + 1} images ({(i + 1) / (time.time() - t0):.0f}/s)")
    if not lines:
      raise DataError(f"task {task.name}: TFDS split {strings[split]!r} is empty")
    with open(os.path.join(tmp, f"{split}.txt"), "w") as f:
      f.writelines(lines)
    log(f"  {task.name}/{split}: {len(lines)} images ({strings[split]})")
  if task.label_fn is vtab_tasks.label:
    names = builder.info.features["label"].names
    with open(os.path.join(tmp, "classes.txt"), "w") as f:
      f.writelines(n + "\n" for n in names)
  with open(os.path.join(tmp, MARKER), "w") as f:
    f.write(f"{task.tfds_name}\n")
  shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from an older run
  os.replace(tmp, final)
  return final

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="root folder to write <task>/ folders into")
  p.add_argument("--tasks", default=",".join(vtab_tasks.TASKS), help="comma-separated task names (default: all 19)")
  p.add_argument("--data_dir", default="", help="TFDS data dir ('' = TFDS default)")
  p.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality")
  p.add_argument("--format", default="jpg", choices=("jpg", "png"), help="jpg (NOAH layout) or lossless png")
  a = p.parse_args(argv)
  names = [t.strip() for t in a.tasks.split(",") if t.strip()]
  unknown = [n for n in names if n not in vtab_tasks.TASKS]
  if unknown:
    print(f"error: unknown task(s) {', '.join(unknown)}; known: {', '.join(vtab_tasks.TASKS)}", file=sys.stderr)
    return 2
  os.makedirs(a.out, exist_ok=True)
  for k, name in enumerate(names, 1):
    if is_complete(a.out, name):
      print(f"[{k}/{len(names)}] {name}: already complete, skipped")
      continue
    print(f"[{k}/{len(names)}] {name}: writing from TFDS {vtab_tasks.TASKS[name].tfds_name}")
    try:
      write_task(vtab_tasks.TASKS[name], a.out, a.data_dir, a.quality, a.format)
    except DataError as e:
      shutil.rmtree(os.path.join(a.out, f".{name}.tmp"), ignore_errors=True)
      print(f"error: {e}", file=sys.stderr)
      return 1
  return 0

if __name__ == "__main__":
  sys.exit(main())

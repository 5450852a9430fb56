"""Image decoding, conversion to RGB and bicubic resizing, in a thread pool.

PIL releases the GIL while it decodes and resizes, so threads scale over cores without the
cost of copying arrays between processes.
"""

import concurrent.futures
import dataclasses
import io
import os
import threading
import time
from typing import Callable, Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from dmlora_jax.data.split import DataError, one_line

# Splits at least this big get a progress line (small VTAB-1k train splits decode in seconds).
PROGRESS_MIN = 2000


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An image file and where it was listed (for error messages)."""
  path: str
  list_file: str
  line: int  # 1-based line of the list file, or entry index of a JSON list
  json: bool = False

  @property
  def where(self) -> str:
    return f"{self.list_file} entry {self.line}" if self.json else f"{self.list_file}:{self.line}"


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB.

  16-bit grey ('I;16*', and 'I' holding values above 255) keeps its top 8 bits; palette
  images go through RGBA when they declare transparency (PIL warns otherwise); alpha is
  dropped as torchvision's loader does, so pixels match the PyTorch repositories.
  """
  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I;16") or mode == "I":
    a = np.asarray(img).astype(np.int64)
    if mode != "I" or a.max(initial=0) > 255:
      a = a >> 8
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
  if mode == "F":
    a = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


def resize(img: Image.Image, size: int) -> np.ndarray:
  """RGB PIL image -> uint8 (size, size, 3), bicubic (the common VTAB-1k recipe)."""
  if size and img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


def array_to_rgb(a: np.ndarray) -> Image.Image:
  """uint8 (H, W), (H, W, 1) or (H, W, 3) array -> RGB PIL image (grey is tiled)."""
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    return Image.fromarray(a, "L").convert("RGB")
  return Image.fromarray(a, "RGB")


def load_file(ref: ImageRef, size: int) -> np.ndarray:
  """Decodes one file to uint8 (size, size, 3); any failure is a one-line DataError."""
  try:
    with Image.open(ref.path) as img:
      img.load()  # forces the full decode so truncated files fail here
      return resize(to_rgb(img), size)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
    raise DataError(f"cannot decode image {ref.path} (listed in {ref.where}): "
                    f"{type(e).__name__}: {one_line(e)}") from None


def decode_bytes(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 (size, size, 3)."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    return resize(to_rgb(img), size)


class _Progress:
  def __init__(self, total: int, desc: str):
    self.total, self.desc, self.done = total, desc, 0
    self.enabled = total >= PROGRESS_MIN
    self.t0 = self.last = time.time()
    self.lock = threading.Lock()

  def add(self, n: int):
    with self.lock:
      self.done += n
      now = time.time()
      if self.enabled and (now - self.last > 5 or self.done == self.total):
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        logging.info("%s: decoded %d/%d images (%.0f img/s, ETA %.0fs)", self.desc, self.done,
                     self.total, rate, eta)


def decode_files(refs: Sequence[ImageRef], size: int, num_workers: int, desc: str = "") -> np.ndarray:
  """Decodes and resizes every file in parallel into one uint8 (N, size, size, 3) array."""
  out = np.empty((len(refs), size, size, 3), np.uint8)
  progress = _Progress(len(refs), desc)

  def work(lo: int, hi: int):
    for i in range(lo, hi):
      out[i] = load_file(refs[i], size)
    progress.add(hi - lo)

  chunk = 32
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as ex:
    futures = [ex.submit(work, lo, min(lo + chunk, len(refs))) for lo in range(0, len(refs), chunk)]
    try:
      for f in concurrent.futures.as_completed(futures):
        f.result()
    except BaseException:
      for f in futures:
        f.cancel()
      raise
  return out


def resize_stream(arrays: Iterable[np.ndarray], size: int, num_workers: int, desc: str = "",
                  count: int | None = None,
                  convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """Resizes a stream of native uint8 arrays in parallel, holding only a few at a time.

  With `count` known the output is filled in place; otherwise results are stacked at the end.
  """
  slots: dict[int, np.ndarray] = {}
  out = np.empty((count, size, size, 3), np.uint8) if count is not None else None
  progress = _Progress(count or 0, desc)
  window = threading.BoundedSemaphore(max(4, 4 * num_workers))  # bounds native images in flight

  def work(i: int, a: np.ndarray):
    try:
      if convert is not None:
        a = convert(a)
      r = resize(array_to_rgb(np.asarray(a, np.uint8)), size)
      if out is not None:
        out[i] = r
      else:
        slots[i] = r
      progress.add(1)
    finally:
      window.release()

  n = 0
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as ex:
    futures = []
    for i, a in enumerate(arrays):
      if count is not None and i >= count:
        raise DataError(f"{desc}: more than the expected {count} examples")
      window.acquire()
      futures.append(ex.submit(work, i, a))
      n += 1
    for f in futures:
      f.result()
  if out is None:
    return np.stack([slots[i] for i in range(n)]) if n else np.zeros((0, size, size, 3), np.uint8)
  if n != count:
    raise DataError(f"{desc}: got {n} examples, expected {count}")
  return out


def cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shard_count_of(num_examples: int | None, index: int, count: int) -> int | None:
  """Size of the strided shard index::count, or None when the total is unknown."""
  return None if num_examples is None else len(range(index, num_examples, count))

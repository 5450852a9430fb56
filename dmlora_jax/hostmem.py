"""Transparent huge pages for host malloc when XLA runs on the CPU.

XLA CPU allocates a train step's temporary buffers afresh on every call. glibc serves the
large ones with mmap and returns them with munmap, so every step first-touches its whole
working set again in 4 KiB pages: about a million minor page faults per ViT-S/16 step
(batch 32, ~4 GB), a quarter of the step time on the 2-core dev VM (benchmarks/README.md).
glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages
(madvise), and the same step takes ~30-50 thousand faults.

The tunable is read when the process starts, so the command-line entry points re-run
themselves once with it set, before JAX is imported. This only happens on Linux with glibc
>= 2.35, transparent huge pages in `madvise` mode (with `always` they are used anyway) and no
GPU or TPU device files (those hosts were not measured). DMLORA_JAX_HUGEPAGES=0 turns it off;
a GLIBC_TUNABLES that already names glibc.malloc.hugetlb is left as it is.
"""

import glob
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OFF_SWITCH = "DMLORA_JAX_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def tunables_with_hugepages(current: str) -> str | None:
  """GLIBC_TUNABLES with malloc huge pages on, or None where `current` already decides it."""
  items = [t for t in current.split(":") if t]
  if any(t.split("=", 1)[0] == TUNABLE for t in items):
    return None
  return ":".join([*items, f"{TUNABLE}=1"])


def _thp_mode(path: str = THP_ENABLED) -> str:
  """The bracketed mode of the kernel's THP setting ('always', 'madvise', 'never'), or ''."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc":
    return False
  try:
    return tuple(int(v) for v in version.split(".")[:2]) >= (major, minor)
  except ValueError:
    return False


def wanted(environ=None) -> bool:
  """Whether this host gets the malloc huge-pages setting (see the module docstring)."""
  env = os.environ if environ is None else environ
  if env.get(OFF_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and not platforms.split(",")[0].strip().startswith("cpu"):
    return False
  if any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")):
    return False  # GPU; TPU (v4/v5e expose /dev/accel*, newer TPU VMs /dev/vfio/N)
  return _thp_mode() == "madvise" and _glibc_at_least(2, 35)


def reexec_with_hugepages() -> None:
  """Re-runs this exact command line with the tunable set; returns where nothing is to do.

  Call it first thing in an entry point's `__main__` block, before JAX is imported.
  """
  if not wanted():
    return
  new = tunables_with_hugepages(os.environ.get("GLIBC_TUNABLES", ""))
  if new is None:
    return
  argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], dict(os.environ, GLIBC_TUNABLES=new))


def cpu_model() -> str:
  """This host's CPU model name (/proc/cpuinfo), or what `platform` knows where that is not readable."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def status() -> str:
  """One line for logs and benchmark records."""
  value = os.environ.get("GLIBC_TUNABLES", "")
  on = any(t == f"{TUNABLE}=1" for t in value.split(":"))
  return f"malloc huge pages {'on' if on else 'off'} (GLIBC_TUNABLES={value!r}, THP {_thp_mode() or 'unknown'})"

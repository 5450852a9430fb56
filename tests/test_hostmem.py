"""hostmem: the GLIBC_TUNABLES rewrite, when it applies, and that the entry points re-exec."""

import json
import os
import subprocess
import sys

from dmlora_jax import hostmem
from conftest import REPO


def test_tunables_value_is_added_once_and_a_user_choice_is_kept():
  assert hostmem.tunables_with_hugepages("") == "glibc.malloc.hugetlb=1"
  assert hostmem.tunables_with_hugepages("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert hostmem.tunables_with_hugepages("glibc.malloc.hugetlb=0") is None
  assert hostmem.tunables_with_hugepages("a=1:glibc.malloc.hugetlb=2") is None


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hostmem._thp_mode(str(f)) == "madvise"
  assert hostmem._thp_mode(str(tmp_path / "missing")) == ""


def test_off_switch_and_accelerator_platforms_opt_out():
  assert not hostmem.wanted({"DMLORA_JAX_HUGEPAGES": "0"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "tpu"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cuda,cpu"})


def test_bench_entry_point_records_the_setting_it_ran_with(tmp_path):
  # `python -m dmlora_jax.bench` re-executes itself with GLIBC_TUNABLES where hostmem wants
  # it; the JSON records what the measuring process actually had.
  out = tmp_path / "b.json"
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DMLORA_JAX_HUGEPAGES")}
  env["PYTHONPATH"] = REPO
  cmd = [sys.executable, "-m", "dmlora_jax.bench", "--variant", "tiny/4", "--image_size", "8", "--batch_size", "2",
         "--steps", "1", "--eval_steps", "1", "--warmup", "0", "--methods", "linear", "--matmul_size", "64",
         "--in_process", "1", f"--json={out}"]
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  line = json.loads(out.read_text())["hardware"]["host_malloc"]
  expect = "on" if hostmem.wanted(env) else "off"
  assert line.startswith(f"malloc huge pages {expect}"), line

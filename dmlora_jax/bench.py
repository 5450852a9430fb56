r"""Speed and memory of full, linear, LoRA and DMLoRA training on random data.

  python -m dmlora_jax.bench --variant S/16 --image_size 224 --batch_size 32 --steps 10 \
      --methods full,linear,lora,dmlora --num_branches 4 --rank 8 --json=bench.json

Every row runs the real per-device train step of steps.py (pmapped over the local devices,
state donated) on a fixed random uint8 batch. All rows are compiled first and then timed
round-robin, one step of each row in turn, with the f32 matmul ceiling in the same rounds,
so that load from other processes on a shared machine hits every row alike; figures are
medians. `peak_memory_bytes` is the backend's device peak where it reports one, else the
peak RSS of a fresh process per row (compile + one train and one eval step); with
--in_process 1 it is this process's cumulative peak instead.

- `lora` uses the same total rank as DMLoRA (K*r) unless --lora_rank says otherwise; with
  --per_branch_lora 1 (default) a second LoRA row `lora_r{r}` has DMLoRA's per-branch rank r.
- `dmlora` also reports merged-model and plain-ViT eval throughput (--merged_steps each,
  interleaved in ABBA order), and hashes
  of the lowered and compiled eval programs of both (equal = the same compiled program).
- --k_sweep 1,2,4,8 adds `dmlora_k{K}` rows; --switches remat,bf16 adds `full_*`/`dmlora_*`
  rows with config.model.remat / config.model.dtype=bfloat16.
- On an accelerator (benchmarks/accelerator.sh): --per_device_batch sets the batch from the
  device count, each row reports its achieved FLOP/s as a fraction of the chip's peak
  (PEAK_FLOPS by `device_kind`, or --peak_flops), dmlora rows compare the merged model's
  logits with the unmerged adapter's, --markdown writes the table, and --combine joins the
  JSONs of several runs (one method per process: a device's peak memory is per process).
XLA flags, if any, come from the XLA_FLAGS environment variable and are recorded.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmlora_jax import config_base, hostmem, layout, merge, methods, partition, pytrees, setup, steps, vit
from dmlora_jax.data import normalize



# ---- helpers ----

def _config(a: argparse.Namespace, method: str, num_branches: int, rank: int, dtype: str = "", remat: str = "",
            scan_layers: int = -1):
  c = config_base.get_base_config()
  c.method = method
  c.model.variant = a.variant
  c.model.dtype = dtype or a.dtype
  c.model.remat = vit.remat_policy(remat or a.remat)
  c.model.scan_layers = bool(a.scan_layers if scan_layers < 0 else scan_layers)
  c.data.image_size = a.image_size
  c.batch_size = a.batch_size
  c.dmlora.num_branches = max(num_branches, 1)
  c.dmlora.rank = rank
  c.dmlora.targets = tuple(a.targets.split(","))
  c.dmlora.drop_schedule, c.dmlora.drop_end = "constant", 0.25  # the cost of a step does not depend on p
  c.model.init_checkpoint = ""
  c.model.attention = a.attention
  return c


def _times(fn, n: int) -> list[float]:
  """Wall time of n calls of fn, each waited for."""
  out = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", 0.0))


def _fingerprint(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# Peak dense bf16 FLOP/s per chip, by a lower-case piece of jax's `device_kind` (first match
# wins: the more specific names come first). From the vendors' data sheets (dense, no sparsity).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The chip's peak bf16 FLOP/s from PEAK_FLOPS, or None (CPUs and chips not in the table)."""
  kind = device_kind.lower()
  return next((f for name, f in PEAK_FLOPS if name in kind), None)


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the device's peak where the backend reports one, else peak RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def _on_devices(tree: Any) -> Any:
  """(n_dev, ...) host arrays -> arrays sharded over the local devices along axis 0."""
  return jax.device_put(tree, steps.local_sharding())


class Matmul:
  """f32 (n x n) @ (n x n) through jax.jit: the machine's ceiling. Timed in the same
  round-robin as the rows, so that it sees the same load."""

  def __init__(self, n: int):
    k1, k2 = jax.random.split(jax.random.key(0))
    self.n = n
    self.a = jax.random.normal(k1, (n, n), jnp.float32)
    self.b = jax.random.normal(k2, (n, n), jnp.float32)
    self.f = jax.jit(jnp.dot).lower(self.a, self.b).compile()
    jax.block_until_ready(self.f(self.a, self.b))
    self.times = []

  def step(self, repeats: int = 3) -> float:
    """The best of a few calls (one call is short next to a train step)."""
    return min(_times(lambda: self.f(self.a, self.b), repeats))

  def result(self) -> dict:
    t = statistics.median(self.times)
    return {"n": self.n, "median_s": t, "flops_per_s": 2.0 * self.n ** 3 / t, "times_s": self.times}


# ---- one method ----

class Row:
  """One method's compiled train and eval steps on a fixed random batch; times them one call
  at a time, so that several rows can be interleaved (fair on a shared machine)."""

  def __init__(self, a: argparse.Namespace, method: str, num_branches: int, rank: int, dtype: str = "",
               remat: str = ""):
    self.a, self.method = a, method
    c = self.config = config_base.resolve(_config(a, method, num_branches, rank, dtype, remat))
    s = setup.build(c, a.num_classes)  # the model and params exactly as a training run builds them
    self.adapter, model = s.adapter, s.model
    n_dev = self.n_dev = jax.local_device_count()
    if a.batch_size % n_dev:
      raise ValueError(f"--batch_size {a.batch_size} is not divisible by the {n_dev} local devices")
    self.counts = setup.count(s.trainable), setup.count(s.params)
    plan = setup.Plan(steps_per_epoch=100, stage1_steps=1000, stage2_steps=0)
    tx, _ = s.optimizer(1, plan)
    train = steps.pmap_train_step(steps.make_train_step(model, tx, s.step_config(1, plan)))
    self.state = steps.replicate(s.host_state(1, plan))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch_size, a.image_size, a.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, a.num_classes, (a.batch_size,), dtype=np.int32)
    self.batch = _on_devices(steps.shard_batch({"image": images, "label": labels}, n_dev))
    self.eval_batch = _on_devices(steps.shard_batch(
        {"image": images, "label": labels, "mask": np.ones((a.batch_size,), np.float32)}, n_dev))
    self.base_key = jax.random.key(1)
    t0 = time.perf_counter()
    self.train_c = train.lower(self.state, self.batch, self.base_key).compile()
    self.compile_s = time.perf_counter() - t0
    self.step_flops = _flops(self.train_c) * n_dev  # cost analysis is of the per-device program
    t0 = time.perf_counter()
    self.eval_c = steps.pmap_eval_step(steps.make_eval_step(model, "imagenet")).lower(
        self.state, self.eval_batch).compile()
    self.eval_compile_s = time.perf_counter() - t0
    self.i, self.train_times, self.eval_times, self.train_faults = 0, [], [], []
    self.model, self.images = model, images

  def train_step(self) -> tuple[float, int]:
    """One train step: (wall seconds, minor page faults of the whole process meanwhile)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    self.state, m = self.train_c(self.state, self.batch, jax.random.fold_in(self.base_key, self.i))
    jax.block_until_ready(m["loss"])
    dt = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    self.i += 1
    return dt, faults

  def eval_step(self) -> float:
    t = time.perf_counter()
    jax.block_until_ready(self.eval_c(self.state, self.eval_batch))
    return time.perf_counter() - t

  def result(self) -> dict:
    a, ad = self.a, self.adapter
    step_s, eval_s = statistics.median(self.train_times), statistics.median(self.eval_times)
    out = {
        "method": self.method, "num_branches": ad.num_branches if ad else 0, "rank": ad.rank if ad else 0,
        "dtype": self.config.model.dtype, "remat": self.config.model.remat,
        "scan_layers": self.config.model.scan_layers,
        "attention": self.config.model.attention,
        "train_images_per_s": a.batch_size / step_s, "train_step_s": step_s, "train_step_times_s": self.train_times,
        "train_step_minor_faults": self.train_faults,
        "eval_images_per_s": a.batch_size / eval_s, "eval_step_s": eval_s, "compile_s": self.compile_s,
        "eval_compile_s": self.eval_compile_s,
        "trainable_params": self.counts[0], "total_params": self.counts[1],
        "step_flops": self.step_flops, "achieved_flops_per_s": self.step_flops / step_s,
        "eval_flops": _flops(self.eval_c) * self.n_dev,
    }
    peak = a.peak_flops or peak_flops(jax.local_devices()[0].device_kind)
    out["chip_peak_flops_per_s"] = peak
    out["fraction_of_peak"] = None if not peak else out["achieved_flops_per_s"] / (peak * self.n_dev)
    if self.method == "dmlora":
      out.update(_merged_vs_plain(a, self.config, self.state, self.eval_batch, self.eval_c))
      out.update(_merged_logits(self.model, self.config, self.state, self.images[:a.logits_images]))
    return out


def measure_rows(a: argparse.Namespace, specs: list[tuple]) -> tuple[dict[str, dict], dict]:
  """Compiles every row, then times them round-robin (step i of every row, then step i+1),
  so that load from other processes on a shared machine hits every row alike."""
  rows = {}
  for name, *spec in specs:
    print(f"[bench] compiling {name}: {spec}", file=sys.stderr, flush=True)
    rows[name] = Row(a, *spec)
  mm = Matmul(a.matmul_size)
  for _ in range(a.warmup):
    for row in rows.values():
      row.train_step(), row.eval_step()
  for _ in range(a.steps):
    for row in rows.values():
      dt, faults = row.train_step()
      row.train_times.append(dt)
      row.train_faults.append(faults)
    mm.times.append(mm.step())
  for _ in range(a.eval_steps):
    for row in rows.values():
      row.eval_times.append(row.eval_step())
    mm.times.append(mm.step())
  return {name: row.result() for name, row in rows.items()}, mm.result()


def _merged_vs_plain(a, c, state_dev, eval_batch, adapter_eval_c) -> dict:
  """Eval throughput of the merged params and of a plain ViT (adapter=None), interleaved
  so that load changes hit both alike, and the fingerprints of their programs."""
  host = steps.unreplicate(state_dev.replace(opt_state=None))
  merged = merge.merge_params(pytrees.join(host.frozen, host.trainable))
  plain_model = setup.build_model(c, a.num_classes)
  x0 = jnp.zeros((1, a.image_size, a.image_size, 3), jnp.float32)
  # Public layout, as the merged params (with model.scan_layers both are stacked in the step).
  plain = jax.tree.map(np.asarray, layout.unstack(jax.jit(plain_model.init)(jax.random.key(2), x0)["params"]))
  ev = steps.pmap_eval_step(steps.make_eval_step(plain_model, "imagenet"))

  def eval_state(params):  # every leaf in `frozen`: eval only joins the two
    return steps.replicate(steps.TrainState(step=np.int32(0), trainable={}, frozen=params, opt_state=None))

  progs = {}
  for name, p in (("merged", merged), ("plain", plain)):
    s = eval_state(p)
    lowered = ev.lower(s, eval_batch)
    comp = lowered.compile()
    jax.block_until_ready(comp(s, eval_batch))
    progs[name] = (s, lowered.as_text(), comp)
  times = {"merged": [], "plain": []}
  for i in range(a.merged_steps):  # ABBA order: a drift in load hits both alike
    for name in (("merged", "plain") if i % 2 == 0 else ("plain", "merged")):
      s, _, comp = progs[name]
      times[name] += _times(lambda: comp(s, eval_batch), 1)
  med = {k: statistics.median(v) for k, v in times.items()}
  fp = {k: {"lowered_hlo_sha256": _fingerprint(v[1]), "compiled_hlo_sha256": _fingerprint(v[2].as_text()),
            "eval_flops": _flops(v[2])} for k, v in progs.items()}
  return {
      "merged_eval_images_per_s": a.batch_size / med["merged"],
      "plain_eval_images_per_s": a.batch_size / med["plain"],
      "merged_over_plain_eval": med["plain"] / med["merged"],
      "programs": {**fp, "unmerged_adapter": {"compiled_hlo_sha256": _fingerprint(adapter_eval_c.as_text()),
                                              "eval_flops": _flops(adapter_eval_c)}},
      "merged_is_plain_program": fp["merged"]["lowered_hlo_sha256"] == fp["plain"]["lowered_hlo_sha256"]
                                 and fp["merged"]["compiled_hlo_sha256"] == fp["plain"]["compiled_hlo_sha256"],
  }


def _merged_logits(model, c, state_dev, images) -> dict:
  """The trained adapter's logits (all branches, eval) against the merged params' logits on
  the plain ViT, on the first images of the batch: the merge is exact up to rounding in the
  compute dtype (the B matrices are no longer zero after the timed steps)."""
  host = steps.unreplicate(state_dev.replace(opt_state=None))
  params = pytrees.join(host.frozen, host.trainable)
  x = normalize(jnp.asarray(images), "imagenet")
  plain = setup.build_model(c, model.cfg.num_classes)
  adapter = np.asarray(jax.jit(model.apply)({"params": layout.for_model(model, params)}, x), np.float64)
  merged = np.asarray(jax.jit(plain.apply)({"params": layout.for_model(plain, merge.merge_params(params))}, x), np.float64)
  return {"merged_logits_max_abs_diff": float(np.max(np.abs(adapter - merged))),
          "logits_max_abs": float(np.max(np.abs(adapter))), "logits_images": int(len(images))}


# ---- the run ----

# --switches: name -> the row's model.remat ("" = --remat); remat is the policy `full`.
SWITCHES = {"remat": "full", "dots": "dots", "bf16": ""}


def _runs(a) -> list[tuple]:
  """(row name, method, K, per-branch rank[, dtype, remat]) for every row to measure."""
  k, r = a.num_branches, a.rank
  lora_rank = a.lora_rank if a.lora_rank > 0 else k * r
  rows = []
  for m in a.methods.split(","):
    if m not in methods.METHODS:
      raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(methods.METHODS)}")
    if m == "lora":
      rows.append(("lora", "lora", 1, lora_rank))
      if a.per_branch_lora and lora_rank != r:
        rows.append((f"lora_r{r}", "lora", 1, r))
    elif m == "dmlora":
      rows.append(("dmlora", "dmlora", k, r))
    else:
      rows.append((m, m, 0, 0))
  for kk in (int(x) for x in a.k_sweep.split(",") if x):
    rows.append((f"dmlora_k{kk}", "dmlora", kk, r))
  for sw in filter(None, a.switches.split(",")):
    if sw not in SWITCHES:
      raise ValueError(f"--switches: unknown switch {sw!r}; choose from {', '.join(SWITCHES)}")
    for name, method, kk, rr in [x for x in rows if x[0] in ("full", "dmlora")]:
      rows.append((f"{name}_{sw}", method, kk, rr, "bfloat16" if sw == "bf16" else "", SWITCHES[sw]))
  if a.attention != "auto":  # e.g. dmlora_cudnn: a row beside the default's in a combined table
    rows = [(f"{x[0]}_{a.attention}", *x[1:]) for x in rows]
  return rows


def child_peak_memory(a: argparse.Namespace, spec: tuple[str, str, int, int]) -> dict:
  """Peak memory of one row in a fresh Python process: compile, one train step, one eval step."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  argv = [sys.executable, "-m", "dmlora_jax.bench", *a.raw_argv, f"--_child={json.dumps(spec)}",
          f"--_child_out={path}"]
  try:
    subprocess.run(argv, check=True)
    with open(path) as f:
      return json.load(f)
  finally:
    os.remove(path)


def _child_main(a: argparse.Namespace) -> None:
  _, *spec = json.loads(a._child)
  if a.compile_only:
    with open(a._child_out, "w") as f:
      json.dump(compile_row(a, *spec), f)
    return
  row = Row(a, *spec)
  row.train_step(), row.eval_step()
  mem, source = peak_memory()
  with open(a._child_out, "w") as f:
    json.dump({"peak_memory_bytes": mem, "peak_memory_source": source}, f)


# ---- compile only ----

def compile_row(a: argparse.Namespace, method: str, num_branches: int, rank: int, dtype: str = "", remat: str = "",
                scan_layers: int = 0) -> dict:
  """One row's train step compiled from abstract shapes (jax.eval_shape: no parameter is
  allocated, so ViT-H compiles on a small machine): compile seconds, XLA's memory analysis of
  the compiled step (arguments + outputs + temporaries - aliased = what one step needs) and
  the peak RSS of this process (compiling included). Run it in a fresh process per row."""
  c = config_base.resolve(_config(a, method, num_branches, rank, dtype, remat, scan_layers))
  m = methods.get(c.method)
  adapter = m.adapter(c)
  model = setup.build_model(c, a.num_classes, adapter)
  x0 = jax.ShapeDtypeStruct((1, a.image_size, a.image_size, 3), jnp.float32)
  # the public layout, as setup.init_params returns it (the unrolled model's init)
  public_model = vit.ViT(dataclasses.replace(model.cfg, scan_layers=False), adapter)
  params = jax.eval_shape(public_model.init, jax.random.key(0), x0)["params"]
  trainable, frozen = partition.split(params, m.owned)
  s = setup.Setup(c, m, adapter, model, params, trainable, frozen, "abstract", a.num_classes)
  plan = setup.Plan(steps_per_epoch=100, stage1_steps=1000, stage2_steps=0)
  tx, _ = s.optimizer(1, plan)
  state = steps.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                           frozen=jax.eval_shape(lambda f: layout.for_model(model, f), frozen),
                           opt_state=jax.eval_shape(tx.init, trainable))
  n = jax.local_device_count()
  dev = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype), t)
  batch = {"image": jax.ShapeDtypeStruct((n, a.batch_size // n, a.image_size, a.image_size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((n, a.batch_size // n), jnp.int32)}
  train = steps.pmap_train_step(steps.make_train_step(model, tx, s.step_config(1, plan)))
  t0 = time.perf_counter()
  compiled = train.lower(dev(state), batch, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  out = {"method": method, "num_branches": adapter.num_branches if adapter else 0, "rank": adapter.rank if adapter else 0,
         "dtype": c.model.dtype, "remat": c.model.remat, "scan_layers": c.model.scan_layers, "compile_s": compile_s,
         "trainable_params": setup.count(trainable), "total_params": setup.count(params),
         "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  ma = compiled.memory_analysis()
  if ma is not None:
    for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes"):
      out[f] = int(getattr(ma, f, 0) or 0)
    out["step_memory_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                                - out["alias_size_in_bytes"])
  return out


def compile_table(res: dict) -> str:
  lines = ["| row | scan | remat | trainable | total | compile s | step memory MiB (XLA: args + out + temp - alias) | "
           "temp MiB | compiling process peak RSS MiB |", "|" + " --- |" * 9]
  for name, m in res["methods"].items():
    mib = lambda k: f"{m[k] / 2**20:,.0f}" if k in m else "-"
    lines.append(f"| {name} | {int(m['scan_layers'])} | {m['remat']} | {m['trainable_params']:,} | {m['total_params']:,} | "
                 f"{m['compile_s']:.1f} | {mib('step_memory_bytes')} | {mib('temp_size_in_bytes')} | "
                 f"{mib('process_peak_rss_bytes')} |")
  return "\n".join(lines)


def hardware() -> dict:
  return {"cpu_model": hostmem.cpu_model(), "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.local_devices()],
          "device_kind": jax.local_devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "host_malloc": hostmem.status(),
          "load_average_1_5_15": list(os.getloadavg())}


def table(res: dict) -> str:
  ceil = res["matmul"]["flops_per_s"]
  lines = ["| row | K | rank | dtype | remat | scan | trainable | total | train img/s | step s | eval img/s | compile s | "
           "step GFLOP | GFLOP/s | % matmul | % chip peak | peak MiB |", "|" + " --- |" * 17]
  for name, m in res["methods"].items():
    frac = m.get("fraction_of_peak")
    lines.append(f"| {name} | {m['num_branches']} | {m['rank']} | {m['dtype']} | {vit.remat_policy(m['remat'])} | {int(m.get('scan_layers', False))} | {m['trainable_params']:,} | {m['total_params']:,} | "
                 f"{m['train_images_per_s']:.2f} | {m['train_step_s']:.3f} | {m['eval_images_per_s']:.2f} | "
                 f"{m['compile_s']:.1f} | {m['step_flops'] / 1e9:.1f} | {m['achieved_flops_per_s'] / 1e9:.1f} | "
                 f"{100 * m['achieved_flops_per_s'] / ceil:.0f}% | {'-' if frac is None else f'{100 * frac:.1f}%'} | "
                 f"{m['peak_memory_bytes'] / 2**20:.0f} |")
  mm = res["matmul"]
  hw = res["hardware"]
  lines.append(f"\n{hw.get('device_kind', '?')} x {len(hw['devices'])} ({hw['backend']}); % chip peak: achieved FLOP/s "
               "(XLA's count of the compiled step) over the chip's peak dense bf16 FLOP/s (bench.PEAK_FLOPS)")
  lines.append(f"f32 matmul {mm['n']}^3: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s (median {mm['median_s'] * 1e3:.1f} ms)")
  for name, m in res["methods"].items():
    if "merged_logits_max_abs_diff" in m:
      lines.append(f"{name}: merged vs unmerged logits on {m['logits_images']} images: max |diff| "
                   f"{m['merged_logits_max_abs_diff']:.3g} (max |logit| {m['logits_max_abs']:.3g}, {m['dtype']})")
  if "dmlora" in res["methods"]:
    d = res["methods"]["dmlora"]
    lines.append(f"dmlora merged eval {d['merged_eval_images_per_s']:.2f} img/s, plain ViT eval "
                 f"{d['plain_eval_images_per_s']:.2f} img/s (ratio {d['merged_over_plain_eval']:.3f}); "
                 f"same program: {d['merged_is_plain_program']} "
                 f"(lowered {d['programs']['merged']['lowered_hlo_sha256']} vs "
                 f"{d['programs']['plain']['lowered_hlo_sha256']})")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", default="S/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--num_classes", type=int, default=100)
  ap.add_argument("--steps", type=int, default=10, help="timed train steps after compilation and warm-up")
  ap.add_argument("--merged_steps", type=int, default=10,
                  help="timed eval steps of the merged and of the plain ViT each (interleaved)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed train steps after compilation")
  ap.add_argument("--eval_steps", type=int, default=5, help="timed eval steps")
  ap.add_argument("--methods", default="full,linear,lora,dmlora")
  ap.add_argument("--num_branches", type=int, default=4)
  ap.add_argument("--rank", type=int, default=8, help="rank of each DMLoRA branch")
  ap.add_argument("--lora_rank", type=int, default=0, help="LoRA rank; 0 = the same total rank, K * rank")
  ap.add_argument("--per_branch_lora", type=int, default=1,
                  help="1: also measure LoRA at DMLoRA's per-branch rank (row lora_r{rank})")
  ap.add_argument("--targets", default="query,key,value", help="adapted projections")
  ap.add_argument("--k_sweep", default="", help="e.g. 1,2,4,8: extra dmlora_k{K} rows")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--remat", default="none", help="config.model.remat: none | full | dots (1/0: full/none)")
  ap.add_argument("--scan_layers", type=int, default=0, help="1: config.model.scan_layers (blocks under nn.scan)")
  ap.add_argument("--switches", default="",
                  help="e.g. remat,dots,bf16: extra full_/dmlora_ rows with remat=full, remat=dots or bfloat16")
  ap.add_argument("--compile_only", default="",
                  help="e.g. 0,1: measure no steps; compile each row's train step from abstract shapes (no params "
                       "in memory) with scan_layers=0 and =1, each in a fresh process: compile seconds, XLA's "
                       "memory analysis of the step and the compiling process's peak RSS")
  ap.add_argument("--matmul_size", type=int, default=2048)
  ap.add_argument("--in_process", type=int, default=0,
                  help="1: no fresh process per row for peak memory (faster; peak memory is then cumulative)")
  ap.add_argument("--attention", default="auto", choices=config_base.ATTENTION,
                  help="config.model.attention; other than auto, the row names get _{attention}")
  ap.add_argument("--per_device_batch", type=int, default=0,
                  help="> 0: --batch_size is this times the number of local devices")
  ap.add_argument("--peak_flops", type=float, default=0.0,
                  help="the chip's peak FLOP/s; 0 = from PEAK_FLOPS by jax's device_kind (none on CPU)")
  ap.add_argument("--logits_images", type=int, default=8, help="images of the merged-vs-unmerged logits check")
  ap.add_argument("--combine", default="",
                  help="comma-separated bench JSONs to join into one (--json, --markdown); measures nothing")
  ap.add_argument("--markdown", default="", help="where the Markdown table goes")
  ap.add_argument("--json", default="", help="where the results go")
  ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--_child_out", default="", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  a.raw_argv = [x for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--_child")]
  return a


def combine(paths: list[str]) -> dict:
  """Several bench JSONs (e.g. one method per process) as one: their rows side by side, the
  first one's hardware and matmul ceiling, each run's command and settings under `runs`."""
  out = None
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    if out is None:
      out = dict(r, methods={}, runs=[])
    clash = set(out["methods"]) & set(r["methods"])
    if clash:
      raise ValueError(f"--combine: rows {sorted(clash)} are in more than one file ({path})")
    out["methods"].update(r["methods"])
    out["runs"].append({"file": path, "command": r["command"], "settings": r["settings"]})
  return out


def _write(a, res: dict) -> None:
  text = table(res)
  print(text)
  for path, body in ((a.json, lambda f: json.dump(res, f, indent=1)), (a.markdown, lambda f: f.write(text + "\n"))):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w") as f:
        body(f)


def main(argv=None) -> dict | None:
  a = parse_args(argv)
  if a.combine:
    res = combine([p for p in a.combine.split(",") if p])
    _write(a, res)
    return res
  if a.per_device_batch > 0:
    a.batch_size = a.per_device_batch * jax.local_device_count()
  if a._child:
    _child_main(a)
    return None
  res = {"command": "python -m dmlora_jax.bench " + " ".join(a.raw_argv), "hardware": hardware(),
         "settings": {k: v for k, v in vars(a).items() if not k.startswith("_") and k != "raw_argv"},
         "timing_note": "rows compiled first, then timed round-robin (one step of each row in turn); medians",
         "peak_memory_note": "peak of a fresh process per row (compile + 1 train + 1 eval step)" if not a.in_process
         else "peak of this process after all rows (cumulative, the same for every row)",
         "methods": {}}
  if a.compile_only:  # one fresh process per row and scan setting; rows in turn
    for name, *spec in _runs(a):
      spec += [""] * (5 - len(spec))
      for scan in (int(x) for x in a.compile_only.split(",")):
        row = f"{name}_scan" if scan else name
        print(f"[bench] compiling {row}", file=sys.stderr, flush=True)
        res["methods"][row] = child_peak_memory(a, (row, *spec, scan))
        print(f"[bench] {row}: {res['methods'][row]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    res["hardware"]["load_average_end"] = list(os.getloadavg())
    text = compile_table(res)
    print(text)
    for path, body in ((a.json, lambda f: json.dump(res, f, indent=1)), (a.markdown, lambda f: f.write(text + "\n"))):
      if path:
        with open(path, "w") as f:
          body(f)
    return res
  specs, same = [], {}
  for name, *spec in _runs(a):
    first = next((s[0] for s in specs if tuple(s[1:]) == tuple(spec)), None)
    if first:  # e.g. dmlora_k4 is the dmlora row
      same[name] = first
    else:
      specs.append((name, *spec))
  mem = {} if a.in_process else {s[0]: child_peak_memory(a, s) for s in specs}
  res["methods"], res["matmul"] = measure_rows(a, specs)
  for name, m in res["methods"].items():
    if a.in_process:
      m["peak_memory_bytes"], m["peak_memory_source"] = peak_memory()
    else:
      m.update(mem[name])
  for name, first in same.items():
    res["methods"][name] = dict(res["methods"][first], same_as=first)
  res["hardware"]["load_average_end"] = list(os.getloadavg())
  _write(a, res)
  return res


if __name__ == "__main__":
  hostmem.reexec_with_hugepages()  # XLA CPU: huge pages for malloc (a fresh process, so JAX is not set up yet)
  main()

"""Progress lines, metrics.jsonl + TensorBoard events, and the final summary table."""

import json
import os
import time

import jax


def say(msg: str) -> None:
  """A user-facing line, printed by process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter  # light, no TensorFlow import
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, stage: int, metrics: dict):
    if not self.enabled:
      return
    self._f.write(json.dumps({"step": step, "stage": stage, **metrics}) + "\n")
    self._f.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"train/{k}", v, step)

  def close(self):
    if self.enabled:
      self._f.close()
      self._tb.close()


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
  """step/total, stage, loss, lr, drop probability, images/s and ETA, one line per log."""

  def __init__(self, total: int, start_step: int, batch_size: int, enabled: bool = True):
    self.total, self.batch, self.enabled = total, batch_size, enabled
    self.t0 = self.t_last = time.time()
    self.start = self.last = start_step

  def update(self, step: int, stage: int, m: dict) -> float:
    now = time.time()
    ips = (step - self.last) * self.batch / max(now - self.t_last, 1e-9)
    rate = (step - self.start) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else 0.0
    self.t_last, self.last = now, step
    if self.enabled:
      print(f"[{step:>6d}/{self.total}] stage {stage}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
            f"lr {m['lr']:.2e}  p_drop {m['drop_p']:.3f}  {ips:7.1f} img/s  ETA {_fmt_time(eta)}", flush=True)
    return ips


def print_summary(results: dict):
  if jax.process_index() != 0:
    return
  rows = [(f"top-1 {k}", f"{100 * v:.2f}%") for k, v in results["accuracy"].items()]
  rows += [
      ("method", results["method"]),
      ("trainable / total params", f"{results['trainable_params']:,} / {results['total_params']:,}"),
      ("steps (stage 1 + stage 2)", f"{results['stage1_steps']} + {results['stage2_steps']}"),
      ("wall time", _fmt_time(results["wall_time_s"])),
      ("merged export", results["merged_npz"] or f"none (the method does not merge): {results.get('prompts_npz')}"),
  ]
  spread = results.get("scale_spread")
  if spread:
    rows.append(("alpha_l (min / max, std of log)", f"{spread['min']:.4g} / {spread['max']:.4g}, {spread['std_log']:.3g}"))
  curve = results.get("stage2_loss")
  if curve:
    rows.append(("stage-2 loss (first / last logged)", f"{curve[0][1]:.4f} / {curve[-1][1]:.4f}"))
  w = max(len(r[0]) for r in rows)
  line = "-" * (w + 3 + max(len(r[1]) for r in rows))
  print("\n" + line)
  for k, v in rows:
    print(f"{k:<{w}} | {v}")
  print(line, flush=True)

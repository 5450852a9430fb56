r"""The proxy accuracy study: pre-train a small ViT on 5 CIFAR-10 classes, adapt it to 5 others.

  python benchmarks/study_cifar10.py pretrain --out runs/study_cifar10   # ~12 min on 2 idle CPU cores
  python benchmarks/study_cifar10.py adapt --out runs/study_cifar10      # the grid, ~13 min
  python benchmarks/study_cifar10.py report --out runs/study_cifar10     # the Markdown table

1. `pretrain`: a "mini/4" ViT (width 96, depth 4, 3 heads, patch 4, 32 px) trained from
   scratch on ../shared/data/cifar10_source5.npz (airplane, automobile, bird, cat, deer;
   25,000 images), with the recipe in PRETRAIN below. 1,000 source images are held out to
   report source accuracy. The backbone is exported to the public .npz layout
   (`<out>/backbone_mini4.npz`) with a zeroed head: the target classes are new, so the head
   must start from the usual zero init (load_pretrained would keep a 5-class head).
2. `adapt`: benchmarks/study_cifar10_config.py on ../shared/data/vtab1k/cifar10_t5 (dog, frog, horse,
   ship, truck; never seen in pre-training) through the regular trainer, for each row of
   row (a method): the lr of LRS is chosen on val200 after training on train800 (seed 0), then that
   lr trains on train800val200 and is scored on test for 3 seeds. Test is never used to choose.
3. `report`: mean +- std of test top-1 over the seeds, per row.
"""

import argparse
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dmlora_jax import data, npz, pytrees, vit  # noqa: E402

SOURCE = os.path.join(REPO, "..", "shared", "data", "cifar10_source5.npz")

# The pre-training recipe (DeiT-like, shortened to fit ~15 min of 2 CPU cores).
PRETRAIN = dict(variant="mini/4", image_size=32, epochs=14, batch_size=128, lr=2e-3, min_lr=2e-5,
                warmup_epochs=1, weight_decay=0.05, holdout=1000, seed=0, label_smoothing=0.1)


def load_source(path: str = SOURCE) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 32, 32, 3), labels int32 (N,)) decoded from the concatenated JPEGs."""
  with np.load(path) as f:
    raw, off, labels = f["jpeg_bytes"], f["offsets"], f["labels"]
  imgs = np.stack([np.asarray(Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                   for i in range(len(off) - 1)])
  return imgs, labels.astype(np.int32)


def augment(rng: np.random.Generator, x_BxHxWx3: np.ndarray) -> np.ndarray:
  """Random crop after 4-px reflect padding, and horizontal flip (the usual CIFAR recipe)."""
  b, h, w, _ = x_BxHxWx3.shape
  pad = np.pad(x_BxHxWx3, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 9, b), rng.integers(0, 9, b)
  out = np.stack([pad[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
  flip = rng.random(b) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def pretrain(out: str, epochs: int | None = None) -> dict:
  p = dict(PRETRAIN, epochs=epochs or PRETRAIN["epochs"])
  t0 = time.time()
  imgs, labels = load_source()
  rng = np.random.default_rng(p["seed"])
  perm = rng.permutation(len(labels))
  hold, train = perm[:p["holdout"]], perm[p["holdout"]:]
  print(f"decoded {len(labels)} images in {time.time() - t0:.0f}s", flush=True)

  model = vit.ViT(vit.parse_variant(p["variant"], 5))
  params = jax.jit(model.init)(jax.random.key(p["seed"]), jnp.zeros((1, 32, 32, 3)))["params"]
  spe = len(train) // p["batch_size"]
  total = spe * p["epochs"]
  sched = optax.warmup_cosine_decay_schedule(0.0, p["lr"], spe * p["warmup_epochs"], total, p["min_lr"])
  decay = lambda t: jax.tree.map(lambda x: x.ndim >= 2, t)  # no decay on biases, LN, scalars
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=p["weight_decay"], mask=decay))
  opt_state = tx.init(params)

  def prep(x):  # the normalisation the adaptation config uses (data.normalization='imagenet')
    return data.normalize(x, "imagenet")

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits = model.apply({"params": params}, prep(x))
      target = optax.smooth_labels(jax.nn.one_hot(y, 5), p["label_smoothing"])
      return optax.softmax_cross_entropy(logits, target).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(model.apply({"params": params}, prep(x)), -1)

  def accuracy(params, idx):
    hits = sum(int((np.asarray(predict(params, imgs[idx[i:i + 500]])) == labels[idx[i:i + 500]]).sum())
               for i in range(0, len(idx), 500))
    return hits / len(idx)

  log = []
  t_train = time.time()
  for epoch in range(p["epochs"]):
    order = np.random.default_rng([p["seed"], epoch]).permutation(train)
    aug_rng = np.random.default_rng([p["seed"], epoch, 1])
    losses = []
    for i in range(spe):
      idx = order[i * p["batch_size"]:(i + 1) * p["batch_size"]]
      params, opt_state, loss = step(params, opt_state, augment(aug_rng, imgs[idx]), labels[idx])
      losses.append(loss)
    acc = accuracy(params, hold)
    log.append({"epoch": epoch + 1, "loss": float(np.mean(jax.device_get(losses))), "holdout_top1": acc,
                "elapsed_s": round(time.time() - t_train, 1)})
    print(json.dumps(log[-1]), flush=True)

  os.makedirs(out, exist_ok=True)
  # The head is zeroed: the target classes are new (see the module docstring).
  flat = pytrees.flatten(jax.device_get(params))
  flat = {k: (np.zeros_like(v) if k.startswith("head/") else np.asarray(v)) for k, v in flat.items()}
  path = os.path.join(out, "backbone_mini4.npz")
  npz.save_npz(path, flat)
  result = {"recipe": p, "source_holdout_top1": log[-1]["holdout_top1"], "log": log,
            "train_s": round(time.time() - t_train, 1), "checkpoint": path,
            "fingerprint": npz.fingerprint(flat)}
  with open(os.path.join(out, "pretrain.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}: source holdout top-1 {result['source_holdout_top1']:.4f} in {result['train_s']:.0f}s")
  return result


def _study_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(REPO, "benchmarks",
                                                                           "study_cifar10_config.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _run(cfg_mod, row: str, lr: float, seed: int, protocol: str, workdir: str, checkpoint: str) -> dict:
  """One training through the regular trainer; reuses a finished run's results.json."""
  from dmlora_jax import trainer
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  c = cfg_mod.get_config(f"method={row},checkpoint={checkpoint}")
  c.stage1.lr, c.seed, c.data.protocol = lr, seed, protocol
  return trainer.train_and_evaluate(c, workdir)


def adapt(out: str, rows: list[str], seeds: int) -> dict:
  """lr chosen on val200 (train800, seed 0), then train800val200 -> test for each seed."""
  cfg_mod = _study_config()
  checkpoint = os.path.abspath(os.path.join(out, "backbone_mini4.npz"))
  summary_path = os.path.join(out, "adapt.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  for row in rows:
    t0 = time.time()
    val = {}
    for lr in cfg_mod.LRS.get(row, cfg_mod.DEFAULT_LRS):
      r = _run(cfg_mod, row, lr, 0, "tune", os.path.join(out, "runs", row, f"tune_lr{lr:g}"), checkpoint)
      assert "test" not in r["accuracy"], "a tune run must not read test"
      val[lr] = r["accuracy"]["val200"]
    best = max(val, key=lambda k: (val[k], -list(val).index(k)))  # ties: first in grid order
    test = []
    for seed in range(seeds):
      r = _run(cfg_mod, row, best, seed, "final", os.path.join(out, "runs", row, f"final_seed{seed}"), checkpoint)
      test.append(r["accuracy"]["test"])
    summary[row] = {"val200_by_lr": {f"{k:g}": v for k, v in val.items()}, "lr": best, "test_by_seed": test,
                    "test_mean": float(np.mean(test)), "test_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                    "trainable_params": r["trainable_params"], "total_params": r["total_params"],
                    "wall_s": round(time.time() - t0, 1)}
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"[study] {row}: lr {best:g} test {summary[row]['test_mean']:.4f} +- {summary[row]['test_std']:.4f}",
          flush=True)
  return summary


def report(out: str) -> str:
  with open(os.path.join(out, "adapt.json")) as f:
    summary = json.load(f)
  lines = ["| row | trainable | lr (val200) | val200 by lr | test top-1, mean +- std (seeds) |",
           "| --- | --- | --- | --- | --- |"]
  for row, s in summary.items():
    seeds = ", ".join(f"{100 * t:.1f}" for t in s["test_by_seed"])
    vals = ", ".join(f"{k}: {100 * v:.1f}" for k, v in s["val200_by_lr"].items())
    lines.append(f"| {row} | {s['trainable_params']:,} | {s['lr']:g} | {vals} | "
                 f"{100 * s['test_mean']:.1f} +- {100 * s['test_std']:.1f} ({seeds}) |")
  text = "\n".join(lines)
  print(text)
  return text


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("command", choices=("pretrain", "adapt", "report"))
  ap.add_argument("--out", default="runs/study_cifar10")
  ap.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the recipe's)")
  ap.add_argument("--rows", default="linear,lora,multibranch,dropout,dmlora,full")
  ap.add_argument("--seeds", type=int, default=3)
  a = ap.parse_args(argv)
  if a.command == "pretrain":
    pretrain(a.out, a.epochs)
  elif a.command == "adapt":
    adapt(a.out, a.rows.split(","), a.seeds)
  else:
    report(a.out)


if __name__ == "__main__":
  from dmlora_jax import hostmem
  hostmem.reexec_with_hugepages()  # XLA CPU: malloc huge pages (dmlora_jax/hostmem.py)
  main()

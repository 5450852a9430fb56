"""Command line: python -m dmlora_jax.main --config=configs/vtab1k.py:task=cifar --workdir=DIR

Modes: train (default; resumes by itself from DIR/checkpoints), export (merged.npz from the
newest checkpoint), eval (evaluate the merged newest checkpoint).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, results.json and merged.npz go.")
flags.DEFINE_enum("mode", "train", ["train", "export", "eval"], "What to do.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port (multi-process).")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; progress goes to stdout
  from dmlora_jax import distributed, trainer  # after flag parsing: keeps --help fast
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    config = FLAGS.config
    config.get("method")  # config_flags defers a failed load until first use
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: --config={FLAGS['config'].serialize().split('=', 1)[-1]}: {lines[-1]}", file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.mode == "train":
      trainer.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "export":
      trainer.export_from_checkpoint(config, FLAGS.workdir)
    else:
      trainer.evaluate_checkpoint(config, FLAGS.workdir)
  except trainer.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
  """absl parsing, with config mistakes (a misspelt --config.key, a bad value, a bad config
  argument or path) reported as one line that names the culprit instead of a traceback."""
  try:
    return FLAGS(argv)
  except Exception as e:  # absl wraps some errors, ml_collections raises AttributeError/KeyError
    cause = e
    while getattr(cause, "__cause__", None) is not None:
      cause = cause.__cause__
    raw = str(cause).replace("\\n", "\n").replace("\\'", "'")
    lines = [l.strip() for l in raw.splitlines() if l.strip()]
    # A traceback inside the message (config file errors): its last line says what is wrong.
    msg = lines[-1] if "Traceback" in raw else " ".join(lines)
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((a for a in overrides if f"'{a.rsplit('.', 1)[-1]}'" in raw), None)
    if culprit:
      hint = msg[msg.find("Did you mean"):].rstrip("'\"") if "Did you mean" in msg else ""
      msg = f"{culprit}: no such config key. {hint}".strip()
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  from dmlora_jax import hostmem
  hostmem.reexec_with_hugepages()  # XLA CPU: huge pages for malloc, before JAX is imported
  run()

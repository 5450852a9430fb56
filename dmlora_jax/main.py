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
  config = FLAGS.config
  try:
    if FLAGS.mode == "train":
      trainer.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "export":
      trainer.export_from_checkpoint(config, FLAGS.workdir)
    else:
      trainer.evaluate_checkpoint(config, FLAGS.workdir)
  except trainer.USER_ERRORS as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  app.run(main)


if __name__ == "__main__":
  run()

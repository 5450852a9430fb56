"""Test session setup: the repository on sys.path and one temp dir for everything written.

No test reads anything outside the repository: the tasks the tests train on are written by
tests/task_files.py from scikit-learn's bundled digits.
"""

import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Everything the session writes to the temp dir (this process and its subprocesses, TFDS's
# mock_data included, which leaves an empty tmp*tfds directory per builder) goes into one
# directory that is removed at the end.
SESSION_TMP = tempfile.mkdtemp(prefix="dmlora_jax_tests_")
# Under pytest-xdist (-n 2) each worker imports this file again, inside the first process's
# SESSION_TMP (TMPDIR is inherited): SHARED_TMP is the first process's directory, the same
# for every worker, where fixtures that should run once per session (the tiny sweep) live.
SHARED_TMP = os.environ.setdefault("DMLORA_JAX_TESTS_SHARED", SESSION_TMP)
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP
# One XLA compilation cache for the whole session (both xdist workers and every subprocess
# they start): the many tiny trainings compile the same few programs; only compile time
# changes, never a result (a cached executable is the program XLA would compile again).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(SHARED_TMP, "xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
  shutil.rmtree(SESSION_TMP, ignore_errors=True)

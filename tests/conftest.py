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
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP


def pytest_unconfigure(config):
  shutil.rmtree(SESSION_TMP, ignore_errors=True)

import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(REPO), "shared")

# Everything the session writes to the temp dir (this process and its subprocesses, TFDS's
# mock_data included, which leaves an empty tmp*tfds directory per builder) goes into one
# directory that is removed at the end.
SESSION_TMP = tempfile.mkdtemp(prefix="dmlora_jax_tests_")
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP


def pytest_unconfigure(config):
  shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture
def shared_data():
  path = os.path.join(SHARED, "data")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"../shared/data not found beside the repo (looked in {path})")
  return path

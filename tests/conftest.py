import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(REPO), "shared")


@pytest.fixture
def shared_data():
  path = os.path.join(SHARED, "data")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"../shared/data not found beside the repo (looked in {path})")
  return path

"""Shared test fixtures. Tests run on CPU with few threads: the suite must stay fast on 2 shared cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Busy-waiting OpenMP threads make small FFTs ~100x slower on 2 shared cores; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """Small real files (a real header, slices, metadata CSVs and stats) kept in the repository."""
    return REPO_ROOT / "tests" / "data"


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (small models run fastest so on 2 shared cores); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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


@pytest.fixture(scope="session")
def shepp_logan_prior(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained prior, trained once per session and shared (``tests/test_trained_prior.py``,
    ``tests/test_raw_trained_prior.py``): ``train_mri.py``'s main, ``configs/unet/compact.json``, unconditional, 300
    steps x batch 8 on 8 x 8 Shepp-Logan-family slices (32x32, 4 coils; ``tests/training_helpers.shepp_logan_variant``),
    one thread. About a minute on one core.

    Returns:
        ``{"root": data root, "train_csv": its metadata CSV, "model": the exported model folder}``.
    """
    from tests.training_helpers import write_tiny_dataset
    from utils.training import main as train_main

    root = tmp_path_factory.mktemp("shepp_logan_prior")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_csv = write_tiny_dataset(root, "brain", num_files=8, slices_per_file=8, crop=32, coils=4, seed=0,
                                       phantom="shepp_logan")
        model = root / "model"
        assert train_main(argv=[
            "--unet_config", str(REPO_ROOT / "configs" / "unet" / "compact.json"), "--data_root", str(root),
            "--mri_metadata_dir_brain", str(train_csv), "--resolution", "32", "--train_batch_size", "8",
            "--max_train_steps", "300", "--learning_rate", "1e-3", "--lr_warmup_steps", "10", "--lr_scheduler",
            "constant_with_warmup", "--text_encoder_type", "none", "--unconditional", "--seed", "0",
            "--dataloader_num_workers", "0", "--report_to", "none", "--checkpointing_steps", "100000",
            "--output_dir", str(model)]) == 0
    finally:
        torch.set_num_threads(before)
    return {"root": root, "train_csv": train_csv, "model": model}

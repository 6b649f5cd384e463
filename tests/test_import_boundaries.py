"""The inference path does not import the training package (issue 15: "no import from the inference path into
training"): reconstructing or reporting with a trained model must not need the training code, its optional
dependencies or its side effects. Checked in a fresh interpreter, so modules other tests imported do not count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The modules a reconstruction or a metadata report runs through (the two scripts and what they load lazily).
INFERENCE_MODULES = (
    "recon_complex_multi", "metadata_report", "utils.reconstruction", "utils.raw_reconstruction", "utils.raw_cli",
    "utils.diffusion_recon", "utils.metadata_report", "utils.report", "models.loading", "utils.samplers",
)

_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m == "utils.training" or m.startswith("utils.training."))
print(" ".join(bad))
"""


def test_inference_modules_do_not_import_the_training_package():
    done = subprocess.run([sys.executable, "-c", _PROBE, *INFERENCE_MODULES], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"the inference path imports {done.stdout.strip()}"


def test_the_probe_sees_a_training_import():
    # the same probe on a training module must report it (the check above can fail)
    done = subprocess.run([sys.executable, "-c", _PROBE, "utils.training.config"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "utils.training.config" in done.stdout.split()

"""Report helpers: the paired per-slice comparison of two reconstruction runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from utils.report import paired_comparison


def _write_rows(folder: Path, values: dict[tuple[str, int], float]) -> Path:
    for (name, idx), v in values.items():
        path = folder / "rows" / name / f"{idx:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"filename": name, "slice": idx, "contextmri_psnr": v}))
    return folder


def test_paired_comparison_known_answer(tmp_path):
    keys = [("f0", 0), ("f0", 1), ("f1", 0), ("f1", 1)]
    base = dict(zip(keys, [20.0, 25.0, 30.0, 22.0]))
    diffs = [0.5, -0.1, 0.3, 0.2]
    a = _write_rows(tmp_path / "a", {k: base[k] + d for k, d in zip(keys, diffs)})
    b = _write_rows(tmp_path / "b", base)
    out = paired_comparison(a, b)
    assert out["num_slices"] == 4 and out["wins"] == 3
    assert out["mean_diff"] == pytest.approx(np.mean(diffs))
    assert out["se"] == pytest.approx(np.std(diffs, ddof=1) / 2)
    flipped = paired_comparison(b, a)
    assert flipped["mean_diff"] == pytest.approx(-np.mean(diffs)) and flipped["wins"] == 1


def test_paired_comparison_needs_the_same_slices(tmp_path):
    a = _write_rows(tmp_path / "a", {("f0", 0): 1.0, ("f0", 1): 2.0})
    b = _write_rows(tmp_path / "b", {("f0", 0): 1.0})
    with pytest.raises(ValueError, match="same slices"):
        paired_comparison(a, b)

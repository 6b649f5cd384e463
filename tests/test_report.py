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


def test_paired_comparison_leaves_out_failed_slices_and_says_so(tmp_path):
    keys = [("f0", 0), ("f0", 1), ("f1", 0)]
    a = _write_rows(tmp_path / "a", dict(zip(keys, [21.0, 26.0, 31.0])))
    b = _write_rows(tmp_path / "b", dict(zip(keys, [20.0, 25.0, 30.0])))
    # slice f0/1 of run b failed: its row holds status "failed" and no metric
    (b / "rows" / "f0" / "001.json").write_text(json.dumps(
        {"filename": "f0", "slice": 1, "status": "failed", "failure": "output", "contextmri_psnr": None}))
    out = paired_comparison(a, b)
    assert out["num_slices"] == 2 and out["num_excluded"] == 1
    assert out["mean_diff"] == pytest.approx(1.0)


def test_results_table_states_what_the_means_leave_out(tmp_path):
    from utils.report import MethodResult, results_table

    stat = {"mean": 30.0, "std": 1.0, "n": 2}
    none = {"mean": None, "std": None, "n": 0}
    full = {"fastmri_psnr": stat, "fastmri_ssim": stat, "fastmri_nmse": stat, "contextmri_psnr": stat,
            "contextmri_ssim": stat, "time_s": stat, "nfe": stat, "acceleration": stat, "num_volumes": 2,
            "num_slices": 4, "num_volumes_incomplete": 0, "num_volumes_not_started": 0, "num_slices_failed": 0}
    partial = dict(full, num_volumes=1, num_volumes_incomplete=1, num_slices_failed=1)
    empty = dict(full, fastmri_psnr=none, fastmri_ssim=none, fastmri_nmse=none, num_volumes=0, num_slices_failed=4)
    table, rows = results_table([MethodResult("a", 4, tmp_path, full), MethodResult("b", 4, tmp_path, partial),
                                 MethodResult("c", 4, tmp_path, empty)])
    lines = table.splitlines()
    assert "| a |" in lines[2]
    assert "1 volume(s) incomplete" in lines[3] and "1 slice(s) failed" in lines[3]
    assert "n/a" in lines[4] and "4 slice(s) failed" in lines[4]
    assert rows[2]["num_slices_failed"] == 4

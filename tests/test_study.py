"""The study's pooling over seeds (utils/study.py): intervals, verdicts, and the paired per-slice differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.study import paired_differences, pool_paired, t_quantile_975


def test_t_quantile_matches_the_table():
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.960, abs=1e-3)


def test_a_consistent_gain_is_established_and_its_interval_holds_the_truth():
    rng = np.random.default_rng(0)
    seeds = [0.3 + 0.05 * rng.standard_normal(20) for _ in range(3)]
    out = pool_paired(seeds)
    assert out["verdict"] == "established (first higher)"
    assert out["ci95"][0] < 0.3 < out["ci95"][1] and out["n_seeds"] == 3 and out["n_slices"] == 60
    flipped = pool_paired([-s for s in seeds])
    assert flipped["verdict"] == "established (second higher)"
    assert flipped["mean"] == pytest.approx(-out["mean"])


def test_seed_to_seed_variance_blocks_a_verdict_the_pooled_slices_would_give():
    """Three retrainings disagree (+1.0, −0.6, +0.9 dB) with tiny slice noise: all slices pooled exclude 0, the seed
    level does not, and the verdict follows the seed level."""
    rng = np.random.default_rng(1)
    seeds = [m + 0.01 * rng.standard_normal(20) for m in (1.0, -0.6, 0.9)]
    out = pool_paired(seeds)
    assert out["slice_ci95"][0] > 0
    assert out["ci95"][0] < 0 < out["ci95"][1]
    assert out["verdict"] == "not established"


def test_one_seed_never_establishes():
    out = pool_paired([np.full(20, 5.0) + np.linspace(0, 0.1, 20)])
    assert out["ci95"] is None and out["verdict"].startswith("not established")


def _rows(folder, values):
    for (name, sl), v in values.items():
        (folder / "rows" / name).mkdir(parents=True, exist_ok=True)
        row = {"filename": name, "slice": sl, "contextmri_psnr": v, "status": "ok" if v is not None else "failed"}
        (folder / "rows" / name / f"{sl}.json").write_text(json.dumps(row))


def test_paired_differences_skip_failed_slices_and_refuse_other_slices(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _rows(a, {("f1", 0): 30.0, ("f1", 1): 31.0, ("f2", 0): 29.0})
    _rows(b, {("f1", 0): 29.5, ("f1", 1): None, ("f2", 0): 30.0})
    assert paired_differences(a, b) == pytest.approx([0.5, -1.0])
    _rows(c, {("f1", 0): 30.0, ("f1", 1): 31.0})
    with pytest.raises(ValueError, match="same slices"):
        paired_differences(a, c)

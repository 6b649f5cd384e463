"""The demo's raw-k-space vs re-simulated comparison (utils/demo_raw.py): which volumes and slices, the paired numbers.

The reconstructions themselves are the scripts' (tested in tests/test_raw_recon.py and tests/test_reconstruction.py);
here they are replaced by folders in the scripts' layout, so the orchestration is checked in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from utils import demo_raw
from utils.demo_config import DemoConfig
from utils.demo_raw import (
    RAW_PATH,
    RESIM_PATH,
    heldout_raw_files,
    paired_volume_difference,
    raw_comparison_lines,
    raw_comparison_rows,
)


def _raw_files(cfg: DemoConfig, sizes: dict[str, int]) -> None:
    folder = cfg.output_dir / "raw" / "brain" / "val"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        with h5py.File(folder / f"{name}.h5", "w") as f:
            f.create_dataset("kspace", data=np.zeros((n, 1, 4, 4), np.complex64))


def _items(pairs: list[tuple[str, int]]) -> list[SimpleNamespace]:
    return [SimpleNamespace(filename=f, slice_idx=s) for f, s in pairs]


def test_heldout_raw_files_are_the_complete_volumes_of_the_held_out_prefix(tmp_path) -> None:
    cfg = DemoConfig(output_dir=tmp_path)
    _raw_files(cfg, {"a": 3, "b": 2})
    files, end = heldout_raw_files(cfg, _items([("a", 0), ("a", 1), ("a", 2), ("b", 0)]))  # b cut by max_val_slices
    assert [f.name for f in files] == ["a.h5"] and end == 3
    files, end = heldout_raw_files(cfg, _items([("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]))
    assert [f.name for f in files] == ["a.h5", "b.h5"] and end == 5
    assert heldout_raw_files(cfg, _items([("a", 0)])) == ([], 0)


def _vol(name: str, psnr: float, ssim: float, nmse: float, **kw) -> dict:
    return {"filename": name, "fastmri_psnr": psnr, "fastmri_ssim": ssim, "fastmri_nmse": nmse, **kw}


def test_paired_volume_difference_pairs_by_volume_and_refuses_other_volumes() -> None:
    raw = {"volumes": [_vol("a", 20.0, 0.60, 0.10, status="done"), _vol("b", 25.0, 0.70, 0.05, status="done"),
                       _vol("c", 21.0, 0.65, 0.08, status="done")]}
    resim = {"volumes": [_vol("b", 26.5, 0.72, 0.04, status="scored"), _vol("a", 19.0, 0.61, 0.09, status="scored"),
                         _vol("c", 23.0, 0.70, 0.06, status="scored")]}
    p = paired_volume_difference(raw, resim)
    d = np.array([20.0 - 19.0, 25.0 - 26.5, 21.0 - 23.0])  # independent: per volume, in name order
    assert p["num_volumes"] == 3 and p["volumes"] == ["a", "b", "c"]
    assert p["psnr"]["mean_diff"] == pytest.approx(d.mean())
    assert p["psnr"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert p["psnr"]["raw_lower"] == 2
    assert p["psnr"]["raw"]["mean"] == pytest.approx(22.0) and p["psnr"]["resim"]["mean"] == pytest.approx(22.833333)
    assert p["ssim"]["mean_diff"] == pytest.approx(np.mean([-0.01, -0.02, -0.05]))
    with pytest.raises(ValueError, match="different volumes"):  # a failed raw volume leaves the pair unequal
        paired_volume_difference({"volumes": [*raw["volumes"][:2], _vol("c", 21.0, 0.6, 0.1, failed_slices=1)]},
                                 resim)
    with pytest.raises(ValueError, match="different volumes"):
        paired_volume_difference(raw, {"volumes": resim["volumes"][:2]})
    with pytest.raises(ValueError, match="different volumes"):  # an incomplete re-simulated volume is not scored
        paired_volume_difference(raw, {"volumes": [*resim["volumes"][:2], {**resim["volumes"][2],
                                                                           "status": "incomplete"}]})


def _fake_run(folder: Path, slices: list[tuple[str, int]], psnr: dict[str, float], status: str) -> Path:
    """A run folder in the scripts' layout: rows/{file}/{idx:03d}.json + summary.json with per-volume scores."""
    for f, s in slices:
        (folder / "rows" / f).mkdir(parents=True, exist_ok=True)
        (folder / "rows" / f / f"{s:03d}.json").write_text(json.dumps({"filename": f, "slice": s}))
    vols = [_vol(name, value, 0.5, 0.1, status=status) for name, value in psnr.items()]
    summary = {"num_slices": len(slices), "volumes": vols, "acceleration": {"mean": 4.0}, "time_s": {"mean": 1.0},
               "sigma": {"mean": 1e-6}, "gamma": {"mean": 30.0}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_raw_vs_resimulated_runs_both_paths_on_the_same_slices(tmp_path, monkeypatch) -> None:
    cfg = DemoConfig(output_dir=tmp_path, raw_accelerations=(4.0,), raw_methods=("fine-grained",), parallel=1)
    _raw_files(cfg, {"a": 2, "b": 2})
    items = _items([("a", 0), ("a", 1), ("b", 0)])  # b incomplete: only a is compared
    calls = {"raw": [], "resim": []}
    extra_slice = {"on": False}

    def fake_raw(cfg_, acc, tag, extra, raw_dir):
        calls["raw"].append((tag, sorted(p.name for p in raw_dir.iterdir())))
        return _fake_run(tmp_path / "r" / tag, [("a", 0), ("a", 1)], {"a": 20.0}, "done")

    def fake_resim(cfg_, acc, tag, extra, center_fraction, end_idx):
        calls["resim"].append((tag, center_fraction, end_idx))
        slices = [("a", 0), ("a", 1)] + ([("b", 0)] if extra_slice["on"] else [])
        return _fake_run(tmp_path / "s" / tag, slices, {"a": 22.5}, "scored")

    monkeypatch.setattr(demo_raw, "reconstruct_raw", fake_raw)
    monkeypatch.setattr(demo_raw, "reconstruct", fake_resim)
    models = {"fine-grained": tmp_path / "model", "unconditioned": tmp_path / "u"}  # unconditioned: not in raw_methods
    entries = demo_raw.raw_vs_resimulated(cfg, models, items, {})
    assert sorted(t for t, _ in calls["raw"]) == ["cs", "fine-grained", "zero_filled"]
    assert all(names == ["a.h5"] for _, names in calls["raw"])  # exactly the complete held-out volumes
    assert sorted(calls["resim"]) == [(f"{t}_cf0.125", 0.125, 2) for t in ("cs", "fine-grained", "zero_filled")]
    assert [e["method"] for e in entries] == ["zero_filled", "cs", "fine-grained"]
    assert all(e["paired"]["psnr"]["mean_diff"] == pytest.approx(-2.5) for e in entries)

    lines = "\n".join(raw_comparison_lines(cfg, entries))
    for label in ("zero-filled", "CS L1-wavelet", "fine-grained metadata"):
        assert f"| {label} | {RESIM_PATH} |" in lines and f"| {label} | {RAW_PATH} |" in lines
    assert "-2.50" in lines and "reconstruction_rss" in lines
    rows = raw_comparison_rows(entries)
    assert len(rows) == 6 and {r["path"] for r in rows} == {RAW_PATH, RESIM_PATH}

    extra_slice["on"] = True  # the re-simulated run holds a slice the raw one does not: refused, not compared
    with pytest.raises(RuntimeError, match="different slices"):
        demo_raw.raw_vs_resimulated(cfg, models, items, {})

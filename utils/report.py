"""Tables and figures from reconstruction outputs (the folders written by :mod:`utils.reconstruction`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.channels import channels_to_complex
from utils.recon_outputs import recon_path, std_path


@dataclass
class MethodResult:
    """One row of the results table."""

    label: str
    acc_factor: float
    out_dir: Path
    summary: dict[str, Any]


def load_result(label: str, acc_factor: float, out_dir: str | Path) -> MethodResult:
    out = Path(out_dir)
    return MethodResult(label, acc_factor, out, json.loads((out / "summary.json").read_text()))


def _pm(stat: Mapping[str, float | None], fmt: str) -> str:
    if stat.get("mean") is None:  # nothing scored (strict JSON writes an undefined mean as null)
        return "n/a"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def coverage_note(summary: Mapping[str, Any]) -> str:
    """What a summary's means leave out, in a few words ("" when every volume was scored)."""
    parts = []
    if summary.get("num_volumes_incomplete"):
        parts.append(f"{summary['num_volumes_incomplete']} volume(s) incomplete")
    if summary.get("num_volumes_not_started"):
        parts.append(f"{summary['num_volumes_not_started']} volume(s) not run")
    if summary.get("num_slices_failed"):
        parts.append(f"{summary['num_slices_failed']} slice(s) failed")
    return "; ".join(parts)


def results_table(results: Sequence[MethodResult]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table (fastMRI protocol) and the same rows as dicts for CSV."""
    header = ("| method | R (achieved) | PSNR [dB] | SSIM | NMSE | s / slice | NFE / slice |\n"
              "|---|---|---|---|---|---|---|")
    lines, rows = [header], []
    for r in results:
        s = r.summary
        note = coverage_note(s)
        label = f"{r.label} ({s['num_volumes']} volumes scored; {note})" if note else r.label
        lines.append(
            f"| {label} | {r.acc_factor:g} ({_num(s['acceleration']['mean'], '.2f')}) | "
            f"{_pm(s['fastmri_psnr'], '.2f')} | {_pm(s['fastmri_ssim'], '.4f')} | {_pm(s['fastmri_nmse'], '.4f')} | "
            f"{_num(s['time_s']['mean'], '.2f')} | {_num(s['nfe']['mean'], '.0f')} |"
        )
        rows.append({
            "method": r.label, "acc_factor": r.acc_factor, "achieved_acceleration": s["acceleration"]["mean"],
            **{f"{k}_{m}": s[k][m] for k in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse", "contextmri_psnr",
                                              "contextmri_ssim") for m in ("mean", "std")},
            "time_per_slice_s": s["time_s"]["mean"], "nfe_per_slice": s["nfe"]["mean"],
            "num_volumes": s["num_volumes"], "num_slices": s["num_slices"],
            "num_slices_failed": s.get("num_slices_failed", 0), "complete": s.get("complete", True),
        })
    return "\n".join(lines), rows


def _slice_rows(out_dir: str | Path, metric: str) -> dict[tuple[str, int], float | None]:
    """``{(file, slice): metric}`` of every row; None for a failed slice or an undefined value."""
    rows = (json.loads(p.read_text()) for p in sorted((Path(out_dir) / "rows").glob("*/*.json")))
    out: dict[tuple[str, int], float | None] = {}
    for r in rows:
        value = r.get(metric)
        ok = r.get("status", "ok") == "ok" and value is not None and np.isfinite(value)
        out[(r["filename"], int(r["slice"]))] = float(value) if ok else None
    return out


def paired_comparison(dir_a: str | Path, dir_b: str | Path, metric: str = "contextmri_psnr") -> dict[str, float]:
    """Per-slice paired difference ``a − b`` of a metric between two runs over the same slices (and masks).

    Every slice is its own control, so this resolves differences far smaller than the between-volume spread of the
    table's means. Uses the per-slice rows (ContextMRI protocol by default; the fastMRI protocol is volume-wise).

    Returns:
        ``mean_diff``, ``se`` (standard error of the mean difference), ``wins`` (slices where ``a`` is higher),
        ``num_slices`` (pairs compared), ``num_excluded`` (slices failed in either run, left out).

    Raises:
        ValueError: the runs do not cover the same slices, or no slice succeeded in both.
    """
    a, b = _slice_rows(dir_a, metric), _slice_rows(dir_b, metric)
    if not a or a.keys() != b.keys():
        raise ValueError(f"{dir_a} and {dir_b} do not hold the same slices ({len(a)} vs {len(b)} rows)")
    keys = [k for k in sorted(a) if a[k] is not None and b[k] is not None]
    if not keys:
        raise ValueError(f"no slice of {dir_a} and {dir_b} succeeded in both runs")
    diff = np.array([a[k] - b[k] for k in keys])
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return {"mean_diff": float(diff.mean()), "se": se, "wins": int((diff > 0).sum()), "num_slices": int(diff.size),
            "num_excluded": len(a) - len(keys)}


def _gt(item) -> np.ndarray:
    return channels_to_complex(torch.as_tensor(item.image)[None])[0].numpy()


def _support(gt: np.ndarray, frac: float = 0.05) -> np.ndarray:
    mag = np.abs(gt)
    return mag > frac * mag.max()


def uncertainty_calibration(out_dir: str | Path, dataset: Sequence) -> dict[str, float]:
    """Spearman rank correlation between the ensemble's per-pixel std and the per-pixel absolute error.

    Computed per slice inside the object (|ground truth| > 5 % of its maximum), then mean ± std over slices. A
    calibrated ensemble puts its spread where its errors are (correlation well above 0).
    """
    from scipy.stats import spearmanr

    out = Path(out_dir)
    values = []
    for item in dataset:
        std_file = std_path(out, item.filename, item.slice_idx)
        if not std_file.is_file():
            continue
        gt = _gt(item)
        rec, std = np.load(recon_path(out, item.filename, item.slice_idx)), np.load(std_file)
        if not (np.isfinite(rec).all() and np.isfinite(std).all()):
            continue  # a failed slice (flagged in its row) has no meaningful spread
        err = np.abs(rec - gt)
        inside = _support(gt)
        rho = spearmanr(std[inside].ravel(), err[inside].ravel()).statistic
        if np.isfinite(rho):
            values.append(float(rho))
    arr = np.asarray(values)
    return {"spearman_mean": float(arr.mean()) if arr.size else float("nan"),
            "spearman_std": float(arr.std()) if arr.size else float("nan"), "num_slices": int(arr.size)}


def figure_grid(
    path: str | Path, dataset_item: Any, zero_filled_dir: str | Path, methods: Mapping[str, str | Path],
    std_dir: str | Path | None = None, title: str = "",
) -> Path:
    """One slice: label, zero-filled and each method (top), their error maps ×5 (bottom), the ensemble std map."""
    from utils.figures import Panel, panel_figure, save_figure

    name_idx = (dataset_item.filename, dataset_item.slice_idx)
    gt = _gt(dataset_item)
    images = {"label": gt, "zero-filled": np.load(recon_path(zero_filled_dir, *name_idx))}
    images.update({name: np.load(recon_path(d, *name_idx)) for name, d in methods.items()})
    extra = std_dir is not None and std_path(std_dir, *name_idx).is_file()
    vmax = float(np.abs(gt).max())
    top = [Panel(img, name, vmax=vmax) for name, img in images.items()]
    bottom: list[Panel | None] = [
        Panel(5 * np.abs(np.abs(img) - np.abs(gt)), "error ×5" if name != "label" else "", heat=True, vmax=vmax)
        for name, img in images.items()
    ]
    if extra:
        top.append(Panel(5 * np.load(std_path(std_dir, *name_idx)), "ensemble std ×5", heat=True, vmax=vmax))
        bottom.append(None)
    return save_figure(panel_figure([top, bottom], title), path, dpi=90)

"""Where a reconstruction run's per-slice results live in its folder, and the per-slice PNG.

Layout under the run folder (``{save_dir}/{mask_type}/acc_{R}/{tag}/``, :func:`utils.run_identity.out_dir_for`)::

    rows/{file}/{idx:03d}.json    per-slice status, metrics, timing, NFE, achieved acceleration (both paths)
    recon/{file}/{idx:03d}.npy    complex64 reconstruction (``--data_root``)
    std/{file}/{idx:03d}.npy      float32 ensemble std (``--data_root``, diffusion)
    png/{file}_{idx:03d}.png      labelled panels (``--data_root``)

Rows are the record of what is finished: the run loop writes them last, :func:`utils.recon_summary.summarize` (and
the raw path's :func:`utils.raw_reconstruction.summarize_raw`) rebuild the summary from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def row_path(out: str | Path, filename: str, slice_idx: int) -> Path:
    """Where the per-slice row of a slice lives."""
    return Path(out) / "rows" / filename / f"{int(slice_idx):03d}.json"


def recon_path(out: str | Path, filename: str, slice_idx: int) -> Path:
    """Where the complex64 reconstruction of a slice lives."""
    return Path(out) / "recon" / filename / f"{int(slice_idx):03d}.npy"


def std_path(out: str | Path, filename: str, slice_idx: int) -> Path:
    """Where the ensemble std of a slice lives."""
    return Path(out) / "std" / filename / f"{int(slice_idx):03d}.npy"


def png_path(out: str | Path, filename: str, slice_idx: int) -> Path:
    """Where the panel figure of a slice lives."""
    return Path(out) / "png" / f"{filename}_{int(slice_idx):03d}.png"


def row_is_final(path: Path) -> bool:
    """A row that a re-run keeps: any row except an input failure (cheap to re-check, the data may be fixed)."""
    if not path.is_file():
        return False
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # a damaged row is recomputed
    return not (row.get("status") == "failed" and row.get("failure") == "input")


def save_slice_png(path: Path, panels: dict[str, np.ndarray]) -> None:
    """A row of labelled panels (magnitudes in grey; maps named '*error*'/'*std*' in a heat colour map), drawn by
    :mod:`utils.figures`.

    Args:
        path: the PNG to write (atomically).
        panels: ``{title: [H, W] array}`` in display order; ``"label"`` (the ground truth) sets the grey scale.
    """
    from utils.figures import Panel, panel_figure, save_figure

    label = panels.get("label")
    vmax = float(np.nanmax(np.abs(label))) if label is not None else None
    row = []
    for name, img in panels.items():
        heat = "error" in name or "std" in name
        row.append(Panel(img, name, heat=heat, vmax=None if heat or name == "mask" else vmax))
    save_figure(panel_figure([row], panel_inches=2.4, title_size=9), path, dpi=80)

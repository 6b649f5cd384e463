"""The on-disk layout of a preprocessed dataset and the resumable, atomic writer of its slices (docs/formats.md)::

    {output_root}/{anatomy}_mvue_{crop}_{split}/slice/{file}/{idx:03d}.npy   complex64 [crop, crop]  (image / scale)
    {output_root}/{anatomy}_mvue_{crop}_{split}/mps/{file}/{idx:03d}.npy     complex64 [C, crop, crop] (unit-norm maps)
    {output_root}/{anatomy}_mvue_{crop}_{split}/scale/{file}.json            {"scale": {"000": s, ...}, ...}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from utils.files import atomic_save_npy, atomic_write_text, remove_stale_tmp, to_json
from utils.preprocessing.names import SPLITS  # re-exported: utils.preprocessing.layout.SPLITS
from utils.preprocessing.slices import BadSliceError, SliceOutput, output_problem


def dataset_dir(output_root: str | Path, anatomy: str, crop_size: int, split: str) -> Path:
    """``{output_root}/{anatomy}_mvue_{crop}_{split}``."""
    return Path(output_root) / f"{anatomy}_mvue_{crop_size}_{split}"


def slice_paths(ds_dir: Path, file_stem: str, idx: int) -> tuple[Path, Path]:
    """``(slice path, maps path)`` of slice ``idx`` of ``file_stem``."""
    name = f"{idx:03d}.npy"
    return ds_dir / "slice" / file_stem / name, ds_dir / "mps" / file_stem / name


def _read_scales(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # an unreadable sidecar means "nothing recorded": the slices are redone


def read_scale(ds_dir: str | Path, file_stem: str, idx: int) -> float | None:
    """The normalisation divisor recorded for one slice, or ``None``."""
    info = _read_scales(Path(ds_dir) / "scale" / f"{file_stem}.json")
    value = info.get("scale", {}).get(f"{idx:03d}")
    return None if value is None else float(value)


def _is_valid_npy(path: Path) -> bool:
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError):
        return False


class SliceWriteResult(NamedTuple):
    """Outcome of :func:`write_slices`: slices computed now, already present, and ``(index, reason)`` not written."""

    written: int
    skipped: int
    bad: list[tuple[int, str]]


def write_slices(
    ds_dir: Path,
    file_stem: str,
    indices: Sequence[int],
    compute: Callable[[int], SliceOutput],
    overwrite: bool = False,
    extra_info: dict[str, Any] | None = None,
) -> SliceWriteResult:
    """Compute and atomically write the slices ``indices`` of one file, skipping those already complete.

    A slice is complete when its image and maps load as ``.npy`` and its scale is recorded in
    ``scale/{file}.json``. The JSON is rewritten (atomically) after every slice so a kill loses at most one slice.
    A slice whose ``compute`` raises :class:`BadSliceError` or returns a non-finite result (:func:`output_problem`)
    is not written and is listed in ``bad``; the other slices go on.

    Returns:
        :class:`SliceWriteResult`.
    """
    scale_path = ds_dir / "scale" / f"{file_stem}.json"
    img_dir, map_dir = ds_dir / "slice" / file_stem, ds_dir / "mps" / file_stem
    remove_stale_tmp([img_dir, map_dir, scale_path.parent])
    info = {} if overwrite else _read_scales(scale_path)
    scales: dict[str, float] = dict(info.get("scale", {}))
    info = {**info, **(extra_info or {}), "scale": scales}
    written = skipped = 0
    bad: list[tuple[int, str]] = []
    for idx in indices:
        img_path, map_path = slice_paths(ds_dir, file_stem, idx)
        key = f"{idx:03d}"
        done = not overwrite and key in scales and _is_valid_npy(img_path) and _is_valid_npy(map_path)
        if done:
            skipped += 1
            continue
        try:
            out = compute(idx)
            problem = output_problem(out)
        except BadSliceError as err:
            problem = str(err)
        if problem is not None:
            bad.append((idx, problem))
            continue
        atomic_save_npy(img_path, out.image)
        atomic_save_npy(map_path, out.maps)
        scales[key] = out.scale
        atomic_write_text(scale_path, to_json(info, indent=1, sort_keys=True))
        written += 1
    if written == 0 and not scale_path.is_file():
        atomic_write_text(scale_path, to_json(info, indent=1, sort_keys=True))
    return SliceWriteResult(written, skipped, bad)

"""Offline preprocessing of fully sampled multi-coil k-space into the ContextMRI training layout (docs/formats.md).

Per slice: ESPIRiT maps from the k-space, MVUE coil combination, centre crop/pad in the image domain (which removes the
2x readout oversampling of fastMRI), division by the 99th percentile of the magnitude. Written as::

    {output_root}/{anatomy}_mvue_{crop}_{split}/slice/{file}/{idx:03d}.npy   complex64 [crop, crop]  (image / scale)
    {output_root}/{anatomy}_mvue_{crop}_{split}/mps/{file}/{idx:03d}.npy     complex64 [C, crop, crop] (unit-norm maps)
    {output_root}/{anatomy}_mvue_{crop}_{split}/scale/{file}.json            {"scale": {"000": s, ...}, ...}
    {output_root}/metadata_{anatomy}_{split}.csv

The maps are never rescaled (Σ_c|S_c|² = 1 inside the object, 0 outside); the image is divided by ``scale``, so the
matching k-space is ``kspace / scale``. Every file is written to a temporary name then ``os.replace``d
(:mod:`utils.files`), so a killed run leaves only complete files (and possibly ``*.tmp`` files, removed on the next
run); a rerun skips finished slices.

What a run never does silently:

- a slice whose k-space is non-finite or all zero (or whose result is) is reported and not written; its file counts
  as failed (the other slices of the file are kept);
- unparsable, non-finite or implausible header numbers become empty cells, with one warning per file and column;
- the metadata CSV of an output root is the union of every file ever processed into it: a run replaces the rows of
  the files it processed and keeps the others (:func:`merge_metadata_csv`);
- ``metadata_stats.json`` is built from the train split only;
- worker processes die with the run (:func:`run_in_pool`).

The cardiac (CMRxRecon) pipeline in :mod:`utils.preprocessing_cmrx` shares the per-slice code and the writers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from utils.coils import (
    ESPIRIT_DEFAULTS,
    center_crop_or_pad,
    espirit_maps,
    espirit_maps_fast,
    mvue,
    normalize_percentile,
)
from utils.files import atomic_save_npy, atomic_write_text, remove_stale_tmp, to_json
from utils.metadata import (
    ACQUISITION_TO_CONTRAST,
    CARDIAC_COLUMNS,
    EXTRA_COLUMNS,
    REFERENCE_COLUMNS,
    compute_metadata_stats,
    is_missing,
    load_records,
    save_metadata_stats,
)

#: Column order of the fastMRI metadata CSVs we write.
FASTMRI_CSV_COLUMNS = REFERENCE_COLUMNS + EXTRA_COLUMNS
#: Column order of the cardiac metadata CSVs we write.
#: Column order of the cardiac metadata CSVs: ``file_index`` (= slice * num_frames + frame) names the ``.npy`` file.
CARDIAC_CSV_COLUMNS = REFERENCE_COLUMNS + EXTRA_COLUMNS + CARDIAC_COLUMNS + ["file_index"]


# ----------------------------------------------------------------------------------------------------------------------
# Per-slice math
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EspiritParams:
    """ESPIRiT settings.

    ``backend="fast"`` (default) computes the same maps as sigpy's ``EspiritCalib`` exactly (top eigenvector by
    ``eigh``) on the kept pixels only, see :func:`utils.coils.espirit_maps_fast`; ``max_iter`` is then unused.
    ``backend="sigpy"`` runs ``EspiritCalib`` (power iteration, ``max_iter`` steps) on the full grid, as the reference.
    The other fields are the reference's parameters (docs/formats.md).
    """

    calib_width: int = ESPIRIT_DEFAULTS["calib_width"]
    thresh: float = ESPIRIT_DEFAULTS["thresh"]
    kernel_width: int = ESPIRIT_DEFAULTS["kernel_width"]
    crop: float = ESPIRIT_DEFAULTS["crop"]
    max_iter: int = ESPIRIT_DEFAULTS["max_iter"]
    backend: str = "fast"

    def __post_init__(self) -> None:
        if self.backend not in ("fast", "sigpy"):
            raise ValueError(f"ESPIRiT backend must be 'fast' or 'sigpy', got {self.backend!r}")
        if self.kernel_width > self.calib_width:
            raise ValueError(f"kernel_width {self.kernel_width} exceeds calib_width {self.calib_width}")

    def maps(self, kspace: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
        """Maps ``[C, *out_shape]`` (complex64) of k-space ``[C, H, W]``, centre-cropped/padded to ``out_shape``."""
        if self.backend == "fast":
            return espirit_maps_fast(
                kspace, self.calib_width, self.thresh, self.kernel_width, self.crop, out_shape=out_shape
            )
        full = espirit_maps(
            kspace, self.calib_width, self.thresh, self.kernel_width, self.crop, max_iter=self.max_iter
        )
        return center_crop_or_pad(full, out_shape)


@dataclass
class SliceOutput:
    """One preprocessed slice.

    Attributes:
        image: complex64 ``[h, w]``, MVUE divided by ``scale`` (99th percentile of ``|image|`` is 1).
        maps: complex64 ``[C, h, w]``, unit-norm ESPIRiT maps (not scaled).
        scale: the divisor (float).
    """

    image: np.ndarray
    maps: np.ndarray
    scale: float


def coil_images(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse 2-D FFT of ``[..., H, W]`` k-space (numpy; same convention as ``utils.fft``)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), axes=axes, norm="ortho"), axes=axes)


class BadSliceError(ValueError):
    """A slice that cannot be used: non-finite or all-zero k-space, or a non-finite result. Not written."""


def kspace_problem(kspace: np.ndarray) -> str | None:
    """Why a slice's k-space ``[C, H, W]`` cannot be preprocessed, or ``None`` when it can.

    A NaN/inf sample spreads over the whole image through the FFT (and through ESPIRiT over the maps); an all-zero
    slice has no image to normalise (the 99th percentile is 0). Either would give NaN training targets.
    """
    finite = np.isfinite(kspace)
    if not finite.all():
        return f"non-finite k-space ({finite.size - int(np.count_nonzero(finite))} of {finite.size} samples NaN/inf)"
    if not np.any(kspace):
        return "all-zero k-space"
    return None


def check_kspace(kspace: np.ndarray) -> None:
    """Raise :class:`BadSliceError` when :func:`kspace_problem` finds one."""
    problem = kspace_problem(kspace)
    if problem is not None:
        raise BadSliceError(problem)


def output_problem(out: SliceOutput) -> str | None:
    """Why a computed slice must not be written (non-finite image/maps, scale not finite and > 0), or ``None``."""
    if not (math.isfinite(out.scale) and out.scale > 0):
        return f"unusable normalisation scale {out.scale!r}"
    if not np.isfinite(out.image).all():
        return "non-finite image"
    if not np.isfinite(out.maps).all():
        return "non-finite coil maps"
    return None


def process_kspace_slice(
    kspace: np.ndarray, crop_size: int | tuple[int, int], espirit: EspiritParams, maps: np.ndarray | None = None
) -> SliceOutput:
    """ESPIRiT + MVUE + centre crop/pad + 99th-percentile normalisation of one fully sampled slice.

    Args:
        kspace: complex ``[C, H, W]`` centred k-space.
        crop_size: output size ``h = w`` (int) or ``(h, w)``.
        espirit: map settings.
        maps: precomputed maps ``[C, h, w]`` (skips ESPIRiT), e.g. from a calibration scan.

    Returns:
        :class:`SliceOutput`.

    Raises:
        BadSliceError: non-finite or all-zero k-space.
    """
    shape = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    kspace = np.asarray(kspace, dtype=np.complex64)
    check_kspace(kspace)
    if maps is None:
        maps = espirit.maps(kspace, shape)
    coils = center_crop_or_pad(coil_images(kspace).astype(np.complex64), shape)
    image, scale = normalize_percentile(mvue(coils, maps), 99.0)
    return SliceOutput(np.ascontiguousarray(image, dtype=np.complex64), np.ascontiguousarray(maps), float(scale))


# ----------------------------------------------------------------------------------------------------------------------
# Files and layout
# ----------------------------------------------------------------------------------------------------------------------


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


@dataclass
class FileReport:
    """What happened to one input file (returned from worker processes).

    Attributes:
        name: file stem.
        rows: metadata rows of its slices (empty when it failed).
        written, skipped: slices computed now / already present.
        error: ``None`` on success, else a one-line reason.
        notes: informational messages (e.g. "reconstructed from undersampled data").
        warnings: metadata values read as missing (one line per column), a missing header.
        bad_slices: ``(slice label, reason)`` of the slices not written (the file then has an ``error``).
    """

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    skipped: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad_slices: list[tuple[str, str]] = field(default_factory=list)

    def fail_bad_slices(self) -> None:
        """Set :attr:`error` from :attr:`bad_slices` (if any): the file is reported as failed."""
        if self.bad_slices:
            listed = "; ".join(f"{label}: {why}" for label, why in self.bad_slices)
            self.error = f"{len(self.bad_slices)} slice(s) skipped: {listed}"


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


def _cell(value: Any) -> str:
    """CSV text of a value: ``None``/NaN -> empty; lists joined by ``", "``; integral floats without ``.0``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if value is None or is_missing(value):
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):  # never an "inf" cell: the row would poison the stats and the embedder
            return ""
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def _csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_metadata_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write rows (``None`` -> empty cell; lists joined by ``", "``; integral floats without ``.0``) atomically."""
    atomic_write_text(path, _csv_text(rows, columns))


class MergeCounts(NamedTuple):
    """Rows of a metadata CSV after :func:`merge_metadata_csv`.

    Attributes:
        added: new rows (no row of that file and slice before).
        replaced: rows of this run that replace a row of the same file and slice.
        kept: rows of other files, left as they were.
        dropped: old rows of a re-processed file that this run did not produce again (e.g. a slice now skipped as bad).
    """

    added: int
    replaced: int
    kept: int
    dropped: int

    def format(self) -> str:
        text = f"{self.added} added, {self.replaced} replaced, {self.kept} kept"
        return text + (f", {self.dropped} dropped" if self.dropped else "")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op elsewhere): one read-merge-write at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (e.g. Windows): runs into one root must then be sequential
            pass
        yield


def _row_key(row: dict[str, Any], index_column: str) -> tuple[str, float]:
    """``(filename, index)`` of a CSV row; the index as a number so that 10 sorts after 9."""
    raw = row.get(index_column)
    try:
        index = float(raw)
    except (TypeError, ValueError):
        index = math.inf
    return str(row.get("filename", "")), index


def merge_metadata_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> MergeCounts:
    """Merge this run's rows into the metadata CSV at ``path`` (created if absent), atomically and under a lock.

    The CSV of an output root is the union of every file processed into it: the rows of the files in ``rows`` replace
    every old row of those files; the rows of other files are kept as they are (cell for cell). Rows are sorted by
    file, then slice (``file_index`` for cardiac CSVs). Columns of the old CSV that ``columns`` lacks are kept at the
    end. A lock file ``.{name}.lock`` next to the CSV serialises runs that merge into the same file.

    Raises:
        ValueError: the existing CSV cannot be read (it is left untouched).
    """
    import pandas as pd

    path = Path(path)
    index_column = "file_index" if "file_index" in columns else "slice"
    new_rows = [{c: _cell(row.get(c)) for c in columns} for row in rows]
    run_files = {r["filename"] for r in new_rows}
    new_keys = {_row_key(r, index_column) for r in new_rows}
    with _locked(path.with_name(f".{path.name}.lock")):
        old_rows: list[dict[str, str]] = []
        out_columns = list(columns)
        if path.is_file():
            try:
                old = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (ValueError, OSError) as err:  # pandas' EmptyDataError/ParserError are ValueErrors
                raise ValueError(f"existing metadata CSV {path} cannot be read ({err}); move it away to rebuild it "
                                 "from this run only") from err
            if not old.empty and "filename" not in old.columns:
                raise ValueError(f"existing metadata CSV {path} has no 'filename' column; move it away")
            out_columns += [c for c in old.columns if c not in out_columns]
            old_rows = old.to_dict(orient="records")
        kept = [r for r in old_rows if str(r.get("filename", "")) not in run_files]
        redone = [r for r in old_rows if str(r.get("filename", "")) in run_files]
        replaced = sum(_row_key(r, index_column) in new_keys for r in redone)
        merged = sorted(kept + new_rows, key=lambda r: _row_key(r, index_column))
        atomic_write_text(path, _csv_text(merged, out_columns))
    return MergeCounts(len(new_rows) - replaced, replaced, len(kept), len(redone) - replaced)


def write_stats_from_csvs(
    csv_paths: Sequence[str | Path], output: str | Path, problems: list[str] | None = None
) -> dict[str, Any]:
    """Build ``metadata_stats.json`` (``utils.metadata.compute_metadata_stats`` defaults) from metadata CSVs.

    Non-finite and implausible numbers are ignored (never a bound); ``problems`` receives one line per key with
    ignored values or with no value at all.
    """
    records: list[dict[str, Any]] = []
    for path in csv_paths:
        records.extend(load_records(path))
    stats = compute_metadata_stats(records, problems=problems)
    save_metadata_stats(stats, output)
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# fastMRI
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PreprocessConfig:
    """Settings of a fastMRI preprocessing run (``pre_processing_final.py``).

    Attributes:
        input_dir: folder of ``*.h5`` files (searched non-recursively).
        output_root: output root (see module docstring for the layout).
        split: ``"train"`` or ``"val"``.
        crop_size: image side after crop/pad.
        num_workers: worker processes (1 = in this process).
        anatomy: force the anatomy; ``None`` infers it per file (``file_brain_*`` -> brain, else knee).
        espirit: ESPIRiT settings.
        fastmri_plus_csv: optional fastMRI+ annotation CSV (columns ``file``, ``slice``, ``label``) for pathology.
        write_stats: also write ``{output_root}/metadata_stats.json`` from the ``metadata_*_train.csv`` files there
            (train split only: stats built from validation data would leak it into the model's normalisation).
        overwrite: recompute slices that already exist.
        files: explicit list of files (overrides the ``input_dir`` listing).
    """

    input_dir: Path
    output_root: Path
    split: str = "train"
    crop_size: int = 320
    num_workers: int = 1
    anatomy: str | None = None
    espirit: EspiritParams = field(default_factory=EspiritParams)
    fastmri_plus_csv: Path | None = None
    write_stats: bool = False
    overwrite: bool = False
    files: list[Path] | None = None

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        self.output_root = Path(self.output_root)
        if self.split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {self.split!r}")
        if self.crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.write_stats and self.split != "train":
            raise ValueError(STATS_TRAIN_ONLY)


#: Why ``--write_stats`` is refused on a validation run.
STATS_TRAIN_ONLY = ("--write_stats is for the train split only (stats must not come from validation data): run it with "
                    "--train, or build the stats with make_metadata_stats.py from the train CSVs")


@dataclass
class RunSummary:
    """Outcome of a run. ``ok`` is False when any file failed or there was no input file at all."""

    files_total: int
    files_ok: int
    failed: list[tuple[str, str]]
    slices_written: int
    slices_skipped: int
    seconds: float
    csv_paths: list[Path]
    stats_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: CSV -> rows added / replaced / kept by this run (:func:`merge_metadata_csv`).
    csv_counts: dict[Path, MergeCounts] = field(default_factory=dict)
    slices_bad: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and self.files_total > 0

    def format(self) -> str:
        lines = [
            f"files: {self.files_ok}/{self.files_total} ok, {len(self.failed)} failed; slices: {self.slices_written} "
            f"written, {self.slices_skipped} already present"
            + (f", {self.slices_bad} skipped as unusable" if self.slices_bad else "")
            + f"; {self.seconds:.1f} s"
            + (f" ({self.slices_written / self.seconds:.2f} slices/s)" if self.seconds and self.slices_written else "")
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING {w}" for w in self.warnings]
        lines += [f"  FAILED {name}: {err}" for name, err in self.failed]
        for p in self.csv_paths:
            counts = self.csv_counts.get(p)
            lines.append(f"  metadata: {p}" + (f" (rows: {counts.format()})" if counts is not None else ""))
        if self.csv_counts:
            total = MergeCounts(*(sum(c[i] for c in self.csv_counts.values()) for i in range(4)))
            lines.append(f"  metadata rows: {total.format()}")
        else:
            lines.append("  metadata rows: none from this run (existing CSVs untouched)")
        if self.stats_path is not None:
            lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


def infer_anatomy(filename: str) -> str:
    """fastMRI naming: ``file_brain_*`` is brain, anything else (``file1000007``) knee."""
    return "brain" if Path(filename).name.startswith("file_brain") else "knee"


def contrast_from_acquisition(acquisition: str | None) -> str | None:
    """Clean contrast label (e.g. ``AXFLAIR`` -> ``FLAIR``); an unknown label is kept as is, a missing one is None."""
    if acquisition is None or is_missing(acquisition):
        return None
    return ACQUISITION_TO_CONTRAST.get(acquisition.strip(), acquisition.strip())


def load_fastmri_plus(path: str | Path) -> dict[tuple[str, int], list[str]]:
    """fastMRI+ annotations: ``(file stem, slice) -> [label, ...]`` (one entry per annotation, duplicates kept).

    Rows without a slice number (study-level labels in some releases) or without a label are ignored.
    """
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    needed = {"file", "slice", "label"}
    if not needed <= set(df.columns):
        raise ValueError(f"{path}: fastMRI+ CSV needs columns {sorted(needed)}, has {list(df.columns)}")
    out: dict[tuple[str, int], list[str]] = defaultdict(list)
    for file, slc, label in zip(df["file"], df["slice"], df["label"]):
        if is_missing(slc) or is_missing(label):
            continue
        try:
            idx = int(float(slc))
        except ValueError:
            continue
        out[(Path(file.strip()).stem, idx)].append(label.strip())
    return dict(out)


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _limit_threads() -> None:
    """One thread per worker: the parallelism is over files."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # no numba, or its pool already started: threads stay as they are
        pass


def process_fastmri_file(
    path: Path, cfg: PreprocessConfig, pathology: dict[tuple[str, int], list[str]] | None = None
) -> FileReport:
    """Preprocess every slice of one fastMRI h5 file (resumable) and return its metadata rows.

    Never raises for a bad input file: the error is returned in :attr:`FileReport.error`.
    """
    from utils.fastmri_io import FastMRIFile, header_metadata

    stem = Path(path).stem
    report = FileReport(name=stem)
    try:
        with FastMRIFile.open(path) as f:
            anatomy = cfg.anatomy or infer_anatomy(stem)
            ds_dir = dataset_dir(cfg.output_root, anatomy, cfg.crop_size, cfg.split)
            meta = header_metadata(f.header, num_coils=f.num_coils, problems=report.warnings)
            contrast = contrast_from_acquisition(f.attrs.get("acquisition"))
            extra = {
                "source": str(path),
                "source_shape": [f.num_slices, f.num_coils, *f.shape],
                "crop_size": cfg.crop_size,
                "espirit": asdict(cfg.espirit),
            }
            result = write_slices(
                ds_dir,
                stem,
                range(f.num_slices),
                lambda i: process_kspace_slice(f.read_slice(i), cfg.crop_size, cfg.espirit),
                overwrite=cfg.overwrite,
                extra_info=extra,
            )
            report.written, report.skipped = result.written, result.skipped
            report.bad_slices = [(f"slice {idx}", why) for idx, why in result.bad]
            bad = {idx for idx, _ in result.bad}
            for idx in range(f.num_slices):
                if idx in bad:  # not on disk: no row (the file is reported as failed)
                    continue
                labels = (pathology or {}).get((stem, idx), [])
                row = {"anatomy": anatomy, "filename": stem, "slice": idx, "contrast": contrast, "pathology": labels}
                report.rows.append({**row, **meta})
            report.fail_bad_slices()
    except Exception as exc:  # a corrupt/truncated file must not stop the run
        report.rows = []
        report.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if os.environ.get("PREPROCESS_DEBUG"):
            report.error += "\n" + traceback.format_exc()
    return report


#: Seconds between two checks of the worker watchdog (a worker outlives a killed run by at most about this).
WATCHDOG_INTERVAL_S = 0.2


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, i.e. dead but not yet reaped by its own parent, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X", b"x")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _watch_parent(parent_pid: int) -> None:
    while _process_alive(parent_pid):
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)  # the run is gone: nobody will read this worker's result; atomic writes leave only complete files


def _set_parent_death_signal() -> None:
    """Linux: SIGKILL this process when its parent (here the forkserver) exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init(parent_pid: int) -> None:
    """Initializer of every pool worker: one thread, and die with the run.

    Why: a ``ProcessPoolExecutor`` worker waits on a queue whose write end every worker also holds, so when the run is
    killed it never sees end-of-file and waits forever, and while it lives the forkserver (which waits for all its
    clients to go) lives too. So each worker watches the run's pid (a thread, :data:`WATCHDOG_INTERVAL_S`) and exits
    when it is gone; the kernel also kills it if the forkserver dies first (``PR_SET_PDEATHSIG``). Ctrl-C reaches the
    whole process group: workers ignore SIGINT and the parent's handler stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watchdog").start()
    _limit_threads()


@contextlib.contextmanager
def _stop_workers_on_signal(pool: ProcessPoolExecutor) -> Iterator[None]:
    """While the pool runs, SIGTERM/SIGINT terminate its workers and end the run at once (exit 128 + signal).

    Why not let the exception unwind: leaving the ``with ProcessPoolExecutor`` block waits for every running file to
    finish. Finished slices are on disk (atomic writes): a rerun resumes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        procs = list(getattr(pool, "_processes", {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(2.0)
                if proc.is_alive():
                    proc.kill()
        print(f"\ninterrupted by {signal.Signals(signum).name}: stopped {len(procs)} worker(s); finished slices are "
              "kept, rerun the same command to resume", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def run_in_pool(
    jobs: Sequence[tuple[str, Callable[..., FileReport], tuple]],
    num_workers: int,
    desc: str,
    show_progress: bool = True,
) -> list[FileReport]:
    """Run ``fn(*args)`` for every job (in this process, or a process pool); collect reports.

    A worker that dies (e.g. killed by the OS) is reported as a failure of its job rather than ending the run. Killing
    the run (SIGKILL, SIGTERM, Ctrl-C) leaves no process behind: see :func:`_worker_init` and
    :func:`_stop_workers_on_signal`.
    """
    from tqdm.auto import tqdm

    reports: list[FileReport] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=not show_progress)
    if num_workers == 1 or len(jobs) <= 1:
        for name, fn, args in jobs:
            reports.append(fn(*args))
            bar.update(1)
    else:
        # forkserver: workers fork from a clean server that imported the pipeline once (fork from a process whose
        # OpenMP/torch threads already ran is unsafe; spawn would import torch once per worker). The server exits by
        # itself once the run and all workers are gone (its "alive" pipe reaches end-of-file).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["utils.preprocessing", "utils.fastmri_io"])
        # The server inherits the environment when it starts (at the first submit): one BLAS/OpenMP thread, fixed at
        # library load time.
        saved = {v: os.environ.get(v) for v in _THREAD_VARS}
        os.environ.update({v: "1" for v in _THREAD_VARS})
        try:
            with ProcessPoolExecutor(
                max_workers=num_workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
            ) as pool, _stop_workers_on_signal(pool):
                futures: dict[Future, str] = {pool.submit(fn, *args): name for name, fn, args in jobs}
                for fut in as_completed(futures):
                    try:
                        reports.append(fut.result())
                    except Exception as exc:  # BrokenProcessPool and the like
                        err = f"worker failed: {type(exc).__name__}: {exc}"
                        reports.append(FileReport(name=futures[fut], error=err))
                    bar.update(1)
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
    bar.close()
    return reports


def list_h5_files(input_dir: Path) -> list[Path]:
    """Sorted ``*.h5`` files of a folder."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    return sorted(p for p in input_dir.iterdir() if p.suffix == ".h5" and p.is_file())


def run_preprocessing(cfg: PreprocessConfig, show_progress: bool = True) -> RunSummary:
    """Preprocess a folder of fastMRI h5 files and write the metadata CSV(s) (and stats, if asked).

    Files that fail are reported in the summary and left out of the CSV (a file with unusable slices is reported as
    failed but keeps the rows of its good slices); the others are processed. The rows are merged into the root's CSVs
    (:func:`merge_metadata_csv`).

    Raises:
        FileNotFoundError: ``cfg.input_dir`` is not a folder (and ``cfg.files`` is not given).
        ValueError: an unreadable fastMRI+ CSV or existing metadata CSV.
    """
    start = time.perf_counter()
    files = cfg.files if cfg.files is not None else list_h5_files(cfg.input_dir)
    pathology = load_fastmri_plus(cfg.fastmri_plus_csv) if cfg.fastmri_plus_csv else None
    jobs = [(p.stem, process_fastmri_file, (p, cfg, pathology)) for p in files]
    reports = run_in_pool(jobs, cfg.num_workers, desc=f"preprocess {cfg.split}", show_progress=show_progress)
    return finish_run(reports, cfg.output_root, cfg.split, "fastmri", FASTMRI_CSV_COLUMNS, cfg.write_stats, start)


def finish_run(
    reports: list[FileReport],
    output_root: Path,
    split: str,
    kind: str,
    columns: Sequence[str],
    write_stats: bool,
    start: float,
) -> RunSummary:
    """Merge the rows of ``reports`` into the metadata CSV(s) of ``output_root`` and build the summary.

    Each CSV is the union over runs (:func:`merge_metadata_csv`); with ``write_stats`` (train split only) the stats
    are rebuilt from every ``metadata_*_train.csv`` of the root, i.e. from everything processed into it so far.
    """
    if write_stats and split != "train":
        raise ValueError(STATS_TRAIN_ONLY)
    reports = sorted(reports, key=lambda r: r.name)
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in reports:
        for row in rep.rows:
            group = "cardiology" if kind == "cmrx" else row["anatomy"]
            by_group[group].append(row)
    csv_paths = []
    csv_counts: dict[Path, MergeCounts] = {}
    for group, rows in sorted(by_group.items()):
        path = Path(output_root) / f"metadata_{group}_{split}.csv"
        csv_counts[path] = merge_metadata_csv(path, rows, columns)
        csv_paths.append(path)
    stats_path = None
    notes = [f"{r.name}: {n}" for r in reports for n in r.notes]
    if write_stats:
        all_csvs = sorted(Path(output_root).glob("metadata_*_train.csv"))
        if all_csvs:
            stats_path = Path(output_root) / "metadata_stats.json"
            problems: list[str] = []
            write_stats_from_csvs(all_csvs, stats_path, problems=problems)
            notes += [f"stats: {p}" for p in problems]
    failed = [(r.name, r.error) for r in reports if r.error is not None]
    return RunSummary(
        files_total=len(reports),
        files_ok=len(reports) - len(failed),
        failed=failed,
        slices_written=sum(r.written for r in reports),
        slices_skipped=sum(r.skipped for r in reports),
        seconds=time.perf_counter() - start,
        csv_paths=csv_paths,
        stats_path=stats_path,
        notes=notes,
        warnings=[f"{r.name}: {w}" for r in reports for w in r.warnings],
        csv_counts=csv_counts,
        slices_bad=sum(len(r.bad_slices) for r in reports),
    )

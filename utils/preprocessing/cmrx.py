"""Preprocessing of CMRxRecon (cardiac cine and mapping) ``.mat`` files into the ContextMRI layout.

It shares the per-slice pipeline (ESPIRiT, MVUE, crop/pad, percentile normalisation), the atomic writers and the
process pool with the fastMRI pipeline in :mod:`utils.preprocessing.fastmri`; what it adds is reading the MATLAB v7.3 files of
both challenge layouts, choosing fully sampled k-space (or a SENSE reconstruction from undersampled data + ACS when no
fully sampled data exists), and the cardiac metadata rows.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.coils import center_crop_or_pad, normalize_percentile
from utils.preprocessing.layout import SPLITS, dataset_dir, write_slices
from utils.preprocessing.metadata_csv import CARDIAC_CSV_COLUMNS
from utils.preprocessing.slices import EspiritParams, SliceOutput, check_kspace, kspace_problem, process_kspace_slice
from utils.preprocessing.summary import FileReport, RunSummary, finish_run
from utils.preprocessing.workers import run_in_pool


@dataclass
class CardiacConfig:
    """Settings of a CMRxRecon preprocessing run (``pre_process_cmrx.py``).

    Attributes:
        input_dir: release root (or any folder above the ``Pxxx`` folders), 2023 or 2024 layout.
        output_dir: output root; writes ``heart_mvue_{crop}_{split}/`` and ``metadata_cardiology_{split}.csv``.
        split: output split name; when the input has ``TrainingSet``/``ValidationSet`` folders, ``train`` reads the
            former and ``val`` the latter (``sets`` overrides).
        crop_size: image side after crop/pad (readout ``kx`` is 2x oversampled: cropped in the image domain).
        views: keep only series whose view (``sax``, ``lax``, ``lax_4ch``...) or file name (``cine_sax``,
            ``T1map``...) is listed; ``None`` keeps all.
        slices, frames: keep only these slice / frame indices (those a series has); ``None`` keeps all.
        espirit: ESPIRiT settings (calibration width capped at the ACS width for undersampled data).
        maps_per_frame: ESPIRiT per frame; default one map set per slice from the frame-averaged k-space (coil
            sensitivities do not move over the cardiac cycle, and it is ``num_frames`` times cheaper).
        sense_gamma, sense_iters: fallback SENSE reconstruction ``(I + γ AᴴA) x = γ Aᴴ y`` (Tikhonov ``1/γ``), CG steps.
        num_workers, overwrite: as :class:`PreprocessConfig`.
        sets: explicit set folders to read (e.g. ``("TrainingSet",)``).
        num_shards, shard_index: this run is shard ``shard_index`` of ``num_shards`` separate runs into the same
            output (:func:`utils.distributed.shard_items` over the sorted series; files that cannot be opened are
            reported by shard 0 only).
    """

    input_dir: Path
    output_dir: Path
    split: str = "train"
    crop_size: int = 320
    views: list[str] | None = None
    slices: list[int] | None = None
    frames: list[int] | None = None
    espirit: EspiritParams = field(default_factory=EspiritParams)
    maps_per_frame: bool = False
    sense_gamma: float = 100.0
    sense_iters: int = 30
    num_workers: int = 1
    overwrite: bool = False
    sets: tuple[str, ...] | None = None
    num_shards: int = 1
    shard_index: int = 0

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        self.output_dir = Path(self.output_dir)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.crop_size <= 0 or self.num_workers < 1:
            raise ValueError("crop_size and num_workers must be positive")


def acs_width(mask_ky: np.ndarray) -> int:
    """Number of contiguous sampled phase-encode lines around the centre of a 1-D ky mask."""
    lines = np.asarray(mask_ky) > 0
    c = len(lines) // 2
    if not lines[c]:
        return 0
    lo, hi = c, c
    while lo > 0 and lines[lo - 1]:
        lo -= 1
    while hi < len(lines) - 1 and lines[hi + 1]:
        hi += 1
    return hi - lo + 1


def sense_reconstruction(
    kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray, gamma: float = 100.0, max_iter: int = 30
) -> np.ndarray:
    """Regularised SENSE: solve ``(I + γ AᴴA) x = γ Aᴴ y`` by CG (``utils.cg``), ``A = M F S``.

    Args:
        kspace: undersampled k-space ``[C, H, W]`` (zeros where not sampled).
        maps: ``[C, H, W]`` unit-norm maps on the same grid.
        mask: 0/1 ``[H, W]``.

    Returns:
        complex64 image ``[H, W]``.
    """
    import torch

    from utils.cg import conjugate_gradient
    from utils.operators import SenseOperator

    op = SenseOperator(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.complex64))[None],
                       torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None])  # fmt: skip
    y = torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64))[None]
    b = gamma * op.adjoint(y)
    x = conjugate_gradient(op.normal, b, gamma=gamma, max_iter=max_iter)
    return x[0].numpy().astype(np.complex64)


def _selected(values: Sequence[int] | None, n: int) -> list[int]:
    return list(range(n)) if values is None else [v for v in values if 0 <= v < n]


def process_cmrx_series(series: Any, cfg: CardiacConfig) -> FileReport:
    """Preprocess the selected slices/frames of one CMRxRecon series; never raises for a bad file."""
    from utils.cmrx_io import MatKspace, read_mask, series_metadata

    report = FileReport(name=series.name)
    shape = (cfg.crop_size, cfg.crop_size)
    try:
        with MatKspace(series.path, series.variable) as ks:
            nz, nt = ks.num_slices, ks.num_frames
            slices, frames = _selected(cfg.slices, nz), _selected(cfg.frames, nt)
            ds_dir = dataset_dir(cfg.output_dir, "heart", cfg.crop_size, cfg.split)
            mask_all = None
            espirit = cfg.espirit
            if not series.fully_sampled:
                if series.mask_path is not None:
                    mask_all = read_mask(series.mask_path, series.mask_variable)
                    how = f"mask {series.mask_path.name}:{series.mask_variable}"
                else:
                    how = "mask from the nonzero k-space samples"
                report.notes.append(
                    f"no fully sampled k-space: SENSE (CG, {cfg.sense_iters} it.) from {series.path.name}:"
                    f"{series.variable} ({how})"
                )

            def frame_mask(k: np.ndarray, t: int) -> np.ndarray:
                if mask_all is None:
                    return (np.abs(k) > 0).any(axis=0).astype(np.float32)
                m = mask_all[t] if mask_all.ndim == 3 else mask_all
                return np.broadcast_to(m, k.shape[-2:]).astype(np.float32)

            maps_cache: dict[int, np.ndarray] = {}

            def maps_for(z: int, k_frame: np.ndarray | None, t: int) -> np.ndarray:
                """Full-grid maps (undersampled) or cropped maps (fully sampled) of slice z."""
                out_shape = shape if series.fully_sampled else None
                if cfg.maps_per_frame:
                    k_cal = k_frame
                elif z in maps_cache:
                    return maps_cache[z]
                else:  # frame-averaged k-space: the sensitivities are the same in every frame
                    # (only usable frames: one NaN frame must not spoil the maps of the whole slice)
                    usable = [k for k in (ks.read(z, tt) for tt in range(nt)) if kspace_problem(k) is None]
                    k_cal = np.mean(usable, axis=0)
                params = espirit
                if not series.fully_sampled:
                    acs = acs_width(frame_mask(k_cal if k_frame is None else k_frame, t).max(axis=0))
                    cw = min(espirit.calib_width, acs)
                    if cw < 4:
                        raise ValueError(f"only {acs} ACS lines: cannot calibrate ESPIRiT")
                    params = EspiritParams(cw, espirit.thresh, min(espirit.kernel_width, cw - 1), espirit.crop,
                                           espirit.max_iter, espirit.backend)  # fmt: skip
                m = params.maps(k_cal, out_shape) if out_shape else params.maps(k_cal, k_cal.shape[-2:])
                if not cfg.maps_per_frame:
                    maps_cache[z] = m
                return m

            def compute(index: int) -> SliceOutput:
                z, t = divmod(index, nt)
                k = ks.read(z, t)
                check_kspace(k)  # before the maps: a NaN frame must not be averaged into the slice's calibration
                maps = maps_for(z, k, t)
                if series.fully_sampled:
                    return process_kspace_slice(k, shape, espirit, maps=maps)
                mask = frame_mask(k, t)
                image = sense_reconstruction(k * mask, maps, mask, cfg.sense_gamma, cfg.sense_iters)
                image, scale = normalize_percentile(center_crop_or_pad(image, shape), 99.0)
                return SliceOutput(image.astype(np.complex64), center_crop_or_pad(maps, shape), float(scale))

            indices = [z * nt + t for z in slices for t in frames]
            extra = {
                "source": str(series.path),
                "variable": series.variable,
                "fully_sampled": series.fully_sampled,
                "num_slices": nz,
                "num_frames": nt,
                "index": "slice * num_frames + frame",
                "crop_size": cfg.crop_size,
                "espirit": asdict(espirit),
            }
            result = write_slices(ds_dir, series.name, indices, compute, cfg.overwrite, extra)
            report.written, report.skipped = result.written, result.skipped
            report.bad_slices = [(f"slice {i // nt} frame {i % nt}", why) for i, why in result.bad]
            bad = {i for i, _ in result.bad}
            meta = series_metadata(series, ks.num_coils, ks.image_shape, problems=report.warnings)
            for z in slices:
                for t in frames:
                    if z * nt + t not in bad:
                        report.rows.append({**meta, "slice": z, "frame": t, "file_index": z * nt + t})
            report.fail_bad_slices()
    except Exception as exc:
        report.rows = []
        report.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if os.environ.get("PREPROCESS_DEBUG"):
            report.error += "\n" + traceback.format_exc()
    return report


def run_cmrx_preprocessing(cfg: CardiacConfig, show_progress: bool = True) -> RunSummary:
    """Preprocess every selected CMRxRecon series under ``cfg.input_dir``; see :class:`CardiacConfig`."""
    from utils.cmrx_io import find_cmrx_series, series_protocol

    start = time.perf_counter()
    sets = cfg.sets
    if sets is None:
        wanted = "TrainingSet" if cfg.split == "train" else "ValidationSet"
        has_sets = any(p.name in ("TrainingSet", "ValidationSet") for p in cfg.input_dir.rglob("*Set"))
        sets = (wanted,) if has_sets else None
    series, problems = find_cmrx_series(cfg.input_dir, sets)
    if cfg.views:
        keep = set(cfg.views)
        series = [s for s in series if s.stem in keep or series_protocol(s.stem).view in keep]
    from utils.distributed import shard_items

    series = shard_items(series, cfg.num_shards, cfg.shard_index)  # this machine's series (all, unsharded)
    problems = problems if cfg.shard_index == 0 else []
    jobs = [(s.name, process_cmrx_series, (s, cfg)) for s in series]
    reports = run_in_pool(jobs, cfg.num_workers, desc=f"cmrx {cfg.split}", show_progress=show_progress)
    reports += [FileReport(name=p.split(":")[0], error=p) for p in problems]
    return finish_run(reports, cfg.output_dir, cfg.split, "cmrx", CARDIAC_CSV_COLUMNS, False, start)

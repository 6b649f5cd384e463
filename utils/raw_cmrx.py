"""CMRxRecon multi-coil ``.mat`` (MATLAB v7.3) files on the ``--raw_dir`` path (``docs/raw_reconstruction.md``,
section "CMRxRecon").

A CMRxRecon k-space variable is MATLAB ``(kx, ky, coils, slices, frames)`` (:class:`utils.cmrx_io.MatKspace`); every
(slice, frame) is one item of the reconstruction loop, numbered ``index = slice * num_frames + frame`` (the numbering
cardiac preprocessing uses for ``file_index``). Each item is read as ``[C, kx, ky]`` — readout first, like fastMRI's
``[C, H, W]`` — so the fastMRI machinery (operator, ESPIRiT from the ACS lines, scale, samplers) applies unchanged.

What differs from fastMRI and lives here:

* **Files.** ``FullSample`` files (``kspace_full``) are undersampled retrospectively exactly as fastMRI validation files
  (:func:`utils.raw_data.slice_measurement`, mask seeded from ``(stem, index)``). Undersampled files (2023:
  ``AccFactor{04,08,10}/Pxxx/{name}.mat`` with ``kspace_subXX`` and ``{name}_mask.mat`` holding ``maskXX``; 2024:
  ``{name}_kus_{Pattern}{R}.mat`` with ``kus`` and ``{name}_mask_{Pattern}{R}.mat`` holding ``mask``, in the same
  folder or in the sibling ``Mask_TaskN`` of an ``UnderSample_TaskN`` folder) use their mask file as is, per frame
  for ``k × t`` masks ``(kx, ky, nt)``.
* **Names.** Every CMRxRecon file is called ``cine_sax.mat`` or alike, so a volume's ``stem`` (its row/slice folders,
  its ``.h5`` and its mask seeds) is its path from ``MultiCoil/`` on, joined by ``_`` (e.g.
  ``Cine_ValidationSet_AccFactor04_P001_cine_sax``).
* **Noise.** No header says whether the readout is oversampled, and when it is not the object reaches the readout
  margins that :func:`utils.raw_data.estimate_noise_sigma` uses: :func:`cmrx_noise_sigma` takes the smaller of that
  estimate and one from the null space of the ACS calibration matrix (:func:`calibration_noise_sigma`), which needs
  no empty region (both can only be inflated by signal).
* **Metadata.** No header at all: the series' protocol from its file name and ``ImgSnapshot`` csv, as cardiac
  preprocessing writes it (:func:`utils.cmrx_io.series_metadata`), plus ``slice``/``frame``.
* **Output.** Besides ``reconstructions/{stem}.h5`` (full size, every slice and frame), ``submission/`` mirrors the
  input tree with the challenge's ``img4ranking`` (:func:`ranking_crop`, :func:`write_submission_mat`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from utils.raw_data import (
    _EQUISPACED_TYPES,
    Measurement,
    RawVolume,
    _is_equispaced,
    contiguous_center_width,
    estimate_noise_sigma,
    slice_measurement,
)

#: MAD -> standard deviation of a Gaussian.
_MAD_TO_STD = 1.482602218505602
_KSPACE_FULL = "kspace_full"
_SUB_2023 = re.compile(r"^kspace_sub(\d+)$")
_KUS_NAME = re.compile(r"^(?P<base>.+)_kus_(?P<pattern>[A-Za-z]+)(?P<acc>\d+)$")
_MASK_VAR = re.compile(r"^mask\d*$")
_PATIENT = re.compile(r"^P\d+$")
_UNDERSAMPLE_TASK = re.compile(r"^UnderSample_(Task\d+)$")
#: Where the submission tree starts (the challenge's folders are mirrored from here on).
_TREE_ROOT = "MultiCoil"
#: Per-(slice, frame) metrics on the ranking region (the summary's ``cmrx_*`` columns).
CMRX_SCORE_KEYS = ("cmrx_psnr", "cmrx_ssim", "cmrx_nmse")


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def is_cmrx_file(path: str | Path) -> bool:
    """A ``.mat`` path (the file type the ``--raw_dir`` dispatch hands to this module)."""
    return Path(path).suffix.lower() == ".mat"


def _is_mask_file(path: Path) -> bool:
    return path.stem.endswith("_mask") or "_mask_" in path.stem


def list_cmrx_files(root: str | Path) -> list[Path]:
    """The CMRxRecon k-space ``.mat`` files under ``root`` (searched recursively), sorted by path.

    Mask files (``*_mask.mat``, ``*_mask_*.mat``) are inputs of their data files, not volumes; ``SingleCoil`` trees
    (single-coil k-space, not supported) are skipped. Files are not opened here: an unreadable one is reported by
    :func:`open_cmrx_volume`.
    """
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or not is_cmrx_file(p) or _is_mask_file(p) or p.name.startswith("."):
            continue
        if "SingleCoil" in p.relative_to(root).parts or "SingleCoil" in root.parts:
            continue
        out.append(p)
    seen: dict[str, Path] = {}
    for p in out:  # the stem names a volume's outputs and seeds its masks: two files must not share it
        other = seen.setdefault(volume_stem(p), p)
        if other != p:
            raise ValueError(f"{other} and {p} would share the output name {volume_stem(p)}: give each tree from its "
                             "MultiCoil/ folder on")  # fmt: skip
    return out


def submission_relpath(path: str | Path) -> Path:
    """Where a file's result goes in the submission tree: its path from ``MultiCoil/`` on (else from its set folder,
    ``{folder}/Pxxx/{name}.mat``, else its name), with the 2024 input folder ``UnderSample_TaskN`` named ``TaskN`` as
    the 2024 submission layout names it."""
    parts = Path(path).resolve().parts
    if _TREE_ROOT in parts:
        i = len(parts) - 1 - parts[::-1].index(_TREE_ROOT)
        rel = list(parts[i:])
    elif len(parts) >= 3 and _PATIENT.match(parts[-2]):
        rel = list(parts[-3:])
    else:
        rel = [parts[-1]]
    rel = [(_UNDERSAMPLE_TASK.sub(r"\1", p) if k < len(rel) - 1 else p) for k, p in enumerate(rel)]
    return Path(*rel)


def volume_stem(path: str | Path) -> str:
    """The unique name of a CMRxRecon volume: :func:`submission_relpath` without ``MultiCoil`` and the suffix, joined
    by ``_`` (e.g. ``Cine_ValidationSet_AccFactor04_P001_cine_sax``)."""
    rel = submission_relpath(path)
    parts = [p for p in rel.with_suffix("").parts if p != _TREE_ROOT]
    return "_".join(parts)


def _root_datasets(path: Path) -> dict[str, tuple[int, ...]]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: tuple(f[k].shape) for k in f if isinstance(f[k], h5py.Dataset) and not k.startswith("#")}


def _find_mask(path: Path, base: str, pattern_acc: str | None, sub_digits: str | None) -> tuple[Path, str]:
    """The mask file and variable of an undersampled file (2023 ``{base}_mask.mat``/``maskXX``; 2024
    ``{base}_mask_{Pattern}{R}.mat``/``mask``, next to the file or in the sibling ``Mask_TaskN`` folder).

    Raises:
        ValueError: no mask file, or no mask variable in it.
    """
    candidates = []
    if pattern_acc is not None:
        name = f"{base}_mask_{pattern_acc}.mat"
        candidates.append(path.with_name(name))
        folder = path.parent.parent.name  # UnderSample_TaskN/Pxxx/file
        m = _UNDERSAMPLE_TASK.match(folder)
        if m:
            candidates.append(path.parent.parent.parent / f"Mask_{m.group(1)}" / path.parent.name / name)
    else:
        candidates.append(path.with_name(f"{base}_mask.mat"))
    mask_path = next((c for c in candidates if c.is_file()), None)
    if mask_path is None:
        looked = ", ".join(str(c) for c in candidates)
        raise ValueError(f"undersampled file without its mask file (looked for {looked})")
    try:
        names = [k for k in _root_datasets(mask_path) if _MASK_VAR.match(k)]
    except OSError as err:
        raise ValueError(f"mask file {mask_path.name} unreadable ({str(err).splitlines()[0]})") from err
    if not names:
        raise ValueError(f"mask file {mask_path.name} holds no mask variable")
    wanted = f"mask{sub_digits}" if sub_digits is not None else "mask"
    return mask_path, wanted if wanted in names else names[0]


# ----------------------------------------------------------------------------------------------------------------------
# The volume
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CMRxRawVolume(RawVolume):
    """One CMRxRecon multi-coil series file on the ``--raw_dir`` path (a :class:`utils.raw_data.RawVolume`).

    ``num_slices`` counts (slice, frame) items, ``index = slice * num_frames + frame``; ``grid_shape = (kx, ky)``;
    every ky column is acquired (no zero padding); ``recon_shape = grid_shape`` (the challenge's "original size").

    Attributes (besides :class:`RawVolume`'s):
        variable: the k-space variable (``kspace_full``, ``kspace_subXX``, ``kus``).
        num_series_slices, num_frames: ``nz``, ``nt``.
        frame_masks: bool ``[1 | nt, kx, ky]``, the mask file's pattern (undersampled files), else ``None``.
        mask_path, mask_variable: where it was read.
        pattern: ``"uniform"``, ``"ktuniform"``, ``"ktgaussian"``, ``"ktradial"``, … (undersampled files).
        series: the :class:`utils.cmrx_io.CMRxSeries` (protocol, ``ImgSnapshot`` info).
        submission_path: the file's place in the submission tree (:func:`submission_relpath`).
    """

    variable: str = _KSPACE_FULL
    num_series_slices: int = 1
    num_frames: int = 1
    frame_masks: np.ndarray | None = None
    mask_path: Path | None = None
    mask_variable: str | None = None
    pattern: str | None = None
    series: Any = None
    submission_path: Path = Path()
    _target: np.ndarray | None = field(default=None, repr=False)

    def item(self, idx: int) -> tuple[int, int]:
        """``(slice, frame)`` of item ``idx``."""
        return divmod(int(idx), self.num_frames)

    def read_kspace(self, idx: int) -> np.ndarray:
        """K-space of item ``idx`` as stored, complex64 ``[C, kx, ky]``."""
        from utils.cmrx_io import MatKspace

        z, t = self.item(idx)
        with MatKspace(self.path, self.variable) as ks:
            return ks.read(z, t)

    def read_target(self) -> np.ndarray | None:
        """FullSample files: RSS of the fully sampled coil images of every item, float32 ``[N, kx, ky]`` (the target
        the challenge scores against: RSS of the full k-space); ``None`` for undersampled files."""
        if not self.has_target:
            return None
        if self._target is None:
            from utils.cmrx_io import MatKspace

            with MatKspace(self.path, self.variable) as ks:
                self._target = np.stack([_rss_image(ks.read(*self.item(i))) for i in range(self.num_slices)])
        return self._target

    # -- the hooks of utils.raw_reconstruction ------------------------------------------------------------------------
    def measurement(self, idx: int, kspace: np.ndarray, mask_type: str | None = None,
                    acc_factor: float | None = None, center_fraction: float | None = None) -> Measurement:
        """FullSample: a retrospective mask over ky seeded from ``(stem, index)``; undersampled: the mask file's
        pattern of this frame (``[1, ky]`` when every readout row is the same, else ``[kx, ky]``)."""
        if self.kind != "test":
            return slice_measurement(self, idx, kspace, mask_type, acc_factor, center_fraction)
        _, t = self.item(idx)
        fm = self.frame_masks[t if self.frame_masks.shape[0] > 1 else 0]
        mask = (fm[:1] if bool((fm == fm[:1]).all()) else fm).astype(np.float32)
        y = (kspace * mask[None]).astype(np.complex64)
        full = np.broadcast_to(mask, self.grid_shape)
        measured = float(full.sum())
        acc = float(full.size / measured) if measured > 0 else float("inf")
        return Measurement(y=y, mask=mask, acceleration=acc, num_center_lines=contiguous_center_width(mask),
                           source="file")  # fmt: skip

    def noise_sigma(self, m: Measurement) -> float:
        """:func:`cmrx_noise_sigma`."""
        return cmrx_noise_sigma(m.y, m.mask)

    def check_flags(self, mask_type: str | None, acc_factor: float | None) -> None:
        """Refuse ``--acc_factor``/``--mask_type`` that contradict an undersampled file's own mask (one line).

        ``acc_factor`` contradicts unless it equals the file's nominal rate (``AccFactorXX``/``kspace_subXX``/
        ``…{Pattern}{R}``); ``mask_type`` contradicts a 2-D (e.g. radial) mask always, a line mask if it is a 2-D
        family or its spacing (equispaced vs random outer lines) differs from the mask's first frame.

        Raises:
            ValueError: the contradiction, in one line.
        """
        if self.kind != "test":
            return
        name = str(self.submission_path)
        mask_name = self.mask_path.name if self.mask_path is not None else "its mask"
        file_acc = self.file_acceleration
        if acc_factor is not None and file_acc is not None and abs(acc_factor - file_acc) > 1e-6:
            raise ValueError(f"{name} is undersampled at {self.file_acceleration:g}x with its own mask ({mask_name}); "
                             f"--acc_factor {acc_factor:g} contradicts it (drop the flag)")  # fmt: skip
        if mask_type is None:
            return
        from utils.masks import TWO_D_TYPES

        fm = self.frame_masks[0]
        if not bool((fm == fm[:1]).all()):
            raise ValueError(f"{name} carries a 2-D mask ({mask_name}, {self.pattern}); --mask_type {mask_type} "
                             "contradicts it (drop the flag)")  # fmt: skip
        if mask_type in TWO_D_TYPES:
            raise ValueError(f"{name} carries a line mask ({mask_name}); --mask_type {mask_type} (2-D) contradicts it "
                             "(drop the flag)")  # fmt: skip
        equispaced = _is_equispaced(fm[0].astype(np.float32))
        if equispaced is not None and (mask_type in _EQUISPACED_TYPES) != equispaced:
            kind = "equispaced" if equispaced else "random"
            raise ValueError(f"{name} carries its own mask ({mask_name}) with {kind} outer lines; --mask_type "
                             f"{mask_type} contradicts it (drop the flag)")  # fmt: skip

    def extra_scores(self, magnitude: np.ndarray) -> dict[str, Any]:
        """``cmrx_psnr/ssim/nmse``: the fastMRI-protocol metrics of the challenge's ranking region
        (:func:`ranking_crop` of the result vs the same region of the target); ``{}`` without a target."""
        target = self.read_target()
        if target is None:
            return {}
        from utils.metrics import evaluate_volume

        g = _items_last(ranking_crop(self.to_matlab(target), self.series.stem))
        p = _items_last(ranking_crop(self.to_matlab(magnitude), self.series.stem))
        m = evaluate_volume(g, p, protocol="fastmri")
        return {f"cmrx_{k}": m[k] for k in ("psnr", "ssim", "nmse")}

    def write_extra_outputs(self, out: Path, magnitude: np.ndarray, complex_recon: np.ndarray | None = None,
                            std: np.ndarray | None = None) -> None:
        """``{out}/submission/{submission_path}``: the challenge's ``img4ranking`` (:func:`write_submission_mat`)."""
        write_submission_mat(Path(out) / "submission" / self.submission_path,
                             ranking_crop(self.to_matlab(magnitude), self.series.stem))  # fmt: skip

    def to_matlab(self, items: np.ndarray) -> np.ndarray:
        """``[N, kx, ky]`` per item -> MATLAB order ``(kx, ky, nz, nt)``."""
        a = np.asarray(items).reshape(self.num_series_slices, self.num_frames, *self.grid_shape)
        return np.ascontiguousarray(a.transpose(2, 3, 0, 1))


def _rss_image(kspace: np.ndarray) -> np.ndarray:
    """RSS over coils of the centred orthonormal inverse FFT of ``[C, kx, ky]`` -> float32 ``[kx, ky]``."""
    import torch

    from utils.coils import rss
    from utils.fft import ifft2c

    return rss(ifft2c(torch.from_numpy(np.ascontiguousarray(kspace)))).numpy().astype(np.float32)


def _items_last(a: np.ndarray) -> np.ndarray:
    """MATLAB ``(x, y, z, t)`` -> ``[z·t, x, y]`` (the metrics' ``[S, H, W]``)."""
    x, y = a.shape[:2]
    return np.ascontiguousarray(a.reshape(x, y, -1).transpose(2, 0, 1))


def open_cmrx_volume(
    path: str | Path, overrides: Mapping[tuple[str, int], Mapping[str, Any]] | None = None
) -> CMRxRawVolume:
    """Read a CMRxRecon multi-coil file's layout, its mask file (undersampled files) and per-item metadata.

    Args:
        path: the ``.mat`` file (``kspace_full``, ``kspace_subXX`` or ``kus``).
        overrides: ``(name, slice) -> {column: value}`` from :func:`utils.raw_data.load_metadata_overrides`
            (``--metadata_csv``); ``name`` is the series name of cardiac preprocessing (``P001_cine_sax``) or the
            volume's stem; an override carrying ``frame`` applies to that frame only.

    Raises:
        OSError: unreadable file; ValueError: not a CMRxRecon multi-coil k-space file, a missing or mismatching mask.
    """
    from utils.cmrx_io import CMRxSeries, MatKspace, _find_info_csv, read_info_csv, read_mask

    path = Path(path)
    names = _root_datasets(path)
    full = _KSPACE_FULL in names
    sub = [k for k in names if _SUB_2023.match(k) or k == "kus"]
    if not full and not sub:
        raise ValueError(f"no CMRxRecon multi-coil k-space variable (kspace_full, kspace_subXX, kus) in {path.name} "
                         f"(variables: {', '.join(sorted(names)) or 'none'})")  # fmt: skip
    variable = _KSPACE_FULL if full else sub[0]
    with MatKspace(path, variable) as ks:
        nz, nt, nc = ks.num_slices, ks.num_frames, ks.num_coils
        kx, ky = ks.image_shape
    stem_match = _KUS_NAME.match(path.stem)
    base = stem_match.group("base") if stem_match else path.stem
    patient = path.parent.name if _PATIENT.match(path.parent.name) else ""
    frame_masks = mask_path = mask_var = pattern = None
    acc = None
    if not full:
        sub_digits = None
        if stem_match:
            pattern, acc = stem_match.group("pattern").lower(), float(stem_match.group("acc"))
            pattern_acc = stem_match.group("pattern") + stem_match.group("acc")
        else:
            pattern_acc = None
            m = _SUB_2023.match(variable)
            if m:
                sub_digits, acc, pattern = m.group(1), float(m.group(1)), "uniform"
            else:  # ``kus`` without the 2024 name: the rate from an AccFactorXX folder, if any
                folder = re.match(r"^AccFactor(\d+)$", path.parent.parent.name)
                acc = float(folder.group(1)) if folder else None
        mask_path, mask_var = _find_mask(path, base, pattern_acc, sub_digits)
        raw = read_mask(mask_path, mask_var)  # [kx, ky] or [nt, kx, ky]
        raw = raw[None] if raw.ndim == 2 else raw
        if raw.shape[-2:] != (kx, ky) or raw.shape[0] not in (1, nt):
            raise ValueError(f"mask {mask_path.name}:{mask_var} has MATLAB size {(*raw.shape[1:], raw.shape[0])}, "
                             f"the k-space is {kx} x {ky} with {nt} frames")  # fmt: skip
        frame_masks = raw > 0
        with MatKspace(path, variable) as ks:  # the mask must belong to the data: no sample where it has none
            k0 = ks.read(0, 0)
        outside = float(np.abs(k0[:, ~frame_masks[0]]).sum())
        if outside > 1e-6 * max(float(np.abs(k0).sum()), 1e-30):
            raise ValueError(f"{path.name} has samples where {mask_path.name}:{mask_var} has none: the mask does not "
                             "belong to this file")  # fmt: skip
    info_path = _find_info_csv(path, patient, base) if patient else None
    series = CMRxSeries(
        name=f"{patient}_{base}" if patient else base, patient=patient, stem=base, path=path, variable=variable,
        fully_sampled=full, mask_path=mask_path, mask_variable=mask_var,
        info=read_info_csv(info_path) if info_path is not None else {},
        set_name=next((p for p in path.parts if p in ("TrainingSet", "ValidationSet", "TestSet")), ""),
    )  # fmt: skip
    compact = None
    if frame_masks is not None:  # what pins the mask in the run fingerprint (lines: one row per frame)
        lines = bool((frame_masks == frame_masks[:, :1]).all())
        compact = (frame_masks[:, 0] if lines else frame_masks).astype(np.float32)
    vol = CMRxRawVolume(
        path=path, stem=volume_stem(path), kind="validation" if full else "test", num_slices=nz * nt,
        num_coils=nc, grid_shape=(kx, ky), acquired=np.ones(ky, dtype=bool), file_mask=compact,
        file_acceleration=acc, file_num_low_frequency=None if frame_masks is None else
        contiguous_center_width(frame_masks[0].astype(np.float32)),
        recon_shape=(kx, ky), has_target=full, header=None, attrs={}, variable=variable, num_series_slices=nz,
        num_frames=nt, frame_masks=frame_masks, mask_path=mask_path, mask_variable=mask_var, pattern=pattern,
        series=series, submission_path=submission_relpath(path),
    )  # fmt: skip
    vol.records = cmrx_records(vol, overrides)
    return vol


def cmrx_records(
    vol: CMRxRawVolume, overrides: Mapping[tuple[str, int], Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per-item metadata records: the series' columns as cardiac preprocessing writes them
    (:func:`utils.cmrx_io.series_metadata`: anatomy ``heart``, contrast/sequence/view from the file name, the documented
    3 T Siemens system, ``ImgSnapshot`` values) plus ``slice``, ``frame``, ``file_index``; ``overrides`` replace or add
    values (see :func:`open_cmrx_volume`)."""
    from utils.cmrx_io import series_metadata
    from utils.metadata import record_from_row

    meta = series_metadata(vol.series, vol.num_coils, vol.grid_shape)
    records = []
    for idx in range(vol.num_slices):
        z, t = vol.item(idx)
        record = record_from_row({**meta, "slice": z, "frame": t, "file_index": idx})
        for key in (vol.series.name, vol.stem):
            over = dict((overrides or {}).get((key, z), {}))
            frame = over.pop("frame", None)
            if over and (frame is None or int(frame) == t):
                record.update(over)
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Noise without readout oversampling
# ----------------------------------------------------------------------------------------------------------------------


def corner_noise_sigma(
    y: np.ndarray, mask: np.ndarray, edge_fraction: float = 0.125, min_samples: int = 64
) -> float | None:
    """σ (per real/imaginary part) from the measured k-space samples in the four outer corners (the outer
    ``edge_fraction`` of the readout rows × of the phase-encode columns), by the median absolute deviation.

    Far from the centre along *both* axes the signal of an anatomical image is smallest; it does not need an empty
    readout margin. Returns ``None`` when fewer than ``min_samples`` complex samples are measured there.
    """
    c, h, w = y.shape
    nh, nw = max(1, int(round(edge_fraction * h))), max(1, int(round(edge_fraction * w)))
    region = np.zeros((h, w), dtype=bool)
    rows, cols = np.r_[0:nh, h - nh : h], np.r_[0:nw, w - nw : w]
    region[np.ix_(rows, cols)] = True
    region &= np.broadcast_to(np.asarray(mask) > 0, (h, w))
    if int(region.sum()) * c < min_samples:
        return None
    vals = y[:, region]
    parts = np.concatenate([vals.real.ravel(), vals.imag.ravel()]).astype(np.float64)
    return _MAD_TO_STD * float(np.median(np.abs(parts - np.median(parts))))


def _hankel(block: np.ndarray, kw: int) -> np.ndarray:
    """The calibration matrix of ``[C, h, w]``: one row per ``kw × kw`` window position, ``C·kw²`` columns."""
    c, h, w = block.shape
    cols = [block[:, dy : h - kw + 1 + dy, dx : w - kw + 1 + dx].reshape(c, -1) for dy in range(kw) for dx in range(kw)]
    return np.concatenate(cols, 0).T


def _low_eigenvalues(block: np.ndarray, kw: int, m: int) -> float:
    """Mean of the ``m`` smallest eigenvalues of ``AᴴA`` of the calibration matrix ``A`` of ``block``."""
    a = _hankel(block.astype(np.complex128), kw)
    return float(np.linalg.eigvalsh(a.conj().T @ a)[:m].mean())


@lru_cache(maxsize=16)
def _noise_reference(shape: tuple[int, int, int], kw: int, m: int) -> float:
    """:func:`_low_eigenvalues` of the same-shape block of pure complex noise with σ = 1 per part (fixed seed): the
    calibration of the null-space estimate, exact for the overlapping (Hankel) rows, which no textbook law is."""
    rng = np.random.default_rng(20231)
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    return _low_eigenvalues(noise, kw, m)


def calibration_noise_sigma(
    y: np.ndarray, mask: np.ndarray, kernel_width: int = 5, fraction: float = 0.125, max_rows: int = 96
) -> float | None:
    """σ (per real/imaginary part) from the null space of the ACS calibration matrix.

    The calibration matrix of the fully measured centre (up to ``max_rows`` centre readout rows × the ACS columns,
    ``kernel_width²`` windows × coils) has a low-rank signal part — the coils see one image, what ESPIRiT relies
    on — so its smallest eigenvalues are noise only, whatever fills the field of view. ``σ² = mean(smallest fraction
    of the eigenvalues) / the same for a pure-noise block of the same shape with σ = 1``. Needs no readout
    oversampling and no empty region. Returns ``None`` without an ACS block at least ``kernel_width + 2`` columns
    wide.
    """
    from utils.raw_data import acs_block

    c, h, w = y.shape
    rows, cols = acs_block(mask, (h, w), w, max_rows)  # more rows: more windows, but cost grows with them
    width = cols.stop - cols.start
    if width < kernel_width + 2 or rows.stop - rows.start < kernel_width + 2:
        return None
    block = np.ascontiguousarray(y[:, rows, cols])
    m = max(1, int(fraction * c * kernel_width * kernel_width))
    ref = _noise_reference(block.shape, kernel_width, m)
    return float(np.sqrt(max(_low_eigenvalues(block, kernel_width, m), 0.0) / ref))


def cmrx_noise_sigma(y: np.ndarray, mask: np.ndarray) -> float:
    """σ of one CMRxRecon item: the smaller of the readout-margin estimate
    (:func:`utils.raw_data.estimate_noise_sigma`, right when the readout is oversampled and the margins are empty) and
    the ACS null-space estimate (:func:`calibration_noise_sigma`; :func:`corner_noise_sigma` for masks without an
    ACS block, e.g. radial). Signal can only inflate either, so the smaller is used."""
    calib = calibration_noise_sigma(y, mask)
    estimates = [estimate_noise_sigma(y, mask), calib if calib is not None else corner_noise_sigma(y, mask)]
    positive = [e for e in estimates if e is not None and math.isfinite(e) and e > 0]
    return min(positive) if positive else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# The challenge's submission format
# ----------------------------------------------------------------------------------------------------------------------


def _matlab_round(x: float) -> int:
    """MATLAB's ``round`` (halves away from zero) for non-negative ``x``."""
    return int(math.floor(x + 0.5))


def _matlab_crop_slice(n: int, m: int) -> slice:
    """The centred window of ``m`` of ``n`` samples as the challenge's ``crop`` places it: 0-based start
    ``floor(n/2) + ceil(-m/2)`` (for even ``n`` and odd ``m`` one sample later than fastMRI's ``(n - m)//2``)."""
    start = n // 2 - m // 2
    return slice(start, start + m)


def ranking_crop(img: np.ndarray, series_stem: str) -> np.ndarray:
    """The challenge's ``img4ranking`` of a magnitude series in MATLAB order ``(sx, sy, sz, t)``: the central 2 slices
    (MATLAB ``round(sz/2)-1 : round(sz/2)``; every slice when ``sz < 3``), the first 3 frames for cine (every frame
    for mapping, ``*map*`` names, and when ``t <= 3``), the central ``round(sx/3) × round(sy/2)`` pixels, float32.

    Returns:
        float32 ``(round(sx/3), round(sy/2), nz', nt')`` in MATLAB order.
    """
    sx, sy, sz, nt = img.shape
    zs = slice(0, sz) if sz < 3 else slice(_matlab_round(sz / 2) - 2, _matlab_round(sz / 2))
    ts = slice(0, nt) if ("map" in series_stem.lower() or nt <= 3) else slice(0, 3)
    sel = np.abs(img[:, :, zs, ts])
    cx, cy = _matlab_round(sx / 3), _matlab_round(sy / 2)
    return np.ascontiguousarray(sel[_matlab_crop_slice(sx, cx), _matlab_crop_slice(sy, cy)].astype(np.float32))


def write_submission_mat(path: Path, img4ranking: np.ndarray) -> None:
    """One submission file: a MATLAB v7.3 MAT-file (HDF5 with MATLAB's 512-byte header,
    :func:`utils.simulation.matlab_io.save_mat_v73`) holding the single-precision variable ``img4ranking`` of MATLAB
    size ``(x, y, slices, frames)`` — h5py shows it as ``(frames, slices, y, x)`` float32 with
    ``MATLAB_class = "single"``; written atomically."""
    from utils.files import tmp_name
    from utils.simulation.matlab_io import save_mat_v73

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    save_mat_v73(tmp, {"img4ranking": np.asarray(img4ranking, dtype=np.float32)})
    os.replace(tmp, path)


def read_submission_mat(path: str | Path) -> np.ndarray:
    """``img4ranking`` of a submission file in MATLAB order ``(x, y, slices, frames)`` (plain h5py)."""
    import h5py

    with h5py.File(path, "r") as f:
        return np.ascontiguousarray(np.asarray(f["img4ranking"][()]).T)

"""Real acquisitions in: fastMRI validation and test/challenge h5 files, their masks, coil maps from the ACS lines,
the noise level and the intensity scale — all from the measurement alone (see ``docs/raw_reconstruction.md``).

Conventions: k-space ``[C, H, W]`` complex64 with ``H`` the (2× oversampled) readout and ``W`` the full phase-encode
width of the stored array, zero-padded columns included. A *measured* mask is the sampling pattern restricted to the
acquired band ``encodingLimits/kspace_encoding_step_1`` (padded columns never count as measured); it is ``[1, W]``
for line masks, ``[H, W]`` for 2-D masks. σ is the standard deviation of the real (and of the imaginary) part of the
k-space noise, the convention of the simulator (:func:`utils.simulation.kspace.simulate_coil_kspace`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from utils.fastmri_io import FastMRIFile, IsmrmrdHeader, header_metadata
from utils.masks import FASTMRI_TYPES, ONE_D_TYPES, TWO_D_TYPES, get_mask, seed_from_name

#: MAD -> standard deviation of a Gaussian.
_MAD_TO_STD = 1.482602218505602
#: Mask families whose outer lines are equally spaced (their test-file masks have one constant gap).
_EQUISPACED_TYPES = ("equispaced", "equispaced_fraction", "magic", "magic_fraction")


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def list_raw_files(raw_dir: str | Path) -> list[Path]:
    """The ``.h5`` files of ``raw_dir`` (a folder, searched non-recursively, or one file), sorted by name.

    Raises:
        FileNotFoundError: the path does not exist or holds no ``.h5`` file.
    """
    path = Path(raw_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--raw_dir not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix == ".h5" and p.is_file())
    from utils.raw_cmrx import list_cmrx_files  # CMRxRecon .mat files, searched recursively (their layout is a tree)

    files += list_cmrx_files(path)
    if not files:
        raise FileNotFoundError(f"no .h5 files (or CMRxRecon .mat files) in {path}")
    return files


def acquired_columns(header: IsmrmrdHeader | None, width: int) -> np.ndarray:
    """Bool ``[W]``: the phase-encode columns the scanner acquired (``encodingLimits``), the rest is zero padding.

    The band is ``[W//2 - center, W//2 - center + maximum + 1)`` as fastMRI's readers compute it; without limits in the
    header every column counts as acquired.
    """
    cols = np.ones(width, dtype=bool)
    if header is None or header.pe_center is None or header.pe_max is None:
        return cols
    left = width // 2 - int(header.pe_center)
    right = left + int(header.pe_max) + 1
    cols[:] = False
    cols[max(left, 0) : min(right, width)] = True
    if not cols.any():  # inconsistent limits: trust the array
        cols[:] = True
    return cols


@dataclass
class RawVolume:
    """One raw file and what the reconstruction needs to know about it (the k-space stays on disk).

    Attributes:
        path, stem: the file and its name without suffix (masks are seeded from ``stem``).
        kind: ``"validation"`` (full k-space; undersampled retrospectively) or ``"test"`` (a ``mask`` dataset; the
            k-space is already masked).
        num_slices, num_coils, grid_shape: ``kspace`` is ``[num_slices, num_coils, *grid_shape]``.
        acquired: bool ``[W]`` acquired columns.
        file_mask: the test file's ``mask`` ``[W]`` (float32 0/1), else ``None``.
        file_acceleration, file_num_low_frequency: the test file's attributes (``None`` otherwise).
        recon_shape: output size: ``reconstruction_rss``'s (zero-padded where it is wider than the grid), else the
            header's ``reconSpace`` (x, y) clipped to the grid, else ``(H // 2, W)``.
        has_target: the file holds ``reconstruction_rss``.
        header: parsed ISMRMRD header (or ``None``).
        attrs: file attributes.
        records: per-slice metadata records (:func:`volume_records`).
    """

    path: Path
    stem: str
    kind: str
    num_slices: int
    num_coils: int
    grid_shape: tuple[int, int]
    acquired: np.ndarray
    file_mask: np.ndarray | None
    file_acceleration: float | None
    file_num_low_frequency: int | None
    recon_shape: tuple[int, int]
    has_target: bool
    header: IsmrmrdHeader | None
    attrs: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    def read_kspace(self, idx: int) -> np.ndarray:
        """K-space of slice ``idx`` as stored, complex64 ``[C, H, W]``."""
        with FastMRIFile.open(self.path) as f:
            return f.read_slice(idx)

    def read_target(self) -> np.ndarray | None:
        """``reconstruction_rss`` float32 ``[S, h, w]`` or ``None``."""
        if not self.has_target:
            return None
        with h5py.File(self.path, "r") as f:
            return np.asarray(f["reconstruction_rss"][()], dtype=np.float32)

    # Per-format hooks of utils.raw_reconstruction (CMRxRecon volumes override them: utils.raw_cmrx.CMRxRawVolume).
    def measurement(self, idx: int, kspace: np.ndarray, mask_type: str | None = None, acc_factor: float | None = None,
                    center_fraction: float | None = None) -> "Measurement":
        """:func:`slice_measurement` of slice ``idx``."""
        return slice_measurement(self, idx, kspace, mask_type, acc_factor, center_fraction)

    def noise_sigma(self, m: "Measurement") -> float:
        """:func:`estimate_noise_sigma` of a measurement."""
        return estimate_noise_sigma(m.y, m.mask)

    def check_flags(self, mask_type: str | None, acc_factor: float | None) -> None:
        """:func:`check_test_flags`."""
        check_test_flags(self, mask_type, acc_factor)

    def extra_scores(self, magnitude: np.ndarray) -> dict[str, Any]:
        """Format-specific scores of the assembled volume (none for fastMRI)."""
        return {}

    def write_extra_outputs(self, out: Path, magnitude: np.ndarray, complex_recon: np.ndarray | None = None,
                            std: np.ndarray | None = None) -> None:
        """Format-specific files besides ``reconstructions/{stem}.h5`` (none for fastMRI)."""


def open_raw_volume(
    path: str | Path, overrides: Mapping[tuple[str, int], Mapping[str, Any]] | None = None
) -> RawVolume:
    """Read a fastMRI multi-coil file's layout, mask (test files), target size and per-slice metadata.

    Args:
        path: the h5 file.
        overrides: ``(stem, slice) -> {column: value}`` from :func:`load_metadata_overrides` (``--metadata_csv``).

    Raises:
        OSError / ValueError: not a readable fastMRI multi-coil file, or a ``mask`` that does not match the k-space.
    """
    path = Path(path)
    if path.suffix.lower() == ".mat":  # CMRxRecon (MATLAB v7.3)
        from utils.raw_cmrx import open_cmrx_volume

        return open_cmrx_volume(path, overrides)
    with FastMRIFile.open(path) as f:
        h, w = f.shape
        header, attrs = f.header, dict(f.attrs)
        num_slices, num_coils = f.num_slices, f.num_coils
        h5 = f._h5
        file_mask = None
        if "mask" in h5:
            file_mask = np.asarray(h5["mask"][()], dtype=np.float32).reshape(-1)
            if file_mask.shape != (w,):
                raise ValueError(f"{path}: mask has {file_mask.size} entries, the phase-encode width is {w}")
        has_target = "reconstruction_rss" in h5
        target_shape = tuple(h5["reconstruction_rss"].shape[-2:]) if has_target else None
    if target_shape is not None:  # the output must match the target, even where it is wider than the grid
        recon = target_shape
    elif header is not None and header.recon_matrix[0] and header.recon_matrix[1]:
        recon = (min(int(header.recon_matrix[0]), h), min(int(header.recon_matrix[1]), w))
    else:
        recon = (h // 2, w)
    acc = attrs.get("acceleration")
    nlf = attrs.get("num_low_frequency")
    vol = RawVolume(
        path=path, stem=path.stem, kind="test" if file_mask is not None else "validation", num_slices=num_slices,
        num_coils=num_coils, grid_shape=(h, w), acquired=acquired_columns(header, w), file_mask=file_mask,
        file_acceleration=None if acc is None else float(acc), file_num_low_frequency=None if nlf is None else int(nlf),
        recon_shape=recon, has_target=has_target, header=header, attrs=attrs,
    )  # fmt: skip
    vol.records = volume_records(vol, overrides)
    return vol


# ----------------------------------------------------------------------------------------------------------------------
# Metadata from the file's own header
# ----------------------------------------------------------------------------------------------------------------------


def volume_records(vol: RawVolume, overrides: Mapping[tuple[str, int], Mapping[str, Any]] | None = None) -> list[dict]:
    """Per-slice metadata records from the file's ISMRMRD header and attributes (no CSV needed).

    The columns are those preprocessing writes (:func:`utils.fastmri_io.header_metadata` for the header fields,
    ``anatomy`` from the file name, ``contrast`` from the ``acquisition`` attribute, no pathology); ``overrides``
    replace or add values per (file, slice).
    """
    from utils.metadata import record_from_row
    from utils.preprocessing.fastmri import contrast_from_acquisition, infer_anatomy

    meta = header_metadata(vol.header, num_coils=vol.num_coils)
    records = []
    for idx in range(vol.num_slices):
        row: dict[str, Any] = {
            "anatomy": infer_anatomy(vol.stem), "filename": vol.stem, "slice": idx,
            "contrast": contrast_from_acquisition(vol.attrs.get("acquisition")), "pathology": [], **meta,
        }  # fmt: skip
        record = record_from_row(row)
        record.update((overrides or {}).get((vol.stem, idx), {}))
        records.append(record)
    return records


def load_metadata_overrides(csv_path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """``--metadata_csv``: ``(file stem, slice) -> typed values`` that override the header's (e.g. fastMRI+ pathology).

    Only non-empty cells override (an empty cell keeps the header's value); a ``pathology`` column always overrides,
    an empty cell meaning "no pathology".
    """
    from utils.metadata import is_missing, load_metadata_csv, record_from_row

    df = load_metadata_csv(csv_path)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in df.to_dict(orient="records"):
        raw = {k: v for k, v in row.items()
               if k not in ("filename", "slice") and (k == "pathology" or not is_missing(v))}  # fmt: skip
        typed = record_from_row(raw)
        if "pathology" not in raw:
            typed.pop("pathology", None)
        try:
            key = (Path(str(row["filename"]).strip()).stem, int(float(row["slice"])))
        except ValueError as err:
            raise ValueError(f"{csv_path}: bad slice number {row['slice']!r}") from err
        out[key] = typed
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The measurement of one slice
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """The measured data of one slice.

    Attributes:
        y: measured k-space, complex64 ``[C, H, W]`` (zero wherever ``mask`` is 0).
        mask: measured samples, float32 ``[1, W]`` (lines) or ``[H, W]``.
        acceleration: achieved rate over the *acquired* columns (acquired samples / measured samples).
        num_center_lines: fully sampled centre lines (the ACS width along W).
        source: ``"retrospective"`` (validation file + chosen mask) or ``"file"`` (the test file's own mask).
    """

    y: np.ndarray
    mask: np.ndarray
    acceleration: float
    num_center_lines: int
    source: str


def _acceleration(mask: np.ndarray, acquired: np.ndarray) -> float:
    m = mask[:, acquired]
    measured = float(m.sum())
    return float(m.size / measured) if measured > 0 else float("inf")


def slice_measurement(
    vol: RawVolume,
    idx: int,
    kspace: np.ndarray,
    mask_type: str | None = None,
    acc_factor: float | None = None,
    center_fraction: float | None = None,
) -> Measurement:
    """The measurement of slice ``idx``: a test file's own mask as is, or a retrospective mask over the raw width.

    Retrospective masks are drawn over the full phase-encode width ``W`` of the stored k-space, as fastMRI applies
    them, seeded from (file stem, slice) exactly like :func:`utils.measurement.slice_mask`; columns outside the
    acquired band never count as measured.

    Raises:
        ValueError: a validation file without ``mask_type``/``acc_factor``.
    """
    h, w = vol.grid_shape
    acq = vol.acquired
    if vol.kind == "test":
        mask = (vol.file_mask[None, :] > 0).astype(np.float32) * acq[None, :]
        source = "file"
        ncl = contiguous_center_width(mask)
    else:
        if mask_type is None or acc_factor is None:
            raise ValueError(f"{vol.path.name} holds full k-space: give --mask_type and --acc_factor")
        m = get_mask(mask_type, (h, w), acc_factor, center_fraction=center_fraction, seed=seed_from_name(vol.stem, idx))
        mask = m.mask.numpy().astype(np.float32) * acq[None, :].astype(np.float32)
        source = "retrospective"
        ncl = contiguous_center_width(mask)
    y = (kspace * mask[None]).astype(np.complex64)
    return Measurement(y=y, mask=mask, acceleration=_acceleration(np.broadcast_to(mask, (mask.shape[0], w)), acq),
                       num_center_lines=ncl, source=source)  # fmt: skip


def contiguous_center_width(mask: np.ndarray) -> int:
    """Number of contiguous fully measured columns around ``W // 2`` (every row measured there)."""
    cols = np.asarray(mask).reshape(-1, mask.shape[-1]).min(axis=0) > 0
    c = cols.size // 2
    if not cols[c]:
        return 0
    lo, hi = c, c
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi + 1 < cols.size and cols[hi + 1]:
        hi += 1
    return hi - lo + 1


def check_test_flags(vol: RawVolume, mask_type: str | None, acc_factor: float | None) -> None:
    """Refuse ``--mask_type``/``--acc_factor`` that contradict a test file's own mask (they are not needed).

    ``acc_factor`` contradicts unless it equals the file's ``acceleration`` attribute; ``mask_type`` contradicts if it
    is a 2-D family (the file's mask is 1-D) or its spacing (equispaced vs random outer lines) differs from the mask's.

    Raises:
        ValueError: with one line naming the file, the flag and the file's value.
    """
    if vol.kind != "test":
        return
    if acc_factor is not None and vol.file_acceleration is not None and abs(acc_factor - vol.file_acceleration) > 1e-6:
        raise ValueError(f"{vol.path.name} is a test file undersampled at {vol.file_acceleration:g}x with its own "
                         "mask; "
                         f"--acc_factor {acc_factor:g} contradicts it (drop the flag)")  # fmt: skip
    if mask_type is None:
        return
    if mask_type in TWO_D_TYPES:
        raise ValueError(f"{vol.path.name} carries a 1-D line mask; --mask_type {mask_type} (2-D) contradicts it "
                         "(drop the flag)")  # fmt: skip
    if mask_type in ONE_D_TYPES + FASTMRI_TYPES:
        equispaced = _is_equispaced(vol.file_mask)
        if equispaced is not None and (mask_type in _EQUISPACED_TYPES) != equispaced:
            kind = "equispaced" if equispaced else "random"
            raise ValueError(f"{vol.path.name} carries its own mask with {kind} outer lines; --mask_type {mask_type} "
                             "contradicts it (drop the flag)")  # fmt: skip


def _is_equispaced(mask: np.ndarray) -> bool | None:
    """Whether a line mask's outer lines (outside the centre block) lie on one lattice of spacing > 1; ``None`` when
    fewer than 3 outer lines leave it undecidable."""
    cols = np.asarray(mask).reshape(-1) > 0
    w = cols.size
    ncl = contiguous_center_width(cols[None].astype(np.float32))
    c = w // 2
    lo = c
    while lo > 0 and cols[lo - 1] and c - lo + 1 < ncl:
        lo -= 1
    centre = np.zeros(w, dtype=bool)
    centre[lo : lo + ncl] = True
    outer = np.flatnonzero(cols & ~centre)
    if outer.size < 3:
        return None
    gap = int(np.diff(outer).min())
    return gap > 1 and bool(np.all((outer - outer[0]) % gap == 0))


# ----------------------------------------------------------------------------------------------------------------------
# Coil maps, noise and scale from the measurement only
# ----------------------------------------------------------------------------------------------------------------------


def acs_block(mask: np.ndarray, grid_shape: tuple[int, int], max_width: int, height: int) -> tuple[slice, slice]:
    """The calibration block ``(rows, cols)``: up to ``height`` centre readout rows × the fully measured centre columns
    (at most ``max_width``), placed as sigpy places its calibration window (start ``n//2 - size//2``)."""
    h, w = grid_shape
    full = np.broadcast_to(np.asarray(mask) > 0, (h, w))
    rows_n = min(height, h)
    r0 = h // 2 - rows_n // 2
    rows = slice(r0, r0 + rows_n)
    best = 0
    for n in range(1, min(w, max_width) + 1):
        c0 = w // 2 - n // 2
        if not full[rows, c0 : c0 + n].all():
            break
        best = n
    c0 = w // 2 - best // 2
    return rows, slice(c0, c0 + best)


def _gram_taps(calib: np.ndarray, thresh: float, kw: int) -> np.ndarray:
    """``G[i, j, dy, dx]``: the per-pixel ESPIRiT matrix ``AᴴA(r)`` as taps, from a rectangular calibration block.

    The same construction as :func:`utils.coils.espirit_maps_fast` (sigpy's ``EspiritCalib``: calibration matrix of
    ``kw × kw`` patches, rows above ``thresh · σ_max``), but the block may be taller than wide: undersampled data has
    few ACS columns and every readout row.
    """
    from utils.coils import espirit_gram_taps

    return espirit_gram_taps(calib, thresh, kw)


def coil_maps_from_acs(
    y: np.ndarray,
    mask: np.ndarray,
    calib_width: int = 24,
    calib_height: int = 48,
    kernel_width: int = 6,
    thresh: float = 0.02,
    crop: float = 0.95,
    rows_per_chunk: int = 32,
) -> np.ndarray:
    """ESPIRiT maps on the full grid from the auto-calibration lines present in the undersampled data.

    The calibration block is the fully measured centre: up to ``calib_width`` ACS columns × ``calib_height`` centre
    readout rows (taller than wide: a 4x/8x scan has 15-30 ACS lines but every readout sample). Only that block of
    ``y`` is read, so the maps cannot depend on any other sample. The maps are the exact top eigenvectors of ESPIRiT's
    per-pixel matrix, as :func:`utils.coils.espirit_maps_fast` computes them (phase relative to coil 0, zero where the
    eigenvalue is ``<= crop``); the kernel shrinks to fit a narrow
    ACS (``min(kernel_width, max(3, width // 2))``: at least as many kernel positions as taps along the phase encode).

    Args:
        y: measured k-space ``[C, H, W]``.
        mask: measured samples ``[1, W]`` or ``[H, W]``.

    Returns:
        complex64 maps ``[C, H, W]`` (``Σ|S|² = 1`` inside the object, 0 outside).

    Raises:
        ValueError: fewer than 4 fully sampled centre lines.
    """
    c, h, w = y.shape
    rows, cols = acs_block(mask, (h, w), calib_width, calib_height)
    width = cols.stop - cols.start
    if width < 4:
        raise ValueError(f"only {width} fully sampled centre line(s): ESPIRiT needs an auto-calibration region of >= 4")
    kw = min(kernel_width, max(3, width // 2))
    g = _gram_taps(np.asarray(y[:, rows, cols], dtype=np.complex128), thresh, kw)
    taps = np.arange(-(kw - 1), kw)
    # Centred DFT phases of the taps on the full grid (sigpy's centred ifft maps tap d to exp(+2πi d (n - N//2) / N)).
    ey = np.exp(2j * np.pi * np.outer(taps, np.arange(h) - h // 2) / h)
    ex = np.exp(2j * np.pi * np.outer(taps, np.arange(w) - w // 2) / w)
    gx = torch.from_numpy(np.einsum("ijab,bm->amij", g, ex).reshape(len(taps), -1).astype(np.complex64))
    ey_t = torch.from_numpy(ey.T.astype(np.complex64))
    maps = np.zeros((c, h, w), dtype=np.complex64)
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, h)
        aha = (ey_t[r0:r1] @ gx).reshape(r1 - r0, w, c, c)
        evals, evecs = torch.linalg.eigh(aha)
        top, lam = evecs[..., -1].numpy(), evals[..., -1].numpy()
        ref = top[..., :1]
        mag = np.abs(ref)
        phase = np.where(mag > 0, np.conj(ref) / np.where(mag > 0, mag, 1), 1)
        maps[:, r0:r1] = np.moveaxis(top * phase * (lam > crop)[..., None], -1, 0)
    return maps


def estimate_noise_sigma(y: np.ndarray, mask: np.ndarray, edge_fraction: float = 0.125) -> float:
    """σ of the k-space noise (per real/imaginary part) of one slice, from the measured data alone.

    Where: the readout margins of the zero-filled coil images (the outer ``edge_fraction`` of the rows at each end).
    The scanner's 2× readout oversampling keeps the object out of them, and undersampling along the phase encode only
    aliases along the columns, so they hold thermal noise only. The outer *k-space* rows are not usable: at the readout
    edge the object's signal is still several times the noise (see ``docs/raw_reconstruction.md``). The robust median
    absolute deviation of the real and imaginary parts ignores the few pixels that still carry signal (e.g. a neck).
    With the orthonormal FFT the image noise variance is σ² times the measured fraction of k-space, which is divided
    out.

    Args:
        y: measured k-space ``[C, H, W]`` (zero where not measured).
        mask: measured samples ``[1, W]`` or ``[H, W]`` (for 2-D masks the aliasing reaches the margins: the estimate
            is then biased upwards).
        edge_fraction: fraction of the rows used at each end (at least one row; keep it below 1/4, the oversampling
            margin).

    Returns:
        σ (0.0 when nothing is measured).
    """
    from utils.fft import ifft2c

    c, h, w = y.shape
    measured_fraction = float(np.broadcast_to(np.asarray(mask) > 0, (h, w)).mean())
    if measured_fraction == 0:
        return 0.0
    n = max(1, int(round(edge_fraction * h)))
    img = ifft2c(torch.from_numpy(np.ascontiguousarray(y, dtype=np.complex64))).numpy()
    vals = img[:, np.r_[0:n, h - n : h]]
    parts = np.concatenate([vals.real.ravel(), vals.imag.ravel()]).astype(np.float64)
    mad = float(np.median(np.abs(parts - np.median(parts))))
    return _MAD_TO_STD * mad / float(np.sqrt(measured_fraction))


def density_weights(mask: np.ndarray, acquired: np.ndarray) -> np.ndarray:
    """Per-column density compensation ``[W]`` of a line mask: 1 on the fully sampled centre, ``acquired / measured``
    of the outer columns on the other measured outer columns, 0 elsewhere (the zero-filled image is then unbiased for a
    random outer pattern)."""
    cols = np.asarray(mask).reshape(-1, np.asarray(mask).shape[-1]).max(axis=0) > 0
    w = cols.size
    ncl = contiguous_center_width(np.asarray(mask).reshape(-1, w))
    centre = np.zeros(w, dtype=bool)
    if ncl:
        c = w // 2
        lo = c
        while lo > 0 and cols[lo - 1] and c - lo + 1 < ncl:
            lo -= 1
        centre[lo : lo + ncl] = True
    outer_acq = acquired & ~centre
    outer_meas = cols & outer_acq
    weights = centre.astype(np.float32)
    if outer_meas.any():
        weights[outer_meas] = float(outer_acq.sum()) / float(outer_meas.sum())
    return weights


def coil_combine(y: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``Sᴴ F⁻¹ y``: the coil-combined zero-filled image ``[H, W]`` (complex64)."""
    from utils.fft import ifft2c

    img = ifft2c(torch.from_numpy(np.ascontiguousarray(y, dtype=np.complex64)))
    return (torch.from_numpy(maps).conj() * img).sum(0).numpy()


def zero_filled_rss(y: np.ndarray, recon_shape: tuple[int, int]) -> np.ndarray:
    """fastMRI's zero-filled baseline: RSS of the zero-filled coil images, centre-cropped (removes the oversampling;
    zero-padded along an axis where ``recon_shape`` is wider than the grid).

    Returns:
        float32 ``[h, w]``.
    """
    from utils.coils import center_crop_or_pad, rss
    from utils.fft import ifft2c

    img = ifft2c(torch.from_numpy(np.ascontiguousarray(y, dtype=np.complex64)))
    return center_crop_or_pad(rss(img), recon_shape).numpy().astype(np.float32)


def measured_scale(
    y: np.ndarray, maps: np.ndarray, window: tuple[int, int], weights: np.ndarray | None = None, q: float = 99.0
) -> float:
    """Intensity scale from the measurement: the ``q``-th percentile of the magnitude of the coil-combined,
    density-compensated zero-filled image inside the prior's window — the quantity preprocessing divides by (there from
    the fully sampled image), estimated without it.

    Args:
        y: measured k-space ``[C, H, W]``. maps: ``[C, H, W]``. window: ``(h, w)`` centre window.
        weights: per-column density compensation ``[W]`` (:func:`density_weights`), or ``None``.
        q: percentile.

    Returns:
        A positive float (1.0 for an all-zero measurement).
    """
    from utils.coils import center_crop

    if weights is not None:
        y = y * np.asarray(weights, dtype=np.float32)[None, None, :]
    img = np.abs(coil_combine(y, maps))
    win = (min(window[0], img.shape[0]), min(window[1], img.shape[1]))
    scale = float(np.percentile(center_crop(img, win), q))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def noise_aware_gamma(gamma: float, sigma: float, prior_error_std: float = 0.1) -> float:
    """DDS's data-consistency weight from the noise level (``docs/raw_reconstruction.md``, "γ from σ").

    DDS solves ``min ‖x − x̂₀‖² + γ‖Ax − y‖²``. Read as a MAP step with a Gaussian error of the denoised estimate
    (per-pixel complex variance ``s²``) and complex k-space noise (variance ``2σ²``), the weight is ``s² / (2σ²)``;
    the user's ``γ`` is the value tuned for (near) noise-free data and caps it:
    ``1/γ_eff = 1/γ + 2σ²/s²``. σ and ``s`` are on the normalised scale (image 99th percentile ≈ 1).

    Args:
        gamma: the noise-free weight (``--gamma``).
        sigma: noise σ per real/imaginary part, normalised.
        prior_error_std: ``s``, the typical per-pixel error of x̂₀ in the late part of the schedule.
    """
    if gamma <= 0:
        return gamma
    return 1.0 / (1.0 / gamma + 2.0 * sigma * sigma / (prior_error_std * prior_error_std))

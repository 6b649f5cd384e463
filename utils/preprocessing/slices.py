"""Per-slice math of preprocessing: ESPIRiT maps, MVUE coil combination, crop/pad, 99th-percentile normalisation.

Shared by the fastMRI (:mod:`utils.preprocessing.fastmri`) and cardiac (:mod:`utils.preprocessing.cmrx`) pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from utils.coils import (
    ESPIRIT_DEFAULTS,
    center_crop_or_pad,
    espirit_maps,
    espirit_maps_fast,
    mvue,
    normalize_percentile,
)

#: ESPIRiT backends of :class:`EspiritParams` (``--espirit_backend``).
ESPIRIT_BACKENDS: tuple[str, ...] = ("fast", "sigpy")


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
        if self.backend not in ESPIRIT_BACKENDS:
            raise ValueError(f"ESPIRiT backend must be one of {ESPIRIT_BACKENDS}, got {self.backend!r}")
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

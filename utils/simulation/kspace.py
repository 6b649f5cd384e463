"""From a noise-free object to multi-coil k-space as a scanner stores it.

Steps shared by the fastMRI and CMRxRecon writers: smooth random phase, birdcage coil sensitivities
(``sigpy.mri.birdcage_maps``, normalised so Σ_c |S_c|² = 1 everywhere), 2× readout oversampling (the object occupies the
central half of the rows), the centred orthonormal FFT of ``utils.fft``, complex Gaussian noise and zero-filled
phase-encode columns outside the acquired band (fastMRI's partial phase resolution).
"""

from __future__ import annotations

import functools

import numpy as np
import sigpy.mri
import torch
import torch.nn.functional as F

from utils.coils import center_crop, rss
from utils.fft import fft2c, ifft2c


@functools.lru_cache(maxsize=8)
def _checkerboard(h: int, w: int) -> torch.Tensor:
    """Checkerboard ``(-1)^(i+j)``, complex64 ``[h, w]``."""
    sign = 1.0 - 2.0 * ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2)
    return sign.to(torch.complex64)


def centered_fft2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Exactly :func:`utils.fft.fft2c` (or ``ifft2c``), faster for even sizes.

    For even H and W, ``fftshift(fft2(ifftshift(x))) = (-1)^(H/2 + W/2) · c ⊙ fft2(c ⊙ x)`` with the checkerboard
    ``c = (-1)^(i+j)``: two elementwise products replace four ``roll``s (which dominate the cost on CPU). Odd sizes fall
    back to the reference implementation.

    Args:
        x: complex64 ``[..., H, W]``.
        inverse: compute ``ifft2c`` instead.

    Returns:
        Same shape and dtype.
    """
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        return ifft2c(x) if inverse else fft2c(x)
    cb = _checkerboard(h, w).to(x.device)
    f = torch.fft.ifft2 if inverse else torch.fft.fft2
    out = f(cb * x, dim=(-2, -1), norm="ortho")
    out *= cb
    return -out if (h // 2 + w // 2) % 2 else out


def smooth_phase(rng: np.random.Generator, shape: tuple[int, int], max_linear: float = 1.0) -> np.ndarray:
    """A smooth random phase map (radians): constant + linear ramps + a low-order bilinear term + two slow waves.

    Args:
        rng: generator.
        shape: ``(h, w)``.
        max_linear: largest linear phase excursion across the FOV (radians, each axis).

    Returns:
        float32 ``[h, w]``.
    """
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    a = rng.uniform(-np.pi, np.pi)
    b, c = rng.uniform(-max_linear, max_linear, size=2)
    d = rng.uniform(-0.5, 0.5)
    phase = a + b * xx + c * yy + d * xx * yy
    for _ in range(2):
        kx, ky = rng.uniform(0.5, 1.5, size=2)
        phase = phase + rng.uniform(0.1, 0.4) * np.sin(np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2 * np.pi))
    return phase.astype(np.float32)


def birdcage_coil_maps(
    num_coils: int, full_shape: tuple[int, int], object_size: int, radius: float = 1.3, low_res: int = 96
) -> np.ndarray:
    """Birdcage sensitivities around an object, on the oversampled grid.

    ``sigpy.mri.birdcage_maps`` places the coil ring relative to its own grid; it is evaluated on a coarse square grid
    spanning the larger FOV side (maps are smooth), with the ring radius expressed relative to the object, then
    bilinearly upsampled, centre-cropped to ``full_shape`` and renormalised to Σ|S|² = 1.

    Args:
        num_coils: C.
        full_shape: ``(H, W)`` of the stored k-space.
        object_size: the object's extent in pixels (the ring radius is relative to half of it).
        radius: coil-ring radius in units of ``object_size / 2``.
        low_res: size of the coarse grid.

    Returns:
        complex64 ``[C, H, W]``.
    """
    big = max(full_shape)
    g = min(low_res, big)
    r = radius * (object_size / 2.0) / (big / 2.0)
    coarse = sigpy.mri.birdcage_maps((num_coils, g, g), r=r, dtype=np.complex64)
    t = torch.from_numpy(np.stack([coarse.real, coarse.imag], axis=1))  # [C, 2, g, g]
    up = F.interpolate(t, size=(big, big), mode="bilinear", align_corners=False)
    top, left = (big - full_shape[0]) // 2, (big - full_shape[1]) // 2
    up = up[:, :, top : top + full_shape[0], left : left + full_shape[1]]
    maps = torch.complex(up[:, 0], up[:, 1])
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(0, keepdim=True)).clamp_min(1e-12)
    return maps.numpy().astype(np.complex64)


def embed_oversampled(image: np.ndarray, full_height: int) -> np.ndarray:
    """Place ``[..., h, w]`` images in the centre rows of a ``[..., H, w]`` field of view (readout oversampling)."""
    h = image.shape[-2]
    out = np.zeros(image.shape[:-2] + (full_height, image.shape[-1]), dtype=image.dtype)
    top = (full_height - h) // 2
    out[..., top : top + h, :] = image
    return out


def phase_encode_band(width: int, num_acquired: int) -> tuple[int, int, int]:
    """Acquired phase-encode columns and the matching ISMRMRD ``kspace_encoding_step_1`` limits.

    Columns ``[left, left + num_acquired)`` are acquired with ``left = (W - n) // 2``; fastMRI readers recover them as
    ``[W//2 - center, W//2 - center + maximum + 1)``, so ``center = W//2 - left`` and ``maximum = n - 1``.

    Args:
        width: W (= encodedSpace matrixSize y).
        num_acquired: n <= W.

    Returns:
        ``(left, center, maximum)``.
    """
    n = int(min(max(num_acquired, 1), width))
    left = (width - n) // 2
    return left, width // 2 - left, n - 1


def simulate_coil_kspace(
    image: np.ndarray,
    maps: np.ndarray,
    noise_std: float,
    pe_columns: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Multi-coil k-space of one image with noise and zero-filled columns.

    Args:
        image: complex64 ``[H, W]`` (already oversampled).
        maps: complex64 ``[C, H, W]``.
        noise_std: standard deviation of the real and of the imaginary part of the k-space noise (orthonormal FFT, so
            it equals the per-coil image-domain noise level).
        pe_columns: ``(start, stop)`` of the acquired phase-encode columns; others are exactly zero.
        rng: generator for the noise.

    Returns:
        complex64 ``[C, H, W]``.
    """
    coil_images = torch.from_numpy(maps) * torch.from_numpy(image)[None]
    k = centered_fft2(coil_images).numpy()
    if noise_std > 0:
        # Interleaved float32 pairs viewed as complex64: no complex128 temporaries.
        noise = rng.standard_normal(k.shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]
        noise *= np.float32(noise_std)
        k += noise
    start, stop = pe_columns
    k[..., :start] = 0
    k[..., stop:] = 0
    return k.astype(np.complex64, copy=False)


def rss_from_kspace(kspace: np.ndarray, crop: tuple[int, int] | None = None) -> np.ndarray:
    """Root-sum-of-squares of the coil images of ``kspace``, optionally centre-cropped (fastMRI ``reconstruction_rss``).

    Args:
        kspace: complex ``[..., C, H, W]``.
        crop: ``(h, w)`` centre crop (start ``(H - h) // 2``), or ``None``.

    Returns:
        float32 ``[..., h, w]``.
    """
    img = centered_fft2(torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64)), inverse=True)
    magnitude = rss(img).numpy()
    if crop is not None:
        magnitude = center_crop(magnitude, crop)
    return magnitude.astype(np.float32)

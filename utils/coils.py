"""Coil sensitivities and coil combination: ESPIRiT maps, MVUE, RSS, centre crop/pad, percentile normalisation.

Functions that take images accept a ``torch.Tensor`` or a ``numpy.ndarray`` and return the same type.
ESPIRiT runs through sigpy on the CPU (``device=-1``) or, where cupy is installed, on a GPU (``device=0``...).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)

# ContextMRI's preprocessing parameters (REFERENCE.md §1).
ESPIRIT_DEFAULTS = {"calib_width": 24, "thresh": 0.02, "kernel_width": 6, "crop": 0.95, "max_iter": 100}


def espirit_maps(
    kspace: np.ndarray,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    max_iter: int = 100,
    device: int = -1,
    show_pbar: bool = False,
) -> np.ndarray:
    """ESPIRiT sensitivity maps of one slice (sigpy ``EspiritCalib``).

    Args:
        kspace: complex k-space ``[C, H, W]`` (centred; unsampled entries zero).
        calib_width: width of the fully sampled calibration region (per axis).
        thresh: singular-value threshold of the calibration matrix.
        kernel_width: k-space kernel width.
        crop: eigenvalue threshold below which maps are set to zero (outside the object).
        max_iter: power iterations; fewer is faster (see ``benchmarks/``) at a small loss of accuracy.
        device: sigpy device id, ``-1`` for CPU.
        show_pbar: show sigpy's progress bar.

    Returns:
        complex64 maps ``[C, H, W]``; where the object is, ``Σ_c |S_c|² ≈ 1``.
    """
    import sigpy as sp
    from sigpy.mri.app import EspiritCalib

    if kspace.ndim != 3:
        raise ValueError(f"espirit_maps expects kspace [C, H, W], got shape {kspace.shape}")
    dev = sp.Device(device)
    with dev:
        ksp = sp.to_device(np.ascontiguousarray(kspace, dtype=np.complex64), dev)
        maps = EspiritCalib(
            ksp,
            calib_width=calib_width,
            thresh=thresh,
            kernel_width=kernel_width,
            crop=crop,
            max_iter=max_iter,
            device=dev,
            show_pbar=show_pbar,
        ).run()
        maps = sp.to_device(maps, sp.cpu_device)
    return np.asarray(maps, dtype=np.complex64)


def _coil_dim(x: Array) -> int:
    return -3


def mvue(coil_images: Array, maps: Array, eps: float = 1e-12) -> Array:
    """Minimum-variance unbiased (SENSE-1) combination ``Σ_c conj(S_c) x_c / Σ_c |S_c|²``.

    Pixels that no coil sees (``Σ|S|² = 0``) are set to zero.

    Args:
        coil_images: complex ``[..., C, H, W]``.
        maps: complex ``[..., C, H, W]``.

    Returns:
        complex ``[..., H, W]``.
    """
    if isinstance(coil_images, torch.Tensor):
        num = (maps.conj() * coil_images).sum(dim=-3)
        den = (maps.abs() ** 2).sum(dim=-3)
        return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))
    num = (np.conj(maps) * coil_images).sum(axis=-3)
    den = (np.abs(maps) ** 2).sum(axis=-3)
    out = np.zeros_like(num)
    seen = den > eps
    out[seen] = num[seen] / den[seen]
    return out


def rss(coil_images: Array) -> Array:
    """Root-sum-of-squares magnitude over the coil axis: ``[..., C, H, W]`` -> real ``[..., H, W]``."""
    if isinstance(coil_images, torch.Tensor):
        return (coil_images.abs() ** 2).sum(dim=-3).sqrt()
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=-3))


def center_crop(x: Array, shape: tuple[int, int]) -> Array:
    """Centre crop the last two dims to ``shape`` (each no larger than the input's), fastMRI convention."""
    h, w = x.shape[-2:]
    ch, cw = shape
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {(h, w)} to larger {shape}; use center_pad")
    top = (h - ch) // 2
    left = (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def center_pad(x: Array, shape: tuple[int, int]) -> Array:
    """Zero-pad the last two dims symmetrically to ``shape`` (inverse of :func:`center_crop`)."""
    h, w = x.shape[-2:]
    ph, pw = shape
    if ph < h or pw < w:
        raise ValueError(f"cannot pad {(h, w)} to smaller {shape}; use center_crop")
    top = (ph - h) // 2
    left = (pw - w) // 2
    if isinstance(x, torch.Tensor):
        out = x.new_zeros(*x.shape[:-2], ph, pw)
    else:
        out = np.zeros((*x.shape[:-2], ph, pw), dtype=x.dtype)
    out[..., top : top + h, left : left + w] = x
    return out


def center_crop_or_pad(x: Array, shape: tuple[int, int]) -> Array:
    """Crop or pad each of the last two dims independently to ``shape``."""
    h, w = x.shape[-2:]
    th, tw = shape
    x = center_crop(x, (min(h, th), min(w, tw)))
    return center_pad(x, (th, tw))


def normalize_percentile(x: Array, q: float = 99.0) -> tuple[Array, float]:
    """Divide by the ``q``-th percentile of ``|x|`` (ContextMRI normalises every slice so it is 1).

    Returns:
        ``(x / scale, scale)``; ``scale`` is a Python float. A zero image gets ``scale = 1``.
    """
    mag = x.abs() if isinstance(x, torch.Tensor) else np.abs(x)
    mag_np = mag.detach().cpu().numpy() if isinstance(mag, torch.Tensor) else mag
    scale = float(np.percentile(mag_np, q))
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return x / scale, scale

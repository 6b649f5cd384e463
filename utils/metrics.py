"""Image-quality metrics (PSNR, SSIM, NMSE) under two named protocols.

Every number this project reports carries the label of the protocol that produced it:

``"fastmri"`` (the fastMRI challenge's ``evaluate.py``; use this one for comparisons with the literature)
    Magnitude images, one **volume** ``[S, H, W]`` at a time, ``data_range = max(gt)`` over the whole volume.
    NMSE = ``||gt - pred||² / ||gt||²`` and PSNR = ``10 log10(max(gt)² / MSE)`` over the whole volume;
    SSIM is computed per slice (7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, borders of
    ``(7 - 1) / 2`` pixels excluded, as ``skimage.metrics.structural_similarity``) with the volume's ``data_range``,
    then averaged over slices.

``"contextmri"`` (the per-slice protocol of the ContextMRI evaluation, made honest)
    Each slice's magnitude is min-max normalised to ``[0, 1]`` separately for ``gt`` and ``pred``; PSNR, SSIM and NMSE
    are computed per slice with ``data_range = 1`` and averaged over slices. The reference code passed
    ``data_range = 2.0`` to SSIM on these ``[0, 1]`` images, which inflates SSIM (the stabilising constants grow
    4x); we use the true range 1. Call :func:`ssim` with ``data_range=2.0`` on :func:`minmax_normalize`'d slices to
    reproduce the reference's number if needed.

Inputs may be numpy arrays or torch tensors, ``[S, H, W]`` or a single ``[H, W]`` slice. Complex inputs are turned into
magnitudes; real inputs are taken as magnitude images as they are. All arithmetic is float64 numpy on CPU.

Non-finite inputs. A metric of an image (or reference) holding a NaN or ±inf is undefined: every metric returns NaN
then (under both protocols, per slice for the ContextMRI one), never a number. Without this rule the min-max
normalisation of the ContextMRI protocol turned a NaN image into zeros (PSNR ~10 dB) and a NaN pair into two equal
zero images (SSIM 1.0). Callers decide what a NaN means (the reconstruction runner marks the slice as failed).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy.ndimage import uniform_filter

ArrayLike = np.ndarray | torch.Tensor
Protocol = Literal["fastmri", "contextmri"]
PROTOCOLS: tuple[str, ...] = ("fastmri", "contextmri")


def to_magnitude(x: ArrayLike) -> np.ndarray:
    """Magnitude volume as float64 numpy ``[S, H, W]``.

    Args:
        x: ``[S, H, W]`` or ``[H, W]``, numpy or torch, real (taken as a magnitude) or complex (``|x|``).

    Returns:
        float64 array ``[S, H, W]`` (a 2-D input becomes a one-slice volume).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.abs() if x.is_complex() else x
        arr = x.to(torch.float64).numpy()
    else:
        arr = np.asarray(x)
        arr = np.abs(arr) if np.iscomplexobj(arr) else arr
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image [H, W] or a volume [S, H, W], got shape {arr.shape}")
    return arr


def _pair(gt: ArrayLike, pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    g, p = to_magnitude(gt), to_magnitude(pred)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
    return g, p


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def minmax_normalize(x: ArrayLike) -> np.ndarray:
    """Per-slice min-max normalisation of a magnitude volume to ``[0, 1]`` (the ContextMRI protocol).

    Args:
        x: ``[S, H, W]`` or ``[H, W]`` (complex -> magnitude).

    Returns:
        float64 ``[S, H, W]``; a constant slice maps to zeros, a slice with any non-finite value to all-NaN.
    """
    m = to_magnitude(x)
    bad = ~np.isfinite(m).all(axis=(1, 2), keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    lo = safe.min(axis=(1, 2), keepdims=True)
    span = safe.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (safe - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(bad, np.nan, out)


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / mse))


def nmse(gt: ArrayLike, pred: ArrayLike) -> float:
    """Normalised MSE ``||gt - pred||² / ||gt||²`` over the whole volume (fastMRI protocol).

    Args:
        gt: reference ``[S, H, W]`` or ``[H, W]``.
        pred: reconstruction, same shape.

    Returns:
        NMSE (0 for identical inputs; NaN if either input holds a non-finite value or ``gt`` is all zero).
    """
    g, p = _pair(gt, pred)
    if not _finite(g, p) or not np.any(g):
        return math.nan
    return float(np.sum((g - p) ** 2) / np.sum(g**2))


def psnr(gt: ArrayLike, pred: ArrayLike, data_range: float | None = None) -> float:
    """PSNR over the whole volume, ``10 log10(data_range² / MSE)`` (fastMRI protocol).

    Args:
        gt: reference ``[S, H, W]`` or ``[H, W]``.
        pred: reconstruction, same shape.
        data_range: peak value; default ``max(gt)`` of the volume (fastMRI).

    Returns:
        PSNR in dB; ``inf`` when the inputs are identical; NaN if either input holds a non-finite value.
    """
    g, p = _pair(gt, pred)
    if not _finite(g, p):
        return math.nan
    dr = float(g.max()) if data_range is None else float(data_range)
    return _psnr_from_mse(float(np.mean((g - p) ** 2)), dr)


def ssim_slice(
    x: np.ndarray, y: np.ndarray, data_range: float, win_size: int = 7, k1: float = 0.01, k2: float = 0.03
) -> float:
    """Mean SSIM of two 2-D images with a uniform ``win_size x win_size`` window (Wang et al. 2004).

    Matches ``skimage.metrics.structural_similarity(x, y, data_range=data_range, win_size=win_size, K1=k1, K2=k2)``
    with its defaults: sample (N-1) covariances, and only pixels whose window lies inside the image are averaged.

    Args:
        x: ``[H, W]`` real image.
        y: ``[H, W]`` real image.
        data_range: dynamic range ``L`` in ``C1 = (k1 L)²``, ``C2 = (k2 L)²``.
        win_size: odd window side.
        k1: luminance constant.
        k2: contrast constant.

    Returns:
        The mean SSIM.
    """
    if win_size % 2 != 1 or min(x.shape) < win_size:
        raise ValueError(f"win_size must be odd and fit the image: win_size={win_size}, image {x.shape}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = win_size * win_size
    cov_norm = n / (n - 1)
    mx, my = uniform_filter(x, win_size), uniform_filter(y, win_size)
    vx = cov_norm * (uniform_filter(x * x, win_size) - mx * mx)
    vy = cov_norm * (uniform_filter(y * y, win_size) - my * my)
    vxy = cov_norm * (uniform_filter(x * y, win_size) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean()) if pad else float(s.mean())


def ssim(
    gt: ArrayLike,
    pred: ArrayLike,
    data_range: float | None = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """SSIM per slice, averaged over slices, with one ``data_range`` for the volume (fastMRI protocol).

    Args:
        gt: reference ``[S, H, W]`` or ``[H, W]``.
        pred: reconstruction, same shape.
        data_range: default ``max(gt)`` of the whole volume (fastMRI).
        win_size: uniform window side (7).
        k1: luminance constant (0.01).
        k2: contrast constant (0.03).

    Returns:
        Mean SSIM over slices (1 for identical inputs; NaN if either input holds a non-finite value).
    """
    g, p = _pair(gt, pred)
    if not _finite(g, p):
        return math.nan
    dr = float(g.max()) if data_range is None else float(data_range)
    return float(np.mean([ssim_slice(g[i], p[i], dr, win_size, k1, k2) for i in range(g.shape[0])]))


def fastmri_metrics(gt: ArrayLike, pred: ArrayLike) -> dict[str, Any]:
    """PSNR, SSIM and NMSE of one volume under the fastMRI protocol (see the module docstring)."""
    g, p = _pair(gt, pred)
    return {"protocol": "fastmri", "psnr": psnr(g, p), "ssim": ssim(g, p), "nmse": nmse(g, p), "num_slices": len(g)}


def contextmri_metrics(gt: ArrayLike, pred: ArrayLike) -> dict[str, Any]:
    """PSNR, SSIM and NMSE under the ContextMRI per-slice protocol, with the honest ``data_range = 1``.

    Each slice of ``gt`` and of ``pred`` is min-max normalised to ``[0, 1]`` on its own; every metric is computed per
    slice with ``data_range = 1`` and averaged over slices (PSNR averaged in dB; ``inf`` if any slice is exact).
    Every metric is NaN if any slice of either input holds a non-finite value.
    """
    g, p = minmax_normalize(gt), minmax_normalize(pred)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
    if not _finite(g, p):
        return {"protocol": "contextmri", "psnr": math.nan, "ssim": math.nan, "nmse": math.nan, "num_slices": len(g)}
    per_psnr = [_psnr_from_mse(float(np.mean((g[i] - p[i]) ** 2)), 1.0) for i in range(len(g))]
    per_ssim = [ssim_slice(g[i], p[i], 1.0) for i in range(len(g))]
    tiny = np.finfo(np.float64).tiny
    per_nmse = [float(np.sum((g[i] - p[i]) ** 2) / max(np.sum(g[i] ** 2), tiny)) for i in range(len(g))]
    return {
        "protocol": "contextmri",
        "psnr": float(np.mean(per_psnr)),
        "ssim": float(np.mean(per_ssim)),
        "nmse": float(np.mean(per_nmse)),
        "num_slices": len(g),
    }


def evaluate_volume(gt: ArrayLike, pred: ArrayLike, protocol: Protocol = "fastmri") -> dict[str, Any]:
    """PSNR/SSIM/NMSE of a volume under a named protocol.

    Args:
        gt: reference ``[S, H, W]`` or ``[H, W]`` (numpy or torch; complex -> magnitude).
        pred: reconstruction, same shape.
        protocol: ``"fastmri"`` (volume-wise, ``data_range = max(gt)``) or ``"contextmri"`` (per-slice min-max
            normalised, ``data_range = 1``).

    Returns:
        ``{"protocol", "psnr", "ssim", "nmse", "num_slices"}``.
    """
    if protocol == "fastmri":
        return fastmri_metrics(gt, pred)
    if protocol == "contextmri":
        return contextmri_metrics(gt, pred)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")

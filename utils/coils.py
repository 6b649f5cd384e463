"""Coil sensitivities and coil combination: ESPIRiT maps, MVUE, RSS, centre crop/pad, percentile normalisation.

Functions that take images accept a ``torch.Tensor`` or a ``numpy.ndarray`` and return the same type.
ESPIRiT runs through sigpy on the CPU (``device=-1``) or, where cupy is installed, on a GPU (``device=0``...).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)

# ContextMRI's preprocessing parameters (docs/formats.md).
ESPIRIT_DEFAULTS = {"calib_width": 24, "thresh": 0.02, "kernel_width": 6, "crop": 0.95, "max_iter": 100}


def espirit_maps(
    kspace: np.ndarray,
    calib_width: int = ESPIRIT_DEFAULTS["calib_width"],
    thresh: float = ESPIRIT_DEFAULTS["thresh"],
    kernel_width: int = ESPIRIT_DEFAULTS["kernel_width"],
    crop: float = ESPIRIT_DEFAULTS["crop"],
    max_iter: int = ESPIRIT_DEFAULTS["max_iter"],
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


def _sigpy_resize_window(n_in: int, n_out: int) -> tuple[int, int, int]:
    """``(input start, output start, length)`` of sigpy's centred ``resize`` along one axis."""
    start_in = max(n_in // 2 - n_out // 2, 0)
    start_out = max(n_out // 2 - n_in // 2, 0)
    return start_in, start_out, min(n_in, n_out)


def _espirit_gram_kernel(kspace: np.ndarray, calib_width: int, thresh: float, kernel_width: int) -> np.ndarray:
    """K-space representation ``G[i, j, dy, dx]`` of the ESPIRiT image-domain matrix ``AᴴA`` (see espirit_maps_fast)."""
    num_coils = kspace.shape[0]
    calib = np.zeros((num_coils, calib_width, calib_width), dtype=np.complex128)
    (iy, oy, ly), (ix, ox, lx) = (_sigpy_resize_window(n, calib_width) for n in kspace.shape[1:])
    calib[:, oy : oy + ly, ox : ox + lx] = kspace[:, iy : iy + ly, ix : ix + lx]
    return espirit_gram_taps(calib, thresh, kernel_width)


def espirit_gram_taps(calib: np.ndarray, thresh: float, kernel_width: int) -> np.ndarray:
    """``G[i, j, dy, dx]``: the per-pixel ESPIRiT matrix ``AᴴA(r)`` as ``(2k-1)²`` taps, from a calibration block.

    Args:
        calib: calibration k-space ``[C, Hc, Wc]`` (any rectangle; square for sigpy's ``EspiritCalib``).
        thresh: keep the kernels whose singular value exceeds ``thresh · σ_max``.
        kernel_width: ``k``, the width of the ``k × k`` patches.
    Returns:
        complex128 ``[C, C, 2k-1, 2k-1]``.
    """
    kw = kernel_width
    num_coils = calib.shape[0]
    # Calibration (Hankel) matrix, rows = kernel positions, columns = (coil, ky, kx): sigpy's array_to_blocks order.
    blocks = np.lib.stride_tricks.sliding_window_view(calib, (kw, kw), axis=(1, 2))  # [C, by, bx, kw, kw]
    mat = blocks.reshape(num_coils, -1, kw * kw).transpose(1, 0, 2).reshape(-1, num_coils * kw * kw)
    # Right singular vectors of the calibration matrix from the smaller of its two Gram matrices (σ² = eigenvalues):
    # the same subspace as sigpy's SVD at a fraction of the cost. torch's eigh: numpy's threaded LAPACK collapses when
    # the cores are shared. The threshold compares σ, i.e. the square roots of the eigenvalues.
    mat_t = torch.from_numpy(np.ascontiguousarray(mat, dtype=np.complex128))
    if mat.shape[0] < mat.shape[1]:
        evals, u = torch.linalg.eigh(mat_t @ mat_t.conj().T)
        sv = evals.clamp_min(0).sqrt()
        keep = sv > thresh * sv.max()
        vh = ((u[:, keep].conj().T @ mat_t) / sv[keep, None]).resolve_conj().numpy()
    else:
        evals, v = torch.linalg.eigh(mat_t.conj().T @ mat_t)
        sv = evals.clamp_min(0).sqrt()
        vh = v[:, sv > thresh * sv.max()].conj().T.resolve_conj().numpy()
    # P[(i,p,q), (j,p2,q2)] = Σ_k V_k(i,p,q) conj(V_k(j,p2,q2)); G_ij(d) sums P over index pairs with (p,q)-(p2,q2) = d.
    gram = (vh.T @ vh.conj()).reshape(num_coils, kw, kw, num_coils, kw, kw)
    g = np.zeros((num_coils, num_coils, 2 * kw - 1, 2 * kw - 1), dtype=np.complex128)
    for p2 in range(kw):
        for q2 in range(kw):
            g[:, :, kw - 1 - p2 : 2 * kw - 1 - p2, kw - 1 - q2 : 2 * kw - 1 - q2] += gram[:, :, :, :, p2, q2].transpose(
                0, 3, 1, 2
            )
    return g / (kw * kw)


def espirit_maps_fast(
    kspace: np.ndarray,
    calib_width: int = ESPIRIT_DEFAULTS["calib_width"],
    thresh: float = ESPIRIT_DEFAULTS["thresh"],
    kernel_width: int = ESPIRIT_DEFAULTS["kernel_width"],
    crop: float = ESPIRIT_DEFAULTS["crop"],
    out_shape: tuple[int, int] | None = None,
    rows_per_chunk: int = 32,
) -> np.ndarray:
    """ESPIRiT maps identical in definition to sigpy's ``EspiritCalib`` (one set of maps), computed faster.

    sigpy builds the per-pixel matrix ``AᴴA(r) = Σ_k a_k(r) a_k(r)ᴴ`` with one full-size FFT per kernel and finds its top
    eigenvector by power iteration over the whole grid. Each ``a_k`` is a trigonometric polynomial of the
    ``kernel_width²`` kernel taps, so ``AᴴA(r)`` is one of ``(2·kernel_width − 1)²`` taps: we form those taps once from the
    calibration matrix's Gram matrix, evaluate them (two small DFT matrix products) only on the pixels we keep
    (``out_shape``: the fastMRI readout oversampling is cropped away anyway; every pixel is independent, so cropping is
    exact), and take the exact top eigenvector (batched ``eigh``) instead of 100 power iterations.

    Same conventions as sigpy: phase relative to coil 0, maps zeroed where the top eigenvalue is ``<= crop``.

    Args:
        kspace: complex k-space ``[C, H, W]``, centred.
        calib_width, thresh, kernel_width, crop: as :func:`espirit_maps`.
        out_shape: ``(h, w)``: return ``center_crop_or_pad(maps, out_shape)`` (computed only where it is nonzero);
            ``None`` for the full ``[H, W]`` grid.
        rows_per_chunk: image rows per ``eigh`` batch (bounds memory at ``rows·w·C²`` complex numbers).

    Returns:
        complex64 maps ``[C, h, w]``; ``Σ_c |S_c|² = 1`` where the eigenvalue exceeds ``crop``, 0 elsewhere.
    """
    if kspace.ndim != 3:
        raise ValueError(f"espirit_maps_fast expects kspace [C, H, W], got shape {kspace.shape}")
    num_coils, height, width = kspace.shape
    g = _espirit_gram_kernel(np.asarray(kspace), calib_width, thresh, kernel_width)
    taps = np.arange(-(kernel_width - 1), kernel_width)
    th, tw = out_shape if out_shape is not None else (height, width)

    def kept(n: int, t: int) -> np.ndarray:  # full-grid indices that survive center_crop_or_pad(…, t)
        if t <= n:
            start = (n - t) // 2
            return np.arange(start, start + t)
        return np.arange(n)

    rows, cols = kept(height, th), kept(width, tw)
    # Centred DFT phases: sigpy's centred ifft maps tap d to exp(+2πi d (n - N//2) / N).
    ey = np.exp(2j * np.pi * np.outer(taps, rows - height // 2) / height)  # [T, h]
    ex = np.exp(2j * np.pi * np.outer(taps, cols - width // 2) / width)  # [T, w]
    num_taps = len(taps)
    # gx[a, m, (i, j)] = Σ_b G[i, j, a, b] ex[b, m]; then AᴴA[n, m, i, j] = Σ_a ey[a, n] gx[a, m, (i, j)] (one matmul).
    gx = np.einsum("ijab,bm->amij", g, ex).reshape(num_taps, -1)
    gx_t = torch.from_numpy(gx.astype(np.complex64))
    ey_t = torch.from_numpy(ey.T.astype(np.complex64))  # [h, T]
    maps = np.zeros((num_coils, len(rows), len(cols)), dtype=np.complex64)
    for r0 in range(0, len(rows), rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, len(rows))
        aha = (ey_t[r0:r1] @ gx_t).reshape(r1 - r0, len(cols), num_coils, num_coils)  # [h_chunk, w, C, C]
        evals, evecs = torch.linalg.eigh(aha)
        top = evecs[..., -1].numpy()  # [h_chunk, w, C], unit norm
        lam = evals[..., -1].numpy()
        ref = top[..., :1]
        mag = np.abs(ref)
        phase = np.where(mag > 0, np.conj(ref) / np.where(mag > 0, mag, 1), 1)
        top = top * phase * (lam > crop)[..., None]
        maps[:, r0:r1] = np.moveaxis(top, -1, 0)
    if out_shape is not None:
        maps = center_crop_or_pad(maps, (th, tw))
    return maps

"""Centred, orthonormal 2-D Fourier transforms over the last two dimensions.

"Centred" means the DC component sits at index ``(H // 2, W // 2)`` in both image and k-space, the convention of
fastMRI and of the released ContextMRI checkpoint: ``fft2c(x) = fftshift(fft2(ifftshift(x)))`` with ``norm="ortho"``.
"""

from __future__ import annotations

import torch

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT (image -> k-space).

    Args:
        x: complex tensor ``[..., H, W]``.

    Returns:
        Complex tensor of the same shape and dtype; ``||fft2c(x)|| == ||x||`` (Parseval).
    """
    if not x.is_complex():
        raise TypeError(f"fft2c expects a complex tensor, got {x.dtype}")
    x = torch.fft.ifftshift(x, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT (k-space -> image); the exact inverse and adjoint of :func:`fft2c`.

    Args:
        k: complex tensor ``[..., H, W]``.

    Returns:
        Complex tensor of the same shape and dtype.
    """
    if not k.is_complex():
        raise TypeError(f"ifft2c expects a complex tensor, got {k.dtype}")
    k = torch.fft.ifftshift(k, dim=_DIMS)
    k = torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS)

"""The forward model of a real acquisition: the prior's image -> coil k-space on the scanner's own grid.

Notation (``A = M F S P``):

* ``x`` — the prior's image ``[B, h, w]`` (complex; 320×320 for the released model);
* ``P`` — places ``x`` at the centre of the full field of view ``[B, H, W]`` of the stored k-space (``H`` = the 2×
  oversampled readout, ``W`` = the full phase-encode width including the zero-padded columns outside
  ``encodingLimits``). The window starts at ``((H - h) // 2, (W - w) // 2)``, fastMRI's centre-crop convention, so
  ``Pᴴ`` is exactly the crop that produces ``reconstruction_rss``. Along an axis where the prior's grid is *larger* than
  the field of view, ``P`` keeps the central part of the prior's image (the rest is seen by the prior only);
* ``S`` — coil sensitivities on the full grid ``[B, C, H, W]``;
* ``F`` — the centred orthonormal 2-D FFT over the full grid (:mod:`utils.fft`);
* ``M`` — the 0/1 mask of *measured* samples, broadcastable to ``[B, C, H, W]`` (1-D masks ``[B, 1, 1, W]``); the
  zero-padded columns outside the acquired band are never measured, whatever the sampling pattern says.

``M F S`` on the full grid is :class:`utils.operators.SenseOperator`; this module adds ``P``.

The samplers (:func:`utils.samplers.dds_sample`, :func:`utils.samplers.dps_sample`) read the image size from the last
two dims of ``y`` and use ``op.forward``/``op.adjoint``/``op.normal``/``op.mask``. The k-space grid ``[C, H, W]`` is not
the image size, so the operator's *data space* is the same k-space laid out as ``[B, K, h, w]``: the ``C·H·W``
entries flattened and zero-padded to ``K = ceil(C·H·W / (h·w))`` image-sized planes (:meth:`RawGridOperator.pack`).
Packing is a fixed permutation plus zero padding, so ``forward = pack ∘ M F S P`` is still a linear operator with
``adjoint = Pᴴ Sᴴ Fᴴ M ∘ unpack``, and the padding entries carry mask 0. ``forward_grid``/``adjoint_grid`` work on the
unpacked grid.

The region the crop does not cover (readout oversampling, phase-encode columns beyond ``w``) is handled by
:func:`outside_estimate`: a regularised least-squares estimate on the full grid whose part outside the crop is held
fixed and subtracted from the data (see ``docs/raw_reconstruction.md``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.cg import conjugate_gradient
from utils.operators import SenseOperator


def _axis_window(n_prior: int, n_grid: int) -> tuple[slice, slice]:
    """``(prior slice, grid slice)`` of the overlap of a centred window along one axis (fastMRI offsets)."""
    if n_prior <= n_grid:
        start = (n_grid - n_prior) // 2
        return slice(0, n_prior), slice(start, start + n_prior)
    start = (n_prior - n_grid) // 2
    return slice(start, start + n_grid), slice(0, n_grid)


def place(x: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """``P x``: put ``[..., h, w]`` at the centre of a zero ``[..., H, W]`` grid (cropped where ``h > H``/``w > W``)."""
    (py, gy), (px, gx) = _axis_window(x.shape[-2], grid_shape[0]), _axis_window(x.shape[-1], grid_shape[1])
    out = x.new_zeros(*x.shape[:-2], *grid_shape)
    out[..., gy, gx] = x[..., py, px]
    return out


def crop_to(u: torch.Tensor, prior_shape: tuple[int, int]) -> torch.Tensor:
    """``Pᴴ u``: the centred ``[..., h, w]`` window of ``[..., H, W]`` (zero where the prior exceeds the grid)."""
    (py, gy), (px, gx) = _axis_window(prior_shape[0], u.shape[-2]), _axis_window(prior_shape[1], u.shape[-1])
    out = u.new_zeros(*u.shape[:-2], *prior_shape)
    out[..., py, px] = u[..., gy, gx]
    return out


def window_mask(prior_shape: tuple[int, int], grid_shape: tuple[int, int], device=None) -> torch.Tensor:
    """Real ``[H, W]`` indicator of the grid pixels ``P`` covers (1 inside the crop window, 0 outside)."""
    ones = torch.ones(prior_shape, device=device)
    return place(ones, grid_shape)


class RawGridOperator(nn.Module):
    """``A = M F S P`` from the prior's image to measured coil k-space on the acquisition grid, batched over slices.

    Args:
        maps: complex coil sensitivities on the full grid ``[B, C, H, W]`` (or ``[C, H, W]``).
        mask: measured samples, real/bool, broadcastable to ``[B, C, H, W]`` (``[B, 1, 1, W]`` for line masks).
        image_shape: ``(h, w)`` of the prior's image.

    The data space seen through :meth:`forward`/:meth:`adjoint` is the packed layout ``[B, K, h, w]``
    (:meth:`pack`); ``mask`` is the packed mask there (so ``op.mask * y`` works as in the samplers), ``grid_mask`` the
    mask on the grid.
    """

    mask: torch.Tensor
    grid_mask: torch.Tensor

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.sense = SenseOperator(maps, mask)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        b, c, hh, ww = self.sense.maps.shape
        self.grid_shape = (hh, ww)
        self.num_coils = c
        self.grid_numel = c * hh * ww
        h, w = self.image_shape
        self.num_planes = math.ceil(self.grid_numel / (h * w))
        grid_mask = self.sense.mask.expand(b, c, hh, ww)
        self.register_buffer("grid_mask", self.sense.mask, persistent=False)
        self.register_buffer("mask", self.pack(grid_mask), persistent=False)

    # -- layout ------------------------------------------------------------------------------------------------------
    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """Grid k-space ``[B, C, H, W]`` -> packed ``[B, K, h, w]`` (flatten + zero padding)."""
        b = y.shape[0]
        h, w = self.image_shape
        flat = y.reshape(b, self.grid_numel)
        pad = self.num_planes * h * w - self.grid_numel
        if pad:
            flat = torch.cat([flat, flat.new_zeros(b, pad)], dim=1)
        return flat.reshape(b, self.num_planes, h, w)

    def unpack(self, yp: torch.Tensor) -> torch.Tensor:
        """Packed ``[B, K, h, w]`` -> grid ``[B, C, H, W]`` (the padding entries are dropped): ``unpack = packᴴ``."""
        b = yp.shape[0]
        return yp.reshape(b, -1)[:, : self.grid_numel].reshape(b, self.num_coils, *self.grid_shape)

    # -- on the grid -------------------------------------------------------------------------------------------------
    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``M F S P x``: image ``[B, h, w]`` -> masked coil k-space ``[B, C, H, W]``."""
        return self.sense.forward(place(x, self.grid_shape))

    def adjoint_grid(self, y: torch.Tensor) -> torch.Tensor:
        """``Pᴴ Sᴴ Fᴴ M y``: coil k-space ``[B, C, H, W]`` -> image ``[B, h, w]``."""
        return crop_to(self.sense.adjoint(y), self.image_shape)

    # -- the sampler contract ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` in the packed layout ``[B, K, h, w]``."""
        return self.pack(self.forward_grid(x))

    def adjoint(self, yp: torch.Tensor) -> torch.Tensor:
        """``Aᴴ y`` for packed ``y`` ``[B, K, h, w]`` -> image ``[B, h, w]``."""
        return self.adjoint_grid(self.unpack(yp))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x = Pᴴ (M F S)ᴴ(M F S) P x`` (no packing needed: ``unpack ∘ pack = I``)."""
        return crop_to(self.sense.normal(place(x, self.grid_shape)), self.image_shape)


def outside_estimate(
    sense: SenseOperator,
    y: torch.Tensor,
    image_shape: tuple[int, int],
    lam: float = 0.05,
    max_iter: int = 30,
) -> torch.Tensor:
    """The image outside the prior's crop window, from the data, by Tikhonov-regularised SENSE on the full grid.

    Solves ``(AᴴA + λ I) u = Aᴴ y`` over the whole field of view (``A = M F S`` on the grid) with CG — written as
    ``(I + γ AᴴA) u = γ Aᴴ y`` with ``γ = 1/λ`` for :func:`utils.cg.conjugate_gradient` — and returns ``u`` with the
    crop window zeroed. ``λ`` is relative to the data's scale: pass data normalised so the image is ``O(1)``.

    Args:
        sense: ``M F S`` on the full grid (``maps [B, C, H, W]``).
        y: measured k-space ``[B, C, H, W]``.
        image_shape: the prior's ``(h, w)``.
        lam: Tikhonov weight λ > 0.
        max_iter: CG iterations.

    Returns:
        complex ``[B, H, W]``: zero inside the crop window, the estimate outside it.
    """
    if lam <= 0:
        raise ValueError(f"outside-region Tikhonov weight must be > 0, got {lam}")
    gamma = 1.0 / lam
    b = gamma * sense.adjoint(y)
    u = conjugate_gradient(sense.normal, b, gamma=gamma, max_iter=max_iter)
    outside = 1.0 - window_mask(image_shape, tuple(u.shape[-2:]), device=u.device)
    return u * outside.to(u.real.dtype)

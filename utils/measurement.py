"""The simulated acquisition of the ``--data_root`` (retrospective) mode, and the check that a mask request is
feasible.

Every slice's k-space is simulated the way the reference does it, plus optional noise::

    y = M ⊙ (F(S ⊙ x) + n),    n ~ CN(0, σ² I)  (real and imaginary parts each N(0, σ²/2))

from the normalised MVUE image ``x`` (99th percentile of ``|x|`` = 1, so ``σ`` is relative to that scale) and its
unit-norm maps ``S``. ``F`` is orthonormal, so ``σ`` is also the per-coil noise std in the image domain. The mask is
seeded from (file name, slice) and the noise from (file name, slice) through a different digest, so every method,
every seed and every run sees the same mask *and* the same noisy measurement. (Real acquisitions, ``--raw_dir``, have
their own measurement: :func:`utils.raw_data.slice_measurement`.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import torch

from utils.masks import MaskResult, default_center_fraction, get_mask, seed_from_name
from utils.operators import SenseOperator
from utils.recon_settings import ReconSettings


def slice_mask(settings: ReconSettings, filename: str, slice_idx: int, shape: tuple[int, int]) -> MaskResult:
    """The mask of one slice: seeded from (file, slice) only, so every method and run sees the same mask."""
    return get_mask(
        settings.mask_type, shape, settings.acc_factor, center_fraction=settings.center_fraction,
        seed=seed_from_name(filename, slice_idx),
    )


def noise_seed(filename: str, slice_idx: int) -> int:
    """Seed of a slice's measurement noise: from (file base name, slice) only, independent of the mask's seed."""
    key = f"noise:{PurePath(str(filename)).name}:{int(slice_idx)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 2**63


def measurement_noise(shape: Sequence[int], sigma: float, filename: str, slice_idx: int) -> torch.Tensor:
    """Complex Gaussian k-space noise ``n ~ CN(0, σ²)``: real and imaginary parts i.i.d. ``N(0, σ²/2)``.

    Drawn on the CPU from :func:`noise_seed`, so it is the same on every device, for every method and seed.

    Returns:
        complex64 tensor of ``shape`` (e.g. ``[C, H, W]``).
    """
    gen = torch.Generator().manual_seed(noise_seed(filename, slice_idx))
    parts = torch.randn((2, *shape), generator=gen, dtype=torch.float32) * (sigma / math.sqrt(2.0))
    return torch.complex(parts[0], parts[1])


@dataclass
class SimulatedMeasurement:
    """The simulated acquisition of a batch of slices (a raw file's slice is :class:`utils.raw_data.Measurement`).

    Attributes:
        x_true: complex64 ``[B, H, W]`` ground truth. maps: complex64 ``[B, C, H, W]``.
        masks: per-slice :class:`MaskResult`. mask: float ``[B, 1, H, W]``. op: the SENSE operator.
        y: complex64 ``[B, C, H, W]`` masked (noisy) k-space.
    """

    x_true: torch.Tensor
    maps: torch.Tensor
    masks: list[MaskResult]
    mask: torch.Tensor
    op: SenseOperator
    y: torch.Tensor


def simulate_measurement(
    group: Sequence, settings: ReconSettings, device: torch.device | str = "cpu"
) -> SimulatedMeasurement:
    """``y = M ⊙ (F(S ⊙ x) + n)`` for items with ``.image [2, H, W]``, ``.maps [C, H, W]``, ``.filename``,
    ``.slice_idx`` (all with the same coil count)."""
    from utils.channels import channels_to_complex

    x_true = torch.stack([channels_to_complex(torch.as_tensor(item.image)[None])[0] for item in group]).to(device)
    maps = torch.stack([torch.as_tensor(item.maps) for item in group]).to(device=device, dtype=torch.complex64)
    h, w = x_true.shape[-2:]
    masks = [slice_mask(settings, item.filename, item.slice_idx, (h, w)) for item in group]
    mask = torch.stack([m.mask.expand(h, w) for m in masks])[:, None].to(device)  # [B, 1, H, W]
    op = SenseOperator(maps, mask)
    y = op.forward(x_true)
    if settings.noise_sigma > 0:
        noise = torch.stack([measurement_noise(maps.shape[1:], settings.noise_sigma, item.filename, item.slice_idx)
                             for item in group]).to(device)
        y = y + mask * noise
    return SimulatedMeasurement(x_true, maps, masks, mask, op, y)


def mask_problem(mask_type: str, acc_factor: float, center_fraction: float | None,
                 shape: tuple[int, int]) -> str | None:
    """Why a mask request cannot give the asked-for acceleration on images of ``shape``, or None if it can.

    Mirrors :func:`utils.masks.get_mask`: a 1-D family samples ``round(W / R)`` of the ``W`` phase-encode lines, a 2-D
    family ``round(H W / R)`` points, and both keep the fully sampled centre (``round(W cf)`` lines, or a
    ``round(H cf) x round(W cf)`` square). A request whose budget is below one sample, or below the centre alone,
    would silently run at another acceleration; family-specific limits (integer R for equispaced/magic) are found by
    building one mask.
    """
    from utils.masks import TWO_D_TYPES

    acc = float(acc_factor)
    if not (math.isfinite(acc) and acc > 1):
        return f"--acc_factor must be a finite number > 1, got {acc_factor}"
    if center_fraction is not None and not (math.isfinite(center_fraction) and 0 < center_fraction < 1):
        return f"--center_fraction must lie in (0, 1), got {center_fraction}"
    cf = default_center_fraction(acc) if center_fraction is None else float(center_fraction)
    h, w = int(shape[0]), int(shape[1])
    if mask_type in TWO_D_TYPES:
        total, centre, unit = h * w, round(h * cf) * round(w * cf), "k-space points"
    else:
        total, centre, unit = w, round(w * cf), "phase-encode lines"
    budget = round(total / acc)
    if budget < 1:
        return (f"--acc_factor {acc:g} leaves {budget} of the {total} {unit} of {h}x{w} images: choose R <= "
                f"{total}")
    if centre > budget and mask_type != "magic_fraction":  # magic_fraction shrinks its centre to the budget
        return (f"the fully sampled centre ({centre} {unit}, --center_fraction {cf:g}) exceeds the {budget} of "
                f"{total} that R = {acc:g} allows on {h}x{w} images: lower --center_fraction or --acc_factor")
    if mask_type != "poisson2d":  # poisson2d compiles a numba sampler: its budget check above suffices
        try:
            result = get_mask(mask_type, (h, w), acc, center_fraction=center_fraction, seed=0)
        except ValueError as err:
            return f"--mask_type {mask_type} --acc_factor {acc:g}: {err}"
        if float(result.mask.sum()) < 1:
            return f"--mask_type {mask_type} --acc_factor {acc:g} samples nothing on {h}x{w} images"
    return None

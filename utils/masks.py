"""Cartesian k-space undersampling masks with the *achieved* acceleration reported.

Two families share one entry point, :func:`get_mask`:

* ContextMRI's families (``uniform1d``, ``gaussian1d``, ``gaussian2d``, ``uniformrandom2d``, ``poisson2d``). The
  reference drew lines/points *with replacement*, so duplicates silently lowered the sampling rate (``uniform1d`` at
  nominal 4x achieved 4.47x). Here every draw is *without replacement*: the mask holds exactly
  ``round(N / acc_factor)`` samples (``N`` = ``W`` lines for 1-D, ``H*W`` pixels for 2-D) whenever the fully sampled
  centre fits in that budget, so achieved == nominal up to rounding. ``poisson2d`` is a variable-density Poisson
  disc (sigpy's sampler and density law) trimmed to the same exact budget.
* fastMRI's mask functions (``random``, ``equispaced``, ``equispaced_fraction``, ``magic``, ``magic_fraction``) with
  exactly the semantics of ``fastmri/data/subsample.py``: ``nlf = round(W * center_fraction)`` centre lines starting at
  ``(W - nlf + 1) // 2``, plus the family's outer lines. Only the random source differs (a local
  ``numpy.random.Generator`` instead of a ``RandomState``), so masks are statistically, not bit-wise, identical.
  ``equispaced`` and ``magic`` undershoot the nominal rate by design (W=368: 3.23x at nominal 4, 6.23x at nominal 8).

1-D masks select phase-encode lines along the **last** axis and have shape ``(1, W)``; 2-D masks have shape ``(H, W)``.
Both broadcast against k-space ``[..., H, W]`` (see :class:`utils.operators.SenseOperator`).

Randomness: every draw uses a local ``numpy.random.Generator`` built from ``seed`` (fresh OS entropy when ``seed`` is
None); the global numpy and torch RNGs are never read or written. ``poisson2d`` hands sigpy's numba sampler an integer
seed drawn from that generator (numba keeps its own RNG, separate from numpy's global one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch

ONE_D_TYPES = ("uniform1d", "gaussian1d")
TWO_D_TYPES = ("gaussian2d", "uniformrandom2d", "poisson2d")
FASTMRI_TYPES = ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction")
MASK_TYPES = ONE_D_TYPES + TWO_D_TYPES + FASTMRI_TYPES

# Standard deviations of ContextMRI's Gaussian densities, as fractions of the axis length: 1-D std = W * 15/128;
# 2-D covariance = (size * 1.5/128) * size per axis, i.e. std = size * sqrt(1.5/128).
_GAUSS1D_STD_FRACTION = 15.0 / 128.0
_GAUSS2D_STD_FRACTION = float(np.sqrt(1.5 / 128.0))


@dataclass(frozen=True)
class MaskResult:
    """A sampling mask and what it achieves.

    Attributes:
        mask: float32 tensor of 0/1, ``(1, W)`` for 1-D (line) masks, ``(H, W)`` for 2-D masks.
        acceleration: achieved rate, total / sampled (1-D: ``W / lines``; 2-D: ``H*W / points``).
        num_center_lines: fully sampled centre lines (1-D), or the width of the fully sampled centre square
            along W (2-D).
        mask_type: the family that produced the mask.
        nominal_acceleration: the requested ``acc_factor``.
        center_fraction: the centre fraction actually used (after defaulting).
    """

    mask: torch.Tensor
    acceleration: float
    num_center_lines: int
    mask_type: str
    nominal_acceleration: float
    center_fraction: float

    @property
    def is_1d(self) -> bool:
        """True for line masks of shape ``(1, W)``."""
        return self.mask_type not in TWO_D_TYPES


def default_center_fraction(acc_factor: float) -> float:
    """fastMRI's convention: 0.08 at 4x, 0.04 at 8x, otherwise ``0.32 / acc_factor`` (same centre *line* budget)."""
    if acc_factor == 4:
        return 0.08
    if acc_factor == 8:
        return 0.04
    return 0.32 / acc_factor


def seed_from_name(filename: str, slice_idx: int) -> int:
    """Deterministic mask seed for a validation slice, identical in every process and on every machine.

    Python's ``hash()`` is salted per process, so a cryptographic digest is used instead. Only the base name of
    ``filename`` enters the digest, so the seed does not depend on where the data lives.

    Args:
        filename: file name or path of the volume (e.g. ``"file_brain_AXT2_200_2000019.h5"``).
        slice_idx: slice index within the volume.

    Returns:
        An integer in ``[0, 2**32)`` (valid for numpy and numba seeding).
    """
    key = f"{PurePath(str(filename)).name}:{int(slice_idx)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")



def sample_seed(filename: str, slice_idx: int, seed: int) -> int:
    """Seed of a slice's sampler noise for run seed ``seed`` (ensemble member ``k`` uses ``seed + k``).

    Derived from :func:`seed_from_name`, so the noise of a slice is the same in every process, batch and shard, and
    two methods or models with the same ``seed`` see the same draws; a large odd stride keeps the run seeds apart.
    """
    return (seed_from_name(filename, slice_idx) + 1_000_003 * int(seed)) % 2**63

def get_mask(
    mask_type: str,
    shape: tuple[int, ...],
    acc_factor: float,
    center_fraction: float | None = None,
    seed: int | None = None,
) -> MaskResult:
    """Build an undersampling mask.

    Args:
        mask_type: one of :data:`MASK_TYPES`.
        shape: k-space shape; the last two entries are ``(H, W)`` (W = phase encode). Leading entries are ignored.
        acc_factor: nominal acceleration ``>= 1``. ``equispaced`` and ``magic`` need an integer value.
        center_fraction: fraction of W (and of H for 2-D masks) fully sampled at the centre, in ``[0, 1)``;
            None picks :func:`default_center_fraction`.
        seed: integer seed for a local ``numpy.random.Generator``; None draws fresh entropy (not reproducible).

    Returns:
        A :class:`MaskResult`; ``mask`` is float32 ``(1, W)`` for 1-D types and ``(H, W)`` for 2-D types.

    Raises:
        ValueError: unknown type, ``acc_factor < 1``, centre fraction outside ``[0, 1)``, bad shape, or a
            combination a family cannot realise (non-integer rate for equispaced/magic, a centre larger than the
            line budget for equispaced_fraction).
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; expected one of {', '.join(MASK_TYPES)}")
    if len(shape) < 2 or any(int(s) < 1 for s in shape[-2:]):
        raise ValueError(f"shape must end in (H, W) with positive sizes, got {tuple(shape)}")
    acc = float(acc_factor)
    if not np.isfinite(acc) or acc < 1:
        raise ValueError(f"acc_factor must be a finite number >= 1, got {acc_factor}")
    cf = default_center_fraction(acc) if center_fraction is None else float(center_fraction)
    if not 0.0 <= cf < 1.0:
        raise ValueError(f"center_fraction must lie in [0, 1), got {center_fraction}")
    if seed is not None and (int(seed) != seed or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")

    h, w = int(shape[-2]), int(shape[-1])
    rng = np.random.default_rng(seed)

    if mask_type in TWO_D_TYPES:
        mask, ncl = _mask_2d(mask_type, h, w, acc, cf, rng)
    else:
        nlf = round(w * cf)  # Python's round (half to even), as fastMRI
        if mask_type in ONE_D_TYPES:
            lines = _mask_1d_without_replacement(mask_type, w, acc, nlf, rng)
        else:
            lines = _mask_fastmri(mask_type, w, acc, cf, rng)
            if mask_type == "magic_fraction":
                nlf = _magic_fraction_nlf(w, acc, cf)
        mask, ncl = lines[None, :], nlf

    mask_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    sampled = float(mask_t.sum())
    achieved = mask_t.numel() / sampled if sampled > 0 else float("inf")
    return MaskResult(
        mask=mask_t,
        acceleration=achieved,
        num_center_lines=int(ncl),
        mask_type=mask_type,
        nominal_acceleration=acc,
        center_fraction=cf,
    )


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _center_slice(n: int, n_center: int) -> slice:
    """fastMRI's centre block: ``n_center`` entries starting at ``(n - n_center + 1) // 2``."""
    start = (n - n_center + 1) // 2
    return slice(start, start + n_center)


def _weighted_sample_without_replacement(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` distinct items drawn sequentially with probability proportional to ``weights``.

    Efraimidis-Spirakis: item ``i`` gets key ``E_i / w_i`` with ``E_i ~ Exp(1)``; the ``k`` smallest keys are a
    weighted sample without replacement. Zero-weight items are drawn last (only if ``k`` exceeds the positive ones).
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    e = rng.exponential(size=weights.shape)
    with np.errstate(divide="ignore"):
        keys = np.where(weights > 0, e / np.where(weights > 0, weights, 1.0), np.inf)
    return np.argsort(keys, kind="stable")[:k]


def _mask_1d_without_replacement(kind: str, w: int, acc: float, nlf: int, rng: np.random.Generator) -> np.ndarray:
    """``uniform1d`` / ``gaussian1d``: centre block + outer lines drawn without replacement, ``round(W/acc)`` total."""
    mask = np.zeros(w, dtype=np.float32)
    mask[_center_slice(w, nlf)] = 1.0
    outer = np.flatnonzero(mask == 0)
    n_outer = max(0, min(round(w / acc) - nlf, outer.size))
    if kind == "uniform1d":
        weights = np.ones(outer.size)
    else:
        std = w * _GAUSS1D_STD_FRACTION
        weights = np.exp(-0.5 * ((outer - w // 2) / std) ** 2)
    mask[outer[_weighted_sample_without_replacement(weights, n_outer, rng)]] = 1.0
    return mask


def _mask_2d(kind: str, h: int, w: int, acc: float, cf: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """2-D families: a fully sampled centre square (``round(H*cf) x round(W*cf)``) + points in the rest."""
    ch, cw = round(h * cf), round(w * cf)
    center = np.zeros((h, w), dtype=bool)
    center[_center_slice(h, ch), _center_slice(w, cw)] = True
    if acc == 1:
        return np.ones((h, w), dtype=np.float32), cw
    if kind == "poisson2d":
        return _poisson_disc(h, w, acc, center, (ch, cw), rng), cw

    outer = np.flatnonzero(~center.ravel())
    n_outer = max(0, min(round(h * w / acc) - int(center.sum()), outer.size))
    if kind == "uniformrandom2d":
        weights = np.ones(outer.size)
    else:  # gaussian2d
        yy, xx = np.divmod(outer, w)
        sy, sx = h * _GAUSS2D_STD_FRACTION, w * _GAUSS2D_STD_FRACTION
        weights = np.exp(-0.5 * (((yy - h // 2) / sy) ** 2 + ((xx - w // 2) / sx) ** 2))
    flat = center.ravel().astype(np.float32)
    flat[outer[_weighted_sample_without_replacement(weights, n_outer, rng)]] = 1.0
    return flat.reshape(h, w), cw


def _poisson_disc(
    h: int, w: int, acc: float, center: np.ndarray, calib: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Variable-density Poisson-disc mask with exactly ``round(H*W/acc)`` samples when reachable.

    Uses sigpy's Bridson sampler (``sigpy.mri.samp._poisson``, numba) with sigpy's density law: disc radius
    ``∝ 1 + slope·r`` with ``r`` the normalised distance outside the calibration square, corners (``r >= 1``)
    cropped. ``sigpy.mri.poisson`` itself bisects the slope in an unbounded float loop that can spin forever for
    some seeds; here the search is capped, the sparsest mask with at least the target count is kept, and surplus
    outer points are removed at random (removing points keeps the minimum-distance property).
    """
    from sigpy.mri.samp import _poisson  # local import: numba compilation only when this family is used

    target = round(h * w / acc)
    yy, xx = np.mgrid[:h, :w]
    rx = np.maximum(np.abs(xx - w / 2) - calib[1] / 2, 0)
    ry = np.maximum(np.abs(yy - h / 2) - calib[0] / 2, 0)
    rx, ry = rx / max(rx.max(), 1e-12), ry / max(ry.max(), 1e-12)
    r = np.sqrt(rx**2 + ry**2)
    inside = (r < 1) | center
    # sigpy seeds numba's private RNG (not numpy's global one) with this integer.
    sub_seed = int(rng.integers(0, 2**31 - 1))
    big = max(h, w)

    best, best_n, densest, densest_n = None, None, None, -1
    # Bracket the slope by doubling from 1, then bisect. Starting small matters: a steep slope makes discs of
    # hundreds of pixels near the edge, and Bridson's neighbourhood scan is quadratic in the disc radius.
    lo, hi, slope = 0.0, None, 1.0
    for _ in range(_POISSON_MAX_STEPS):
        radius_x = np.clip((1 + r * slope) * w / big, 1, None)
        radius_y = np.clip((1 + r * slope) * h / big, 1, None)
        m = _poisson(w, h, _POISSON_MAX_ATTEMPTS, radius_x, radius_y, calib, sub_seed)
        m = np.maximum(m * inside, center)
        n = int(m.sum())
        if n > densest_n:
            densest, densest_n = m, n
        if n >= target and (best_n is None or n < best_n):
            best, best_n = m, n
        if target <= n <= target + _POISSON_SURPLUS * target:
            break  # close enough: the few surplus points are trimmed below
        if n > target:
            lo = slope  # too many samples: make discs grow faster with radius
        else:
            hi = slope
        slope = 2.0 * slope if hi is None else 0.5 * (lo + hi)
    if best is None:  # target unreachable (acc close to 1 with cropped corners): keep the densest pattern
        return densest.astype(np.float32)
    surplus = best_n - target
    if surplus > 0:
        removable = np.flatnonzero((best > 0) & ~center)
        best.ravel()[rng.choice(removable, size=min(surplus, removable.size), replace=False)] = 0
    return best.astype(np.float32)


_POISSON_MAX_STEPS = 40
_POISSON_MAX_ATTEMPTS = 30
_POISSON_SURPLUS = 0.02  # stop searching once the count overshoots the target by at most 2 %


def _require_integer_rate(kind: str, acc: float) -> int:
    if acc != round(acc):
        raise ValueError(f"mask_type {kind!r} samples every acc-th line and needs an integer acc_factor, got {acc}")
    return int(round(acc))


def _magic_fraction_nlf(w: int, acc: float, cf: float) -> int:
    """MagicMaskFractionFunc bounds the centre block to ``[1, round(W/acc)]`` lines."""
    return max(min(round(w * cf), round(w / acc)), 1)


def _mask_fastmri(kind: str, w: int, acc: float, cf: float, rng: np.random.Generator) -> np.ndarray:
    """fastMRI ``MaskFunc`` semantics (``sample_mask``): max(centre mask, acceleration mask) along W."""
    nlf = round(w * cf)
    if kind == "magic_fraction":
        nlf = _magic_fraction_nlf(w, acc, cf)
    center = np.zeros(w, dtype=np.float32)
    center[_center_slice(w, nlf)] = 1.0

    if kind == "random":
        # Expected total = W/acc: outer lines kept independently with the probability that tops the centre up.
        prob = (w / acc - nlf) / (w - nlf) if w > nlf else 0.0
        outer = (rng.random(w) < prob).astype(np.float32)
    elif kind == "equispaced":
        step = _require_integer_rate(kind, acc)
        outer = np.zeros(w, dtype=np.float32)
        outer[int(rng.integers(0, step)) :: step] = 1.0
    elif kind == "equispaced_fraction":
        if nlf * acc >= w:
            raise ValueError(
                f"equispaced_fraction: the centre ({nlf} of {w} lines) already meets or exceeds the {acc}x budget; "
                "lower center_fraction"
            )
        # Spacing chosen so centre + outer lines total about W/acc (fastMRI's "adjusted acceleration").
        adjusted = acc * (nlf - w) / (nlf * acc - w)
        offset = int(rng.integers(0, round(adjusted)))
        outer = np.zeros(w, dtype=np.float32)
        outer[np.around(np.arange(offset, w - 1, adjusted)).astype(np.int64)] = 1.0
    elif kind == "magic":
        outer = _magic_outer(w, _require_integer_rate(kind, acc), rng)
    else:  # magic_fraction
        budget = round(w / acc) - nlf
        rate = round(w / budget) if budget > 0 else 0
        outer = _magic_outer(w, rate, rng) if rate > 0 else np.zeros(w, dtype=np.float32)
    return np.maximum(center, outer)


def _magic_outer(w: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Defazio's offset sampling (fastMRI ``MagicMaskFunc``): equispaced lines whose phase on the negative half of
    k-space is shifted relative to the positive half, so conjugate-symmetric partners fill each other's gaps."""
    offset = int(rng.integers(0, rate))
    if offset % 2 == 0:
        off_pos, off_neg = offset + 1, offset + 2
    else:
        off_pos, off_neg = offset + 2, offset - 1
    pos = np.zeros((w + 1) // 2, dtype=np.float32)
    neg = np.zeros(w - (w + 1) // 2, dtype=np.float32)
    pos[off_pos::rate] = 1.0
    neg[off_neg::rate] = 1.0
    # Halves are laid out in unshifted (FFT) order: positive frequencies, then the negative half mirrored.
    return np.fft.fftshift(np.concatenate((pos, neg[::-1])))

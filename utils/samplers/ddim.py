"""The DDIM step (Song, Meng & Ermon, *Denoising Diffusion Implicit Models*, ICLR 2021) that DDS and DPS share, and
the Tweedie estimate x̂₀ that every sampler (DPM-Solver++ too) starts its step from.

Notation: variable -> paper symbol (Eq. n)

* ``x_t``            -> x_t, the noisy complex image ``[B, H, W]`` at timestep t (DDIM Eq. 12)
* ``eps``            -> ε_θ(x_t, t, c), the network's noise prediction (complex, same shape)
* ``a_t``, ``a_prev`` -> ᾱ_t and ᾱ_{t−1} (written α_t, α_{t−1} in DDIM); "t−1" is the next timestep of the sampling
  sequence, and ᾱ_{t−1} := 1 after the last one (``a_prev=None`` here)
* ``x0_hat``         -> x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, Tweedie's denoised estimate (DDIM Eq. 9)
* ``c1``             -> σ_t(η) = η √((1 − ᾱ_t/ᾱ_{t−1})(1 − ᾱ_{t−1})/(1 − ᾱ_t)) (DDIM Eq. 16)
* ``c2``             -> √(1 − ᾱ_{t−1} − σ_t²), the "direction pointing to x_t" (DDIM Eq. 12)
* ``z``              -> ε_t, fresh noise with real and imaginary parts N(0, 1) (DDIM Eq. 12)

All functions work on complex tensors or on the network's real ``[B, 2, H, W]`` channels alike (DPS differentiates
x̂₀ with respect to the channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t (DDIM Eq. 9), elementwise; ``x_t`` and ``eps`` of one shape."""
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def clip_magnitude(x0_hat: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Limit ``|x̂₀|`` to ``clip`` with the phase kept (the complex analogue of DDPM's ``clip_sample``); None: as is.

    Args:
        x0_hat: complex ``[B, H, W]``.
        clip: the largest magnitude kept, or None.
    """
    if clip is None:
        return x0_hat
    return x0_hat * (clip / x0_hat.abs().clamp_min(clip))


def ddim_coefficients(a_t: float, a_prev: float, eta: float) -> tuple[float, float]:
    """``(c₁, c₂)`` of the DDIM update; c₁ = σ_t(η) (DDIM Eq. 16), c₂ = √(1 − ᾱ_{t−1} − σ_t²) (DDIM Eq. 12)."""
    c1 = eta * math.sqrt(max((1.0 - a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t), 0.0))
    c2 = math.sqrt(max(1.0 - a_prev - c1 * c1, 0.0))
    return c1, c2


def ddim_step(
    x0_hat: torch.Tensor,
    eps: torch.Tensor,
    a_t: float,
    a_prev: float | None,
    eta: float,
    noise: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One DDIM update from the (possibly corrected) denoised estimate and the network's noise (DDIM Eq. 12)::

        x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ_t²) ε + σ_t z,     σ_t = σ_t(η) (Eq. 16)

    η = 0 is deterministic DDIM, η = 1 DDPM's ancestral step with the posterior variance β̃_t. DDS passes the
    data-consistent x̂₀ (the network's ε is kept), DPS the network's own.

    Args:
        x0_hat: x̂₀, complex ``[B, H, W]``.
        eps: ε, complex ``[B, H, W]``.
        a_t: ᾱ_t.
        a_prev: ᾱ_{t−1}, or None at the last step: then ᾱ_{t−1} = 1, σ_t = 0 and ``x0_hat`` itself is returned.
        eta: DDIM stochasticity η ≥ 0.
        noise: draws z, complex ``[B, H, W]``; called only when σ_t > 0, so η = 0 consumes no random numbers.

    Returns:
        x_{t−1}, complex ``[B, H, W]``.
    """
    if a_prev is None:
        return x0_hat
    c1, c2 = ddim_coefficients(a_t, a_prev, eta)
    x = math.sqrt(a_prev) * x0_hat + c2 * eps
    if c1 > 0:
        x = x + c1 * noise()
    return x

"""DPS, Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky & Ye, ICLR 2023): the DDIM/DDPM step plus a
measurement-gradient correction taken through the network, and its step size from the noise level σ.

Notation (beyond :mod:`utils.samplers.ddim`): ``step_size`` -> ζ' of DPS's normalised step ζ_i = ζ'/‖y − A x̂₀‖
(Algorithm 1); ``noise_sigma`` -> σ, the k-space noise std per real/imaginary part on the sampler's (normalised)
scale; ``prior_error_std`` -> s, the error of x̂₀ left at the end of the schedule (the same s as DDS's γ rule,
:func:`utils.raw_data.noise_aware_gamma`).

σ-aware step (``docs/raw_reconstruction.md``, "DPS step from σ"). DPS's Gaussian approximation of the likelihood is
p(y | x_t) ≈ N(y; A x̂₀(x_t), v) per measured complex sample, with v = v_t + 2σ²: the error of x̂₀ seen through A
(per-pixel complex variance v_t) plus the noise. The normalised step of the paper is the noise-free case (v = v_t).
With σ known, the step is scaled by the share of the residual that the prior's error explains::

    ζ_t = ζ' · v_t / (v_t + 2σ²),        v_t = s² + 2(1 − ᾱ_t)

v_t is the posterior variance of x₀ given x_t for data of unit variance per part (1 − ᾱ_t per part, as in ΠGDM,
Song et al. ICLR 2023), floored at the network's own error s². Early steps (ᾱ_t → 0) keep ζ'; late steps, where x̂₀
is good and the residual is mostly noise, shrink towards ζ' s²/(s² + 2σ²), the same attenuation DDS's γ rule gives.
σ = 0 leaves ζ' unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from utils.channels import channels_to_complex, complex_to_channels
from utils.samplers.core import Callback, EpsFn, Generators, SamplerStats, SamplingLoop, per_sample
from utils.samplers.ddim import clip_magnitude, ddim_step, tweedie_x0
from utils.samplers.schedule import DiffusionSchedule

#: Default s of the σ-aware step (per-pixel error of x̂₀ late in the schedule, normalised scale); the raw path's
#: ``--prior_error_std`` overrides it.
PRIOR_ERROR_STD = 0.1


def dps_noise_weight(
    a_t: float, noise_sigma: float | torch.Tensor, prior_error_std: float = PRIOR_ERROR_STD
) -> float | torch.Tensor:
    """The factor v_t/(v_t + 2σ²), v_t = s² + 2(1 − ᾱ_t), that scales DPS's step ζ' at timestep t (module docstring).

    Args:
        a_t: ᾱ_t.
        noise_sigma: σ per real/imaginary part (normalised scale), a scalar or one per sample ``[B]``; ≥ 0.
        prior_error_std: s > 0.

    Returns:
        The factor in (0, 1] (1 at σ = 0), of ``noise_sigma``'s type and shape.
    """
    if prior_error_std <= 0:
        raise ValueError(f"prior_error_std must be > 0, got {prior_error_std}")
    v_t = prior_error_std * prior_error_std + 2.0 * (1.0 - a_t)
    return v_t / (v_t + 2.0 * noise_sigma * noise_sigma)


def dps_sample(
    eps_fn: EpsFn,
    op: Any,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor | DiffusionSchedule,
    *,
    num_steps: int = 1000,
    step_size: float | torch.Tensor = 1.0,
    eta: float = 1.0,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generators: Generators = None,
    x_T: torch.Tensor | None = None,
    callback: Callback | None = None,
    stats: SamplerStats | None = None,
    clip_x0: float | None = None,
    noise_sigma: float | torch.Tensor | None = None,
    prior_error_std: float = PRIOR_ERROR_STD,
) -> torch.Tensor:
    """Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky & Ye, ICLR 2023), the classic ~1000-NFE baseline.

    Per step: x̂₀(x_t) by Tweedie from the network, the unconditional DDIM/DDPM update x'_{t−1} from (x̂₀, ε) — with
    ``eta=1`` this is DDPM's ancestral step with the posterior variance β̃_t — then the measurement-guided correction
    ``x_{t−1} = x'_{t−1} − ζ' ∇_{x_t} ‖y − A x̂₀(x_t)‖`` with the gradient taken *through the network*. Using the
    gradient of the norm (not the squared norm) is the paper's normalised step size ζ_i = ζ'/‖y − A x̂₀‖ applied to
    ∇‖·‖², up to the factor 2 absorbed into ``step_size`` (as in the official code). The gradient is taken with
    respect to the network's real input channels, so it is the plain real gradient of each real/imag part.
    The residual norm is per sample, so samples do not influence each other.

    Args:
        eps_fn, op, y, alphas_cumprod, timesteps, generators, x_T, stats: as in :func:`dds_sample`.
        num_steps: sampling steps (default 1000 = every training timestep).
        step_size: ζ', a scalar or one per sample ``[B]``.
        eta: DDIM η of the underlying update (1.0 = DDPM ancestral sampling, as in the paper; 0 = deterministic
            DDIM).
        callback: ``callback(i, t, x_t, x0_hat)`` with the network's denoised estimate x̂₀ (after clipping).
        clip_x0: if set, limit ``|x̂₀|`` to this value (phase kept) in the DDIM update, as in :func:`dds_sample`.
            The measurement gradient is still taken through the unclipped x̂₀ (clipping has zero gradient where it
            acts, which would switch the data term off exactly where the estimate is worst).
        noise_sigma: σ of the measurement noise per real/imaginary part on ``y``'s scale, a scalar or one per
            sample ``[B]``; None (default) or 0 keeps ζ' at every step, else ζ_t = ζ' ·
            :func:`dps_noise_weight` (ᾱ_t, σ, s).
        prior_error_std: s of the σ-aware step.

    Returns:
        Reconstruction, complex ``[B, H, W]`` in the dtype of ``y`` (x̂₀ of the last step, minus the last correction).
    """
    loop = SamplingLoop(y, alphas_cumprod, num_steps=num_steps, timesteps=timesteps, generators=generators,
                        stats=stats)
    with torch.no_grad():
        x = loop.initial(x_T)
        y_masked = op.mask * y
    zeta = per_sample(step_size, x)
    sigma = None if noise_sigma is None else per_sample(noise_sigma, x)

    for step in loop.steps():
        x_ch = complex_to_channels(x).detach().requires_grad_(True)
        with torch.enable_grad():
            eps_ch = loop.eps(eps_fn, x_ch, step)
            with loop.physics():
                x0_ch = tweedie_x0(x_ch, eps_ch, step.a_t)
                residual = op.forward(channels_to_complex(x0_ch).to(x.dtype)) - y_masked
                norm = torch.linalg.vector_norm(residual.flatten(1), dim=1)
            (grad_ch,) = torch.autograd.grad(norm.sum(), x_ch)
        with torch.no_grad(), loop.physics():
            eps = channels_to_complex(eps_ch.detach()).to(x.dtype)
            x0_hat = clip_magnitude(channels_to_complex(x0_ch.detach()).to(x.dtype), clip_x0)
            if callback is not None:
                callback(step.index, step.t, x, x0_hat)
            x_prev = ddim_step(x0_hat, eps, step.a_t, step.a_prev, eta, loop.noise)
            zeta_t = zeta if sigma is None else zeta * dps_noise_weight(step.a_t, sigma, prior_error_std)
            x = x_prev - zeta_t * channels_to_complex(grad_ch).to(x.dtype)
    return loop.finish(x).detach()

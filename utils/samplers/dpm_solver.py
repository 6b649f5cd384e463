"""DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li & Zhu, arXiv:2211.01095, 2022) with DDS's data-consistency step on the
data prediction.

Notation: variable -> paper symbol::

  alpha, sigma -> α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), the VP noise schedule (Sec. 2: x_t = α_t x_0 + σ_t ε)
  lam          -> λ_t = log(α_t/σ_t), half the log-SNR (Sec. 2)
  h            -> h_i = λ_{t_i} − λ_{t_{i−1}} (Algorithm 2)
  r            -> r_i = h_{i−1}/h_i (Algorithm 2)
  x0_hat       -> x_θ(x̃_{t_{i−1}}, t_{i−1}), the data prediction (Tweedie from ε, Sec. 3), here replaced by its
                  DDS data-consistent version (CG on (I + γAᴴA) x = x̂₀ + γAᴴy from x̂₀), exactly as dds_sample does
  d            -> D_i = (1 + 1/(2r_i)) x_θ(t_{i−1}) − 1/(2r_i) x_θ(t_{i−2}) (Algorithm 2, second-order multistep)
  update       -> x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i (Algorithm 2, the
                  update line); with D_i = x_θ(t_{i−1}) it is the first-order step the algorithm takes first
                  (DPM-Solver++1, which equals DDIM η = 0 written in x̂₀: ε is re-derived from x̂₀, not the network's)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from utils.samplers.core import Callback, EpsFn, Generators, SamplerStats, SamplingLoop
from utils.samplers.dds import dc_denoise
from utils.samplers.schedule import DiffusionSchedule


def _alpha_sigma_lambda(a_bar: float) -> tuple[float, float, float]:
    """``(α, σ, λ)`` of ᾱ: α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ) (+inf at ᾱ = 1)."""
    alpha, sigma = math.sqrt(a_bar), math.sqrt(max(1.0 - a_bar, 0.0))
    lam = math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)
    return alpha, sigma, lam


def dpmpp2m_sample(
    eps_fn: EpsFn,
    op: Any,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor | DiffusionSchedule,
    *,
    num_steps: int = 20,
    gamma: float | torch.Tensor = 5.0,
    cg_iter: int = 5,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generators: Generators = None,
    x_T: torch.Tensor | None = None,
    callback: Callback | None = None,
    stats: SamplerStats | None = None,
    clip_x0: float | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with the DDS data-consistency step on the data prediction.

    Per step: ε = ε_θ(x_t, t); x̂₀ = (x_t − σ_t ε)/α_t (optionally clipped); x̂₀ ← CG solution of
    (I + γAᴴA) x = x̂₀ + γAᴴy started at x̂₀ (as :func:`dds_sample`); then the multistep update of Algorithm 2 with
    the data-consistent x̂₀ of this and the previous step. The first step is first order (no history), and the last
    step returns the data-consistent x̂₀ (diffusers' ``final_sigmas_type="zero"``, whose last step is first order
    towards σ = 0). Without data consistency (``cg_iter=0`` or ``gamma=0``) this is diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` on the same timesteps.

    The sampler is deterministic: ``generators``/``x_T`` only draw the initial noise.

    Why it is weaker than DDS with data consistency (measured in ``benchmarks/bench_nfe_quality.py``): the update
    re-derives the noise direction from the *corrected* x̂₀, so a CG correction Δ of x̂₀ moves the next state by
    α_t (1 − e^{−h}) Δ (first-order step; 2M alike), while DDS, which keeps the network's ε, moves it by α_t Δ. With
    fine steps (small h) little of each correction survives.

    Args:
        eps_fn, op, y, alphas_cumprod, timesteps, generators, x_T, stats, clip_x0: as in :func:`dds_sample`.
        num_steps: sampling steps = network calls ("leading" timesteps, as :func:`dds_sample`).
        gamma: data-consistency weight γ, a scalar or one per sample ``[B]``.
        cg_iter: CG iterations per step (0 disables data consistency).
        callback: ``callback(i, t, x_t, x0_hat)`` with the data-consistent x̂₀.
        eta: accepted for a common signature with :func:`dds_sample`; must be 0 (the solver is an ODE solver).

    Returns:
        Reconstruction, complex ``[B, H, W]`` in the dtype of ``y``.
    """
    if eta != 0:
        raise ValueError(f"dpmpp2m is a deterministic ODE solver: eta must be 0, got {eta}")
    loop = SamplingLoop(y, alphas_cumprod, num_steps=num_steps, timesteps=timesteps, generators=generators,
                        stats=stats)
    with torch.no_grad():
        x = loop.initial(x_T)
        with loop.physics():
            aty = op.adjoint(y).to(x.dtype)
        x0_prev, h_prev = None, None
        for step in loop.steps():
            alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(step.a_t)
            _, x0_hat = dc_denoise(loop, eps_fn, op, x, step, aty, gamma=gamma, cg_iter=cg_iter, clip_x0=clip_x0,
                                   callback=callback)
            with loop.physics():
                if step.last:
                    x = x0_hat  # the step to σ = 0: α = 1, e^{−h} = 0
                else:
                    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(step.a_prev)
                    h = lam_t - lam_s
                    if x0_prev is None:
                        d = x0_hat
                    else:
                        r = h_prev / h
                        d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
                    # −α_t (e^{−h} − 1) = −α_t expm1(−h): expm1 keeps precision when h is small (many steps)
                    x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
                    x0_prev, h_prev = x0_hat, h
    return loop.finish(x)

"""DDS, the Decomposed Diffusion Sampler (Chung, Lee & Ye, ICLR 2024): DDIM whose denoised estimate is made
data-consistent by a few CG steps at every step.

Notation (beyond :mod:`utils.samplers.ddim`): ``A``, ``y`` -> the forward model (SENSE ``M ⊙ F(S ⊙ ·)``, or the
raw-grid operator) and the measured k-space; ``gamma`` -> γ, the data-consistency weight. The data-consistent x̂₀ is
argmin_x ‖x − x̂₀‖² + γ‖Ax − y‖², i.e. the solution of (I + γAᴴA) x = x̂₀ + γAᴴy, approximated by ``cg_iter`` CG steps
started at x̂₀ (DDS Sec. 3, Algorithm "DDS"; CG from x̂₀ keeps the update in the tangent space at x̂₀).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from utils.cg import conjugate_gradient
from utils.channels import channels_to_complex, complex_to_channels
from utils.samplers.core import Callback, EpsFn, Generators, SamplerStats, SamplingLoop, Step, per_sample
from utils.samplers.ddim import clip_magnitude, ddim_step, tweedie_x0
from utils.samplers.schedule import DiffusionSchedule


def data_consistency(
    op: Any, x0_hat: torch.Tensor, aty: torch.Tensor, gamma: float | torch.Tensor, cg_iter: int
) -> torch.Tensor:
    """DDS's data-consistency step: ``cg_iter`` CG steps on (I + γAᴴA) x = x̂₀ + γAᴴy, started at x̂₀.

    Args:
        op: the forward model (``normal`` is AᴴA).
        x0_hat: x̂₀, complex ``[B, H, W]``.
        aty: Aᴴy, complex ``[B, H, W]`` (computed once per sampler call).
        gamma: γ, a scalar or one per sample ``[B]``.
        cg_iter: CG iterations; 0 returns ``x0_hat`` unchanged (no data consistency).

    Returns:
        The data-consistent estimate, complex ``[B, H, W]``.
    """
    if cg_iter <= 0:
        return x0_hat
    return conjugate_gradient(op.normal, x0_hat + per_sample(gamma, x0_hat) * aty, x0=x0_hat, gamma=gamma,
                              max_iter=cg_iter)


def dc_denoise(
    loop: SamplingLoop,
    eps_fn: EpsFn,
    op: Any,
    x: torch.Tensor,
    step: Step,
    aty: torch.Tensor,
    *,
    gamma: float | torch.Tensor,
    cg_iter: int,
    clip_x0: float | None,
    callback: Callback | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of a DDS (and DPM-Solver++ with data consistency) step: ε = ε_θ(x_t, t), Tweedie's x̂₀
    (clipped when ``clip_x0`` is set), its data-consistent version (:func:`data_consistency`), then ``callback``.

    Args:
        loop: the sampler's :class:`~utils.samplers.core.SamplingLoop` (counts the network call).
        eps_fn: the noise predictor.
        op: the forward model.
        x: x_t, complex ``[B, H, W]``.
        step: the current step.
        aty: Aᴴy, complex ``[B, H, W]``.
        gamma, cg_iter, clip_x0, callback: as in :func:`dds_sample`.

    Returns:
        ``(eps, x0_hat)``: the network's ε and the data-consistent x̂₀, complex ``[B, H, W]`` each.
    """
    eps_ch = loop.eps(eps_fn, complex_to_channels(x), step)
    with loop.physics():
        eps = channels_to_complex(eps_ch).to(x.dtype)
        x0_hat = clip_magnitude(tweedie_x0(x, eps, step.a_t), clip_x0)
        x0_hat = data_consistency(op, x0_hat, aty, gamma, cg_iter)
        if callback is not None:
            callback(step.index, step.t, x, x0_hat)
    return eps, x0_hat


def dds_sample(
    eps_fn: EpsFn,
    op: Any,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor | DiffusionSchedule,
    *,
    num_steps: int = 100,
    eta: float = 0.8,
    gamma: float | torch.Tensor = 5.0,
    cg_iter: int = 5,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generators: Generators = None,
    x_T: torch.Tensor | None = None,
    callback: Callback | None = None,
    stats: SamplerStats | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Decomposed Diffusion Sampler (DDS-VP): DDIM with a CG data-consistency step on the denoised estimate.

    Per step: ε = ε_θ(x_t, t); x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t (:func:`~utils.samplers.ddim.tweedie_x0`); x = CG
    solution of (I + γAᴴA) x = x̂₀ + γAᴴy started at x̂₀ (:func:`data_consistency`); x_{t−1} = √ᾱ_{t−1} x + c₁ z + c₂ ε
    (:func:`~utils.samplers.ddim.ddim_step`). At the last step (ᾱ_{t−1} := 1, so c₁ = c₂ = 0) the data-consistent x̂₀
    itself is returned.

    Args:
        eps_fn: noise predictor ``(x_t[B, 2, H, W] float, t[B] long) -> eps[B, 2, H, W]``. May expose
            ``evals_per_call``/``forwards_per_call`` (see :class:`GuidedEpsFn`) for NFE counting.
        op: SENSE operator for the batch (``forward``, ``adjoint``, ``normal``).
        y: measured k-space ``[B, C, H, W]`` complex (zero off the mask; the adjoint masks it anyway).
        alphas_cumprod: ᾱ ``[T]`` or a :class:`DiffusionSchedule` (whose ``steps_offset`` shifts the timesteps).
        num_steps: sampling steps (timesteps from ``"leading"`` spacing; 100 over T=1000 gives 990, 980, …, 0, or
            991, …, 1 with a schedule's ``steps_offset`` of 1, as diffusers' DDIMScheduler).
        eta: DDIM stochasticity η (0 = deterministic).
        gamma: data-consistency weight γ, a scalar or one per sample ``[B]``.
        cg_iter: CG iterations per step (0 disables data consistency: plain DDIM).
        timesteps: explicit descending timesteps; overrides ``num_steps``.
        generators: one ``torch.Generator`` per sample (result independent of batch composition), a single shared
            generator, or None (a fresh OS-seeded generator).
        x_T: initial noise, complex ``[B, H, W]``; drawn from ``generators`` when None.
        callback: ``callback(i, t, x_t, x0_hat)`` after each step's data consistency (``x0_hat`` is the
            data-consistent estimate).
        stats: a :class:`SamplerStats` to fill in place.
        clip_x0: if set, limit ``|x̂₀|`` to this value (phase kept) before data consistency, the complex analogue of
            DDPM's ``clip_sample``. Off by default (the reference does not clip). It matters for weak networks: with
            ε-prediction, x̂₀'s error is the ε error times √((1−ᾱ_t)/ᾱ_t), ~30x at t = 800.

    Returns:
        Reconstruction, complex ``[B, H, W]`` in the dtype of ``y``.
    """
    loop = SamplingLoop(y, alphas_cumprod, num_steps=num_steps, timesteps=timesteps, generators=generators,
                        stats=stats)
    with torch.no_grad():
        x = loop.initial(x_T)
        with loop.physics():
            aty = op.adjoint(y).to(x.dtype)
        for step in loop.steps():
            eps, x0_hat = dc_denoise(loop, eps_fn, op, x, step, aty, gamma=gamma, cg_iter=cg_iter, clip_x0=clip_x0,
                                     callback=callback)
            with loop.physics():
                x = ddim_step(x0_hat, eps, step.a_t, step.a_prev, eta, loop.noise)
    return loop.finish(x)

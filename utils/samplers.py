"""Diffusion samplers for accelerated MRI: DDS (DDIM + CG data consistency), DPM-Solver++(2M) with the same data
consistency, DPS, classifier-free guidance, named presets.

Every sampler is a plain function with one signature (in the style of k-diffusion / EDM's ``edm_sampler``)::

    sampler(eps_fn, op, y, alphas_cumprod, *, num_steps, eta, ..., timesteps=None, generators=None, x_T=None,
            callback=None, stats=None) -> x0 [B, H, W] complex

* ``eps_fn(x_t[B, 2, H, W] float, t[B] long) -> eps[B, 2, H, W]`` is the noise predictor. The network boundary is the
  only place with (real, imag) channels; everything else here works on native complex tensors.
* ``op`` is a :class:`utils.operators.SenseOperator` (anything with ``forward``/``adjoint``/``normal``/``mask``), ``y``
  the measured (masked) k-space ``[B, C, H, W]`` complex. The image dtype follows ``y`` (complex64 in practice).
* ``alphas_cumprod`` is ᾱ over the training timesteps ``[T]`` (see :class:`DiffusionSchedule`).
* ``generators`` holds one ``torch.Generator`` per batch element, so a slice's result does not depend on which other
  slices share its batch (as in EDM's per-sample seeds). The global RNG is never touched.
* ``callback(i, t, x_t, x0_hat)`` is called once per step; ``stats`` (a :class:`SamplerStats`) is filled in place with
  the number of network evaluations (NFE) and timings.

Precision: the network may run under fp16/bf16 autocast (the caller's context, or ``make_cfg_eps_fn(...,
autocast_dtype=...)``). Its output is cast to fp32 and every FFT, CG iteration and update runs with autocast disabled,
in the dtype of ``y``, so data consistency is never computed in half precision.

Noise: a complex image's real and imaginary parts are the network's two channels, each trained with N(0, 1) noise, so
the sampler's noise ``z`` has real and imaginary parts that are each N(0, 1) (``E|z|² = 2``), not a unit-variance
complex Gaussian.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.cg import conjugate_gradient
from utils.channels import channels_to_complex, complex_to_channels

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generators = Sequence[torch.Generator] | torch.Generator | None

TIMESTEP_SPACINGS = ("leading", "uniform", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")

__all__ = [
    "DC_SAMPLERS",
    "PRESETS",
    "TIMESTEP_SPACINGS",
    "DiffusionSchedule",
    "GuidedEpsFn",
    "SamplerStats",
    "dc_sample",
    "dds_sample",
    "dpmpp2m_sample",
    "dps_sample",
    "ensemble_stats",
    "make_cfg_eps_fn",
    "make_generators",
    "make_timesteps",
]


# ----------------------------------------------------------------------------------------------------------------------
# Schedule


def make_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Sampling timesteps, descending, as a long tensor ``[num_steps]``.

    Args:
        num_train_timesteps: ``T``, the number of training timesteps (1000 for the released model).
        num_steps: number of sampling steps, ``1 <= num_steps <= T``.
        spacing: ``"leading"`` — diffusers' DDIM default, ``i * (T // num_steps)`` (T=1000, 100 steps: 990, 980, …, 0);
            ``"uniform"`` — ``floor(i * T / num_steps)``, identical to ``"leading"`` when ``num_steps`` divides ``T``
            but covering the whole range otherwise; ``"trailing"`` — ``round(T - i * T / num_steps) - 1`` (ends at
            ``T - 1``, diffusers' "trailing"); ``"linspace"`` — ``round(linspace(0, T - 1, num_steps))``.
        steps_offset: diffusers' ``steps_offset``, applied the way ``DDIMScheduler.set_timesteps`` applies it: added
            to every ``"leading"`` timestep (T=1000, 100 steps, offset 1: 991, 981, …, 1), not used by
            ``"trailing"``/``"linspace"`` (diffusers ignores it there too); ``"uniform"`` (ours, no diffusers
            counterpart) refuses an offset other than 0.

    Returns:
        ``[num_steps]`` long tensor, strictly decreasing, values in ``[0, T)``.

    Raises:
        ValueError: bad ``num_steps``/``spacing``, a negative offset, an offset with ``"uniform"``, or an offset that
            pushes a timestep to ``T`` or beyond.
    """
    t_max = int(num_train_timesteps)
    n = int(num_steps)
    if not 1 <= n <= t_max:
        raise ValueError(f"num_steps must be in [1, {t_max}], got {num_steps}")
    offset = int(steps_offset)
    if offset != steps_offset or offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if offset and spacing == "uniform":
        raise ValueError(f"steps_offset {offset} is not defined for 'uniform' spacing (diffusers applies it to "
                         "'leading' only): use spacing 'leading' or a scheduler config with steps_offset 0")
    if spacing == "leading" and (n - 1) * (t_max // n) + offset >= t_max:
        raise ValueError(f"steps_offset {offset} with {n} 'leading' steps over T={t_max} gives a timestep >= {t_max}")
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (t_max // n) + offset
    elif spacing == "uniform":
        ts = torch.floor(torch.arange(n, dtype=torch.float64) * t_max / n)
    elif spacing == "trailing":
        ts = torch.round(t_max - torch.arange(n, dtype=torch.float64) * (t_max / n)).flip(0) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, t_max - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {TIMESTEP_SPACINGS}")
    ts = ts.long().flip(0)
    if int(ts.max()) >= t_max or int(ts.min()) < 0 or (n > 1 and not bool((ts[:-1] > ts[1:]).all())):
        raise ValueError(f"spacing {spacing!r} with {n} steps over T={t_max} gives invalid timesteps {ts.tolist()}")
    return ts


@dataclass(frozen=True)
class DiffusionSchedule:
    """The DDPM noise schedule ᾱ_t of a trained model, plus timestep spacing for sampling.

    Attributes:
        alphas_cumprod: ᾱ_t = Π_{s≤t} (1 − β_s), float64 ``[T]`` on CPU.
        steps_offset: diffusers' ``steps_offset`` (added to "leading" timesteps).
        prediction_type: what the network outputs, ``"epsilon"`` or ``"v_prediction"`` (the scheduler config's
            ``prediction_type``); :func:`make_cfg_eps_fn` turns either into ε for the samplers.
    """

    alphas_cumprod: torch.Tensor
    steps_offset: int = 0
    prediction_type: str = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def timesteps(self, num_steps: int, spacing: str = "leading") -> torch.Tensor:
        """Descending sampling timesteps ``[num_steps]`` (see :func:`make_timesteps`)."""
        return make_timesteps(self.num_train_timesteps, num_steps, spacing, self.steps_offset)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> DiffusionSchedule:
        """Read ᾱ from a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, …)."""
        acp = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
        prediction_type = str(getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use one of "
                             f"{PREDICTION_TYPES}")
        return cls(acp, int(getattr(scheduler.config, "steps_offset", 0) or 0), prediction_type)

    @classmethod
    def from_config(cls, source: str | os.PathLike | dict) -> DiffusionSchedule:
        """Build the schedule from a ``scheduler_config.json``.

        Args:
            source: a config dict, the JSON file, a folder holding ``scheduler_config.json``, or a pipeline folder
                holding ``scheduler/scheduler_config.json`` (the released ``MRI_checkpoint/`` layout).

        The betas (``beta_schedule``, ``beta_start``/``beta_end``, ``trained_betas``, ``num_train_timesteps``) are
        read from the file and turned into ᾱ by diffusers' ``DDPMScheduler``, so every schedule diffusers knows is
        reproduced exactly.
        """
        from diffusers import DDPMScheduler

        if isinstance(source, dict):
            config = source
        else:
            path = Path(source)
            for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                raise FileNotFoundError(f"no scheduler_config.json at {source}")
            config = json.loads(path.read_text())
        return cls.from_scheduler(DDPMScheduler.from_config(config))


def _alphas_cumprod(alphas_cumprod: torch.Tensor | DiffusionSchedule) -> torch.Tensor:
    if isinstance(alphas_cumprod, DiffusionSchedule):
        return alphas_cumprod.alphas_cumprod
    acp = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if acp.ndim != 1 or not bool(((acp > 0) & (acp <= 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1]")
    return acp


def _resolve_timesteps(
    alphas_cumprod: torch.Tensor | DiffusionSchedule, acp: torch.Tensor, num_steps: int,
    timesteps: Sequence[int] | torch.Tensor | None,
) -> list[int]:
    """Explicit timesteps (checked), or ``"leading"`` ones with the schedule's ``steps_offset``."""
    if timesteps is None:
        offset = alphas_cumprod.steps_offset if isinstance(alphas_cumprod, DiffusionSchedule) else 0
        return make_timesteps(acp.shape[0], num_steps, "leading", offset).tolist()
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts or any(not 0 <= t < acp.shape[0] for t in ts) or any(a <= b for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing values in [0, {acp.shape[0]}), got {ts}")
    return ts


# ----------------------------------------------------------------------------------------------------------------------
# Randomness, bookkeeping


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per batch element (e.g. ``range(seed, seed + N)`` for an ensemble)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _generator_list(generators: Generators, batch: int, device: torch.device) -> list[torch.Generator]:
    if generators is None:
        # A fresh, OS-seeded generator: non-reproducible, but the global RNG stays untouched.
        g = torch.Generator(device=device)
        g.seed()
        return [g] * batch
    if isinstance(generators, torch.Generator):
        return [generators] * batch
    generators = list(generators)
    if len(generators) != batch:
        raise ValueError(f"need one generator per batch element ({batch}), got {len(generators)}")
    return generators


def _randn_images(
    generators: list[torch.Generator], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Complex ``[B, H, W]`` noise; real and imaginary parts are independent N(0, 1), one generator per sample."""
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    z = [torch.randn((2, *shape), generator=g, device=g.device, dtype=real_dtype).to(device) for g in generators]
    return channels_to_complex(torch.stack(z))


@dataclass
class SamplerStats:
    """Counters a sampler fills in place (pass ``stats=SamplerStats()``).

    Attributes:
        num_steps: sampling steps taken.
        eps_calls: calls of ``eps_fn``.
        nfe: network evaluations per sample — ``eps_calls × eps_fn.evals_per_call`` (2 per step under CFG with
            ``w > 1``, the convention used when comparing DDS, DPS and score-MRI).
        network_forwards: batched network forward passes — ``eps_calls × eps_fn.forwards_per_call`` (CFG batches
            both passes into one forward of size 2B).
        wall_s: wall time of the whole sampler call.
        eps_s: wall time spent inside ``eps_fn`` (host-side; on a GPU, asynchronous kernels make this a lower bound).
    """

    num_steps: int = 0
    eps_calls: int = 0
    nfe: int = 0
    network_forwards: int = 0
    wall_s: float = 0.0
    eps_s: float = 0.0


def _call_eps(eps_fn: EpsFn, x_ch: torch.Tensor, t: torch.Tensor, stats: SamplerStats) -> torch.Tensor:
    """Evaluate the network in the caller's autocast context and return fp32 ``[B, 2, H, W]``."""
    start = time.perf_counter()
    eps = eps_fn(x_ch, t)
    stats.eps_s += time.perf_counter() - start
    stats.eps_calls += 1
    stats.nfe += int(getattr(eps_fn, "evals_per_call", 1))
    stats.network_forwards += int(getattr(eps_fn, "forwards_per_call", 1))
    if eps.shape != x_ch.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x_ch.shape)}")
    return eps.to(x_ch.dtype)


def _full_precision(device: torch.device):
    """Disable autocast for the physics (FFTs, CG, updates)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


def _per_sample(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar, or a ``[B]`` tensor reshaped to broadcast against ``like`` ``[B, ...]``."""
    if isinstance(v, torch.Tensor) and v.ndim > 0:
        return v.to(like.device, like.real.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return float(v)


def _init_x(
    x_T: torch.Tensor | None, y: torch.Tensor, gens: list[torch.Generator], shape: tuple[int, int]
) -> torch.Tensor:
    b = y.shape[0]
    if x_T is None:
        return _randn_images(gens, shape, y.dtype, y.device)
    if not x_T.is_complex() or tuple(x_T.shape) != (b, *shape):
        raise ValueError(f"x_T must be complex [{b}, {shape[0]}, {shape[1]}], got {x_T.dtype} {tuple(x_T.shape)}")
    return x_T.to(y.device, y.dtype)


def _ddim_coefficients(a_t: float, a_prev: float, eta: float) -> tuple[float, float]:
    """``(c₁, c₂)`` of the DDIM update; c₁ = σ_t(η) (DDIM Eq. 16), c₂ = √(1 − ᾱ_{t−1} − σ_t²) (DDIM Eq. 12)."""
    c1 = eta * math.sqrt(max((1.0 - a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t), 0.0))
    c2 = math.sqrt(max(1.0 - a_prev - c1 * c1, 0.0))
    return c1, c2


# ----------------------------------------------------------------------------------------------------------------------
# Samplers
#
# Notation: variable -> paper symbol (Eq. n)
#   x           -> x_t, the noisy complex image at timestep t (DDIM, Song, Meng & Ermon, ICLR 2021, Eq. 12)
#   eps         -> ε_θ(x_t, t, c), the network's noise prediction (complex; channels only at the network boundary)
#   a_t, a_prev -> ᾱ_t, ᾱ_{t−1} (written α_t, α_{t−1} in DDIM); "t−1" is the next timestep of the sampling
#                  sequence, and ᾱ_{t−1} := 1 after the last one
#   x0_hat      -> x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, Tweedie's denoised estimate (DDIM Eq. 9); in DDS it is then
#                  replaced by its data-consistent version argmin_x ‖x − x̂₀‖² + γ‖Ax − y‖², i.e. the solution of
#                  (I + γAᴴA) x = x̂₀ + γAᴴy by `cg_iter` CG steps started at x̂₀ (DDS, Chung, Lee & Ye, ICLR 2024,
#                  Sec. 3, Algorithm "DDS"; CG from x̂₀ keeps the update in the tangent space at x̂₀)
#   c1          -> σ_t(η) = η √((1 − ᾱ_t/ᾱ_{t−1})(1 − ᾱ_{t−1})/(1 − ᾱ_t)) (DDIM Eq. 16)
#   c2          -> √(1 − ᾱ_{t−1} − σ_t²), the "direction pointing to x_t" (DDIM Eq. 12)
#   z           -> ε_t ~ N(0, I) per real channel, fresh noise (DDIM Eq. 12)
#   A, y        -> SENSE forward model M ⊙ F(S ⊙ ·) and measured k-space
#   step_size   -> ζ' of DPS's normalised step ζ_i = ζ'/‖y − A x̂₀‖ (DPS, Chung et al., ICLR 2023, Algorithm 1)


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

    Per step (REFERENCE §1): ε = ε_θ(x_t, t); x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t; x = CG solution of
    (I + γAᴴA) x = x̂₀ + γAᴴy started at x̂₀; x_{t−1} = √ᾱ_{t−1} x + c₁ z + c₂ ε. At the last step (ᾱ_{t−1} := 1,
    so c₁ = c₂ = 0) the data-consistent x̂₀ itself is returned.

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
    stats = SamplerStats() if stats is None else stats
    start = time.perf_counter()
    acp = _alphas_cumprod(alphas_cumprod)
    ts = _resolve_timesteps(alphas_cumprod, acp, num_steps, timesteps)
    b, (h, w), device = y.shape[0], y.shape[-2:], y.device
    gens = _generator_list(generators, b, device)

    with torch.no_grad():
        x = _init_x(x_T, y, gens, (h, w))
        gamma_b = _per_sample(gamma, x)
        with _full_precision(device):
            aty = op.adjoint(y).to(x.dtype)
        for i, t in enumerate(ts):
            a_t = float(acp[t])
            a_prev = float(acp[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            t_batch = torch.full((b,), t, dtype=torch.long, device=device)
            eps_ch = _call_eps(eps_fn, complex_to_channels(x), t_batch, stats)
            with _full_precision(device):
                eps = channels_to_complex(eps_ch).to(x.dtype)
                x0_hat = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
                if clip_x0 is not None:
                    mag = x0_hat.abs()
                    x0_hat = x0_hat * (clip_x0 / mag.clamp_min(clip_x0))
                if cg_iter > 0:
                    x0_hat = conjugate_gradient(
                        op.normal, x0_hat + gamma_b * aty, x0=x0_hat, gamma=gamma, max_iter=cg_iter
                    )
                if callback is not None:
                    callback(i, t, x, x0_hat)
                if i + 1 == len(ts):
                    x = x0_hat
                else:
                    c1, c2 = _ddim_coefficients(a_t, a_prev, eta)
                    x = math.sqrt(a_prev) * x0_hat + c2 * eps
                    if c1 > 0:
                        x = x + c1 * _randn_images(gens, (h, w), x.dtype, device)
            stats.num_steps += 1
    stats.wall_s += time.perf_counter() - start
    return x


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

    Returns:
        Reconstruction, complex ``[B, H, W]`` in the dtype of ``y`` (x̂₀ of the last step, minus the last correction).
    """
    stats = SamplerStats() if stats is None else stats
    start = time.perf_counter()
    acp = _alphas_cumprod(alphas_cumprod)
    ts = _resolve_timesteps(alphas_cumprod, acp, num_steps, timesteps)
    b, (h, w), device = y.shape[0], y.shape[-2:], y.device
    gens = _generator_list(generators, b, device)
    with torch.no_grad():
        x = _init_x(x_T, y, gens, (h, w))
        y_masked = op.mask * y
    zeta = _per_sample(step_size, x)

    for i, t in enumerate(ts):
        a_t = float(acp[t])
        a_prev = float(acp[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        t_batch = torch.full((b,), t, dtype=torch.long, device=device)
        x_ch = complex_to_channels(x).detach().requires_grad_(True)
        with torch.enable_grad():
            eps_ch = _call_eps(eps_fn, x_ch, t_batch, stats)
            with _full_precision(device):
                x0_ch = (x_ch - math.sqrt(1.0 - a_t) * eps_ch) / math.sqrt(a_t)
                residual = op.forward(channels_to_complex(x0_ch).to(x.dtype)) - y_masked
                norm = torch.linalg.vector_norm(residual.flatten(1), dim=1)
            (grad_ch,) = torch.autograd.grad(norm.sum(), x_ch)
        with torch.no_grad(), _full_precision(device):
            eps = channels_to_complex(eps_ch.detach()).to(x.dtype)
            x0_hat = channels_to_complex(x0_ch.detach()).to(x.dtype)
            if clip_x0 is not None:
                x0_hat = x0_hat * (clip_x0 / x0_hat.abs().clamp_min(clip_x0))
            if callback is not None:
                callback(i, t, x, x0_hat)
            if i + 1 == len(ts):
                x_prev = x0_hat
            else:
                c1, c2 = _ddim_coefficients(a_t, a_prev, eta)
                x_prev = math.sqrt(a_prev) * x0_hat + c2 * eps
                if c1 > 0:
                    x_prev = x_prev + c1 * _randn_images(gens, (h, w), x.dtype, device)
            x = x_prev - zeta * channels_to_complex(grad_ch).to(x.dtype)
        stats.num_steps += 1
    stats.wall_s += time.perf_counter() - start
    return x.detach()


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) with DDS data consistency
#
# Notation: variable -> paper symbol (DPM-Solver++, Lu, Zhou, Bao, Chen, Li & Zhu, arXiv:2211.01095, 2022)
#   alpha, sigma -> α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), the VP noise schedule (Sec. 2: x_t = α_t x_0 + σ_t ε)
#   lam          -> λ_t = log(α_t/σ_t), half the log-SNR (Sec. 2)
#   h            -> h_i = λ_{t_i} − λ_{t_{i−1}} (Algorithm 2)
#   r            -> r_i = h_{i−1}/h_i (Algorithm 2)
#   x0_hat       -> x_θ(x̃_{t_{i−1}}, t_{i−1}), the data prediction (Tweedie from ε, Sec. 3), here replaced by its
#                   DDS data-consistent version (CG on (I + γAᴴA) x = x̂₀ + γAᴴy from x̂₀), exactly as dds_sample does
#   d            -> D_i = (1 + 1/(2r_i)) x_θ(t_{i−1}) − 1/(2r_i) x_θ(t_{i−2}) (Algorithm 2, second-order multistep)
#   update       -> x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i (Algorithm 2, the
#                   update line); with D_i = x_θ(t_{i−1}) it is the first-order step the algorithm takes first
#                   (DPM-Solver++1, which equals DDIM η = 0 written in x̂₀: ε is re-derived from x̂₀, not the network's)


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
    stats = SamplerStats() if stats is None else stats
    start = time.perf_counter()
    acp = _alphas_cumprod(alphas_cumprod)
    ts = _resolve_timesteps(alphas_cumprod, acp, num_steps, timesteps)
    b, (h, w), device = y.shape[0], y.shape[-2:], y.device
    gens = _generator_list(generators, b, device)

    with torch.no_grad():
        x = _init_x(x_T, y, gens, (h, w))
        gamma_b = _per_sample(gamma, x)
        with _full_precision(device):
            aty = op.adjoint(y).to(x.dtype)
        x0_prev, h_prev = None, None
        for i, t in enumerate(ts):
            alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(float(acp[t]))
            t_batch = torch.full((b,), t, dtype=torch.long, device=device)
            eps_ch = _call_eps(eps_fn, complex_to_channels(x), t_batch, stats)
            with _full_precision(device):
                eps = channels_to_complex(eps_ch).to(x.dtype)
                x0_hat = (x - sigma_s * eps) / alpha_s
                if clip_x0 is not None:
                    x0_hat = x0_hat * (clip_x0 / x0_hat.abs().clamp_min(clip_x0))
                if cg_iter > 0:
                    x0_hat = conjugate_gradient(
                        op.normal, x0_hat + gamma_b * aty, x0=x0_hat, gamma=gamma, max_iter=cg_iter
                    )
                if callback is not None:
                    callback(i, t, x, x0_hat)
                if i + 1 == len(ts):
                    x = x0_hat  # the step to σ = 0: α = 1, e^{−h} = 0
                else:
                    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(float(acp[ts[i + 1]]))
                    step = lam_t - lam_s
                    if x0_prev is None:
                        d = x0_hat
                    else:
                        r = h_prev / step
                        d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
                    # −α_t (e^{−h} − 1) = −α_t expm1(−h): expm1 keeps precision when h is small (many steps)
                    x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-step)) * d
                    x0_prev, h_prev = x0_hat, step
            stats.num_steps += 1
    stats.wall_s += time.perf_counter() - start
    return x


# Samplers that share DDS's data-consistency step and settings (num_steps, eta, gamma, cg_iter, clip_x0), by name.
DC_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"dds": dds_sample, "dpmpp2m": dpmpp2m_sample}

# Named settings for the DC samplers. "fast" is what benchmarks/bench_nfe_quality.py measured as the cheapest setting
# within 0.2 dB (paired mean PSNR) of 100-step DDS at <= 25 network evaluations (or, if none got there, the best such
# setting); tests/test_fast_preset.py checks it against the committed benchmarks/results/nfe_quality.json.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"sampler": "dds", "num_steps": 25, "eta": 1.0, "gamma": 50.0, "cg_iter": 5},
}


def dc_sample(sampler: str, eps_fn: EpsFn, op: Any, y: torch.Tensor,
              alphas_cumprod: torch.Tensor | DiffusionSchedule, **settings: Any) -> torch.Tensor:
    """Run the DC sampler named ``sampler`` (a key of :data:`DC_SAMPLERS`) with keyword ``settings``.

    Raises:
        ValueError: an unknown sampler name.
    """
    if sampler not in DC_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(DC_SAMPLERS)}")
    return DC_SAMPLERS[sampler](eps_fn, op, y, alphas_cumprod, **settings)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


class GuidedEpsFn:
    """Noise predictor of a diffusers ``UNet2DConditionModel`` with classifier-free guidance.

    ``w ≤ 1`` runs the conditional pass only (the reference's convention: scales below 1 are not interpolated towards
    the unconditional model). ``w > 1`` runs the conditional and unconditional passes in one forward of batch 2B and
    returns ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, Eq. 6 with w ← 1 + w_paper).

    A network trained to predict v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (``prediction_type="v_prediction"``) has its (guided) output
    turned into ε = √ᾱ_t v + √(1−ᾱ_t) x_t, so the samplers always receive ε. The map is affine in the output with
    the same x_t for both passes, so guiding v and then converting equals converting and then guiding ε.

    Attributes:
        evals_per_call: network evaluations per sample and call (1 or 2), read by the samplers for NFE.
        forwards_per_call: batched forward passes per call (always 1).
        num_forwards: forward passes run so far.
        num_evals: network evaluations per sample run so far.
    """

    def __init__(
        self,
        unet: Any,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance_scale: float,
        autocast_dtype: torch.dtype | None = None,
        prediction_type: str = "epsilon",
        alphas_cumprod: torch.Tensor | None = None,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != "epsilon" and alphas_cumprod is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs alphas_cumprod to convert to ε")
        self.prediction_type = prediction_type
        self.alphas_cumprod = None if alphas_cumprod is None else _alphas_cumprod(alphas_cumprod)
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale > 1.0
        if cond.ndim != 3:
            raise ValueError(f"cond must be [B, L, D], got shape {tuple(cond.shape)}")
        if self.guided:
            if uncond is None:
                raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional tokens")
            if uncond.ndim != 3 or uncond.shape[1:] != cond.shape[1:]:
                raise ValueError(
                    f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must share [L, D] "
                    "(build both with the same condition builder)"
                )
        self.cond = cond
        self.uncond = uncond
        self.autocast_dtype = autocast_dtype
        self.evals_per_call = 2 if self.guided else 1
        self.forwards_per_call = 1
        self.num_forwards = 0
        self.num_evals = 0

    @staticmethod
    def _batch(tokens: torch.Tensor, b: int) -> torch.Tensor:
        if tokens.shape[0] == b:
            return tokens
        if tokens.shape[0] == 1:
            return tokens.expand(b, -1, -1)
        raise ValueError(f"condition tokens have batch {tokens.shape[0]}, images have batch {b}")

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self._network(x, t)
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod.to(t.device)[t].to(torch.float32).view(-1, 1, 1, 1)
        return a.sqrt() * out + (1.0 - a).sqrt() * x.float()

    def _network(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The (guided) network output, fp32."""
        b = x.shape[0]
        tokens = self._batch(self.cond, b)
        if self.guided:
            tokens = torch.cat([tokens, self._batch(self.uncond, b)])
            x, t = torch.cat([x, x]), torch.cat([t, t])
        tokens = tokens.to(x.device)
        net_dtype = getattr(self.unet, "dtype", x.dtype)
        if self.autocast_dtype is None and net_dtype.is_floating_point and net_dtype != x.dtype:
            x, tokens = x.to(net_dtype), tokens.to(net_dtype)  # e.g. a UNet loaded in fp16 without autocast
        if self.autocast_dtype is not None:
            ctx = torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
        else:
            ctx = nullcontext()
        with ctx:
            out = self.unet(x, t, encoder_hidden_states=tokens).sample
        out = out.float()
        self.num_forwards += 1
        self.num_evals += self.evals_per_call
        if not self.guided:
            return out
        eps_c, eps_u = out.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


def make_cfg_eps_fn(
    unet: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    *,
    autocast_dtype: torch.dtype | None = None,
    prediction_type: str = "epsilon",
    alphas_cumprod: torch.Tensor | DiffusionSchedule | None = None,
) -> GuidedEpsFn:
    """An ``eps_fn`` for the samplers from a diffusers ``UNet2DConditionModel`` and condition tokens.

    Args:
        unet: called as ``unet(x[B', 2, H, W], t[B'], encoder_hidden_states=[B', L, D]).sample``.
        cond: conditional tokens ``[B, L, D]`` (text tokens, then metadata tokens), or ``[1, L, D]`` for the batch.
        uncond: unconditional tokens of the same ``[L, D]`` (all, or only chosen, attributes dropped); may be None
            when ``guidance_scale <= 1``.
        guidance_scale: CFG scale ``w``; ``w <= 1`` runs the conditional pass only, ``w > 1`` one batched forward of
            size 2B per call and ε_u + w (ε_c − ε_u).
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``); the
            returned ε is always fp32.
        prediction_type: the network's output, ``"epsilon"`` or ``"v_prediction"`` (then converted to ε, which needs
            ``alphas_cumprod``); a :class:`DiffusionSchedule` passed as ``alphas_cumprod`` carries its own type.

    Returns:
        A callable :class:`GuidedEpsFn` that also counts its forwards and evaluations.
    """
    if isinstance(alphas_cumprod, DiffusionSchedule):
        prediction_type = alphas_cumprod.prediction_type
    return GuidedEpsFn(unet, cond, uncond, guidance_scale, autocast_dtype, prediction_type, alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------------------
# Ensembles


def ensemble_stats(samples: torch.Tensor, std: str = "complex") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-pixel spread of an ensemble of reconstructions.

    Args:
        samples: complex ``[N, B, H, W]`` (N runs with seeds seed … seed+N−1).
        std: ``"complex"`` (default) — √(1/N Σ|x_n − x̄|²), the spread of the complex estimate that is scored
            (phase variation counts); ``"magnitude"`` — population std of |x_n|.

    Returns:
        ``(mean, std)``: the complex mean ``[B, H, W]`` and a real std map ``[B, H, W]`` (population std, ddof 0,
        so one sample gives zeros).
    """
    if not samples.is_complex() or samples.ndim != 4:
        raise ValueError(f"samples must be complex [N, B, H, W], got {samples.dtype} {tuple(samples.shape)}")
    mean = samples.mean(dim=0)
    if std == "complex":
        spread = (samples - mean).abs().square().mean(dim=0).sqrt()
    elif std == "magnitude":
        spread = samples.abs().std(dim=0, correction=0)
    else:
        raise ValueError(f"std must be 'complex' or 'magnitude', got {std!r}")
    return mean, spread

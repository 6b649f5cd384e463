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

Modules, one job each: :mod:`~utils.samplers.schedule` (ᾱ, timesteps), :mod:`~utils.samplers.core` (the loop
setup every sampler shares: generators, noise, counters, precision), :mod:`~utils.samplers.ddim` (Tweedie's x̂₀ and
the DDIM step DDS and DPS share), :mod:`~utils.samplers.dds`, :mod:`~utils.samplers.dps`,
:mod:`~utils.samplers.dpm_solver`, :mod:`~utils.samplers.guidance` (CFG), :mod:`~utils.samplers.presets` and
:mod:`~utils.samplers.ensemble`. The names below are the package's public interface.
"""

from utils.samplers.core import SamplerStats, make_generators
from utils.samplers.dds import dds_sample
from utils.samplers.ddim import ddim_step, tweedie_x0
from utils.samplers.dpm_solver import dpmpp2m_sample
from utils.samplers.dps import dps_noise_weight, dps_sample
from utils.samplers.ensemble import ensemble_stats
from utils.samplers.guidance import GuidedEpsFn, make_cfg_eps_fn
from utils.samplers.presets import DC_SAMPLERS, PRESETS, dc_sample
from utils.samplers.schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, DiffusionSchedule, make_timesteps

__all__ = [
    "DC_SAMPLERS",
    "PREDICTION_TYPES",
    "PRESETS",
    "TIMESTEP_SPACINGS",
    "DiffusionSchedule",
    "GuidedEpsFn",
    "SamplerStats",
    "dc_sample",
    "ddim_step",
    "dds_sample",
    "dpmpp2m_sample",
    "dps_noise_weight",
    "dps_sample",
    "ensemble_stats",
    "make_cfg_eps_fn",
    "make_generators",
    "make_timesteps",
    "tweedie_x0",
]

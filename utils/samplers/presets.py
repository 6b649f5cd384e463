"""The data-consistent (DC) samplers by name, their named presets, and a dispatcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from utils.samplers.core import EpsFn
from utils.samplers.dds import dds_sample
from utils.samplers.dpm_solver import dpmpp2m_sample
from utils.samplers.schedule import DiffusionSchedule

# Samplers that share DDS's data-consistency step and settings (num_steps, eta, gamma, cg_iter, clip_x0), by name.
DC_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"dds": dds_sample, "dpmpp2m": dpmpp2m_sample}

# Named settings for the DC samplers. "fast" is what benchmarks/bench_nfe_quality.py measured as the cheapest setting
# within 0.2 dB (paired mean PSNR) of 100-step DDS at <= 25 network evaluations (or, if none got there, the best such
# setting), on the raw path (the files' own noisy k-space); tests/test_fast_preset.py checks it against the committed
# benchmarks/results/nfe_quality_raw_wide.json.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"sampler": "dds", "num_steps": 25, "eta": 1.0, "gamma": 200.0, "cg_iter": 40, "gamma_rule": "noise",
             "prior_error_std": 0.2},
}

#: Preset keys that are not sampler arguments: ``recon_complex_multi.py --raw_dir``'s γ rule, which lowers γ per
#: slice from the noise σ it estimates from the raw k-space (``--data_root`` runs have no such estimate and use
#: ``gamma`` as is). :func:`sampler_kwargs` leaves them out.
RAW_ONLY_PRESET_KEYS = ("gamma_rule", "prior_error_std")


def sampler_kwargs(preset: dict[str, Any]) -> dict[str, Any]:
    """The keyword settings of :func:`dc_sample` in a preset: without ``sampler``, ``num_steps`` and the raw-only
    keys (:data:`RAW_ONLY_PRESET_KEYS`)."""
    return {k: v for k, v in preset.items() if k not in ("sampler", "num_steps", *RAW_ONLY_PRESET_KEYS)}


def dc_sample(sampler: str, eps_fn: EpsFn, op: Any, y: torch.Tensor,
              alphas_cumprod: torch.Tensor | DiffusionSchedule, **settings: Any) -> torch.Tensor:
    """Run the DC sampler named ``sampler`` (a key of :data:`DC_SAMPLERS`) with keyword ``settings``.

    Raises:
        ValueError: an unknown sampler name.
    """
    if sampler not in DC_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(DC_SAMPLERS)}")
    return DC_SAMPLERS[sampler](eps_fn, op, y, alphas_cumprod, **settings)



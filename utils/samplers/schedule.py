"""The noise schedule ᾱ_t of a trained model and the timesteps a sampler visits."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.choices import PREDICTION_TYPES  # re-exported: utils.samplers.PREDICTION_TYPES

TIMESTEP_SPACINGS = ("leading", "uniform", "trailing", "linspace")


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


def alphas_cumprod_of(alphas_cumprod: torch.Tensor | DiffusionSchedule) -> torch.Tensor:
    """ᾱ ``[T]`` float64 on CPU from a tensor (checked: 1-D, values in (0, 1]) or a :class:`DiffusionSchedule`."""
    if isinstance(alphas_cumprod, DiffusionSchedule):
        return alphas_cumprod.alphas_cumprod
    acp = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if acp.ndim != 1 or not bool(((acp > 0) & (acp <= 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1]")
    return acp


def resolve_timesteps(
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

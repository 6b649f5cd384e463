"""A trained conditional diffusion model packaged as a reconstructor: condition tokens -> guided ε -> DDS or DPS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from utils.samplers import DiffusionSchedule, SamplerStats, dds_sample, dps_sample, make_cfg_eps_fn


class DiffusionReconstructor:
    """Callable ``(y, op, records, prompts, generators) -> (samples [1, B, H, W], nfe)`` used by
    :func:`utils.reconstruction.run_reconstruction`.

    Args:
        unet: diffusers ``UNet2DConditionModel`` (eval mode).
        conditioner: :class:`models.conditioning.ConditionBuilder`.
        schedule: the diffusion schedule (``alphas_cumprod``) the model was trained with.
        sampler: ``"dds"`` or ``"dps"``.
        num_steps, eta, gamma, cg_iter: DDS settings (REFERENCE.md §1 defaults: 100, 0.8, 5, 5).
        dps_step: DPS step size ζ'.
        guidance_scale: CFG scale ``w`` (``w <= 1``: conditional only).
        drop_metadata_keys: attributes removed at inference (they get their learned empty embedding).
        uncond_drop_keys: for ``w > 1``, the attributes the unconditional branch drops (None: all, with the empty
            prompt); dropping only some gives per-attribute guidance.
        autocast_dtype: run the network in this dtype (e.g. ``torch.bfloat16``); data consistency stays fp32.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioner: torch.nn.Module,
        schedule: DiffusionSchedule,
        sampler: str = "dds",
        num_steps: int = 100,
        eta: float = 0.8,
        gamma: float = 5.0,
        cg_iter: int = 5,
        dps_step: float = 1.0,
        guidance_scale: float = 1.0,
        drop_metadata_keys: Sequence[str] | None = None,
        uncond_drop_keys: Sequence[str] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if sampler not in ("dds", "dps"):
            raise ValueError(f"unknown sampler {sampler!r}")
        self.unet = unet.eval()
        self.conditioner = conditioner.eval()
        self.schedule = schedule
        self.sampler = sampler
        self.num_steps = num_steps
        self.eta = eta
        self.gamma = gamma
        self.cg_iter = cg_iter
        self.dps_step = dps_step
        self.guidance_scale = guidance_scale
        self.drop_metadata_keys = list(drop_metadata_keys or [])
        self.uncond_drop_keys = None if uncond_drop_keys is None else list(uncond_drop_keys)
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def condition(
        self, records: Sequence[Mapping[str, Any]], prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional and (for ``w > 1``) unconditional tokens ``[B, L, D]``."""
        drop = self.drop_metadata_keys or None
        cond = self.conditioner.build(records, prompts, drop_keys=drop)
        uncond = None
        if self.guidance_scale > 1.0:
            if self.uncond_drop_keys is None:
                uncond = self.conditioner.unconditional(records)
            else:
                keys = sorted(set(self.uncond_drop_keys) | set(self.drop_metadata_keys))
                uncond = self.conditioner.build(records, prompts, drop_keys=keys)
        return cond, uncond

    def __call__(
        self,
        y: torch.Tensor,
        op: Any,
        records: Sequence[Mapping[str, Any]],
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, int]:
        cond, uncond = self.condition(records, prompts)
        eps_fn = make_cfg_eps_fn(self.unet, cond, uncond, self.guidance_scale, autocast_dtype=self.autocast_dtype)
        stats = SamplerStats()
        if self.sampler == "dds":
            x = dds_sample(
                eps_fn, op, y, self.schedule, num_steps=self.num_steps, eta=self.eta, gamma=self.gamma,
                cg_iter=self.cg_iter, generators=list(generators), stats=stats,
            )
        else:
            x = dps_sample(
                eps_fn, op, y, self.schedule, num_steps=self.num_steps, step_size=self.dps_step,
                generators=list(generators), stats=stats,
            )
        return x.unsqueeze(0), stats.nfe

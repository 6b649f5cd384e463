"""Classifier-free guidance (Ho & Salimans 2022) around a diffusers ``UNet2DConditionModel``: the ``eps_fn`` the
samplers call, with ε- or v-prediction networks."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from utils.samplers.schedule import PREDICTION_TYPES, DiffusionSchedule, alphas_cumprod_of


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
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod_of(alphas_cumprod)
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



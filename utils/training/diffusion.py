"""The DDPM training objective: timestep sampling (with the OOD restriction), noising, ε-prediction loss.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
    x0 -> x_0 (clean image, [B,2,H,W] real/imag channels); noise -> ε ~ N(0, I); t -> timestep in [0, T);
    alphas_cumprod[t] -> ᾱ_t; x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Eq. 4); loss = ‖ε − ε_θ(x_t, t, c)‖² (Eq. 14, "L_simple").
"""

from __future__ import annotations

import hashlib

import torch

from utils.samplers import PREDICTION_TYPES


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, *keys)`` (e.g. step, micro-step, process index).

    Drawing the training noise from a generator that depends only on the step makes a resumed run draw exactly what the
    uninterrupted run drew, whatever happened to the global RNG in between (iterator creation, workers, validation).
    """
    digest = hashlib.blake2b(repr((int(seed), *map(int, keys))).encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    ood_mask: torch.Tensor | None = None,
    ood_t_min: int = 750,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform DDPM timesteps; out-of-distribution samples only from ``[ood_t_min, num_train_timesteps)``.

    Restricting OOD (cardiac) samples to high noise levels lets them teach coarse structure without pulling the fine
    detail the model has learnt on brain/knee (Metadata Matters' OOD recipe).

    Args:
        batch_size: ``B``.
        num_train_timesteps: ``T`` (1000 for the released scheduler).
        generator: a CPU ``torch.Generator`` (drawn on CPU so results do not depend on the device).
        ood_mask: bool ``[B]``, True for OOD samples; ``None`` = all in-distribution.
        ood_t_min: lower bound of the OOD range; must satisfy ``0 <= ood_t_min < T``.
        device: where the returned tensor lives.

    Returns:
        int64 ``[B]`` timesteps.
    """
    if not 0 <= ood_t_min < num_train_timesteps:
        raise ValueError(f"ood_t_min must lie in [0, {num_train_timesteps}), got {ood_t_min}")
    # One uniform draw per sample mapped onto the sample's range: the stream of draws does not depend on the mask.
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    t = (u * num_train_timesteps).long()
    if ood_mask is not None:
        ood_mask = ood_mask.to("cpu", torch.bool)
        if ood_mask.shape != (batch_size,):
            raise ValueError(f"ood_mask must have shape ({batch_size},), got {tuple(ood_mask.shape)}")
        t_ood = ood_t_min + (u * (num_train_timesteps - ood_t_min)).long()
        t = torch.where(ood_mask, t_ood, t)
    t = t.clamp_(max=num_train_timesteps - 1)
    return t.to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` (Ho et al. Eq. 4), computed in fp32; shapes ``[B,C,H,W]``, ``t`` ``[B]``."""
    a = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps].view(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()).to(x0.dtype)



def prediction_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What the network is trained to output, in fp32.

    ``epsilon``: the noise ε (Ho et al. 2020, Eq. 14). ``v_prediction``: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022,
    "Progressive distillation", Sec. 4), whose x_0 estimate √ᾱ_t x_t − √(1−ᾱ_t) v stays bounded as ᾱ_t → 0.
    """
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise.float() - (1.0 - a).sqrt() * x0.float()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

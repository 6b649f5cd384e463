"""Conversion between native complex images and the network's 2-channel (real, imag) layout.

Only the network boundary uses channels; everything else in the project works on complex tensors.
"""

from __future__ import annotations

import torch


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """Complex ``[B, H, W]`` -> real ``[B, 2, H, W]`` (channel 0 real, channel 1 imaginary)."""
    if not x.is_complex():
        raise TypeError(f"expected a complex tensor, got {x.dtype}")
    return torch.stack((x.real, x.imag), dim=-3)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real ``[B, 2, H, W]`` -> complex ``[B, H, W]``. Half-precision input is promoted to complex64."""
    if x.shape[-3] != 2:
        raise ValueError(f"expected 2 channels (real, imag) in dim -3, got shape {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])

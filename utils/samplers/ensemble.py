"""Ensembles of reconstructions: their mean and per-pixel spread."""

from __future__ import annotations

import torch


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

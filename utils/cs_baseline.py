"""The compressed-sensing baseline of both reconstruction paths (``--data_root`` and ``--raw_dir``): SENSE with an
L1-wavelet prior, one slice at a time on the CPU (sigpy)."""

from __future__ import annotations

import numpy as np
import torch


def cs_l1_wavelet(y: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, lamda: float, max_iter: int) -> torch.Tensor:
    """Compressed-sensing SENSE with an L1-wavelet prior (sigpy ``L1WaveletRecon``), one slice.

    Args:
        y: masked k-space ``[C, H, W]`` complex. maps: ``[C, H, W]``. mask: broadcastable to ``[H, W]``.
        lamda: the L1 weight λ. max_iter: solver iterations.
    Returns:
        complex64 image ``[H, W]`` on ``y``'s device.
    """
    from sigpy.mri.app import L1WaveletRecon

    y_np = (y * mask).detach().cpu().numpy().astype(np.complex64)
    weights = np.broadcast_to(mask.detach().cpu().numpy(), y_np.shape[-2:]).astype(np.float32)
    x = L1WaveletRecon(
        y_np, maps.detach().cpu().numpy().astype(np.complex64), lamda, weights=weights, max_iter=max_iter,
        show_pbar=False,
    ).run()
    return torch.from_numpy(np.asarray(x, dtype=np.complex64)).to(y.device)

"""Periodic validation during training: reconstruct a few fixed slices with DDS and score them.

Masks are seeded from (file name, slice) and the sampler noise from the same seed, so every validation round sees the
same measurements and noise and the curve reflects the model only. Metrics use the fastMRI protocol per slice
(magnitude, ``data_range = max(gt)``), labelled as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.channels import channels_to_complex
from utils.masks import get_mask, seed_from_name
from utils.metrics import fastmri_metrics
from utils.operators import SenseOperator
from utils.samplers import dds_sample, make_cfg_eps_fn


@dataclass
class ValidationResult:
    """Mean metrics over the validation slices, per-slice rows, and a ``[rows*H, 4*W]`` uint8 image grid."""

    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    grid: np.ndarray | None = None


def _to_uint8(img: np.ndarray, vmax: float) -> np.ndarray:
    return (np.clip(img / max(vmax, 1e-12), 0.0, 1.0) * 255.0).round().astype(np.uint8)


@torch.no_grad()
def run_validation(
    unet: torch.nn.Module,
    conditioner: torch.nn.Module,
    items: Sequence,
    alphas_cumprod: torch.Tensor,
    *,
    mask_type: str = "uniform1d",
    acc_factor: float = 4.0,
    num_steps: int = 20,
    eta: float = 0.8,
    gamma: float = 5.0,
    cg_iter: int = 5,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    prediction_type: str = "epsilon",
) -> ValidationResult:
    """Reconstruct ``items`` (one at a time: coil counts may differ) and score them.

    Args:
        unet: the (unwrapped) UNet, in eval mode for the call.
        conditioner: the condition builder (eval mode: no dropout).
        items: :class:`utils.data.MRISample` with ``maps`` (datasets built with ``load_maps=True``).
        alphas_cumprod: ᾱ ``[T]`` of the training scheduler.
        mask_type, acc_factor: the retrospective undersampling (seeded from file and slice).
        num_steps, eta, gamma, cg_iter: DDS settings (few steps: this is a progress signal, not the evaluation).
        autocast_dtype: run the network under autocast (the run's mixed precision).
        prediction_type: the network's output (``"epsilon"`` or ``"v_prediction"``).
        device: where the work runs.

    Returns:
        :class:`ValidationResult`; ``metrics`` has ``psnr``, ``ssim``, ``nmse`` and ``zero_filled_psnr`` means.
    """
    was_training = (unet.training, conditioner.training)
    unet.eval()
    conditioner.eval()
    rows, panels = [], []
    try:
        for item in items:
            if item.maps is None:
                raise ValueError("validation needs coil maps: build the validation dataset with load_maps=True")
            image = torch.as_tensor(np.asarray(item.image), dtype=torch.float32)
            x_true = channels_to_complex(image[None]).to(device)  # [1, H, W] complex64
            maps = torch.as_tensor(np.asarray(item.maps)).to(device=device, dtype=torch.complex64)[None]
            h, w = x_true.shape[-2:]
            seed = seed_from_name(item.filename, item.slice_idx)
            mask = get_mask(mask_type, (h, w), acc_factor, seed=seed).mask.to(device)
            op = SenseOperator(maps, mask)
            y = op.forward(x_true)
            cond = conditioner.build([item.record], [item.prompt])
            eps_fn = make_cfg_eps_fn(unet, cond, None, 1.0, autocast_dtype=autocast_dtype,
                                     prediction_type=prediction_type, alphas_cumprod=alphas_cumprod)
            gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
            recon = dds_sample(eps_fn, op, y, alphas_cumprod, num_steps=num_steps, eta=eta, gamma=gamma,
                               cg_iter=cg_iter, generators=[gen])
            zero_filled = op.adjoint(y)
            gt_np = x_true[0].abs().cpu().numpy()
            rec_np = recon[0].abs().float().cpu().numpy()
            zf_np = zero_filled[0].abs().cpu().numpy()
            m = fastmri_metrics(gt_np[None], rec_np[None])
            zf = fastmri_metrics(gt_np[None], zf_np[None])
            rows.append({"filename": item.filename, "slice": int(item.slice_idx), "psnr": m["psnr"],
                         "ssim": m["ssim"], "nmse": m["nmse"], "zero_filled_psnr": zf["psnr"]})
            vmax = float(gt_np.max())
            err = np.abs(rec_np - gt_np) * 5.0
            panels.append(np.concatenate([_to_uint8(p, vmax) for p in (gt_np, zf_np, rec_np, err)], axis=1))
    finally:
        unet.train(was_training[0])
        conditioner.train(was_training[1])
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nmse", "zero_filled_psnr")}
    grid = np.concatenate(panels, axis=0) if panels and len({p.shape for p in panels}) == 1 else None
    return ValidationResult(metrics=metrics, rows=rows, grid=grid)


def save_grid_png(grid: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 grayscale grid (columns: ground truth, zero-filled, DDS, |error| x5) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=255)
    return path

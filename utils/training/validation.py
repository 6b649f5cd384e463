"""Periodic validation during training: reconstruct a few fixed slices with DDS and score them.

Each slice goes through the reconstruction path's own per-slice pipeline (:func:`utils.reconstruction.
measure_and_reconstruct`: mask seeded from (file name, slice) -> SENSE operator -> ``y`` -> DDS with the sampler noise
seeded from the same seed), so every validation round sees the same measurements and noise, the curve reflects the
model only, and validation measures exactly what ``recon_complex_multi.py`` would. Metrics use the fastMRI protocol
per slice (magnitude, ``data_range = max(gt)``), labelled as such. A reconstruction that scores below zero-filling
(a diverging sampler, an untrained model) is logged as a warning and named in the figure's title.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.diffusion_recon import DiffusionReconstructor
from utils.figures import Panel, panel_figure, save_figure
from utils.metrics import fastmri_metrics
from utils.recon_settings import ReconSettings
from utils.reconstruction import measure_and_reconstruct
from utils.samplers import DiffusionSchedule
from utils.samplers.schedule import alphas_cumprod_of

logger = logging.getLogger(__name__)

#: Multiplier of the |error| panels (errors are small next to the image).
ERROR_GAIN = 5.0


@dataclass
class SliceImages:
    """Magnitudes of one validation slice, ``[H, W]`` float32 each: target, zero-filled, reconstruction."""

    target: np.ndarray
    zero_filled: np.ndarray
    recon: np.ndarray


@dataclass
class ValidationResult:
    """Mean metrics over the validation slices, per-slice rows and images, warnings, and a uint8 image grid.

    Attributes:
        metrics: means of ``psnr``, ``ssim``, ``nmse``, ``zero_filled_psnr``.
        rows: per slice ``filename``, ``slice``, ``psnr``, ``ssim``, ``nmse``, ``zero_filled_psnr``,
            ``zero_filled_ssim``, ``below_zero_filled``.
        grid: ``[rows*H, 4*W]`` uint8 (target, zero-filled, reconstruction, |error| ×5; for tensorboard), or None
            when the slices differ in size.
        images: the slices' magnitudes, for :func:`save_validation_figure`.
        warnings: one line per slice whose reconstruction PSNR is below zero-filling's.
    """

    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    grid: np.ndarray | None = None
    images: list[SliceImages] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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
    settings = ReconSettings(method="diffusion", sampler="dds", mask_type=mask_type, acc_factor=acc_factor,
                             num_steps=num_steps, eta=eta, gamma=gamma, cg_iter=cg_iter, num_samples=1, seed=0,
                             save_png=False)
    schedule = DiffusionSchedule(alphas_cumprod_of(alphas_cumprod), 0, prediction_type)
    rows, panels, images, warnings = [], [], [], []
    try:
        reconstructor = DiffusionReconstructor(unet, conditioner, schedule, sampler="dds", num_steps=num_steps,
                                               eta=eta, gamma=gamma, cg_iter=cg_iter, guidance_scale=1.0,
                                               autocast_dtype=autocast_dtype)
        for item in items:
            if item.maps is None:
                raise ValueError("validation needs coil maps: build the validation dataset with load_maps=True")
            result = measure_and_reconstruct([item], settings, reconstructor, device)
            gt_np = result.measurement.x_true[0].abs().cpu().numpy()
            rec_np = result.recon[0].abs().float().cpu().numpy()
            zf_np = result.zero_filled[0].abs().cpu().numpy()
            m = fastmri_metrics(gt_np[None], rec_np[None])
            zf = fastmri_metrics(gt_np[None], zf_np[None])
            below = bool(m["psnr"] < zf["psnr"])
            rows.append({"filename": item.filename, "slice": int(item.slice_idx), "psnr": m["psnr"],
                         "ssim": m["ssim"], "nmse": m["nmse"], "zero_filled_psnr": zf["psnr"],
                         "zero_filled_ssim": zf["ssim"], "below_zero_filled": below})
            if below:
                warnings.append(f"{item.filename} slice {int(item.slice_idx)}: reconstruction PSNR {m['psnr']:.2f} "
                                f"dB is below zero-filling ({zf['psnr']:.2f} dB)")
                logger.warning("validation: %s", warnings[-1])
            images.append(SliceImages(gt_np, zf_np, rec_np))
            vmax = float(gt_np.max())
            err = np.abs(rec_np - gt_np) * ERROR_GAIN
            panels.append(np.concatenate([_to_uint8(p, vmax) for p in (gt_np, zf_np, rec_np, err)], axis=1))
    finally:
        unet.train(was_training[0])
        conditioner.train(was_training[1])
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nmse", "zero_filled_psnr")}
    grid = np.concatenate(panels, axis=0) if panels and len({p.shape for p in panels}) == 1 else None
    return ValidationResult(metrics=metrics, rows=rows, grid=grid, images=images, warnings=warnings)


def save_validation_figure(result: ValidationResult, path: str | Path, title: str = "") -> Path:
    """The validation grid as a readable PNG: one row per slice, titled panels (target, zero-filled with its
    PSNR/SSIM, reconstruction with its PSNR/SSIM, |error| ×5) with colour bars; the title names every slice that
    scores below zero-filling.

    Args:
        result: what :func:`run_validation` returned.
        path: the PNG file.
        title: the figure's title (e.g. the training step); warnings are appended.
    """
    rows = []
    for row, img in zip(result.rows, result.images):
        vmax = float(img.target.max()) or 1.0
        mark = " (BELOW zero-filled)" if row["below_zero_filled"] else ""
        rows.append([
            Panel(img.target, f"target\n{row['filename']} #{row['slice']}", vmax=vmax, colorbar=True),
            Panel(img.zero_filled, f"zero-filled\n{row['zero_filled_psnr']:.2f} dB / SSIM "
                  f"{row['zero_filled_ssim']:.3f}", vmax=vmax, colorbar=True),
            Panel(img.recon, f"DDS{mark}\n{row['psnr']:.2f} dB / SSIM {row['ssim']:.3f}", vmax=vmax, colorbar=True),
            Panel(np.abs(img.recon - img.target) * ERROR_GAIN, f"|error| ×{ERROR_GAIN:g}", heat=True, vmax=vmax,
                  colorbar=True),
        ])
    heading = title
    if result.warnings:
        heading = (f"{title} - " if title else "") + (
            f"WARNING: {len(result.warnings)} of {len(result.rows)} reconstructions below zero-filling")
    return save_figure(panel_figure(rows, heading, panel_inches=2.4), path, dpi=100)


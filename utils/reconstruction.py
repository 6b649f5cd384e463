"""The reconstruction run of validation sets (``recon_complex_multi.py --data_root``): for every slice, the simulated
measurement (:mod:`utils.measurement`), the method (zero-filled, the CS baseline :mod:`utils.cs_baseline`, or
diffusion posterior sampling), metrics, and the per-slice outputs (:mod:`utils.recon_outputs`).

The command line is thin: it builds :class:`utils.recon_settings.ReconSettings`, the run's identity and folder
(:mod:`utils.run_identity`: :func:`~utils.run_identity.run_fingerprint`, :func:`~utils.run_identity.prepare_out_dir`),
calls :func:`run_reconstruction`, then :func:`utils.recon_summary.summarize`. :func:`measure_and_reconstruct` is the
one per-slice pipeline, shared with training validation.

Outputs under ``{save_dir}/{mask_type}/acc_{R}/{tag}/``: ``run.json`` (fingerprint), ``settings.json`` (the full
settings of the run that created the folder, written once), ``recon/{file}/{idx:03d}.npy`` (complex64), ``std/...``
(ensemble std), ``rows/{file}/{idx:03d}.json`` (per-slice status, metrics, timing, NFE, achieved acceleration),
``png/{file}_{idx:03d}.png``, and ``summary.json`` + ``summary.csv`` (per-volume rows) + ``slices.csv`` (per-slice
rows), rebuilt from the rows on disk by :func:`utils.recon_summary.summarize`. Finished slices are skipped on a re-run
(files are written atomically), and several processes or separately launched shards can share the work.

Finite values. A slice whose image or maps hold NaN/inf is not reconstructed: its row has ``status: "failed"``,
``failure: "input"`` and a reason (retried on the next run, in case the data were fixed). A reconstruction with a
non-finite pixel is kept but flagged (``failure: "output"``) and never scored. Summaries count both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cs_baseline import cs_l1_wavelet
from utils.files import atomic_save_npy, write_json
from utils.masks import sample_seed
from utils.measurement import SimulatedMeasurement, simulate_measurement
from utils.recon_outputs import png_path, recon_path, row_is_final, row_path, save_slice_png, std_path
from utils.recon_settings import ReconSettings
from utils.run_identity import (
    RunMismatchError,
    data_identity,
    dataset_slices,
    fingerprint_differences,
    out_dir_for,
    prepare_out_dir,
    read_fingerprint,
    run_fingerprint,
)
from utils.samplers import ensemble_stats


def input_problem(item: Any) -> str | None:
    """Why a slice cannot be reconstructed (non-finite image or maps), or None."""
    image = torch.as_tensor(item.image)
    if not bool(torch.isfinite(image).all()):
        return f"non-finite values in the image ({int((~torch.isfinite(image)).sum())} of {image.numel()})"
    if item.maps is None:
        return "no coil maps (build the dataset with load_maps=True)"
    maps = torch.as_tensor(item.maps)
    if not bool(torch.isfinite(torch.view_as_real(maps) if maps.is_complex() else maps).all()):
        return "non-finite values in the coil maps"
    return None


def run_reconstruction(
    dataset: Sequence,
    settings: ReconSettings,
    save_dir: str | Path,
    diffusion: Callable[..., tuple[torch.Tensor, int]] | None = None,
    device: torch.device | str = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Reconstruct (a shard of) a dataset and write per-slice results.

    Args:
        dataset: items with ``.image`` ``[2, H, W]`` (normalised MVUE as channels), ``.maps`` ``[C, H, W]``,
            ``.filename``, ``.slice_idx``, ``.record``, ``.prompt`` (:class:`utils.data.MRISample`).
        settings: the run's settings.
        save_dir: root of the outputs.
        diffusion: for ``method="diffusion"``, ``diffusion(y, op, records, prompts, generators) -> (x, nfe)`` with
            ``x`` complex ``[B, H, W]`` and ``nfe`` network evaluations per slice
            (:class:`utils.diffusion_recon.DiffusionReconstructor`); called once per ensemble member.
        device: where the work runs.
        process_index, num_processes: this process takes items ``indices[process_index::num_processes]``.
        indices: dataset indices to run (default all).
        fingerprint: the run's identity (:func:`utils.run_identity.run_fingerprint`); default: from the settings
            and the dataset's slice list (no model or CSV identity: pass a full one from a script).
        out_dir: the output folder when the caller has resolved it (:func:`utils.run_identity.resolve_out_dir`);
            default :func:`utils.run_identity.out_dir_for`.
        overwrite: replace another run's results in the folder (see :func:`utils.run_identity.prepare_out_dir`).

    Returns:
        The method's output folder.

    Raises:
        RunMismatchError: the folder holds another run (process 0 checks and claims it; others only check).
    """
    from tqdm.auto import tqdm

    from utils.metrics import contextmri_metrics

    if settings.method == "diffusion" and diffusion is None:
        raise ValueError("method 'diffusion' needs a diffusion reconstructor (a model)")
    if fingerprint is None:
        fingerprint = run_fingerprint(settings, data=data_identity(dataset))
    out = Path(out_dir) if out_dir is not None else out_dir_for(save_dir, settings, fingerprint)
    if process_index == 0:
        prepare_out_dir(out, fingerprint, overwrite=overwrite, settings=settings)
    else:  # the main process claimed the folder; a different fingerprint here means the processes disagree
        old = read_fingerprint(out)
        if old is None or old.get("hash") != fingerprint["hash"]:
            raise RunMismatchError(out, fingerprint_differences(old or {}, fingerprint) or ["no run.json"])
    all_idx = list(range(len(dataset))) if indices is None else list(indices)
    mine = all_idx[process_index::num_processes]
    slices = dataset_slices(dataset)
    todo = [i for i in mine if not row_is_final(row_path(out, slices[i][1], slices[i][2]))]
    bar = tqdm(total=len(todo), desc=f"{settings.run_tag} {settings.mask_type} x{settings.acc_factor:g}",
               disable=not progress or process_index != 0)
    for start in range(0, len(todo), settings.batch_size):
        batch = []
        for i in todo[start : start + settings.batch_size]:
            item = dataset[i]
            problem = input_problem(item)
            if problem is None:
                batch.append(item)
                continue
            _write_failed_input_row(out, item, settings, problem)
            bar.update(1)
        shapes = {tuple(item.maps.shape) for item in batch}
        # different coil counts cannot share one operator: run them one by one
        groups = [[item] for item in batch] if len(shapes) > 1 else ([batch] if batch else [])
        for group in groups:
            _reconstruct_group(group, settings, out, diffusion, torch.device(device), contextmri_metrics)
            bar.update(len(group))
    bar.close()
    return out


def _write_failed_input_row(out: Path, item: Any, settings: ReconSettings, reason: str) -> None:
    row = {"filename": item.filename, "slice": int(item.slice_idx), "status": "failed", "failure": "input",
           "reason": reason, "nominal_acceleration": settings.acc_factor, "noise_sigma": settings.noise_sigma}
    # a recon of older, different input data must not be scored
    recon_path(out, item.filename, item.slice_idx).unlink(missing_ok=True)
    write_json(row_path(out, item.filename, item.slice_idx), row)


@dataclass
class SliceReconstruction:
    """What :func:`measure_and_reconstruct` returns for a batch of slices.

    Attributes:
        measurement: the simulated acquisition (ground truth, maps, masks, operator, ``y``).
        zero_filled: Aᴴy, complex ``[B, H, W]``.
        recon: the reconstruction (the ensemble's complex mean), complex ``[B, H, W]``.
        std: the ensemble's per-pixel spread ``[B, H, W]`` (diffusion only; zeros for one sample), else None.
        nfe: network evaluations per slice (0 without a network).
    """

    measurement: SimulatedMeasurement
    zero_filled: torch.Tensor
    recon: torch.Tensor
    std: torch.Tensor | None
    nfe: int


def measure_and_reconstruct(
    group: Sequence, settings: ReconSettings, diffusion: Callable[..., tuple[torch.Tensor, int]] | None = None,
    device: torch.device | str = "cpu",
) -> SliceReconstruction:
    """Simulate the measurement of a batch of slices and reconstruct it with ``settings.method``: the one per-slice
    pipeline (mask -> operator -> ``y`` -> sampler) that :func:`run_reconstruction` and training validation share.

    Args:
        group: items with ``.image [2, H, W]``, ``.maps [C, H, W]`` (one coil count), ``.filename``, ``.slice_idx``,
            ``.record``, ``.prompt``.
        settings: mask family, R, noise, method and sampler settings, ensemble size and seed.
        diffusion: for ``method="diffusion"``, ``diffusion(y, op, records, prompts, generators) -> (x, nfe)``; it
            also gets ``noise_sigma`` (σ per real/imaginary part, ``settings.noise_sigma / √2``) for DPS on noisy
            measurements. Ensemble member ``k`` of a slice is seeded from (file, slice) and ``settings.seed + k``.
        device: where the work runs.
    """
    meas = simulate_measurement(group, settings, device)
    y, op = meas.y, meas.op
    zero_filled = op.adjoint(y)
    std = None
    nfe = 0
    if settings.method == "zero_filled":
        recon = zero_filled
    elif settings.method == "cs":
        recon = torch.stack([
            cs_l1_wavelet(y[b], meas.maps[b], meas.mask[b, 0], settings.cs_lambda, settings.cs_iter)
            for b in range(len(group))
        ])
    else:
        from utils.metadata import build_prompt, mismatched_record

        records = [dict(item.record, **settings.metadata_override) for item in group]
        if settings.mismatch_metadata:
            records = [mismatched_record(r) for r in records]
        prompts = [item.prompt for item in group]
        if settings.metadata_override or settings.mismatch_metadata:
            prompts = [build_prompt(r) for r in records]
        # DPS's step follows the noise when there is some (σ per real/imaginary part); DDS keeps its γ.
        noise = ({"noise_sigma": settings.noise_sigma / math.sqrt(2.0)}
                 if settings.sampler == "dps" and settings.noise_sigma > 0 else {})
        samples = []
        for k in range(settings.num_samples):
            gens = [
                torch.Generator(device=device).manual_seed(
                    sample_seed(item.filename, item.slice_idx, settings.seed + k)
                )
                for item in group
            ]
            sample, n = diffusion(y, op, records, prompts, gens, **noise)
            samples.append(sample)
            nfe += n
        # Ensemble: the complex mean is scored; std = sqrt(mean |x_n - mean|^2) per pixel (zero for one sample).
        recon, std = ensemble_stats(torch.stack(samples), std="complex")
    return SliceReconstruction(meas, zero_filled, recon, std, nfe)


def _reconstruct_group(group, settings, out, diffusion, device, slice_metrics) -> None:
    t0 = time.perf_counter()
    result = measure_and_reconstruct(group, settings, diffusion, device)
    meas, zero_filled, recon, std, nfe = result.measurement, result.zero_filled, result.recon, result.std, result.nfe
    x_true, masks, mask = meas.x_true, meas.masks, meas.mask
    h, w = x_true.shape[-2:]
    elapsed = (time.perf_counter() - t0) / len(group)
    for b, item in enumerate(group):
        rec_np = recon[b].detach().cpu().numpy().astype(np.complex64)
        gt_np = x_true[b].detach().cpu().numpy()
        atomic_save_npy(recon_path(out, item.filename, item.slice_idx), rec_np)
        if std is not None:
            atomic_save_npy(std_path(out, item.filename, item.slice_idx),
                            std[b].detach().cpu().numpy().astype(np.float32))
        finite = bool(np.isfinite(rec_np).all())
        row = {
            "filename": item.filename,
            "slice": int(item.slice_idx),
            "status": "ok" if finite else "failed",
            "failure": None if finite else "output",
            "reason": None if finite else (f"non-finite reconstruction ({int((~np.isfinite(rec_np)).sum())} of "
                                           f"{rec_np.size} pixels)"),
            "acceleration": masks[b].acceleration,
            "nominal_acceleration": settings.acc_factor,
            "num_center_lines": masks[b].num_center_lines,
            "noise_sigma": settings.noise_sigma,
            "time_s": elapsed,
            "nfe": nfe,
        }
        metrics = slice_metrics(gt_np, rec_np) if finite else {}
        row.update({f"contextmri_{k}": metrics.get(k) for k in ("psnr", "ssim", "nmse")})
        if settings.save_png:
            panels = {
                "label": gt_np,
                "zero-filled": zero_filled[b].detach().cpu().numpy(),
                "mask": np.broadcast_to(mask[b, 0].cpu().numpy(), (h, w)),
                "recon": np.nan_to_num(rec_np),
                "error x5": 5 * np.abs(np.abs(np.nan_to_num(rec_np)) - np.abs(gt_np)),
            }
            if std is not None and settings.num_samples > 1:
                panels["std x5"] = 5 * np.nan_to_num(std[b].detach().cpu().numpy())
            save_slice_png(png_path(out, item.filename, item.slice_idx), panels)
        write_json(row_path(out, item.filename, item.slice_idx), row, indent=None)

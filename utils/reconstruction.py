"""Reconstruction of validation sets: retrospective undersampling, baselines, diffusion posterior sampling, metrics,
outputs. ``recon_complex_multi.py`` is a thin command line over :func:`run_reconstruction`.

The measurement of every slice is simulated the way the reference does it: ``y = M ⊙ F(S ⊙ x)`` from the normalised
MVUE image ``x`` and its unit-norm maps ``S``, with a mask seeded from (file name, slice) so every method and every
run sees the same mask.

Outputs under ``{save_dir}/{mask_type}/acc_{R}/{tag}/`` (``tag`` names the method):
``recon/{file}/{idx:03d}.npy`` (complex64), ``std/...`` (ensemble std), ``rows/{file}/{idx:03d}.json`` (per-slice
metrics, timing, NFE, achieved acceleration), ``png/{file}_{idx:03d}.png`` and, once every slice is done,
``summary.json`` + ``summary.csv`` (per-volume rows) + ``slices.csv`` (per-slice rows). Finished slices are skipped on a
re-run (files are written atomically), and several processes can share the work (each takes every n-th slice).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.masks import MaskResult, get_mask, seed_from_name
from utils.operators import SenseOperator
from utils.samplers import ensemble_stats


@dataclass
class ReconSettings:
    """Everything that defines a reconstruction run (written to ``settings.json`` next to the results)."""

    method: str = "diffusion"  # zero_filled | cs | diffusion
    sampler: str = "dds"  # dds | dps (diffusion only)
    mask_type: str = "uniform1d"
    acc_factor: float = 4.0
    center_fraction: float | None = None
    num_steps: int = 100
    eta: float = 0.8
    gamma: float = 5.0
    cg_iter: int = 5
    dps_step: float = 1.0
    guidance_scale: float = 1.0
    clip_x0: float | None = None
    drop_metadata_keys: list[str] = field(default_factory=list)
    uncond_drop_keys: list[str] | None = None  # None: the unconditional branch drops every key
    metadata_override: dict[str, Any] = field(default_factory=dict)  # replace these values in every record
    mismatch_metadata: bool = False  # give each slice the protocol of another contrast (metadata-sensitivity check)
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 1
    cs_lambda: float = 0.005
    cs_iter: int = 100
    save_png: bool = True
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("zero_filled", "cs", "diffusion"):
            raise ValueError(f"unknown method {self.method!r}: choose zero_filled, cs or diffusion")
        if self.sampler not in ("dds", "dps"):
            raise ValueError(f"unknown sampler {self.sampler!r}: choose dds or dps")
        if self.num_samples < 1 or self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("num_samples, batch_size and num_steps must be >= 1")

    @property
    def run_tag(self) -> str:
        if self.tag:
            return self.tag
        if self.method != "diffusion":
            return self.method
        return f"{self.sampler}_steps{self.num_steps}_w{self.guidance_scale:g}_n{self.num_samples}"

    def out_dir(self, save_dir: str | Path) -> Path:
        return Path(save_dir) / self.mask_type / f"acc_{self.acc_factor:g}" / self.run_tag


def slice_mask(settings: ReconSettings, filename: str, slice_idx: int, shape: tuple[int, int]) -> MaskResult:
    """The mask of one slice: seeded from (file, slice) only, so every method and run sees the same mask."""
    return get_mask(
        settings.mask_type, shape, settings.acc_factor, center_fraction=settings.center_fraction,
        seed=seed_from_name(filename, slice_idx),
    )


def cs_l1_wavelet(y: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, lamda: float, max_iter: int) -> torch.Tensor:
    """Compressed-sensing SENSE with an L1-wavelet prior (sigpy ``L1WaveletRecon``), one slice.

    Args:
        y: masked k-space ``[C, H, W]`` complex. maps: ``[C, H, W]``. mask: broadcastable to ``[H, W]``.
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


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    os.close(fd)
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_slice_png(path: Path, panels: dict[str, np.ndarray]) -> None:
    """A row of labelled panels (magnitudes in grey; maps named '*error*'/'*std*' in a heat colour map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6))
    axes = np.atleast_1d(axes)
    label = panels.get("label")
    vmax = float(np.abs(label).max()) if label is not None else None
    for ax, (name, img) in zip(axes, panels.items()):
        heat = "error" in name or "std" in name
        ax.imshow(np.abs(img), cmap="inferno" if heat else "gray", vmin=0, vmax=None if heat or name == "mask" else vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


EpsReconstructor = Callable[..., torch.Tensor]


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

    Returns:
        The method's output folder.
    """
    from tqdm.auto import tqdm

    from utils.channels import channels_to_complex
    from utils.metrics import contextmri_metrics

    out = settings.out_dir(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    if process_index == 0:
        _atomic_write_text(out / "settings.json", json.dumps(asdict(settings), indent=2))
    if settings.method == "diffusion" and diffusion is None:
        raise ValueError("method 'diffusion' needs a diffusion reconstructor (a model)")
    all_idx = list(range(len(dataset))) if indices is None else list(indices)
    mine = all_idx[process_index::num_processes]

    def done(item_file: str, item_slice: int) -> bool:
        return (out / "rows" / item_file / f"{item_slice:03d}.json").is_file()

    todo = []
    for i in mine:
        item = dataset[i]
        if not done(item.filename, item.slice_idx):
            todo.append(i)
    bar = tqdm(total=len(todo), desc=f"{settings.run_tag} {settings.mask_type} x{settings.acc_factor:g}",
               disable=not progress or process_index != 0)
    for start in range(0, len(todo), settings.batch_size):
        batch = [dataset[i] for i in todo[start : start + settings.batch_size]]
        if any(item.maps is None for item in batch):
            raise ValueError("reconstruction needs coil maps: build the dataset with load_maps=True")
        shapes = {tuple(item.maps.shape) for item in batch}
        if len(shapes) > 1:  # different coil counts cannot share one operator: run them one by one
            groups = [[item] for item in batch]
        else:
            groups = [batch]
        for group in groups:
            _reconstruct_group(group, settings, out, diffusion, torch.device(device), channels_to_complex,
                               contextmri_metrics)
            bar.update(len(group))
    bar.close()
    return out


def _reconstruct_group(group, settings, out, diffusion, device, channels_to_complex, slice_metrics) -> None:
    t0 = time.perf_counter()
    x_true = torch.stack([channels_to_complex(torch.as_tensor(item.image)[None])[0] for item in group]).to(device)
    maps = torch.stack([torch.as_tensor(item.maps) for item in group]).to(device=device, dtype=torch.complex64)
    h, w = x_true.shape[-2:]
    masks = [slice_mask(settings, item.filename, item.slice_idx, (h, w)) for item in group]
    mask = torch.stack([m.mask.expand(h, w) for m in masks])[:, None].to(device)  # [B, 1, H, W]
    op = SenseOperator(maps, mask)
    y = op.forward(x_true)
    zero_filled = op.adjoint(y)
    std = None
    nfe = 0
    if settings.method == "zero_filled":
        recon = zero_filled
    elif settings.method == "cs":
        recon = torch.stack([
            cs_l1_wavelet(y[b], maps[b], mask[b, 0], settings.cs_lambda, settings.cs_iter) for b in range(len(group))
        ])
    else:
        from utils.metadata import build_prompt, mismatched_record

        records = [dict(item.record, **settings.metadata_override) for item in group]
        if settings.mismatch_metadata:
            records = [mismatched_record(r) for r in records]
        prompts = [item.prompt for item in group]
        if settings.metadata_override or settings.mismatch_metadata:
            prompts = [build_prompt(r) for r in records]
        samples = []
        for k in range(settings.num_samples):
            gens = [
                torch.Generator(device=device).manual_seed(
                    (seed_from_name(item.filename, item.slice_idx) + 1_000_003 * (settings.seed + k)) % 2**63
                )
                for item in group
            ]
            sample, n = diffusion(y, op, records, prompts, gens)
            samples.append(sample)
            nfe += n
        # Ensemble: the complex mean is scored; std = sqrt(mean |x_n - mean|^2) per pixel (zero for one sample).
        recon, std = ensemble_stats(torch.stack(samples), std="complex")
    elapsed = (time.perf_counter() - t0) / len(group)
    for b, item in enumerate(group):
        rel = Path(item.filename) / f"{item.slice_idx:03d}"
        rec_np = recon[b].detach().cpu().numpy().astype(np.complex64)
        gt_np = x_true[b].detach().cpu().numpy()
        _atomic_save_npy(out / "recon" / f"{rel}.npy", rec_np)
        if std is not None:
            _atomic_save_npy(out / "std" / f"{rel}.npy", std[b].detach().cpu().numpy().astype(np.float32))
        row = {
            "filename": item.filename,
            "slice": int(item.slice_idx),
            "acceleration": masks[b].acceleration,
            "nominal_acceleration": settings.acc_factor,
            "num_center_lines": masks[b].num_center_lines,
            "time_s": elapsed,
            "nfe": nfe,
            **{f"contextmri_{k}": v for k, v in slice_metrics(gt_np, rec_np).items() if k in ("psnr", "ssim", "nmse")},
        }
        if settings.save_png:
            panels = {
                "label": gt_np,
                "zero-filled": zero_filled[b].detach().cpu().numpy(),
                "mask": np.broadcast_to(mask[b, 0].cpu().numpy(), (h, w)),
                "recon": rec_np,
                "error x5": 5 * np.abs(np.abs(rec_np) - np.abs(gt_np)),
            }
            if std is not None and settings.num_samples > 1:
                panels["std x5"] = 5 * std[b].detach().cpu().numpy()
            save_slice_png(out / "png" / f"{item.filename}_{item.slice_idx:03d}.png", panels)
        _atomic_write_text(out / "rows" / f"{rel}.json", json.dumps(row))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def summarize(out_dir: str | Path, dataset: Sequence, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Merge per-slice rows into per-volume and overall results and write the summary files.

    fastMRI-protocol metrics are computed per *volume* (magnitudes, ``data_range = max`` of the volume's ground
    truth) from the saved reconstructions; ContextMRI-protocol metrics are the per-slice values averaged. Overall
    figures are mean ± std over volumes (fastMRI) and over slices (ContextMRI).

    Returns:
        The summary dict (also written as ``summary.json``; per-volume rows go to ``summary.csv``, per-slice rows to
        ``slices.csv``).
    """
    import pandas as pd

    from utils.channels import channels_to_complex
    from utils.metrics import evaluate_volume

    out = Path(out_dir)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i in idx:
        item = dataset[i]
        by_file.setdefault(item.filename, []).append((item.slice_idx, i))
    slice_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for filename, entries in sorted(by_file.items()):
        entries.sort()
        gts, recs = [], []
        for slice_idx, i in entries:
            row_path = out / "rows" / filename / f"{slice_idx:03d}.json"
            if not row_path.is_file():
                missing.append(f"{filename}/{slice_idx:03d}")
                continue
            slice_rows.append(json.loads(row_path.read_text()))
            gts.append(channels_to_complex(torch.as_tensor(dataset[i].image)[None])[0].numpy())
            recs.append(np.load(out / "recon" / filename / f"{slice_idx:03d}.npy"))
        if gts:
            m = evaluate_volume(np.stack(gts), np.stack(recs), protocol="fastmri")
            volume_rows.append({"filename": filename, "num_slices": len(gts),
                                **{f"fastmri_{k}": m[k] for k in ("psnr", "ssim", "nmse")}})
    if missing:
        raise RuntimeError(f"{len(missing)} slice(s) not reconstructed yet (e.g. {missing[:3]}); run again to finish")
    summary: dict[str, Any] = {"num_volumes": len(volume_rows), "num_slices": len(slice_rows)}
    if (out / "settings.json").is_file():
        summary["settings"] = json.loads((out / "settings.json").read_text())
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse"):
        summary[key] = dict(zip(("mean", "std"), _mean_std([r[key] for r in volume_rows])))
    for key in ("contextmri_psnr", "contextmri_ssim", "contextmri_nmse", "time_s", "nfe", "acceleration"):
        summary[key] = dict(zip(("mean", "std"), _mean_std([r[key] for r in slice_rows])))
    summary["protocols"] = {
        "fastmri": "magnitude, volume-wise, data_range = max(ground-truth volume); mean ± std over volumes",
        "contextmri": "per-slice min-max normalised magnitudes, data_range = 1; mean ± std over slices",
    }
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    _atomic_write_text(out / "summary.csv", pd.DataFrame(volume_rows).to_csv(index=False))
    _atomic_write_text(out / "slices.csv", pd.DataFrame(slice_rows).to_csv(index=False))
    return summary

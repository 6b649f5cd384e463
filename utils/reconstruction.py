"""Reconstruction of validation sets: retrospective undersampling, baselines, diffusion posterior sampling, metrics,
outputs, and the *run identity* that keeps results of different settings apart. ``recon_complex_multi.py`` is a thin
command line over :func:`run_fingerprint`, :func:`resolve_out_dir`, :func:`run_reconstruction` and :func:`summarize`.

Measurement. Every slice's k-space is simulated the way the reference does it, plus optional noise::

    y = M ⊙ (F(S ⊙ x) + n),    n ~ CN(0, σ² I)  (real and imaginary parts each N(0, σ²/2))

from the normalised MVUE image ``x`` (99th percentile of ``|x|`` = 1, so ``σ`` is relative to that scale) and its
unit-norm maps ``S``. ``F`` is orthonormal, so ``σ`` is also the per-coil noise std in the image domain. The mask is
seeded from (file name, slice) and the noise from (file name, slice) through a different digest, so every method,
every seed and every run sees the same mask *and* the same noisy measurement.

Run identity. Everything that changes a result (:func:`result_settings`: the method and its settings, mask family /
R / centre fraction / noise σ, samples, seed, guidance, metadata changes, precision; the model's files; the stats file;
the CSVs and the list of slices) is hashed into a fingerprint (:func:`run_fingerprint`) that is stored as ``run.json``
in the output folder. A folder is resumed only when its ``run.json`` holds the same hash; the default folder name is a
readable tag plus the first 8 hex digits of the hash (``dds_steps100_w1_n1-3fa9c2d1``), so different settings never
share a folder. An explicit tag whose folder holds another fingerprint is refused with the differing fields named
(:class:`RunMismatchError`), unless ``overwrite=True`` clears the old results first. Settings that cannot change a
result (batch size, PNGs, progress bars, the shard range) are not part of the fingerprint.

Outputs under ``{save_dir}/{mask_type}/acc_{R}/{tag}/``: ``run.json`` (fingerprint), ``settings.json`` (the full
settings of the run that created the folder, written once), ``recon/{file}/{idx:03d}.npy`` (complex64), ``std/...``
(ensemble std), ``rows/{file}/{idx:03d}.json`` (per-slice status, metrics, timing, NFE, achieved acceleration),
``png/{file}_{idx:03d}.png``, and ``summary.json`` + ``summary.csv`` (per-volume rows) + ``slices.csv`` (per-slice
rows), rebuilt from the rows on disk by :func:`summarize`. Finished slices are skipped on a re-run (files are written
atomically), and several processes or separately launched shards can share the work.

Finite values. A slice whose image or maps hold NaN/inf is not reconstructed: its row has ``status: "failed"``,
``failure: "input"`` and a reason (retried on the next run, in case the data were fixed). A reconstruction with a
non-finite pixel is kept but flagged (``failure: "output"``) and never scored. Summaries count both.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from utils.files import atomic_save_npy, atomic_write_text, sha256_file, sha256_json, write_json
from utils.masks import MaskResult, default_center_fraction, get_mask, sample_seed, seed_from_name
from utils.operators import SenseOperator
from utils.recon_options import SamplerSettings
from utils.samplers import ensemble_stats

FINGERPRINT_VERSION = 1
RUN_FILE = "run.json"
# What a run writes into its folder (cleared by ``overwrite``; nothing else in the folder is touched).
RESULT_ENTRIES = ("rows", "recon", "std", "png", "summary.json", "summary.csv", "slices.csv", "settings.json",
                  "command.json", RUN_FILE)


@dataclass
class ReconSettings(SamplerSettings):
    """Everything that defines a reconstruction run (written to ``settings.json`` when the folder is created).

    The sampler's (and the CS baseline's) settings and their defaults are inherited from
    :class:`utils.recon_options.SamplerSettings`. Only :func:`result_settings` of these enter the fingerprint;
    ``batch_size``, ``save_png`` and ``tag`` do not.
    """

    method: str = "diffusion"  # zero_filled | cs | diffusion
    mask_type: str = "uniform1d"
    acc_factor: float = 4.0
    center_fraction: float | None = None
    noise_sigma: float = 0.0  # complex Gaussian k-space noise std σ (E|n|² = σ²), see the module docstring
    metadata_override: dict[str, Any] = field(default_factory=dict)  # replace these values in every record
    mismatch_metadata: bool = False  # give each slice the protocol of another contrast (metadata-sensitivity check)
    num_samples: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # network precision of the diffusion model (no | fp16 | bf16)
    batch_size: int = 1
    save_png: bool = True
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("zero_filled", "cs", "diffusion"):
            raise ValueError(f"unknown method {self.method!r}: choose zero_filled, cs or diffusion")
        if self.sampler not in ("dds", "dps"):
            raise ValueError(f"unknown sampler {self.sampler!r}: choose dds or dps")
        if self.num_samples < 1 or self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("num_samples, batch_size and num_steps must be >= 1")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {self.noise_sigma}")
        if not (math.isfinite(self.acc_factor) and self.acc_factor >= 1):
            raise ValueError(f"acc_factor must be a finite number >= 1, got {self.acc_factor}")

    @property
    def run_tag(self) -> str:
        """The readable part of the folder name (the explicit ``tag`` when given)."""
        return self.tag if self.tag else readable_tag(self)

    @property
    def resolved_center_fraction(self) -> float:
        """The centre fraction the masks use (the default for R when None)."""
        if self.center_fraction is None:
            return default_center_fraction(float(self.acc_factor))
        return float(self.center_fraction)

    def out_dir(self, save_dir: str | Path, fingerprint: Mapping[str, Any] | None = None) -> Path:
        """The output folder: ``{save_dir}/{mask}/acc_{R}/{tag}``; without an explicit tag the readable tag plus
        the short fingerprint hash (computed from the settings alone when ``fingerprint`` is None)."""
        return out_dir_for(save_dir, self, fingerprint if fingerprint is not None else run_fingerprint(self))


def readable_tag(settings: ReconSettings) -> str:
    """``zero_filled``, ``cs`` or ``{sampler}_steps{N}_w{w}_n{samples}`` (the hash suffix tells the rest apart)."""
    if settings.method != "diffusion":
        return settings.method
    return f"{settings.sampler}_steps{settings.num_steps}_w{settings.guidance_scale:g}_n{settings.num_samples}"


# ----------------------------------------------------------------------------------------------------------------------
# run identity
# ----------------------------------------------------------------------------------------------------------------------


def result_settings(settings: ReconSettings) -> dict[str, Any]:
    """The settings that change a result, and only those (the sampler's settings only for its method).

    ``center_fraction`` is resolved (None and the explicit default are the same run); key lists are sorted (their
    order does not matter). Batch size is left out: every slice has its own seeded generators and per-sample CG, so
    its result does not depend on which slices share a batch (up to float rounding in batched convolutions).
    """
    s = settings
    out: dict[str, Any] = {
        "method": s.method, "mask_type": s.mask_type, "acc_factor": float(s.acc_factor),
        "center_fraction": s.resolved_center_fraction, "noise_sigma": float(s.noise_sigma),
    }
    if s.method == "cs":
        out.update(cs_lambda=float(s.cs_lambda), cs_iter=int(s.cs_iter))
    elif s.method == "diffusion":
        out.update(
            sampler=s.sampler, num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
            drop_metadata_keys=sorted(s.drop_metadata_keys),
            uncond_drop_keys=None if s.uncond_drop_keys is None or s.guidance_scale <= 1 else sorted(s.uncond_drop_keys),
            metadata_override=dict(sorted((s.metadata_override or {}).items())),
            mismatch_metadata=bool(s.mismatch_metadata), num_samples=int(s.num_samples), seed=int(s.seed),
            mixed_precision=s.mixed_precision,
        )
        if s.sampler == "dds":
            out.update(eta=float(s.eta), gamma=float(s.gamma), cg_iter=int(s.cg_iter),
                       clip_x0=None if s.clip_x0 is None else float(s.clip_x0))
        else:
            out.update(dps_step=float(s.dps_step))
    return out


def hash_files(files: Mapping[str, str | Path]) -> dict[str, str]:
    """``{name: sha256 of the file's bytes}`` for ``{name: path}`` (names are what the fingerprint shows)."""
    return {name: sha256_file(path) for name, path in sorted(files.items())}


def folder_files(folder: str | Path, prefix: str, exclude: Sequence[str] = ()) -> dict[str, Path]:
    """Every regular file under ``folder`` as ``{prefix/relative path: path}`` (hidden files and ``exclude``d
    top-level entries left out)."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.parts[0] in exclude or any(p.startswith(".") for p in rel.parts):
            continue
        out[f"{prefix}/{rel.as_posix()}"] = path
    return out


def dataset_slices(dataset: Sequence) -> list[tuple[str, str, int]]:
    """``(anatomy, file, slice index)`` of every item, in dataset order (without loading arrays when the dataset
    is a :class:`utils.data.MRISliceDataset`)."""
    items = getattr(dataset, "items", None)
    if items is not None and all(hasattr(it, "idx") for it in items):
        return [(str(it.anatomy), str(it.filename), int(it.idx)) for it in items]
    out = []
    for i in range(len(dataset)):
        it = dataset[i]
        out.append((str(getattr(it, "anatomy", "")), str(it.filename), int(it.slice_idx)))
    return out


def data_identity(
    dataset: Sequence,
    csvs: Sequence[str | Path] = (),
    split: str | None = None,
    crop_size: int | None = None,
) -> dict[str, Any]:
    """What identifies the data of a run: the CSVs' content hashes and the list of slices (not the folder paths, so
    moving the data keeps the identity; the slice arrays themselves are not hashed, for speed)."""
    slices = dataset_slices(dataset)
    return {
        "csvs": {Path(c).name: sha256_file(c) for c in csvs},
        "split": split,
        "crop_size": crop_size,
        "num_slices": len(slices),
        "slices_sha256": sha256_json(slices),
    }


def run_fingerprint(
    settings: ReconSettings | Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
    stats: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The identity of a reconstruction run, as stored in ``run.json``.

    Args:
        settings: the run's :class:`ReconSettings` (reduced to :func:`result_settings`) or an already reduced dict.
        model: the model's identity, e.g. ``{"files": {name: sha256}}`` from
            :func:`utils.diffusion_recon.model_identity`; None for methods without a model.
        stats: the metadata stats file the model reads (its content hash is taken); None if unused.
        data: the data's identity (:func:`data_identity`, or any JSON dict that pins the inputs, e.g. raw-file
            hashes); None when unknown.
        info: extra fields stored but *not* hashed (paths, versions).

    Returns:
        ``{"version", "settings", "model", "stats", "data", "hash", "info"}``; ``hash`` is the sha256 of the
        canonical JSON of everything but ``info``. Equal inputs give equal hashes in every process and on every
        machine.
    """
    ident = {
        "version": FINGERPRINT_VERSION,
        "settings": result_settings(settings) if isinstance(settings, ReconSettings) else dict(settings),
        "model": None if model is None else dict(model),
        "stats": None if stats is None else {"name": Path(stats).name, "sha256": sha256_file(stats)},
        "data": None if data is None else dict(data),
    }
    return {**ident, "hash": sha256_json(ident), "info": dict(info or {})}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (``"gamma: 5.0 -> 10.0"``), settings named bare."""
    keys = ("version", "settings", "model", "stats", "data")
    a = _flatten({k: old.get(k) for k in keys})
    b = _flatten({k: new.get(k) for k in keys})
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            name = key[len("settings."):] if key.startswith("settings.") else key
            out.append(f"{name}: {_short(va)} -> {_short(vb)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] + "…" if isinstance(value, str) and len(value) == 64 else text


class RunMismatchError(ValueError):
    """An output folder holds results of other settings (``differences`` names them)."""

    def __init__(self, folder: Path, differences: list[str]) -> None:
        self.folder, self.differences = folder, differences
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        super().__init__(f"{folder} holds results of another run ({shown}); use another --tag (or none: the default "
                         "folder name includes the settings' hash), or --overwrite to replace them")


def out_dir_for(save_dir: str | Path, settings: ReconSettings, fingerprint: Mapping[str, Any],
                tag: str | None = None) -> Path:
    """``{save_dir}/{mask}/acc_{R}/{tag}``; without a tag (argument or ``settings.tag``):
    ``{readable tag}-{hash[:8]}``."""
    tag = tag or settings.tag
    name = tag if tag else f"{readable_tag(settings)}-{fingerprint['hash'][:8]}"
    return Path(save_dir) / settings.mask_type / f"acc_{settings.acc_factor:g}" / name


def _has_results(folder: Path) -> bool:
    return any((folder / e).exists() for e in RESULT_ENTRIES)


def clear_results(folder: str | Path) -> None:
    """Delete what a run writes into ``folder`` (:data:`RESULT_ENTRIES`), nothing else."""
    folder = Path(folder)
    for entry in RESULT_ENTRIES:
        path = folder / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_out_dir(
    folder: str | Path,
    fingerprint: Mapping[str, Any],
    overwrite: bool = False,
    settings: ReconSettings | None = None,
    create: bool = True,
) -> str:
    """Check ``folder`` against ``fingerprint`` and (with ``create``) claim it by writing ``run.json``.

    Returns:
        ``"new"`` (empty or absent folder), ``"resume"`` (same fingerprint: finished slices are kept, also with
        ``overwrite``) or ``"overwritten"`` (another run's results were cleared).

    Raises:
        RunMismatchError: the folder holds another fingerprint, or results without a ``run.json`` (unknown
            settings), and ``overwrite`` is False.
    """
    folder = Path(folder)
    run_file = folder / RUN_FILE
    state = "new"
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("hash") == fingerprint["hash"]:
            return "resume"
        diffs = fingerprint_differences(old, fingerprint) or ["run.json unreadable"]
        if not overwrite:
            raise RunMismatchError(folder, diffs)
        state = "overwritten"
    elif _has_results(folder):
        if not overwrite:
            raise RunMismatchError(folder, ["the folder holds results without a run.json (settings unknown)"])
        state = "overwritten"
    if not create:
        return state
    if state == "overwritten":
        clear_results(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        write_json(folder / "settings.json", asdict(settings))
    write_json(run_file, dict(fingerprint))
    return state


def resolve_out_dir(
    save_dir: str | Path,
    settings: ReconSettings,
    fingerprint: Mapping[str, Any],
    tag: str | None = None,
    overwrite: bool = False,
    create: bool = True,
) -> Path:
    """The output folder of a run, checked and claimed (:func:`out_dir_for` + :func:`prepare_out_dir`).

    Raises:
        RunMismatchError: see :func:`prepare_out_dir`.
    """
    folder = out_dir_for(save_dir, settings, fingerprint, tag)
    prepare_out_dir(folder, fingerprint, overwrite=overwrite, settings=settings, create=create)
    return folder


def read_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of an output folder, or None."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------------


def slice_mask(settings: ReconSettings, filename: str, slice_idx: int, shape: tuple[int, int]) -> MaskResult:
    """The mask of one slice: seeded from (file, slice) only, so every method and run sees the same mask."""
    return get_mask(
        settings.mask_type, shape, settings.acc_factor, center_fraction=settings.center_fraction,
        seed=seed_from_name(filename, slice_idx),
    )


def noise_seed(filename: str, slice_idx: int) -> int:
    """Seed of a slice's measurement noise: from (file base name, slice) only, independent of the mask's seed."""
    key = f"noise:{PurePath(str(filename)).name}:{int(slice_idx)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 2**63


def measurement_noise(shape: Sequence[int], sigma: float, filename: str, slice_idx: int) -> torch.Tensor:
    """Complex Gaussian k-space noise ``n ~ CN(0, σ²)``: real and imaginary parts i.i.d. ``N(0, σ²/2)``.

    Drawn on the CPU from :func:`noise_seed`, so it is the same on every device, for every method and seed.

    Returns:
        complex64 tensor of ``shape`` (e.g. ``[C, H, W]``).
    """
    gen = torch.Generator().manual_seed(noise_seed(filename, slice_idx))
    parts = torch.randn((2, *shape), generator=gen, dtype=torch.float32) * (sigma / math.sqrt(2.0))
    return torch.complex(parts[0], parts[1])


@dataclass
class Measurement:
    """The simulated acquisition of a batch of slices.

    Attributes:
        x_true: complex64 ``[B, H, W]`` ground truth. maps: complex64 ``[B, C, H, W]``.
        masks: per-slice :class:`MaskResult`. mask: float ``[B, 1, H, W]``. op: the SENSE operator.
        y: complex64 ``[B, C, H, W]`` masked (noisy) k-space.
    """

    x_true: torch.Tensor
    maps: torch.Tensor
    masks: list[MaskResult]
    mask: torch.Tensor
    op: SenseOperator
    y: torch.Tensor


def simulate_measurement(group: Sequence, settings: ReconSettings, device: torch.device | str = "cpu") -> Measurement:
    """``y = M ⊙ (F(S ⊙ x) + n)`` for items with ``.image [2, H, W]``, ``.maps [C, H, W]``, ``.filename``,
    ``.slice_idx`` (all with the same coil count)."""
    from utils.channels import channels_to_complex

    x_true = torch.stack([channels_to_complex(torch.as_tensor(item.image)[None])[0] for item in group]).to(device)
    maps = torch.stack([torch.as_tensor(item.maps) for item in group]).to(device=device, dtype=torch.complex64)
    h, w = x_true.shape[-2:]
    masks = [slice_mask(settings, item.filename, item.slice_idx, (h, w)) for item in group]
    mask = torch.stack([m.mask.expand(h, w) for m in masks])[:, None].to(device)  # [B, 1, H, W]
    op = SenseOperator(maps, mask)
    y = op.forward(x_true)
    if settings.noise_sigma > 0:
        noise = torch.stack([measurement_noise(maps.shape[1:], settings.noise_sigma, item.filename, item.slice_idx)
                             for item in group]).to(device)
        y = y + mask * noise
    return Measurement(x_true, maps, masks, mask, op, y)


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


def save_slice_png(path: Path, panels: dict[str, np.ndarray]) -> None:
    """A row of labelled panels (magnitudes in grey; maps named '*error*'/'*std*' in a heat colour map)."""
    from utils.figures import Panel, panel_figure, save_figure

    label = panels.get("label")
    vmax = float(np.nanmax(np.abs(label))) if label is not None else None
    row = []
    for name, img in panels.items():
        heat = "error" in name or "std" in name
        row.append(Panel(img, name, heat=heat, vmax=None if heat or name == "mask" else vmax))
    save_figure(panel_figure([row], panel_inches=2.4, title_size=9), path, dpi=80)


# ----------------------------------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------------------------------


def row_path(out: Path, filename: str, slice_idx: int) -> Path:
    """Where the per-slice row of a slice lives."""
    return Path(out) / "rows" / filename / f"{int(slice_idx):03d}.json"


def _row_is_final(path: Path) -> bool:
    """A row that a re-run keeps: any row except an input failure (cheap to re-check, the data may be fixed)."""
    if not path.is_file():
        return False
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # a damaged row is recomputed
    return not (row.get("status") == "failed" and row.get("failure") == "input")


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
        fingerprint: the run's identity (:func:`run_fingerprint`); default: from the settings and the dataset's
            slice list (no model or CSV identity: pass a full one from a script).
        out_dir: the output folder when the caller has resolved it (:func:`resolve_out_dir`); default
            :func:`out_dir_for`.
        overwrite: replace another run's results in the folder (see :func:`prepare_out_dir`).

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
    todo = [i for i in mine if not _row_is_final(row_path(out, slices[i][1], slices[i][2]))]
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
    for stale in (out / "recon" / item.filename / f"{int(item.slice_idx):03d}.npy",):
        stale.unlink(missing_ok=True)  # a recon of older, different input data must not be scored
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

    measurement: Measurement
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
        rel = Path(item.filename) / f"{item.slice_idx:03d}"
        rec_np = recon[b].detach().cpu().numpy().astype(np.complex64)
        gt_np = x_true[b].detach().cpu().numpy()
        atomic_save_npy(out / "recon" / f"{rel}.npy", rec_np)
        if std is not None:
            atomic_save_npy(out / "std" / f"{rel}.npy", std[b].detach().cpu().numpy().astype(np.float32))
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
            save_slice_png(out / "png" / f"{item.filename}_{item.slice_idx:03d}.png", panels)
        write_json(out / "rows" / f"{rel}.json", row, indent=None)


# ----------------------------------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean ± std over the finite values, and how many there were (``n``); None when there are none."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarize(out_dir: str | Path, dataset: Sequence, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Rebuild the summary of an output folder from the per-slice rows on disk.

    A volume (file) is *complete* when every slice the dataset lists for it has a row; it is *scored* when it is
    complete and no slice failed. Incomplete volumes (a shard still running or never run) and volumes with failed
    slices are listed with their counts but kept out of the means, and the top-level counts say so.

    fastMRI-protocol metrics are computed per scored volume (magnitudes, ``data_range = max`` of the volume's
    ground truth) from the saved reconstructions; ContextMRI-protocol metrics (and time, NFE, acceleration) are the
    per-slice values of the scored volumes. Overall figures are mean ± std over volumes (fastMRI) and over slices
    (ContextMRI), each with its count ``n``.

    Args:
        out_dir: the run's folder.
        dataset: the run's whole dataset (it defines which slices each volume has).
        indices: restrict the expected slices to these dataset indices (default: all).

    Returns:
        The summary dict (also written as strict-JSON ``summary.json``; per-volume rows go to ``summary.csv``,
        per-slice rows to ``slices.csv``).
    """
    import pandas as pd

    from utils.channels import channels_to_complex
    from utils.metrics import evaluate_volume

    out = Path(out_dir)
    slices = dataset_slices(dataset)
    idx = list(range(len(slices))) if indices is None else list(indices)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i in idx:
        by_file.setdefault(slices[i][1], []).append((slices[i][2], i))
    slice_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    scored_slice_rows: list[dict[str, Any]] = []
    for filename, entries in sorted(by_file.items()):
        entries.sort()
        rows, missing = [], 0
        for slice_idx, i in entries:
            path = row_path(out, filename, slice_idx)
            if not path.is_file():
                missing += 1
                continue
            row = json.loads(path.read_text())
            row.setdefault("status", "ok")  # rows of older runs had no status and only finite outputs
            rows.append((row, i))
        slice_rows.extend(r for r, _ in rows)
        bad = [r for r, _ in rows if r["status"] != "ok"]
        failed.extend({"filename": r["filename"], "slice": r["slice"], "failure": r.get("failure"),
                       "reason": r.get("reason")} for r in bad)
        complete = missing == 0
        vol: dict[str, Any] = {"filename": filename, "num_slices": len(entries), "num_rows": len(rows),
                               "num_missing": missing, "num_failed": len(bad), "complete": complete}
        if not rows:
            vol["status"] = "not started"
        elif not complete:
            vol["status"] = "incomplete"
        elif bad:
            vol["status"] = "failed"
        else:
            vol["status"] = "scored"
            gts = [channels_to_complex(torch.as_tensor(dataset[i].image)[None])[0].numpy() for _, i in rows]
            recs = [np.load(out / "recon" / filename / f"{r['slice']:03d}.npy") for r, _ in rows]
            m = evaluate_volume(np.stack(gts), np.stack(recs), protocol="fastmri")
            vol.update({f"fastmri_{k}": m[k] for k in ("psnr", "ssim", "nmse")})
            scored_slice_rows.extend(r for r, _ in rows)
        volume_rows.append(vol)
    scored = [v for v in volume_rows if v["status"] == "scored"]
    counts = {status: sum(v["status"] == status for v in volume_rows)
              for status in ("scored", "incomplete", "failed", "not started")}
    summary: dict[str, Any] = {
        "complete": counts["incomplete"] == 0 and counts["not started"] == 0,
        "num_volumes": len(scored),
        "num_slices": len(scored_slice_rows),
        "num_volumes_expected": len(volume_rows),
        "num_volumes_incomplete": counts["incomplete"],
        "num_volumes_not_started": counts["not started"],
        "num_volumes_failed": counts["failed"],
        "num_slices_expected": len(idx),
        "num_slices_done": len(slice_rows),
        "num_slices_missing": sum(v["num_missing"] for v in volume_rows),
        "num_slices_failed": len(failed),
        "failed": failed,
    }
    fp = read_fingerprint(out)
    if fp is not None:
        summary["fingerprint"] = fp["hash"]
        summary["run_settings"] = fp.get("settings")
    if (out / "settings.json").is_file():
        summary["settings"] = json.loads((out / "settings.json").read_text())
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse"):
        summary[key] = _mean_std([v[key] for v in scored])
    for key in ("contextmri_psnr", "contextmri_ssim", "contextmri_nmse", "time_s", "nfe", "acceleration"):
        summary[key] = _mean_std([r.get(key) for r in scored_slice_rows])
    summary["protocols"] = {
        "fastmri": "magnitude, volume-wise, data_range = max(ground-truth volume); mean ± std over scored volumes",
        "contextmri": "per-slice min-max normalised magnitudes, data_range = 1; mean ± std over the slices of the "
                      "scored volumes",
        "scored": "a volume is scored when every slice of it has a row and none failed",
    }
    summary["volumes"] = volume_rows
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.csv", pd.DataFrame(volume_rows).to_csv(index=False))
    atomic_write_text(out / "slices.csv", pd.DataFrame(slice_rows).to_csv(index=False))
    return summary


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What the summary covers, in words: scored/expected volumes and slices, incomplete, failed."""
    lines = [f"scored {summary['num_volumes']} of {summary['num_volumes_expected']} volumes "
             f"({summary['num_slices']} slices); {summary['num_slices_done']} of {summary['num_slices_expected']} "
             f"slices done, {summary['num_slices_failed']} failed"]
    if summary["num_volumes_incomplete"]:
        lines.append(f"INCOMPLETE: {summary['num_volumes_incomplete']} volume(s) lack rows for "
                     f"{summary['num_slices_missing']} slice(s) (a shard not run yet?); they are not in the means")
    if summary["num_volumes_not_started"]:
        lines.append(f"{summary['num_volumes_not_started']} volume(s) of the dataset have no rows yet")
    if summary["num_slices_failed"]:
        lines.append(f"FAILED: {summary['num_slices_failed']} slice(s) in {summary['num_volumes_failed']} volume(s), "
                     "not scored:")
        lines += [f"  {f['filename']} slice {f['slice']}: {f['reason']}" for f in summary["failed"][:10]]
    return lines


def mask_problem(mask_type: str, acc_factor: float, center_fraction: float | None,
                 shape: tuple[int, int]) -> str | None:
    """Why a mask request cannot give the asked-for acceleration on images of ``shape``, or None if it can.

    Mirrors :func:`utils.masks.get_mask`: a 1-D family samples ``round(W / R)`` of the ``W`` phase-encode lines, a 2-D
    family ``round(H W / R)`` points, and both keep the fully sampled centre (``round(W cf)`` lines, or a
    ``round(H cf) x round(W cf)`` square). A request whose budget is below one sample, or below the centre alone,
    would silently run at another acceleration; family-specific limits (integer R for equispaced/magic) are found by
    building one mask.
    """
    from utils.masks import TWO_D_TYPES

    acc = float(acc_factor)
    if not (math.isfinite(acc) and acc > 1):
        return f"--acc_factor must be a finite number > 1, got {acc_factor}"
    if center_fraction is not None and not (math.isfinite(center_fraction) and 0 < center_fraction < 1):
        return f"--center_fraction must lie in (0, 1), got {center_fraction}"
    cf = default_center_fraction(acc) if center_fraction is None else float(center_fraction)
    h, w = int(shape[0]), int(shape[1])
    if mask_type in TWO_D_TYPES:
        total, centre, unit = h * w, round(h * cf) * round(w * cf), "k-space points"
    else:
        total, centre, unit = w, round(w * cf), "phase-encode lines"
    budget = round(total / acc)
    if budget < 1:
        return (f"--acc_factor {acc:g} leaves {budget} of the {total} {unit} of {h}x{w} images: choose R <= "
                f"{total}")
    if centre > budget and mask_type != "magic_fraction":  # magic_fraction shrinks its centre to the budget
        return (f"the fully sampled centre ({centre} {unit}, --center_fraction {cf:g}) exceeds the {budget} of "
                f"{total} that R = {acc:g} allows on {h}x{w} images: lower --center_fraction or --acc_factor")
    if mask_type != "poisson2d":  # poisson2d compiles a numba sampler: its budget check above suffices
        try:
            result = get_mask(mask_type, (h, w), acc, center_fraction=center_fraction, seed=0)
        except ValueError as err:
            return f"--mask_type {mask_type} --acc_factor {acc:g}: {err}"
        if float(result.mask.sum()) < 1:
            return f"--mask_type {mask_type} --acc_factor {acc:g} samples nothing on {h}x{w} images"
    return None

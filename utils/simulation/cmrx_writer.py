"""Simulated CMRxRecon cine data in the 2023 and 2024 folder layouts (docs/formats.md).

Arrays are given to :func:`utils.simulation.matlab_io.save_mat_v73` in MATLAB order ``(kx, ky, coils, slices, frames)``
(h5py then shows ``(frames, slices, coils, ky, kx)``); ``kx`` is the 2× oversampled readout, ``ky`` the phase encode
that the masks undersample. All cine data are 3 T Siemens MAGNETOM Vida bSSFP with 10 (virtual) coils.

2023: ``MultiCoil/Cine/{TrainingSet,ValidationSet}/FullSample/Pxxx/cine_{sax,lax}.mat`` (``kspace_full``) and
``AccFactor{04,08,10}/Pxxx/cine_{sax,lax}.mat`` (``kspace_subXX``) + ``cine_{sax,lax}_mask.mat`` (``maskXX``,
``kx × ky``, equispaced ky lines + 24 ACS lines).
2024: ``MultiCoil/Cine/{TrainingSet,ValidationSet}/FullSample/Pxxx/cine_{sax,lax}.mat`` (``kspace_full``),
``Mask_Task1/Pxxx/cine_{view}_mask_Uniform{R}.mat`` (``mask`` ``kx × ky``) with ``cine_{view}_kus_Uniform{R}.mat``
(``kus``), ``Mask_Task2/Pxxx/cine_{view}_mask_kt{Gaussian,Radial}{R}.mat`` (``mask`` ``kx × ky × frames``) with the
matching ``kus``; 16 ACS lines; ``ImgSnapshot/Pxxx/cine_{view}_info.csv`` (key,value rows).
Ground truth (noise-free images with Σ|S|² = 1 maps) goes to ``{output_dir}/ground_truth/{year}_{Pxxx}_cine_{view}.npz``.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.simulation.cardiac_phantom import render_cine, sample_heart
from utils.simulation.kspace import birdcage_coil_maps, centered_fft2, embed_oversampled, smooth_phase
from utils.simulation.matlab_io import save_mat_v73
from utils.simulation.sidecar import save_npz_deterministic
from utils.simulation.tissue import Acquisition

# Values used to *simulate* contrast. CMRxRecon files carry no TR/TE/flip, so the metadata leaves them missing.
CINE_ACQUISITION = Acquisition(
    acquisition="CINE", contrast="cine", sequence="TrueFISP", tr=3.0, te=1.5, ti=None, flip_angle=50.0, field_strength=3.0
)
#: The CMRxRecon release layouts written (module docstring).
CMRX_LAYOUTS: tuple[str, ...] = ("2023", "2024")
CARDIAC_METADATA_COLUMNS: tuple[str, ...] = (
    "anatomy", "filename", "slice", "contrast", "pathology", "sequence", "TR", "TE", "TI", "flip_angle",
    "field_strength", "vendor", "scanner_model", "protocol_name", "num_coils", "matrix_x", "matrix_y", "fov_x", "fov_y",
    "view", "frame",
)  # fmt: skip


@dataclass
class CMRxConfig:
    """Options of a simulated CMRxRecon cine dataset (defaults = real sizes).

    Attributes:
        output_dir: root (``MultiCoil/`` is created inside).
        layout: ``"2023"`` or ``"2024"``.
        num_volumes: subjects (``P001``…).
        num_slices_sax: short-axis slices; long-axis series have ``num_slices_lax``.
        num_frames: cardiac phases.
        matrix: ``(kx, ky)`` = oversampled readout × phase encode.
        num_coils: coils (10 in the challenge data).
        seed: master seed (subject ``i`` uses ``default_rng([seed, i])``).
        accelerations: acceleration factors of the masks.
        task2_patterns: 2024 Task-2 k-t patterns.
        val_fraction: fraction of subjects placed in ``ValidationSet`` (``None``: all in ``TrainingSet``).
        snr: mean object signal / complex noise std of the coil-combined image.
        ground_truth: write the sidecars.
    """

    output_dir: Path
    layout: str = "2023"  # one of CMRX_LAYOUTS
    num_volumes: int = 1
    num_slices_sax: int = 10
    num_slices_lax: int = 3
    num_frames: int = 12
    matrix: tuple[int, int] = (512, 246)
    num_coils: int = 10
    seed: int = 0
    accelerations: tuple[int, ...] = (4, 8, 10)
    task2_patterns: tuple[str, ...] = ("ktGaussian", "ktRadial")
    val_fraction: float | None = None
    snr: float = 25.0
    ground_truth: bool = True

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.layout not in CMRX_LAYOUTS:
            raise ValueError(f"layout must be 2023 or 2024, got {self.layout!r}")
        kx, ky = self.matrix
        if kx % 2 or kx < 8 or ky < 8:
            raise ValueError(f"matrix must be even kx >= 8 and ky >= 8, got {self.matrix}")
        if min(self.num_frames, self.num_slices_sax, self.num_slices_lax, self.num_coils, self.num_volumes) < 1:
            raise ValueError("sizes must be positive")


def _acs_lines(ky: int, year: str) -> int:
    return min(24 if year == "2023" else 16, ky)


def uniform_mask(ky: int, kx: int, acc: int, acs: int) -> np.ndarray:
    """Equispaced ky lines (every ``acc``-th, aligned to the centre) plus ``acs`` central lines; float64 ``[kx, ky]``."""
    lines = np.zeros(ky, dtype=bool)
    c = ky // 2
    lines[c % acc :: acc] = True
    lines[c - acs // 2 : c - acs // 2 + acs] = True
    return np.repeat(lines[None, :].astype(np.float64), kx, axis=0)


def kt_gaussian_mask(rng: np.random.Generator, ky: int, kx: int, nt: int, acc: int, acs: int) -> np.ndarray:
    """Per-frame ky lines drawn without replacement from a Gaussian density, plus ACS; float64 ``[kx, ky, nt]``."""
    c = ky // 2
    k = np.arange(ky) - c
    dens = np.exp(-0.5 * (k / (ky / 5.0)) ** 2)
    acs_idx = np.arange(c - acs // 2, c - acs // 2 + acs)
    dens[acs_idx] = 0
    n_extra = max(int(round(ky / acc)) - acs, 0)
    out = np.zeros((kx, ky, nt))
    for t in range(nt):
        lines = np.zeros(ky, dtype=bool)
        lines[acs_idx] = True
        if n_extra:
            lines[rng.choice(ky, size=min(n_extra, int((dens > 0).sum())), replace=False, p=dens / dens.sum())] = True
        out[:, :, t] = lines[None, :]
    return out


def kt_radial_mask(ky: int, kx: int, nt: int, acc: int) -> np.ndarray:
    """Radial spokes through the k-space centre, golden-angle rotated per frame; float64 ``[kx, ky, nt]``.

    Spokes (about one pixel wide) are added until the sampled fraction reaches ``1/acc``.
    """
    yy, xx = np.meshgrid(np.arange(kx) - kx // 2, np.arange(ky) - ky // 2, indexing="ij")
    out = np.zeros((kx, ky, nt))
    golden = np.pi * (3.0 - np.sqrt(5.0))
    angle = 0.0
    for t in range(nt):
        mask = np.hypot(yy, xx) < 1.5
        while mask.mean() < 1.0 / acc:
            mask |= np.abs(-np.sin(angle) * yy + np.cos(angle) * xx) < 0.6
            angle += golden
        out[:, :, t] = mask
    return out


def _info_rows(num_slices: int, num_frames: int, kx: int, ky: int, pixel_mm: float) -> list[tuple[str, str]]:
    return [
        ("Manufacturer", "SIEMENS"),
        ("ManufacturerModelName", "MAGNETOM Vida"),
        ("FieldStrength", "3"),
        ("SliceThickness", "8"),
        ("SpacingBetweenSlices", "10"),
        ("PixelSpacing", f"{pixel_mm:g}"),
        ("ReadoutSamples", str(kx)),
        ("PhaseEncodingLines", str(ky)),
        ("Slices", str(num_slices)),
        ("Frames", str(num_frames)),
        ("Coils", "10"),
    ]


def simulate_cine_kspace(
    config: CMRxConfig, rng: np.random.Generator, view: str, subject
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-coil cine k-space of one view.

    Returns:
        ``(kspace [kx, ky, C, nz, nt] complex64 (MATLAB order), image [nz, nt, kx, ky] complex64 noise-free,
        maps [C, kx, ky] complex64)``.
    """
    kx, ky = config.matrix
    h = kx // 2
    nz = config.num_slices_sax if view == "sax" else config.num_slices_lax
    nt = config.num_frames
    pixel_mm = 1.4 * 256.0 / max(h, ky)  # real cine: ~1.4 mm for 256 × 246; coarser grids keep the same FOV
    mag = render_cine(subject, view, nz, nt, (h, ky), pixel_mm, CINE_ACQUISITION)
    phase = np.stack([smooth_phase(rng, (h, ky)) for _ in range(nz)])[:, None]
    gain = 2e-3 * float(rng.uniform(0.5, 2.0))
    image = embed_oversampled((gain * mag * np.exp(1j * phase)).astype(np.complex64), kx)
    maps = birdcage_coil_maps(config.num_coils, (kx, ky), object_size=max(h, ky), radius=float(rng.uniform(1.1, 1.4)))
    obj = mag > 0.05 * mag.max()
    noise_std = gain * float(mag[obj].mean()) / config.snr / np.sqrt(2.0)
    k = centered_fft2(torch.from_numpy(maps)[None, None] * torch.from_numpy(image)[:, :, None]).numpy()
    noise = rng.standard_normal(k.shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]  # [nz, nt, C, kx, ky]
    k += np.float32(noise_std) * noise
    return np.ascontiguousarray(k.transpose(3, 4, 2, 0, 1)), image, maps


def _patient_dirs(config: CMRxConfig) -> list[tuple[str, str]]:
    n = config.num_volumes
    val: set[int] = set()
    if config.val_fraction is not None:
        perm = np.random.default_rng([config.seed, 7_777_777]).permutation(n)
        val = set(perm[: int(round(n * config.val_fraction))].tolist())
    return [("ValidationSet" if i in val else "TrainingSet", f"P{i + 1:03d}") for i in range(n)]


def simulate_cmrx_subject(
    config: CMRxConfig, index: int, split: str, patient: str
) -> tuple[list[Path], list[dict]]:
    """Write every file of one subject.

    Returns:
        ``(written paths, metadata rows)`` (one row per slice and frame, cardiac metadata columns).
    """
    rng = np.random.default_rng([config.seed, index])
    subject = sample_heart(rng)
    kx, ky = config.matrix
    nt = config.num_frames
    root = config.output_dir / "MultiCoil" / "Cine" / split
    acs = _acs_lines(ky, config.layout)
    written: list[Path] = []
    rows: list[dict] = []

    def save(folder: str, fname: str, variables: dict[str, np.ndarray]) -> None:
        d = root / folder / patient
        d.mkdir(parents=True, exist_ok=True)
        save_mat_v73(d / fname, variables)
        written.append(d / fname)

    for view in ("sax", "lax"):
        kfull, image, maps = simulate_cine_kspace(config, rng, view, subject)
        nz = kfull.shape[3]
        base = f"cine_{view}"
        save("FullSample", f"{base}.mat", {"kspace_full": kfull})
        if config.layout == "2023":
            for r in config.accelerations:
                m = uniform_mask(ky, kx, r, acs)
                kus = (kfull * m[:, :, None, None, None]).astype(np.complex64)
                save(f"AccFactor{r:02d}", f"{base}.mat", {f"kspace_sub{r:02d}": kus})
                save(f"AccFactor{r:02d}", f"{base}_mask.mat", {f"mask{r:02d}": m})
        else:
            for r in config.accelerations:
                m = uniform_mask(ky, kx, r, acs)
                save("Mask_Task1", f"{base}_mask_Uniform{r}.mat", {"mask": m})
                kus = (kfull * m[:, :, None, None, None]).astype(np.complex64)
                save("Mask_Task1", f"{base}_kus_Uniform{r}.mat", {"kus": kus})
            for pattern in config.task2_patterns:
                for r in config.accelerations:
                    if pattern == "ktGaussian":
                        m = kt_gaussian_mask(rng, ky, kx, nt, r, acs)
                    elif pattern == "ktRadial":
                        m = kt_radial_mask(ky, kx, nt, r)
                    else:
                        m = np.repeat(uniform_mask(ky, kx, r, acs)[:, :, None], nt, axis=2)
                    save("Mask_Task2", f"{base}_mask_{pattern}{r}.mat", {"mask": m})
                    kus = (kfull * m[:, :, None, None, :]).astype(np.complex64)
                    save("Mask_Task2", f"{base}_kus_{pattern}{r}.mat", {"kus": kus})
            snap = root / "ImgSnapshot" / patient
            snap.mkdir(parents=True, exist_ok=True)
            pixel_mm = 1.4 * 256.0 / max(kx // 2, ky)
            with open(snap / f"{base}_info.csv", "w", newline="") as fh:
                csv.writer(fh, lineterminator="\n").writerows(_info_rows(nz, nt, kx, ky, pixel_mm))
            written.append(snap / f"{base}_info.csv")
        if config.ground_truth:
            gt = config.output_dir / "ground_truth"
            gt.mkdir(parents=True, exist_ok=True)
            save_npz_deterministic(
                gt / f"{config.layout}_{patient}_{base}.npz", {"image": image, "maps": maps, "split": np.array(split)}
            )
        for z in range(nz):
            for t in range(nt):
                rows.append({
                    "anatomy": "cardiac", "filename": f"{patient}_{base}", "slice": z, "contrast": "cine",
                    "pathology": "", "sequence": "TrueFISP", "field_strength": 3.0, "vendor": "SIEMENS",
                    "scanner_model": "MAGNETOM Vida", "num_coils": config.num_coils, "matrix_x": kx, "matrix_y": ky,
                    "view": view, "frame": t,
                })  # fmt: skip
    return written, rows


def generate_cmrx_dataset(config: CMRxConfig, log=print) -> list[Path]:
    """Write a simulated CMRxRecon cine dataset; returns every written path.

    Args:
        config: options.
        log: progress callback (``None`` for silence).
    """
    paths: list[Path] = []
    rows: list[dict] = []
    for i, (split, patient) in enumerate(_patient_dirs(config)):
        t0 = time.perf_counter()
        sub_paths, sub_rows = simulate_cmrx_subject(config, i, split, patient)
        paths += sub_paths
        rows += sub_rows
        if log is not None:
            log(f"[{i + 1}/{config.num_volumes}] {split}/{patient} ({config.layout}) {time.perf_counter() - t0:.1f}s")
    if config.ground_truth:
        gt = config.output_dir / "ground_truth"
        gt.mkdir(parents=True, exist_ok=True)
        with open(gt / "metadata_cardiac.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(CARDIAC_METADATA_COLUMNS), lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in CARDIAC_METADATA_COLUMNS})
    return paths

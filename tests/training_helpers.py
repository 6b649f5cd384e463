"""Tiny on-disk MRI datasets in the preprocessed layout, for the training tests and the benchmark.

``{root}/{anatomy}_mvue_{crop}_{split}/slice/{file}/{idx:03d}.npy`` (complex64 ``[crop, crop]``, 99th percentile of the
magnitude = 1), ``.../mps/...`` (unit-norm maps ``[C, crop, crop]``) and ``{root}/metadata_{anatomy}_{split}.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.preprocessing.layout import dataset_dir, slice_paths
from utils.preprocessing.metadata_csv import CARDIAC_CSV_COLUMNS, FASTMRI_CSV_COLUMNS, write_metadata_csv

_CONTRASTS = {"brain": ["T1", "T2", "FLAIR"], "knee": ["PD", "PDFS"], "cardiac": ["cine"]}


def _phantom(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth complex blob image, normalised so the 99th percentile of its magnitude is 1."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = np.zeros((size, size), np.complex128)
    for _ in range(3):
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        r = rng.uniform(0.2, 0.5)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        img += rng.uniform(0.5, 1.0) * blob * np.exp(1j * rng.uniform(0, 6))
    img /= np.percentile(np.abs(img), 99)
    return img.astype(np.complex64)


def shepp_logan_variant(rng: np.random.Generator, size: int) -> np.ndarray:
    """One member of a narrow family: Shepp-Logan with jittered ellipse intensities, sizes and positions and a smooth
    random phase (sharp edges, so zero-filling aliases; a learned prior of the family can fill the missing lines).
    Normalised so the 99th percentile of the magnitude is 1."""
    from sigpy import sim

    amps = np.asarray(sim.sl_amps, float)
    amps[2:] *= rng.uniform(0.5, 1.5, amps.size - 2)
    scales = np.asarray(sim.sl_scales, float) * rng.uniform(0.9, 1.1, (len(sim.sl_scales), 1))
    offsets = np.asarray(sim.sl_offsets, float) + rng.uniform(-0.04, 0.04, (len(sim.sl_offsets), 1)) * [1, 1, 0]
    img = sim.phantom((size, size), amps, scales, offsets, sim.sl_angles, np.complex128)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = img * np.exp(1j * (rng.uniform(-np.pi, np.pi) + rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy))
    img /= np.percentile(np.abs(img), 99)
    return img.astype(np.complex64)


def _maps(coils: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    maps = np.stack([np.exp(-((xx - np.cos(a)) ** 2 + (yy - np.sin(a)) ** 2)) * np.exp(1j * a)
                     for a in np.linspace(0, 2 * np.pi, coils, endpoint=False)])
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def write_tiny_dataset(root: str | Path, anatomy: str = "brain", split: str = "train", num_files: int = 2,
                       slices_per_file: int = 4, crop: int = 32, coils: int = 2, seed: int = 0,
                       wrong_size_slice: bool = False, phantom: str = "blobs") -> Path:
    """Write slices + maps + CSV; returns the CSV path. ``wrong_size_slice`` makes the last slice ``crop+8`` wide;
    ``phantom`` is ``"blobs"`` (smooth random blobs) or ``"shepp_logan"`` (:func:`shepp_logan_variant`)."""
    make_image = {"blobs": _phantom, "shepp_logan": shepp_logan_variant}[phantom]
    root = Path(root)
    rng = np.random.default_rng(seed)
    ds_dir = dataset_dir(root, anatomy, crop, split)
    rows = []
    contrasts = _CONTRASTS.get(anatomy, ["T1"])
    for f in range(num_files):
        name = f"file_{anatomy}_{split}_{f:03d}"
        contrast = contrasts[f % len(contrasts)]
        for s in range(slices_per_file):
            size = crop + 8 if (wrong_size_slice and f == num_files - 1 and s == slices_per_file - 1) else crop
            img_path, map_path = slice_paths(ds_dir, name, s)
            img_path.parent.mkdir(parents=True, exist_ok=True)
            map_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(img_path, make_image(rng, size))
            np.save(map_path, _maps(coils, size))
            row = {"anatomy": anatomy, "filename": name, "slice": s, "contrast": contrast,
                   "pathology": ["Edema"] if (f + s) % 3 == 0 else [], "sequence": "TurboSpinEcho",
                   "TR": 3000.0 + 100 * f, "TE": 30.0 + s, "TI": None, "flip_angle": 90.0,
                   "field_strength": 3.0 if f % 2 else 1.5, "vendor": "SIEMENS", "scanner_model": "Skyra",
                   "num_coils": coils, "matrix_x": crop, "matrix_y": crop}
            if anatomy == "cardiac":
                row.update({"view": "sax", "frame": s, "sequence": "bSSFP", "TR": None, "TE": None,
                            "flip_angle": None})
            rows.append(row)
    columns = CARDIAC_CSV_COLUMNS if anatomy == "cardiac" else FASTMRI_CSV_COLUMNS
    csv_path = root / f"metadata_{anatomy}_{split}.csv"
    write_metadata_csv(csv_path, rows, columns)
    return csv_path

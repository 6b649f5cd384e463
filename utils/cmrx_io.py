"""Reading CMRxRecon multi-coil ``.mat`` files (MATLAB v7.3 = HDF5) of the 2023 and 2024 releases (docs/formats.md).

h5py shows MATLAB's dimensions reversed and complex numbers as a compound ``(real, imag)``. k-space is
``(kx, ky, coils, slices, frames)`` in MATLAB, i.e. ``(frames, slices, coils, ky, kx)`` in h5py; ``kx`` is the (2x
oversampled) readout, ``ky`` the undersampled phase encode. We return one (slice, frame) at a time as
``[C, kx, ky]`` (readout first, like fastMRI's ``[C, H, W]``), so a 5-D series is never loaded whole.

Folder layouts::

    2023: MultiCoil/{Cine,Mapping}/{TrainingSet,ValidationSet}/{FullSample,AccFactor04,08,10}/Pxxx/{name}.mat
          ({name}: cine_sax, cine_lax, T1map, T2map; variables kspace_full / kspace_subXX; masks {name}_mask.mat: maskXX)
    2024: MultiCoil/{Cine,Aorta,Mapping,Tagging}/{TrainingSet,ValidationSet}/FullSample/Pxxx/{name}.mat (kspace_full),
          Mask_Task*/Pxxx/{name}_kus_{pattern}.mat (kus) with {name}_mask_{pattern}.mat (mask),
          ImgSnapshot/Pxxx/{name}_info.csv (key,value rows)
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Facts about all CMRxRecon data (no per-file header exists): Siemens 3 T MAGNETOM Vida, 10 virtual coils.
CMRX_SYSTEM = {"field_strength": 3.0, "vendor": "SIEMENS", "scanner_model": "MAGNETOM Vida"}
CINE_CONTRAST = "Balanced steady-state free precession"


@dataclass(frozen=True)
class SeriesProtocol:
    """What is known about a CMRxRecon series type; ``None`` = unknown (stored as missing)."""

    view: str | None
    sequence: str | None
    contrast: str | None
    TR: float | None = None
    TE: float | None = None
    TI: float | None = None
    flip_angle: float | None = None


#: Known series (file stem -> protocol). Cine TR/TE/flip are not published: missing. Mapping values: docs/formats.md.
SERIES_PROTOCOLS: dict[str, SeriesProtocol] = {
    "cine_sax": SeriesProtocol("sax", "Short axis CINE", CINE_CONTRAST),
    "cine_lax": SeriesProtocol("lax", "Long axis CINE", CINE_CONTRAST),
    "cine_lax_2ch": SeriesProtocol("lax_2ch", "Long axis CINE", CINE_CONTRAST),
    "cine_lax_3ch": SeriesProtocol("lax_3ch", "Long axis CINE", CINE_CONTRAST),
    "cine_lax_4ch": SeriesProtocol("lax_4ch", "Long axis CINE", CINE_CONTRAST),
    "cine_lvot": SeriesProtocol("lvot", "Long axis CINE", CINE_CONTRAST),
    "T1map": SeriesProtocol("sax", "MOLLI", "T1 map", TR=2.67, TE=1.13),
    "T2map": SeriesProtocol("sax", "T2prep-FLASH", "T2 map", TR=3.06, TE=1.29),
}

_KSPACE_FULL = "kspace_full"
_UNDERSAMPLED = re.compile(r"^(kspace_sub\d+|kus)$")
_MASK = re.compile(r"^mask\d*$")
_PATIENT = re.compile(r"^P\d+$")


def series_protocol(stem: str) -> SeriesProtocol:
    """Protocol of a series name; unknown names get the name's view guess and nothing else."""
    if stem in SERIES_PROTOCOLS:
        return SERIES_PROTOCOLS[stem]
    view = stem.split("_", 1)[1] if "_" in stem else None
    return SeriesProtocol(view, None, None)


def _to_complex(data: np.ndarray) -> np.ndarray:
    if data.dtype.names is not None and {"real", "imag"} <= set(data.dtype.names):
        return (data["real"] + 1j * data["imag"]).astype(np.complex64)
    return np.asarray(data).astype(np.complex64)


def mat_variables(path: str | Path) -> list[str]:
    """Names of the root datasets of a v7.3 MAT file (``#refs#`` and groups excluded)."""
    with h5py.File(path, "r") as f:
        return [k for k in f if isinstance(f[k], h5py.Dataset) and not k.startswith("#")]


class MatKspace:
    """Lazy reader of one k-space variable: ``read(slice, frame) -> complex64 [C, kx, ky]``.

    Accepts MATLAB ``(kx, ky, C, nz, nt)``, ``(kx, ky, C, nz)`` (one frame) and ``(kx, ky, C)`` (one slice, one frame).

    Raises:
        OSError: unreadable / truncated file; KeyError: no such variable; ValueError: unexpected rank.
    """

    def __init__(self, path: str | Path, variable: str) -> None:
        self.path = Path(path)
        self.variable = variable
        self._h5 = h5py.File(self.path, "r")
        try:
            self._ds = self._h5[variable]
            shape = self._ds.shape  # reversed: (nt, nz, C, ky, kx)
            if len(shape) not in (3, 4, 5):
                raise ValueError(f"{self.path}:{variable}: expected 3-5 dims, got h5 shape {shape}")
        except Exception:
            self._h5.close()
            raise
        full = (1,) * (5 - len(shape)) + tuple(shape)
        self.num_frames, self.num_slices, self.num_coils, self.ny, self.nx = full

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(kx, ky)``."""
        return self.nx, self.ny

    def read(self, slice_idx: int, frame: int) -> np.ndarray:
        """complex64 ``[C, kx, ky]`` of one slice and frame."""
        if not (0 <= slice_idx < self.num_slices and 0 <= frame < self.num_frames):
            raise IndexError(f"(slice {slice_idx}, frame {frame}) outside ({self.num_slices}, {self.num_frames})")
        nd = self._ds.ndim
        index = (frame, slice_idx) if nd == 5 else (slice_idx,) if nd == 4 else ()
        return np.ascontiguousarray(np.swapaxes(_to_complex(self._ds[index]), -1, -2))

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "MatKspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_mask(path: str | Path, variable: str | None = None) -> np.ndarray:
    """A sampling mask as float32 ``[kx, ky]`` or ``[nt, kx, ky]`` (MATLAB ``kx × ky (× nt)``)."""
    with h5py.File(path, "r") as f:
        if variable is None:
            names = [k for k in f if _MASK.match(k)]
            if not names:
                raise KeyError(f"{path}: no mask variable")
            variable = names[0]
        data = np.asarray(f[variable][()], dtype=np.float32)  # h5: (ky, kx) or (nt, ky, kx)
    return np.ascontiguousarray(np.swapaxes(data, -1, -2))


def read_info_csv(path: str | Path) -> dict[str, str]:
    """``ImgSnapshot/*_info.csv`` key,value rows as a dict (2024 layout)."""
    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if len(row) >= 2 and row[0].strip():
                out[row[0].strip()] = row[1].strip()
    return out


@dataclass
class CMRxSeries:
    """One series (patient x file type) and where to read it.

    Attributes:
        name: output file name, e.g. ``P001_cine_sax``.
        patient, stem: e.g. ``P001``, ``cine_sax``.
        path, variable: the k-space file and variable (``kspace_full`` when a fully sampled file exists).
        fully_sampled: False when only undersampled data (+ ACS) exist.
        mask_path, mask_variable: the mask of undersampled data (``None``: derived from the nonzero k-space).
        info: ``ImgSnapshot`` key/values (2024), may be empty.
        set_name: ``TrainingSet`` / ``ValidationSet`` / ``""``.
    """

    name: str
    patient: str
    stem: str
    path: Path
    variable: str
    fully_sampled: bool
    mask_path: Path | None = None
    mask_variable: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    set_name: str = ""


def _set_name(path: Path) -> str:
    for part in path.parts:
        if part in ("TrainingSet", "ValidationSet", "TestSet"):
            return part
    return ""


def _acceleration_rank(path: Path) -> tuple[int, str]:
    """Lower = preferred undersampled file: uniform (Cartesian with ACS) at the lowest acceleration first."""
    digits = re.findall(r"(\d+)", path.stem.split("_kus_")[-1] if "_kus_" in path.stem else path.parent.parent.name)
    acc = int(digits[-1]) if digits else 99
    kt_penalty = 100 if re.search(r"kt|Radial|Gaussian", path.stem) else 0
    return acc + kt_penalty, str(path)


def find_cmrx_series(input_dir: str | Path, sets: tuple[str, ...] | None = None) -> tuple[list[CMRxSeries], list[str]]:
    """Find every series under ``input_dir`` (either layout), preferring fully sampled files.

    Args:
        input_dir: any folder above the ``Pxxx`` folders (the release root, ``MultiCoil``, ``Cine``...).
        sets: keep only these set folders (e.g. ``("TrainingSet",)``); files outside any set folder are always kept.

    Returns:
        ``(series sorted by name, problems)``; ``problems`` lists files that could not be opened.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    full: dict[tuple[str, str, str], Path] = {}
    under: dict[tuple[str, str, str], list[tuple[Path, str]]] = {}
    masks: dict[Path, str] = {}
    problems: list[str] = []
    for path in sorted(input_dir.rglob("*.mat")):
        patient = path.parent.name
        if not _PATIENT.match(patient):
            continue
        set_name = _set_name(path)
        if sets is not None and set_name and set_name not in sets:
            continue
        try:
            names = mat_variables(path)
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        if _KSPACE_FULL in names:
            full[(set_name, patient, path.stem)] = path
            continue
        sub = [n for n in names if _UNDERSAMPLED.match(n)]
        if sub:
            stem = path.stem.split("_kus_")[0]
            under.setdefault((set_name, patient, stem), []).append((path, sub[0]))
            continue
        mask_names = [n for n in names if _MASK.match(n)]
        if mask_names:
            masks[path] = mask_names[0]

    series: list[CMRxSeries] = []
    for key in sorted(set(full) | set(under)):
        set_name, patient, stem = key
        if key in full:
            path, variable, fully, mpath, mvar = full[key], _KSPACE_FULL, True, None, None
        else:
            path, variable = min(under[key], key=lambda pv: _acceleration_rank(pv[0]))
            fully = False
            mpath = path.with_name(path.name.replace("_kus_", "_mask_"))  # 2024
            if mpath == path or mpath not in masks:
                mpath = path.with_name(f"{stem}_mask.mat")  # 2023
            mvar = masks.get(mpath)
            if mvar is not None and mvar != "mask" and variable.startswith("kspace_sub"):
                wanted = "mask" + variable[len("kspace_sub") :]
                mvar = wanted if wanted in mat_variables(mpath) else mvar
            if mvar is None:
                mpath = None
        info_path = _find_info_csv(path, patient, stem)
        info = read_info_csv(info_path) if info_path is not None else {}
        name = f"{patient}_{stem}"
        series.append(CMRxSeries(name, patient, stem, path, variable, fully, mpath, mvar, info, set_name))
    # The same patient id in two sets/releases is two subjects: keep names unique and deterministic.
    seen: dict[str, int] = {}
    for s in series:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name}_{n + 1}"
    return sorted(series, key=lambda s: s.name), problems


def _find_info_csv(path: Path, patient: str, stem: str) -> Path | None:
    for parent in path.parents:
        candidate = parent / "ImgSnapshot" / patient / f"{stem}_info.csv"
        if candidate.is_file():
            return candidate
        if parent.name in ("TrainingSet", "ValidationSet", "MultiCoil"):
            break
    return None


def series_metadata(
    series: CMRxSeries, num_coils: int, image_shape: tuple[int, int], problems: list[str] | None = None
) -> dict[str, Any]:
    """Metadata columns shared by every (slice, frame) of a series; unknown values ``None``.

    A snapshot ``FieldStrength`` that is not a plausible number keeps the documented 3 T, with a line in ``problems``.
    """
    from utils.metadata import clean_number

    proto = series_protocol(series.stem)
    meta: dict[str, Any] = {
        "anatomy": "heart",
        "filename": series.name,
        "contrast": proto.contrast,
        "pathology": [],
        "sequence": proto.sequence,
        "TR": proto.TR,
        "TE": proto.TE,
        "TI": proto.TI,
        "flip_angle": proto.flip_angle,
        **CMRX_SYSTEM,
        "protocol_name": None,
        "num_coils": num_coils,
        "matrix_x": image_shape[0],
        "matrix_y": image_shape[1],
        "fov_x": None,
        "fov_y": None,
        "view": proto.view,
    }
    field_strength = series.info.get("FieldStrength")
    if field_strength:
        value, problem = clean_number("field_strength", field_strength)
        if value is not None:
            meta["field_strength"] = value
        elif problem is not None and problems is not None:  # keep the documented 3 T of every CMRxRecon scanner
            problems.append(f"field_strength: ImgSnapshot FieldStrength {problem}: kept the documented 3 T")
    return meta

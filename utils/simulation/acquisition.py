"""Sampling realistic acquisition protocols and scanners for simulated volumes.

The brain protocol tuples (acquisition label, contrast, sequence, TR, TE, TI, flip angle, site code) are drawn from the
empirical distribution of the real fastMRI brain validation metadata (file-level counts shipped in
``utils/simulation/data/fastmri_brain_acquisitions.csv``, derived from the ContextMRI ``metadata_val.csv``), or from any
metadata CSV with the reference columns. Field strength, vendor and model come from a scanner table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.metadata import ACQUISITION_TO_CONTRAST
from utils.simulation.tissue import Acquisition

DEFAULT_ACQUISITION_TABLE = Path(__file__).resolve().parent / "data" / "fastmri_brain_acquisitions.csv"

BRAIN_ACQUISITIONS: tuple[str, ...] = ("AXT1", "AXT1PRE", "AXT1POST", "AXT2", "AXFLAIR")
_PROTOCOL_NAME: dict[str, str] = {
    "AXT1": "AX T1",
    "AXT1PRE": "AX T1 PRE",
    "AXT1POST": "AX T1 POST",
    "AXT2": "AX T2",
    "AXFLAIR": "AX FLAIR",
}


@dataclass(frozen=True)
class Scanner:
    """A scanner as the ISMRMRD header describes it.

    Attributes:
        vendor: ``systemVendor`` string.
        model: ``systemModel`` string.
        field_strength: ``systemFieldStrength_T`` (the exact value scanners write, e.g. 1.494).
        coil_name: prefix of the ``coilLabel/coilName`` entries.
        serial: a device serial (used in measurement IDs and UIDs).
    """

    vendor: str
    model: str
    field_strength: float
    coil_name: str
    serial: int


SCANNERS: tuple[Scanner, ...] = (
    Scanner("SIEMENS", "Aera", 1.494, "HeadNeck_20", 41964),
    Scanner("SIEMENS", "Avanto", 1.494, "HeadMatrix", 26501),
    Scanner("SIEMENS", "Skyra", 2.89362, "HeadNeck_20_TCS", 45160),
    Scanner("SIEMENS", "Prisma_fit", 2.89362, "HeadNeck_64", 67022),
    Scanner("SIEMENS", "Biograph_mMR", 2.89362, "HeadNeck_MRPET", 51025),
    Scanner("GE MEDICAL SYSTEMS", "SIGNA Premier", 3.0, "48HAP", 30211),
    Scanner("GE MEDICAL SYSTEMS", "Optima MR450w", 1.5, "HNS Head", 15044),
    Scanner("Philips Medical Systems", "Ingenia", 3.0, "dS Head", 42117),
    Scanner("Philips Medical Systems", "Achieva", 1.5, "SENSE-Head-8", 17390),
)

INSTITUTIONS: tuple[str, ...] = ("TH RADIOLOGY", "RADIOLOGY NORTH", "IMAGING CENTER", "NEURORADIOLOGY")


@dataclass(frozen=True)
class Protocol:
    """A sampled series: the contrast-defining acquisition plus the bookkeeping the header reports.

    Attributes:
        acq: contrast-defining parameters (:class:`~utils.simulation.tissue.Acquisition`).
        scanner: the scanner.
        site: fastMRI-style site code used in the file name (e.g. 201).
        protocol_name: ``measurementInformation/protocolName``.
        echo_spacing: ms.
        echo_train_length: TSE echo train length, ``None`` for gradient echo.
        institution: ``institutionName``.
    """

    acq: Acquisition
    scanner: Scanner
    site: int
    protocol_name: str
    echo_spacing: float
    echo_train_length: int | None
    institution: str


@functools.lru_cache(maxsize=4)
def load_acquisition_table(path: str | None = None) -> pd.DataFrame:
    """File-level protocol tuples with counts.

    Args:
        path: ``None`` for the shipped table, or a metadata CSV with the reference columns (``filename, contrast,
            sequence, TR, TE, TI, flip_angle``; one row per slice): it is reduced to one row per file.

    Returns:
        DataFrame with columns ``acquisition, contrast, sequence, TR, TE, TI, flip_angle, site, count``.
    """
    if path is None:
        return pd.read_csv(DEFAULT_ACQUISITION_TABLE)
    df = pd.read_csv(path)
    if "count" in df.columns and "acquisition" in df.columns:
        return df
    files = df.drop_duplicates("filename").copy()
    parts = files["filename"].str.split("_")
    files["acquisition"] = parts.str[2]
    files["site"] = pd.to_numeric(parts.str[3], errors="coerce").fillna(200).astype(int)
    cols = ["acquisition", "contrast", "sequence", "TR", "TE", "TI", "flip_angle", "site"]
    table = files.groupby(cols, dropna=False).size().reset_index(name="count")
    return table[table["acquisition"].isin(BRAIN_ACQUISITIONS)].reset_index(drop=True)


def sample_protocol(
    rng: np.random.Generator,
    acquisitions: tuple[str, ...] | None = None,
    vendors: tuple[str, ...] = ("SIEMENS",),
    field_strengths: tuple[float, ...] = (1.5, 3.0),
    table_path: str | None = None,
) -> Protocol:
    """Draw one brain series from the real protocol distribution and a scanner.

    Args:
        rng: the generator (the only randomness used).
        acquisitions: restrict to these acquisition labels (``None`` = all, with their real frequencies).
        vendors: vendor prefixes allowed (case-insensitive match on the start of :attr:`Scanner.vendor`).
        field_strengths: nominal fields allowed (1.5 and/or 3.0).
        table_path: see :func:`load_acquisition_table`.

    Returns:
        The :class:`Protocol`.

    Raises:
        ValueError: if the restrictions leave nothing to sample.
    """
    table = load_acquisition_table(table_path)
    if acquisitions is not None:
        table = table[table["acquisition"].isin(acquisitions)]
    if table.empty:
        raise ValueError(f"no protocol matches acquisitions={acquisitions}")
    w = table["count"].to_numpy(dtype=np.float64)
    row = table.iloc[int(rng.choice(len(table), p=w / w.sum()))]

    vend = tuple(v.lower() for v in vendors)
    scanners = [
        s
        for s in SCANNERS
        if s.vendor.lower().startswith(vend) and any(abs(s.field_strength - b) < 0.2 for b in field_strengths)
    ]
    if not scanners:
        raise ValueError(f"no scanner for vendors={vendors} field_strengths={field_strengths}")
    scanner = scanners[int(rng.integers(len(scanners)))]

    label = str(row["acquisition"])
    sequence = str(row["sequence"])
    ti = None if pd.isna(row["TI"]) else float(row["TI"])
    acq = Acquisition(
        acquisition=label,
        contrast=ACQUISITION_TO_CONTRAST.get(label, str(row["contrast"])),
        sequence=sequence,
        tr=float(row["TR"]),
        te=float(row["TE"]),
        ti=ti,
        flip_angle=float(row["flip_angle"]),
        field_strength=scanner.field_strength,
        post_contrast=label == "AXT1POST",
        # Real fastMRI headers carry a placeholder TI (100/300 ms) for non-IR series: only FLAIR is inverted.
        inversion=label == "AXFLAIR",
    )
    tse = sequence == "TurboSpinEcho"
    if tse:
        echo_spacing = round(float(rng.uniform(8.0, 12.5)), 2)
        etl = int(rng.choice([3, 4])) if label.startswith("AXT1") else int(rng.choice([14, 16, 18]))
    else:
        echo_spacing = round(float(rng.uniform(4.0, 7.0)), 2)
        etl = None
    suffix = ("", "_FBB", "_FBB_256")[int(rng.integers(3))]
    return Protocol(
        acq=acq,
        scanner=scanner,
        site=int(row["site"]),
        protocol_name=_PROTOCOL_NAME.get(label, label) + suffix,
        echo_spacing=echo_spacing,
        echo_train_length=etl,
        institution=INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))],
    )

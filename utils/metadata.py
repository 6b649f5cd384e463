"""Metadata records, the ContextMRI prompt, and ``metadata_stats.json``.

A *record* is the metadata of one slice: a ``dict`` keyed by the metadata CSV's column names, plus ``slice_number``
(the name the stats files use for ``slice``). Numbers are ``float`` or ``None``, text is ``str`` or ``None``, and
``pathology`` is a ``list[str]`` of annotated labels (duplicates kept: the prompt counts them; empty list = none).
Missing values stay missing (``None``); nothing is invented.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

#: Columns of the reference metadata CSV (ContextMRI / Metadata Matters), in their order.
REFERENCE_COLUMNS = ["anatomy", "filename", "slice", "contrast", "pathology", "sequence", "TR", "TE", "TI", "flip_angle"]
#: Columns this project adds from the ISMRMRD header (cardiac CSVs add ``view`` and ``frame``).
EXTRA_COLUMNS = [
    "field_strength", "vendor", "scanner_model", "protocol_name", "num_coils", "matrix_x", "matrix_y", "fov_x", "fov_y",
]
CARDIAC_COLUMNS = ["view", "frame"]
#: Cardiac CSVs we write end with ``file_index`` (= slice * num_frames + frame): the ``{idx:03d}.npy`` of the row.

NUMERIC_COLUMNS = {
    "slice", "TR", "TE", "TI", "flip_angle", "field_strength", "num_coils", "matrix_x", "matrix_y", "fov_x", "fov_y",
    "frame", "file_index",
}
MULTI_LABEL_COLUMNS = {"pathology"}
#: Strings that mean "no value" in the CSVs found in the wild.
_MISSING_STRINGS = {"", "nan", "none", "null", "n/a", "na"}

#: Clean contrast labels from the fastMRI ``acquisition`` attribute (REFERENCE.md §1).
ACQUISITION_TO_CONTRAST = {
    "CORPD_FBK": "PD",
    "CORPDFS_FBK": "PDFS",
    "AXT1": "T1",
    "AXT1PRE": "T1 pre-contrast",
    "AXT1POST": "T1 post-contrast",
    "AXT2": "T2",
    "AXFLAIR": "FLAIR",
}

#: Default keys of the fine-grained embedder: the reference's plus field strength and scanner.
DEFAULT_CATEGORICAL_KEYS = ["anatomy", "contrast", "sequence", "pathology", "vendor", "scanner_model"]
DEFAULT_NUMERICAL_KEYS = ["slice_number", "TR", "TE", "TI", "flip_angle", "field_strength"]


def is_missing(value: Any) -> bool:
    """True for ``None``, NaN and the usual "missing" strings."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in _MISSING_STRINGS:
        return True
    return False


def parse_pathology(value: Any) -> list[str]:
    """Parse a pathology cell (labels joined by ``", "``, or a list) into a list of stripped labels."""
    if isinstance(value, (list, tuple)):
        labels = [str(v).strip() for v in value]
    elif is_missing(value):
        return []
    else:
        labels = [part.strip() for part in str(value).split(",")]
    return [label for label in labels if label and not is_missing(label)]


def _to_float(value: Any) -> float | None:
    if is_missing(value):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def record_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Turn one CSV row (a mapping of column -> raw value) into a typed record."""
    record: dict[str, Any] = {}
    for key, value in row.items():
        if key in MULTI_LABEL_COLUMNS:
            record[key] = parse_pathology(value)
        elif key in NUMERIC_COLUMNS:
            record[key] = _to_float(value)
        else:
            record[key] = None if is_missing(value) else str(value).strip()
    record.setdefault("pathology", [])
    if "slice" in record:
        record["slice_number"] = record["slice"]
    return record


def load_metadata_csv(path: str | Path) -> pd.DataFrame:
    """Read a metadata CSV; every column as text so that nothing is silently coerced (e.g. ``"null"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"filename", "slice"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: metadata CSV lacks required column(s) {sorted(missing)}")
    if df.empty:
        raise ValueError(f"{path}: metadata CSV has no rows")
    return df


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metadata CSV."""
    return [record_from_row(row) for row in load_metadata_csv(path).to_dict(orient="records")]


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def build_prompt(record: Mapping[str, Any], include_sequence: bool = True) -> str:
    """The ContextMRI text prompt of a record.

    Template: ``"{anatomy}, Slice {slice}, {contrast}"``, then ``", Pathology: {n} {label}, ..."`` if any label (``n``
    counts the annotations of that label on the slice), then ``", Sequence: {seq}, TR: {TR}, TE: {TE}, TI: {TI},
    Flip angle: {fa}"`` when ``include_sequence``. Missing items are left out rather than written as ``nan``.

    Example: ``knee, Slice 20, PDFS, Sequence: TurboSpinEcho, TR: 3120, TE: 33, TI: 100, Flip angle: 140``.
    """
    parts: list[str] = []
    if not is_missing(record.get("anatomy")):
        parts.append(str(record["anatomy"]))
    slice_value = record.get("slice", record.get("slice_number"))
    if _to_float(slice_value) is not None:
        parts.append(f"Slice {_fmt_number(float(slice_value))}")
    if not is_missing(record.get("contrast")):
        parts.append(str(record["contrast"]))
    labels = parse_pathology(record.get("pathology"))
    if labels:
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        parts.append("Pathology: " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    if include_sequence:
        if not is_missing(record.get("sequence")):
            parts.append(f"Sequence: {record['sequence']}")
        for key, name in (("TR", "TR"), ("TE", "TE"), ("TI", "TI"), ("flip_angle", "Flip angle")):
            value = _to_float(record.get(key))
            if value is not None:
                parts.append(f"{name}: {_fmt_number(value)}")
    return ", ".join(parts)


def compute_metadata_stats(
    records: Iterable[Mapping[str, Any]],
    categorical_keys: Iterable[str] = DEFAULT_CATEGORICAL_KEYS,
    numerical_keys: Iterable[str] = DEFAULT_NUMERICAL_KEYS,
) -> dict[str, Any]:
    """Build a ``metadata_stats.json`` dict: sorted vocabularies for categorical keys, ``{min, max}`` for numerical.

    Keys with no observed value are still written (empty vocabulary, or ``min = max = 0``) so the embedder has a slot
    for them; their values will always map to the learned "empty" embedding.
    """
    categorical_keys = list(categorical_keys)
    numerical_keys = list(numerical_keys)
    vocab: dict[str, set[str]] = {k: set() for k in categorical_keys}
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    for record in records:
        for key in categorical_keys:
            value = record.get(key)
            if key in MULTI_LABEL_COLUMNS:
                vocab[key].update(parse_pathology(value))
            elif not is_missing(value):
                vocab[key].add(str(value))
        for key in numerical_keys:
            value = _to_float(record.get(key))
            if value is not None:
                lows[key] = min(lows.get(key, value), value)
                highs[key] = max(highs.get(key, value), value)
    stats: dict[str, Any] = {}
    for key in categorical_keys:
        stats[key] = sorted(vocab[key])
    for key in numerical_keys:
        stats[key] = {"min": float(lows.get(key, 0.0)), "max": float(highs.get(key, 0.0))}
    return stats


def save_metadata_stats(stats: Mapping[str, Any], path: str | Path) -> None:
    """Write stats as indented JSON."""
    Path(path).write_text(json.dumps(stats, indent=2) + "\n")


def load_metadata_stats(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``metadata_stats.json``: every value is a list or a ``{"min", "max"}`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata stats file not found: {path}")
    stats = json.loads(path.read_text())
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{path}: expected a non-empty JSON object")
    for key, value in stats.items():
        ok = isinstance(value, list) or (isinstance(value, dict) and {"min", "max"} <= set(value))
        if not ok:
            raise ValueError(f"{path}: key {key!r} must map to a vocabulary list or {{'min', 'max'}}, got {value!r}")
    return stats


#: A typical fastMRI brain protocol per contrast (the most frequent tuple of the real validation metadata).
TYPICAL_BRAIN_PROTOCOLS: dict[str, dict[str, Any]] = {
    "T1": {"sequence": "TurboSpinEcho", "TR": 500.0, "TE": 9.0, "TI": 100.0, "flip_angle": 140.0},
    "T1 pre-contrast": {"sequence": "Flash", "TR": 250.0, "TE": 2.0, "TI": 300.0, "flip_angle": 70.0},
    "T1 post-contrast": {"sequence": "Flash", "TR": 250.0, "TE": 2.0, "TI": 300.0, "flip_angle": 70.0},
    "T2": {"sequence": "TurboSpinEcho", "TR": 5120.0, "TE": 103.0, "TI": 100.0, "flip_angle": 150.0},
    "FLAIR": {"sequence": "TurboSpinEcho", "TR": 9000.0, "TE": 81.0, "TI": 2500.0, "flip_angle": 150.0},
}
#: The contrast whose protocol most contradicts each contrast (T1-weighted <-> T2-weighted).
_MISMATCH = {"T1": "T2", "T1 pre-contrast": "T2", "T1 post-contrast": "FLAIR", "T2": "T1", "FLAIR": "T1"}


def mismatched_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with contrast, sequence, TR, TE, TI and flip angle of a *different* contrast.

    Used to test whether a model uses its metadata at all: a model that ignores it reconstructs the same image either
    way. T1-weighted records get a T2 protocol and vice versa (FLAIR -> T1, T1 post-contrast -> FLAIR); other anatomies'
    records (no brain contrast) are returned unchanged apart from a copied dict.
    """
    out = dict(record)
    target = _MISMATCH.get(str(record.get("contrast")))
    if target is None:
        return out
    out["contrast"] = target
    out.update(TYPICAL_BRAIN_PROTOCOLS[target])
    return out

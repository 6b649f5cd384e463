"""Metadata records, the ContextMRI prompt, and ``metadata_stats.json``.

A *record* is the metadata of one slice: a ``dict`` keyed by the metadata CSV's column names, plus ``slice_number``
(the name the stats files use for ``slice``). Numbers are ``float`` or ``None``, text is ``str`` or ``None``, and
``pathology`` is a ``list[str]`` of annotated labels (duplicates kept: the prompt counts them; empty list = none).
Missing values stay missing (``None``); nothing is invented.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from utils.files import write_json

logger = logging.getLogger(__name__)

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

#: Clean contrast labels from the fastMRI ``acquisition`` attribute (docs/formats.md).
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


#: Pathology cells that state an explicit negative finding (compared case-insensitively). Such a cell is "annotated,
#: nothing found" and has its own learned row in the embedder; an empty or missing cell is "not annotated" (unknown).
#: In the pathology column ``"none"`` is read as this explicit value, not as missing as in the other columns.
NO_FINDING_STRINGS = frozenset({"no finding", "no findings", "no pathology", "none"})
#: The cell value this project writes for an explicit negative finding.
NO_FINDING = "no finding"


def _is_no_finding(text: str) -> bool:
    return text.strip().lower() in NO_FINDING_STRINGS


def parse_pathology_cell(value: Any) -> list[str] | None:
    """Parse a pathology cell into ``None`` (unknown), ``[]`` (explicit "no finding") or a list of labels.

    * ``None``, NaN, ``""`` and the missing strings (``"null"``, ``"n/a"``, ...) mean *not annotated*: ``None``.
      Unannotated data (cardiac files, fastMRI without fastMRI+) must not look like a confident "healthy".
    * a :data:`NO_FINDING_STRINGS` value (``"no finding"``, ``"none"``, ...) means *annotated, nothing found*: ``[]``.
    * otherwise labels joined by ``", "`` (duplicates kept: the prompt counts them); no-finding words among real
      labels are dropped. A list or tuple is taken as already parsed (``[]`` = explicit no finding).
    """
    if isinstance(value, (list, tuple)):
        labels = [str(v).strip() for v in value]
        return [label for label in labels if label and not is_missing(label) and not _is_no_finding(label)]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if _is_no_finding(text):
        return []
    if is_missing(text):
        return None
    parts = [part.strip() for part in text.split(",")]
    if any(_is_no_finding(p) for p in parts if p):
        labels = [p for p in parts if p and not is_missing(p) and not _is_no_finding(p)]
        return labels
    labels = [p for p in parts if p and not is_missing(p)]
    return labels or None


def parse_pathology(value: Any) -> list[str]:
    """The labels of a pathology cell or list (``[]`` both for "unknown" and for "no finding").

    For label sets (vocabularies, validation); use :func:`parse_pathology_cell` where unknown and "no finding" must
    stay apart.
    """
    return parse_pathology_cell(value) or []


#: Plausible ranges ``(low, high, low_exclusive)`` of numeric columns (times in ms, angles in degrees, field in T,
#: FOV in mm). A value outside its range cannot be a real acquisition parameter (a TR of -1e30 ms, a 300 T magnet), so
#: it is read as missing (with a warning per file and column) rather than stretching the stats range or a prompt.
NUMERIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "TR": (0.0, 1e5, False),
    "TE": (0.0, 1e4, False),
    "TI": (0.0, 1e5, False),
    "flip_angle": (0.0, 360.0, False),
    "field_strength": (0.0, 20.0, True),
    "num_coils": (1.0, 1024.0, False),
    "matrix_x": (1.0, 1e5, False),
    "matrix_y": (1.0, 1e5, False),
    "fov_x": (0.0, 1e4, True),
    "fov_y": (0.0, 1e4, True),
    "slice": (0.0, 1e6, False),
    "slice_number": (0.0, 1e6, False),
    "frame": (0.0, 1e6, False),
    "file_index": (0.0, 1e6, False),
}


def _to_float(value: Any) -> float | None:
    """A finite float, or ``None`` for missing, unparsable (``"abc"``) and non-finite (NaN, ±inf) values."""
    if is_missing(value):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def clean_number(key: str, value: Any) -> tuple[float | None, str | None]:
    """Parse a numeric metadata value and check it against :data:`NUMERIC_RANGES`.

    Returns:
        ``(number, problem)``: ``number`` is a finite in-range float or ``None``; ``problem`` says why a value that was
        present was dropped (``None`` when the value was fine or simply missing).
    """
    if is_missing(value):
        return None, None
    number = _to_float(value)
    if number is None:
        return None, f"{value!r} is not a finite number"
    if key in NUMERIC_RANGES:
        low, high, low_open = NUMERIC_RANGES[key]
        if number > high or number < low or (low_open and number == low):
            return None, f"{value!r} is outside the plausible range {'(' if low_open else '['}{low:g}, {high:g}]"
    return number, None


def clean_numbers(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` with every numeric column (:data:`NUMERIC_COLUMNS`) passed through :func:`clean_number`.

    Returns:
        ``(cleaned copy, problems)``: one ``"{key}: {why} -> missing"`` line per dropped value.
    """
    out = dict(values)
    problems = []
    for key, value in values.items():
        if key in NUMERIC_COLUMNS:
            out[key], problem = clean_number(key, value)
            if problem is not None:
                problems.append(f"{key}: {problem} -> missing")
    return out, problems


def record_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Turn one CSV row (a mapping of column -> raw value) into a typed record.

    Numeric columns that are unparsable, non-finite or implausible (:func:`clean_number`) become ``None``;
    :func:`load_metadata_csv` warns about them once per file and column.
    """
    record: dict[str, Any] = {}
    for key, value in row.items():
        if key in MULTI_LABEL_COLUMNS:
            record[key] = parse_pathology_cell(value)
        elif key in NUMERIC_COLUMNS:
            record[key] = clean_number(key, value)[0]
        else:
            record[key] = None if is_missing(value) else str(value).strip()
    record.setdefault("pathology", None)  # no pathology column: not annotated (unknown), not "no finding"
    if "slice" in record:
        record["slice_number"] = record["slice"]
    return record


def numeric_problems(df: pd.DataFrame) -> dict[str, list[str]]:
    """Column -> the distinct raw values of a metadata table that :func:`record_from_row` will read as missing."""
    out: dict[str, list[str]] = {}
    for key in df.columns:
        if key in NUMERIC_COLUMNS:
            bad = sorted({str(v) for v in df[key] if clean_number(key, v)[1] is not None})
            if bad:
                out[key] = bad
    return out


def load_metadata_csv(path: str | Path) -> pd.DataFrame:
    """Read a metadata CSV; every column as text so that nothing is silently coerced (e.g. ``"null"``)."""
    path = Path(path)
    if not path.is_file():
        from utils.data_hints import missing_csv_hint

        raise FileNotFoundError(f"metadata CSV not found: {path}{missing_csv_hint(path)}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"filename", "slice"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: metadata CSV lacks required column(s) {sorted(missing)}")
    if df.empty:
        raise ValueError(f"{path}: metadata CSV has no rows")
    for key, bad in numeric_problems(df).items():  # one line per file and column, not per row
        shown = ", ".join(repr(v) for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
        logger.warning("%s: column %s: unusable value(s) %s read as missing", path, key, shown)
    return df


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metadata CSV."""
    return [record_from_row(row) for row in load_metadata_csv(path).to_dict(orient="records")]


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: Metadata keys the ContextMRI prompt can state, in prompt order (``slice`` is accepted for ``slice_number``).
PROMPT_FIELDS: tuple[str, ...] = ("anatomy", "slice_number", "contrast", "pathology", "sequence", "TR", "TE", "TI",
                                  "flip_angle")
_FIELD_ALIASES = {"slice": "slice_number"}


def prompt_field(key: str) -> str | None:
    """The :data:`PROMPT_FIELDS` name of a metadata key (``"slice"`` -> ``"slice_number"``), or ``None``."""
    key = _FIELD_ALIASES.get(key, key)
    return key if key in PROMPT_FIELDS else None


def build_prompt(
    record: Mapping[str, Any], include_sequence: bool = True, omit: Iterable[str] = ()
) -> str:
    """The ContextMRI text prompt of a record.

    Template: ``"{anatomy}, Slice {slice}, {contrast}"``, then ``", Pathology: {n} {label}, ..."`` if any label (``n``
    counts the annotations of that label on the slice; an explicit "no finding" record says ``", Pathology: none"``;
    an unknown pathology says nothing), then ``", Sequence: {seq}, TR: {TR}, TE: {TE}, TI: {TI}, Flip angle: {fa}"``
    when ``include_sequence``. Missing items are left out rather than written as ``nan``.

    Args:
        record: a metadata record (:func:`record_from_row`).
        include_sequence: write the sequence part.
        omit: metadata keys left out of the prompt as if they were missing (a dropped attribute must not be readable
            from the text): any of :data:`PROMPT_FIELDS` (``"slice"`` counts as ``"slice_number"``); other keys are
            ignored. Omitting every field gives ``""``, the unconditional prompt.

    Example: ``knee, Slice 20, PDFS, Sequence: TurboSpinEcho, TR: 3120, TE: 33, TI: 100, Flip angle: 140``.
    """
    skip = {prompt_field(k) for k in omit} - {None}
    parts: list[str] = []
    if "anatomy" not in skip and not is_missing(record.get("anatomy")):
        parts.append(str(record["anatomy"]))
    slice_value = record.get("slice", record.get("slice_number"))
    if "slice_number" not in skip and _to_float(slice_value) is not None:
        parts.append(f"Slice {_fmt_number(float(slice_value))}")
    if "contrast" not in skip and not is_missing(record.get("contrast")):
        parts.append(str(record["contrast"]))
    labels = None if "pathology" in skip else parse_pathology_cell(record.get("pathology"))
    if labels:
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        parts.append("Pathology: " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    elif labels == []:
        parts.append("Pathology: none")
    if include_sequence:
        if "sequence" not in skip and not is_missing(record.get("sequence")):
            parts.append(f"Sequence: {record['sequence']}")
        for key, name in (("TR", "TR"), ("TE", "TE"), ("TI", "TI"), ("flip_angle", "Flip angle")):
            value = _to_float(record.get(key))
            if key not in skip and value is not None:
                parts.append(f"{name}: {_fmt_number(value)}")
    return ", ".join(parts)


def rebuild_prompt(prompt: str, record: Mapping[str, Any], omit: Iterable[str]) -> str:
    """``prompt`` with the fields ``omit`` taken out, rebuilt from ``record``.

    ``prompt`` must be the record's own prompt, with or without the sequence part (what :class:`utils.data.
    MRISliceDataset` gives), or ``""``; the same variant is rebuilt without the omitted fields.

    Raises:
        ValueError: a prompt that is not built from ``record`` (its fields cannot be located to remove them).
    """
    omit = list(omit)
    if prompt == "" or not {prompt_field(k) for k in omit} - {None}:
        return prompt
    for include_sequence in (True, False):
        if prompt == build_prompt(record, include_sequence):
            return build_prompt(record, include_sequence, omit=omit)
    raise ValueError(
        f"cannot remove {sorted(omit)} from the prompt {prompt!r}: it is not the ContextMRI prompt of its record "
        "(build prompts with utils.metadata.build_prompt, or pass prompts=None to build them from the records)"
    )


def compute_metadata_stats(
    records: Iterable[Mapping[str, Any]],
    categorical_keys: Iterable[str] = DEFAULT_CATEGORICAL_KEYS,
    numerical_keys: Iterable[str] = DEFAULT_NUMERICAL_KEYS,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    """Build a ``metadata_stats.json`` dict: sorted vocabularies for categorical keys, ``{min, max}`` for numerical.

    Only finite, plausible numbers (:func:`clean_number`) enter a range, so a stray ``inf`` or ``-1e30`` can never
    become a bound. Keys with no such value are still written (empty vocabulary, or ``min = max = 0``) so the embedder
    has a slot for them; their values will always map to the learned "empty" embedding.

    Args:
        records: metadata records (e.g. :func:`load_records`).
        categorical_keys, numerical_keys: the keys to describe.
        problems: if given, receives one line per numerical key with ignored values or with no usable value at all.
    """
    categorical_keys = list(categorical_keys)
    numerical_keys = list(numerical_keys)
    vocab: dict[str, set[str]] = {k: set() for k in categorical_keys}
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    ignored: dict[str, int] = {}
    for record in records:
        for key in categorical_keys:
            value = record.get(key)
            if key in MULTI_LABEL_COLUMNS:
                vocab[key].update(parse_pathology(value))
            elif not is_missing(value):
                vocab[key].add(str(value))
        for key in numerical_keys:
            value, problem = clean_number(key, record.get(key))
            if problem is not None:
                ignored[key] = ignored.get(key, 0) + 1
            if value is not None:
                lows[key] = min(lows.get(key, value), value)
                highs[key] = max(highs.get(key, value), value)
    stats: dict[str, Any] = {}
    for key in categorical_keys:
        stats[key] = sorted(vocab[key])
    for key in numerical_keys:
        stats[key] = {"min": float(lows.get(key, 0.0)), "max": float(highs.get(key, 0.0))}
        if problems is not None and key in ignored:
            problems.append(f"{key}: {ignored[key]} non-finite or implausible value(s) ignored")
        if problems is not None and key not in lows:
            problems.append(f"{key}: no finite value: written as the empty slot min = max = 0 (always 'missing')")
    return stats


def save_metadata_stats(stats: Mapping[str, Any], path: str | Path) -> None:
    """Write stats as indented strict JSON (atomically); refuses a non-finite or inverted bound."""
    _check_stats(stats, str(path))
    write_json(path, stats)


def _check_stats(stats: Any, where: str) -> None:
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{where}: expected a non-empty JSON object")
    for key, value in stats.items():
        ok = isinstance(value, list) or (isinstance(value, dict) and {"min", "max"} <= set(value))
        if not ok:
            raise ValueError(f"{where}: key {key!r} must map to a vocabulary list or {{'min', 'max'}}, got {value!r}")
        if isinstance(value, dict):
            bounds = [value["min"], value["max"]]
            # bool is an int subclass; null is what strict JSON writers make of inf/NaN
            if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds):
                raise ValueError(f"{where}: key {key!r} has a non-finite or non-numeric bound {value!r}; rebuild the "
                                 "stats with make_metadata_stats.py")
            if bounds[0] > bounds[1]:
                raise ValueError(f"{where}: key {key!r} has min > max ({value!r}); rebuild the stats with "
                                 "make_metadata_stats.py")


def load_metadata_stats(stats: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Read (from a ``metadata_stats.json`` path) or take (a dict) and validate metadata stats.

    Every value must be a list or a ``{"min", "max"}`` mapping with finite bounds ``min <= max`` (an ``inf`` bound
    would turn every normalised value into NaN from the first step). The one loader of the project: the embedder
    (:meth:`models.condition_embedder.MetadataConditionEmbedder.from_stats`) reads its stats through it too.

    Returns:
        a new dict (a dict given is copied, not modified).

    Raises:
        FileNotFoundError: the path is not a file.
        ValueError: not valid JSON, or a value of the wrong shape.
    """
    if isinstance(stats, Mapping):
        out = dict(stats)
        _check_stats(out, "metadata stats")
        return out
    path = Path(stats)
    if not path.is_file():
        raise FileNotFoundError(f"metadata stats file not found: {path}")
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    _check_stats(out, str(path))
    return out


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

"""File writing that a killed run cannot half-finish, JSON that is always valid, and content hashes.

Every result the project writes goes through these helpers:

- ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_save_npy`` write to a temporary file in the target's own
  folder and then ``os.replace`` it (atomic on POSIX), so a reader sees the old file or the new one, never a part.
  Temporary names are ``.{name}.{pid}.tmp``; ``remove_stale_tmp`` deletes those a killed run left behind.
- ``to_json`` refuses nothing and lies about nothing: non-finite floats (NaN, ±inf) become ``null`` and strict
  ``allow_nan=False`` guarantees no ``NaN``/``Infinity`` token ever reaches a file (those are not JSON).
- ``sha256_file`` / ``sha256_json`` identify weights, configs and settings by content.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def tmp_name(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (same folder, hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def remove_stale_tmp(folders: Iterable[Path]) -> int:
    """Delete the ``.*.tmp`` files a killed run left directly in ``folders``; returns how many."""
    removed = 0
    for folder in folders:
        if Path(folder).is_dir():
            for tmp in Path(folder).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (also inside dicts, lists, tuples, numpy scalars/arrays) replaced by
    ``None``, so it can be written as strict JSON."""
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(obj: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj``: non-finite floats become ``null`` (never ``NaN``/``Infinity``)."""
    return json.dumps(finite_or_none(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (see :func:`to_json`)."""
    atomic_write_text(path, to_json(obj, indent=indent, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj``'s canonical JSON (sorted keys, no whitespace): equal settings give equal hashes."""
    text = json.dumps(finite_or_none(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

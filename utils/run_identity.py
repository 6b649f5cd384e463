"""The *identity* of a reconstruction run, and the output folder it owns (both the ``--data_root`` and the ``--raw_dir``
path use it).

Everything that changes a result (the method and its settings, mask family / R / centre fraction / noise σ,
samples, seed, guidance, metadata changes, precision -- :func:`utils.recon_settings.result_settings`, or
:meth:`utils.raw_reconstruction.RawReconSettings.result_settings` for raw runs; the model's files; the stats file; the
data: CSVs and the list of slices, or the raw files) is hashed into a fingerprint (:func:`run_fingerprint`) that is
stored as ``run.json`` in the output folder. A folder is resumed only when its ``run.json`` holds the same hash; the
default folder name is a readable tag plus the first 8 hex digits of the hash (``dds_steps100_w1_n1-3fa9c2d1``), so
different settings never share a folder. An explicit tag whose folder holds another fingerprint is refused with the
differing fields named (:class:`RunMismatchError`), unless ``overwrite=True`` clears the old results first
(:func:`clear_results`: only what a run writes). Settings that cannot change a result (batch size, PNGs, progress
bars, the shard range) are not part of the fingerprint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from utils.files import sha256_file, sha256_json, write_json
from utils.recon_settings import ReconSettings, readable_tag, result_settings

# The fingerprint's format: a change here changes every hash (existing folders would no longer resume).
FINGERPRINT_VERSION = 1
RUN_FILE = "run.json"
# What a ``--data_root`` run writes into its folder (cleared by ``overwrite``; nothing else in the folder is touched).
RESULT_ENTRIES = ("rows", "recon", "std", "png", "summary.json", "summary.csv", "slices.csv", "settings.json",
                  "command.json", RUN_FILE)


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


def clear_results(folder: str | Path, entries: Sequence[str] = RESULT_ENTRIES) -> None:
    """Delete what a run writes into ``folder`` (``entries``: :data:`RESULT_ENTRIES` for a ``--data_root`` run,
    :data:`utils.raw_reconstruction.RAW_RESULT_ENTRIES` for a raw one), nothing else."""
    folder = Path(folder)
    for entry in entries:
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

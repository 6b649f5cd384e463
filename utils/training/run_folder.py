"""One output folder, one run: the identity check at start, ``--overwrite_output_dir``, and sealing an export made
before completion records existed. The record itself and its verification at load are in :mod:`models.loading`.

Layout facts this module relies on:

* ``checkpoint-{step}/run_config.json`` is the config of the run that wrote the checkpoint;
* ``{output_dir}/run_config.json`` is written only by the final export (with the model files);
* ``{output_dir}/weights.sha256.json`` is the export's completion record, written last: without it the folder holds
  no usable model (training still running, killed, or killed during the export).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.loading import (
    EXPORT_ITEMS,
    EXPORT_RECORD_NAME,
    EXPORT_TMP_NAME,
    RECORD_FORMAT,
    RUN_CONFIG_NAME,
    read_json_object,
)
from utils.files import sha256_file, write_json
from utils.training.checkpointing import list_checkpoints, read_checkpoint_config
from utils.training.config import ConfigError, describe_differences, run_identity_differences

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# the identity check at the start of a run
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class FolderRun:
    """What an output folder already holds.

    Attributes:
        checkpoints: ``checkpoint-*`` folders (complete or not).
        export_items: model files/folders of a (possibly partial) export.
        configs: ``(where, config)`` of every stored run config (top-level and per checkpoint).
        unknown: things that belong to a run whose config is unknown (no ``run_config.json`` to compare).
    """

    checkpoints: list[Path] = field(default_factory=list)
    export_items: list[Path] = field(default_factory=list)
    configs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.checkpoints or self.export_items or self.configs)


def inspect_output_dir(output_dir: str | Path) -> FolderRun:
    """List the run artefacts in ``output_dir`` (other files are not a run and are left alone)."""
    root = Path(output_dir)
    found = FolderRun()
    if not root.is_dir():
        return found
    top = root / RUN_CONFIG_NAME
    top_config = read_json_object(top) if top.is_file() else None
    if top.is_file() and top_config is None:
        found.unknown.append(f"{top} (unreadable)")
    if top_config is not None:
        found.configs.append((str(top), top_config))
    found.export_items = [root / name for name in (*EXPORT_ITEMS, EXPORT_RECORD_NAME) if (root / name).exists()]
    for _, path in list_checkpoints(root):
        found.checkpoints.append(path)
        try:
            stored = read_checkpoint_config(path)
        except (OSError, ValueError):
            stored = None
        if stored is not None:
            found.configs.append((str(path / RUN_CONFIG_NAME), stored))
        elif top_config is None:  # a checkpoint of an older version: the top-level config is its best description
            found.unknown.append(f"{path.name} (no {RUN_CONFIG_NAME})")
    if found.export_items and not found.configs:  # a partial export belongs to the run its checkpoints describe
        found.unknown.append(f"a model without {RUN_CONFIG_NAME}")
    return found


def check_output_dir(output_dir: str | Path, current: Mapping[str, Any], overwrite: bool,
                     resume: str | None) -> bool:
    """Decide whether a run may use ``output_dir``; returns True when the folder's old run must be cleared first.

    A folder holding the same run (every stored config equal in the identity fields) is used as is, unless
    ``--overwrite_output_dir`` asks for a fresh start without ``--resume_from_checkpoint``.

    Raises:
        ConfigError: the folder holds another run (the message names the differing fields) and ``overwrite`` is off.
    """
    found = inspect_output_dir(output_dir)
    if found.empty and not found.unknown:
        return False
    differing: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, stored in found.configs:
        for name in run_identity_differences(stored, current):
            differing.setdefault(name, (where, stored))
    same_run = not differing and not found.unknown
    if same_run:
        return overwrite and resume is None
    if overwrite:
        return True
    if differing:
        names = sorted(differing)
        where = differing[names[0]][0]
        detail = "; ".join(describe_differences(differing[n][1], current, [n]) for n in names)
        what = f"another run that differs in {', '.join(names)}: {detail} (from {where})"
    else:
        what = "a run whose settings are unknown: " + ", ".join(found.unknown)
    raise ConfigError(f"--output_dir {output_dir} holds {what}. Use another --output_dir, or pass "
                      "--overwrite_output_dir to replace it")


def clear_run(output_dir: str | Path, logging_dir: str = "logs") -> list[str]:
    """Remove a previous run's checkpoints, model, record, logs and validation images (nothing else)."""
    root = Path(output_dir)
    names = [p.name for _, p in list_checkpoints(root)]
    names += [*EXPORT_ITEMS, RUN_CONFIG_NAME, EXPORT_RECORD_NAME, EXPORT_TMP_NAME, "validation", logging_dir, "logs"]
    removed = []
    record = root / EXPORT_RECORD_NAME
    record.unlink(missing_ok=True)  # first: from here on the old model no longer counts as one
    for name in dict.fromkeys(names):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists():
            path.unlink()
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# sealing an export made before completion records existed
# ---------------------------------------------------------------------------------------------------------------------

def seal_legacy_export(folder: str | Path) -> dict[str, Any]:
    """Write the completion record for a model exported before records existed (so it loads again).

    Only for a folder you know finished its export: the layout is checked (``run_config.json``, ``unet/`` or
    ``lora/``, ``scheduler/``) and every safetensors file must open, but a killed old export cannot be told apart
    from a finished one in general.

    Raises:
        ValueError: a record exists already, or the layout is incomplete or a weight file unreadable.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / EXPORT_RECORD_NAME).exists():
        raise ValueError(f"{folder} already has {EXPORT_RECORD_NAME}")
    missing = [name for name in (RUN_CONFIG_NAME, "scheduler/scheduler_config.json") if not (folder / name).is_file()]
    if not ((folder / "unet" / "config.json").is_file() or (folder / "lora").is_dir()):
        missing.append("unet/config.json or lora/")
    if missing:
        raise ValueError(f"{folder} is not a complete export: missing {', '.join(missing)}")
    staged = {name: folder / name for name in (*EXPORT_ITEMS, RUN_CONFIG_NAME) if (folder / name).exists()}
    files: dict[str, str] = {}
    for name, path in staged.items():
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                if file.suffix == ".safetensors":
                    try:
                        with safe_open(str(file), framework="pt") as handle:
                            handle.keys()
                    except Exception as err:  # noqa: BLE001 - any damage
                        raise ValueError(f"{file} unreadable: {err}") from err
                files[file.relative_to(folder).as_posix()] = sha256_file(file)
    record = {"format": RECORD_FORMAT, "global_step": None, "files": files, "sealed_legacy": True}
    write_json(folder / EXPORT_RECORD_NAME, record, sort_keys=True)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.training.run_folder --seal FOLDER``: record the hashes of a pre-record export."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=seal_legacy_export.__doc__.splitlines()[0])
    parser.add_argument("--seal", required=True, metavar="FOLDER", help="training output folder to seal")
    args = parser.parse_args(argv)
    try:
        record = seal_legacy_export(args.seal)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.seal}: recorded the sha256 of {len(record['files'])} files in {EXPORT_RECORD_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Resume checkpoints: ``checkpoint-{step}`` folders written by ``accelerator.save_state``, rotation, and resume lookup.

A checkpoint is the *resume state* (model, optimiser, LR schedule, EMA, step, RNG). The *inference snapshot* (EMA
weights in a form the reconstruction script loads) is written separately at the end (``utils.training.export``).

A checkpoint counts as complete only once ``training_state.json`` is in it; that file is written last, so a run killed
while saving leaves a folder that ``--resume_from_checkpoint latest`` skips (and rotation removes first). It also
records the sha256 of every other file of the checkpoint, and ``run_config.json`` (the run config) is saved beside
it, so ``latest`` can tell a damaged checkpoint (a truncated or flipped file: skipped with one warning line, the
previous complete one is used) and a checkpoint of another run (refused) from a good one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.loading import CHECKPOINT_PREFIX, RUN_CONFIG_NAME
from utils.files import sha256_file, write_json
from utils.training.config import ConfigError, describe_differences, run_identity_differences

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainingState:
    """Position of a run, saved with every checkpoint as ``training_state.json``.

    Attributes:
        global_step: optimiser steps done.
        epoch: the epoch being consumed.
        batch_in_epoch: batches of ``epoch`` consumed (per process) when the checkpoint was written.
        num_processes: processes of the run that wrote it (the data position is per process).
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    num_processes: int = 1

    def state_dict(self) -> dict:
        return asdict(self)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(step)}"


def list_checkpoints(output_dir: str | Path, complete_only: bool = False) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-{step}`` folders in ``output_dir``, oldest first (by step, not by name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (not complete_only or (path / STATE_FILE).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None, incoming_step: int | None = None) -> list[Path]:
    """Delete the oldest checkpoints so that, after saving ``incoming_step``, at most ``total_limit`` remain.

    Call it *before* saving. Incomplete folders (a save that was interrupted) go first; a folder with the incoming
    step's name is replaced by the new save and so does not count. Deletion errors are logged, not raised: a stale
    checkpoint must not kill a long run.

    Returns:
        the folders removed.
    """
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}")
    existing = [(s, p) for s, p in list_checkpoints(output_dir) if s != incoming_step]
    # Incomplete first, then oldest complete.
    existing.sort(key=lambda sp: ((sp[1] / STATE_FILE).is_file(), sp[0]))
    keep = total_limit - (1 if incoming_step is not None else 0)
    excess = max(0, len(existing) - keep)
    removed = []
    for _, path in existing[:excess]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError as err:  # e.g. a file held open on a network file system
            logger.warning("could not remove %s: %s", path, err)
    return removed


def _files_of(path: Path) -> list[Path]:
    """Every file of a checkpoint except the completion record and temporaries, sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != STATE_FILE and not p.name.endswith(".tmp"))


def mark_complete(path: str | Path, state: TrainingState) -> None:
    """Write ``training_state.json`` (last, so its presence means the save finished) with the sha256 of every other
    file of the checkpoint under ``"files"`` (relative POSIX path -> hex digest)."""
    path = Path(path)
    record: dict[str, Any] = state.state_dict()
    record["files"] = {p.relative_to(path).as_posix(): sha256_file(p) for p in _files_of(path)}
    write_json(path / STATE_FILE, record)


def write_checkpoint_config(path: str | Path, config: Mapping[str, Any]) -> None:
    """Save the run config into a checkpoint folder (before :func:`mark_complete`, which hashes it too)."""
    write_json(Path(path) / RUN_CONFIG_NAME, dict(config), sort_keys=True)


def read_checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """The run config stored in a checkpoint, or ``None`` (a checkpoint written before configs were stored)."""
    file = Path(path) / RUN_CONFIG_NAME
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (``None``: it is intact).

    Files listed in ``training_state.json`` are checked by sha256. A checkpoint written before hashes were recorded
    has its safetensors files opened instead (that catches truncation, not flipped bytes).
    """
    path = Path(path)
    try:
        record = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable ({err})"
    files = record.get("files")
    if isinstance(files, dict):
        for rel, digest in sorted(files.items()):
            file = path / rel
            if not file.is_file():
                return f"{rel} missing"
            if sha256_file(file) != digest:
                return f"{rel} does not match the sha256 recorded when it was saved (truncated or corrupted)"
        return None
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
            return f"{file.name} unreadable ({err})"
    return None


def resolve_resume_checkpoint(output_dir: str | Path, resume_from: str | None,
                              current: Mapping[str, Any] | None = None) -> Path | None:
    """The checkpoint folder to resume from, or ``None`` to start fresh.

    Args:
        output_dir: the run's output folder.
        resume_from: ``None``; ``"latest"`` (newest complete, intact checkpoint of this run in ``output_dir``; none
            yet = fresh start, so the same command line works for the first launch and every relaunch); or a folder
            path.
        current: the run config (``to_dict()``); when given, a checkpoint whose stored config differs in an identity
            field (:func:`utils.training.config.run_identity_differences`) is not resumed from.

    Raises:
        ConfigError: an explicit path that is not a complete, intact checkpoint of this run.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        complete = list_checkpoints(output_dir, complete_only=True)
        for _, path in reversed(complete):
            if current is not None:
                stored = read_checkpoint_config(path)
                differing = run_identity_differences(stored, current) if stored is not None else []
                if differing:
                    logger.warning("skipping %s: a checkpoint of another run (%s)", path,
                                   describe_differences(stored, current, differing))
                    continue
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning("skipping damaged checkpoint %s: %s; trying the previous one", path, problem)
        logger.warning("--resume_from_checkpoint latest: no usable checkpoint in %s, starting from step 0", output_dir)
        return None
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {resume_from}: not a complete checkpoint folder "
                          f"(no {STATE_FILE} in {path})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"--resume_from_checkpoint {resume_from}: damaged checkpoint: {problem}")
    stored = read_checkpoint_config(path)
    if current is not None and stored is not None:
        differing = run_identity_differences(stored, current)
        if differing:
            raise ConfigError(f"--resume_from_checkpoint {resume_from}: a checkpoint of another run, which differs "
                              f"in {describe_differences(stored, current, differing)}")
    return path


def read_training_state(path: str | Path) -> TrainingState:
    raw = json.loads((Path(path) / STATE_FILE).read_text())
    return TrainingState(**{k: int(raw[k]) for k in ("global_step", "epoch", "batch_in_epoch", "num_processes")
                           if k in raw})

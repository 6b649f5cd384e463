"""Resume checkpoints: ``checkpoint-{step}`` folders written by ``accelerator.save_state``, rotation, and resume lookup.

A checkpoint is the *resume state* (model, optimiser, LR schedule, EMA, step, RNG). The *inference snapshot* (EMA
weights in a form the reconstruction script loads) is written separately at the end (``utils.training.export``).

A checkpoint counts as complete only once ``training_state.json`` is in it; that file is written last, so a run killed
while saving leaves a folder that ``--resume_from_checkpoint latest`` skips (and rotation removes first).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
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


def mark_complete(path: str | Path, state: TrainingState) -> None:
    """Write ``training_state.json`` (last, so its presence means the save finished)."""
    target = Path(path) / STATE_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.state_dict(), indent=2) + "\n")
    tmp.replace(target)


def resolve_resume_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """The checkpoint folder to resume from, or ``None`` to start fresh.

    Args:
        output_dir: the run's output folder.
        resume_from: ``None``; ``"latest"`` (newest complete checkpoint in ``output_dir``; none yet = fresh start,
            so the same command line works for the first launch and every relaunch); or a folder path.

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        complete = list_checkpoints(output_dir, complete_only=True)
        if not complete:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", output_dir)
            return None
        return complete[-1][1]
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: not a complete checkpoint folder "
                                f"(no {STATE_FILE} in {path})")
    return path


def read_training_state(path: str | Path) -> TrainingState:
    raw = json.loads((Path(path) / STATE_FILE).read_text())
    return TrainingState(**{k: int(raw[k]) for k in ("global_step", "epoch", "batch_in_epoch", "num_processes")
                           if k in raw})

"""Work split over processes and machines.

* :func:`multi_process_cpu_launch`: how a script started by ``accelerate launch`` / ``torchrun`` learns that it must
  run as CPU processes.
* ``--num_shards N --shard_index I`` (:func:`add_shard_arguments`, :func:`shard_items`): a job split over machines by
  any scheduler (a SLURM array job, ``parallel``, a loop over hosts). Each shard is an independent run that writes only
  its own files into a shared output folder; the outputs are merged from what is on disk (``docs/cluster.md``).
* :func:`exclusive_lock`: one read-merge-write of a shared file at a time (summaries, the command log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from utils.cli import option

T = TypeVar("T")


def multi_process_cpu_launch() -> bool:
    """True when accelerate must be asked for CPU (gloo) processes: ``ACCELERATE_USE_CPU`` is set, or several
    processes were launched (``WORLD_SIZE > 1``) on a machine without a GPU-like device.

    Without ``cpu=True``, ``PartialState()`` / ``Accelerator()`` on such a machine silently fall back to one process
    each, so every process would do (train on, reconstruct) everything as rank 0 of 1.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())


SHARD_GROUP = "sharding over machines (a SLURM array job or any scheduler; docs/cluster.md)"
_NUM_SHARDS_HELP = "split the work into N shards, run as N separate jobs into the same output"
_SHARD_INDEX_HELP = "which shard this job runs, 0 <= I < N (e.g. $SLURM_ARRAY_TASK_ID)"


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num_shards N --shard_index I``: this invocation is shard ``I`` of ``N`` independent runs (one per machine
    or array task) into the same output location. Checked by :func:`shard_problem` / :func:`exit_on_bad_shards`.
    (A script whose options are a :mod:`utils.cli` dataclass inherits :class:`ShardOptions` instead.)"""
    g = parser.add_argument_group(SHARD_GROUP)
    g.add_argument("--num_shards", type=int, default=1, help=f"{_NUM_SHARDS_HELP} (default: 1)")
    g.add_argument("--shard_index", type=int, default=0, help=f"{_SHARD_INDEX_HELP} (default: 0)")


@dataclass
class ShardOptions:
    """``--num_shards`` / ``--shard_index`` as :mod:`utils.cli` fields (a script's options dataclass inherits them)."""

    num_shards: int = option(1, _NUM_SHARDS_HELP, group=SHARD_GROUP)
    shard_index: int = option(0, _SHARD_INDEX_HELP, group=SHARD_GROUP)


def shard_problem(num_shards: int, shard_index: int) -> str | None:
    """Why ``(num_shards, shard_index)`` is not a valid shard, or None."""
    if num_shards < 1:
        return f"--num_shards must be >= 1, got {num_shards}"
    if not 0 <= shard_index < num_shards:
        return f"--shard_index must satisfy 0 <= I < --num_shards ({num_shards}), got {shard_index}"
    return None


def exit_on_bad_shards(args: Any, prog: str) -> None:
    """Print one line and exit 2 when ``args.num_shards`` / ``args.shard_index`` are invalid (call before any
    work; ``args`` a parsed namespace or options dataclass)."""
    problem = shard_problem(args.num_shards, args.shard_index)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)


def shard_items(items: Sequence[T], num_shards: int = 1, shard_index: int = 0, process_index: int = 0,
                num_processes: int = 1) -> list[T]:
    """This process's share of ``items``: over machines (shards) first, then over the processes of one shard.

    Shard ``I`` of ``N`` takes ``items[I::N]``; process ``p`` of ``P`` within it takes every ``P``-th of those. The
    shares of all ``(I, p)`` are disjoint, cover ``items`` and depend only on the order of ``items`` (pass a sorted
    list), so N separate jobs agree on who does what without talking to each other. Strided rather than contiguous so
    that slow and fast items (e.g. volumes with many slices) spread evenly.

    Args:
        items: everything to do, in a deterministic order.
        num_shards, shard_index: ``--num_shards`` / ``--shard_index``.
        process_index, num_processes: the accelerate process within the shard (``PartialState``).

    Returns:
        The items of this process, in their order in ``items`` (empty when there are more workers than items).

    Raises:
        ValueError: invalid shard or process arguments.
    """
    problem = shard_problem(num_shards, shard_index)
    if problem is None and not (num_processes >= 1 and 0 <= process_index < num_processes):
        problem = f"process index {process_index} of {num_processes} processes"
    if problem is not None:
        raise ValueError(problem)
    return list(items[shard_index::num_shards][process_index::num_processes])


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock on the file ``path`` (POSIX ``flock``; a no-op where there is none), held for the
    ``with`` block: shards that finish at the same time rebuild a shared summary one after the other, so the last one
    sees every row. ``flock`` works on local file systems and NFSv4; a cluster file system mounted without lock
    support (e.g. Lustre without ``-o flock``) makes it a no-op (``docs/cluster.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock: concurrent writers of one folder must then be sequential
            pass
        yield

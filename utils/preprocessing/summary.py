"""What a preprocessing run reports: one :class:`FileReport` per input file, merged by :func:`finish_run` into the
root's metadata CSVs, the stats (train split) and one :class:`RunSummary`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.preprocessing.metadata_csv import MergeCounts, merge_metadata_csv
from utils.preprocessing.stats import STATS_TRAIN_ONLY, write_stats_from_csvs


@dataclass
class FileReport:
    """What happened to one input file (returned from worker processes).

    Attributes:
        name: file stem.
        rows: metadata rows of its slices (empty when it failed).
        written, skipped: slices computed now / already present.
        error: ``None`` on success, else a one-line reason.
        notes: informational messages (e.g. "reconstructed from undersampled data").
        warnings: metadata values read as missing (one line per column), a missing header.
        bad_slices: ``(slice label, reason)`` of the slices not written (the file then has an ``error``).
    """

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    skipped: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad_slices: list[tuple[str, str]] = field(default_factory=list)

    def fail_bad_slices(self) -> None:
        """Set :attr:`error` from :attr:`bad_slices` (if any): the file is reported as failed."""
        if self.bad_slices:
            listed = "; ".join(f"{label}: {why}" for label, why in self.bad_slices)
            self.error = f"{len(self.bad_slices)} slice(s) skipped: {listed}"


@dataclass
class RunSummary:
    """Outcome of a run. ``ok`` is False when any file failed or there was no input file at all."""

    files_total: int
    files_ok: int
    failed: list[tuple[str, str]]
    slices_written: int
    slices_skipped: int
    seconds: float
    csv_paths: list[Path]
    stats_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: CSV -> rows added / replaced / kept by this run (:func:`merge_metadata_csv`).
    csv_counts: dict[Path, MergeCounts] = field(default_factory=dict)
    slices_bad: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and self.files_total > 0

    def format(self) -> str:
        lines = [
            f"files: {self.files_ok}/{self.files_total} ok, {len(self.failed)} failed; slices: {self.slices_written} "
            f"written, {self.slices_skipped} already present"
            + (f", {self.slices_bad} skipped as unusable" if self.slices_bad else "")
            + f"; {self.seconds:.1f} s"
            + (f" ({self.slices_written / self.seconds:.2f} slices/s)" if self.seconds and self.slices_written else "")
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING {w}" for w in self.warnings]
        lines += [f"  FAILED {name}: {err}" for name, err in self.failed]
        for p in self.csv_paths:
            counts = self.csv_counts.get(p)
            lines.append(f"  metadata: {p}" + (f" (rows: {counts.format()})" if counts is not None else ""))
        if self.csv_counts:
            total = MergeCounts(*(sum(c[i] for c in self.csv_counts.values()) for i in range(4)))
            lines.append(f"  metadata rows: {total.format()}")
        else:
            lines.append("  metadata rows: none from this run (existing CSVs untouched)")
        if self.stats_path is not None:
            lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


def finish_run(
    reports: list[FileReport],
    output_root: Path,
    split: str,
    kind: str,
    columns: Sequence[str],
    write_stats: bool,
    start: float,
) -> RunSummary:
    """Merge the rows of ``reports`` into the metadata CSV(s) of ``output_root`` and build the summary.

    Each CSV is the union over runs (:func:`merge_metadata_csv`); with ``write_stats`` (train split only) the stats
    are rebuilt from every ``metadata_*_train.csv`` of the root, i.e. from everything processed into it so far.
    """
    if write_stats and split != "train":
        raise ValueError(STATS_TRAIN_ONLY)
    reports = sorted(reports, key=lambda r: r.name)
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in reports:
        for row in rep.rows:
            group = "cardiology" if kind == "cmrx" else row["anatomy"]
            by_group[group].append(row)
    csv_paths = []
    csv_counts: dict[Path, MergeCounts] = {}
    for group, rows in sorted(by_group.items()):
        path = Path(output_root) / f"metadata_{group}_{split}.csv"
        csv_counts[path] = merge_metadata_csv(path, rows, columns)
        csv_paths.append(path)
    stats_path = None
    notes = [f"{r.name}: {n}" for r in reports for n in r.notes]
    if write_stats:
        all_csvs = sorted(Path(output_root).glob("metadata_*_train.csv"))
        if all_csvs:
            stats_path = Path(output_root) / "metadata_stats.json"
            problems: list[str] = []
            write_stats_from_csvs(all_csvs, stats_path, problems=problems)
            notes += [f"stats: {p}" for p in problems]
    failed = [(r.name, r.error) for r in reports if r.error is not None]
    return RunSummary(
        files_total=len(reports),
        files_ok=len(reports) - len(failed),
        failed=failed,
        slices_written=sum(r.written for r in reports),
        slices_skipped=sum(r.skipped for r in reports),
        seconds=time.perf_counter() - start,
        csv_paths=csv_paths,
        stats_path=stats_path,
        notes=notes,
        warnings=[f"{r.name}: {w}" for r in reports for w in r.warnings],
        csv_counts=csv_counts,
        slices_bad=sum(len(r.bad_slices) for r in reports),
    )

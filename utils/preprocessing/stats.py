"""``metadata_stats.json`` from the train split's metadata CSVs (never from validation data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.metadata import compute_metadata_stats, load_records, save_metadata_stats

#: Why ``--write_stats`` is refused on a validation run.
STATS_TRAIN_ONLY = ("--write_stats is for the train split only (stats must not come from validation data): run it with "
                    "--train, or build the stats with make_metadata_stats.py from the train CSVs")


def write_stats_from_csvs(
    csv_paths: Sequence[str | Path], output: str | Path, problems: list[str] | None = None
) -> dict[str, Any]:
    """Build ``metadata_stats.json`` (``utils.metadata.compute_metadata_stats`` defaults) from metadata CSVs.

    Non-finite and implausible numbers are ignored (never a bound); ``problems`` receives one line per key with
    ignored values or with no value at all.
    """
    records: list[dict[str, Any]] = []
    for path in csv_paths:
        records.extend(load_records(path))
    stats = compute_metadata_stats(records, problems=problems)
    save_metadata_stats(stats, output)
    return stats

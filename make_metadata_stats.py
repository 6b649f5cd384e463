"""Build ``metadata_stats.json`` (categorical vocabularies, numerical min/max) from metadata CSVs.

Example::

    python make_metadata_stats.py fastmri/metadata_brain_train.csv fastmri/metadata_knee_train.csv \\
        --output metadata_stats.json

Use the train CSVs: the stats fix the embedder's normalisation, so they must not come from validation data.
Non-finite or implausible numbers (``inf``, ``abc``, a TR of ``-1e30``) never become a bound: they are ignored and
reported; a numerical key with no usable value gets the empty slot ``min = max = 0`` (always "missing"), reported too.
Exit status 2 for a missing or unreadable CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.preprocessing.stats import write_stats_from_csvs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", type=Path, nargs="+", help="metadata CSV files (of the train split)")
    p.add_argument("--output", type=Path, default=Path("metadata_stats.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems: list[str] = []
    try:
        stats = write_stats_from_csvs(args.csvs, args.output, problems=problems)
    except (FileNotFoundError, ValueError) as err:
        print(f"make_metadata_stats.py: error: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"  note: {line}")
    print(f"wrote {args.output}: {len(stats)} keys from {len(args.csvs)} CSV file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build ``metadata_stats.json`` (categorical vocabularies, numerical min/max) from metadata CSVs.

Example::

    python make_metadata_stats.py fastmri/metadata_brain_train.csv fastmri/metadata_knee_train.csv \\
        --output metadata_stats.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.preprocessing import write_stats_from_csvs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", type=Path, nargs="+", help="metadata CSV files")
    p.add_argument("--output", type=Path, default=Path("metadata_stats.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = write_stats_from_csvs(args.csvs, args.output)
    print(f"wrote {args.output}: {len(stats)} keys from {len(args.csvs)} CSV file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

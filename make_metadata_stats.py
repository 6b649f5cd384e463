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
from dataclasses import dataclass
from pathlib import Path

from utils import cli
from utils.cli import option
from utils.preprocessing.stats import write_stats_from_csvs

PROG = "make_metadata_stats.py"
STATS_NAME = "metadata_stats.json"


@dataclass(kw_only=True)
class StatsOptions:
    """Every option of ``make_metadata_stats.py``."""

    csvs: list[Path] = option(help="metadata CSV files (of the train split)", positional=True, metavar="CSV")
    output: Path = option(Path(STATS_NAME), "the stats file to write")
    output_dir: Path | None = option(None, f"write {STATS_NAME} into this folder instead (the house's name for "
                                     "an output location; give --output or --output_dir, not both)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`StatsOptions` (with ``--config FILE``)."""
    return cli.build_parser(StatsOptions, prog=PROG, description=__doc__)


def parse_args(argv: list[str] | None = None) -> StatsOptions:
    """The options of a command line; ``output`` is the file to write (resolved from ``--output_dir``)."""
    parsed = cli.parse_with_sources(StatsOptions, argv, build_parser())
    options = parsed.config
    if not options.csvs:
        cli.fail(PROG, "give at least one metadata CSV")
    if options.output_dir is not None:
        if "output" in parsed.set_explicitly:
            cli.fail(PROG, "give --output FILE or --output_dir DIR, not both")
        options.output = options.output_dir / STATS_NAME
    return options


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

"""Preprocess CMRxRecon (2023 or 2024 layout) multi-coil .mat files into the ContextMRI slice layout.

Example::

    python pre_process_cmrx.py --input_dir /data/CMRxRecon2023 --output_dir ./fastmri
    python pre_process_cmrx.py --input_dir /data/CMRxRecon2024 --output_dir ./fastmri --views sax lax_4ch \\
        --slices 2 3 4 --frames 0 6 --split val

Every slice and frame of every series by default. Fully sampled ``kspace_full`` is used when present; otherwise the
undersampled data are reconstructed by SENSE (CG) with ESPIRiT maps from the ACS lines, and the summary says so.
Writes ``{output_dir}/heart_mvue_{crop}_{split}/{slice,mps,scale}/{Pxxx}_{series}/{idx:03d}.npy`` with
``idx = slice * num_frames + frame`` (``num_frames`` of the series; also the CSV column ``file_index``), and
``{output_dir}/metadata_cardiology_{split}.csv`` (anatomy ``heart``, view, frame, 3 T Siemens MAGNETOM Vida; published
protocol values for T1/T2 mapping; unknown values empty). Reruns skip finished slices. The CSV is the union of every
series processed into the root (a run replaces the rows of its own series and keeps the others); so N jobs with
``--num_shards N --shard_index I`` (every N-th series by name) into one root leave the union (docs/cluster.md).

Exit status: 0 all series ok; 1 a series failed (unreadable, or a slice/frame with non-finite or all-zero k-space:
reported and skipped) or no series found; 2 bad arguments (e.g. missing folder); 128 + signal when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pre_processing_final import EspiritOptions, espirit_from_args
from utils import cli
from utils.cli import option
from utils.distributed import ShardOptions, shard_problem
from utils.preprocessing.cmrx import CardiacConfig, run_cmrx_preprocessing
from utils.preprocessing.names import SPLITS

PROG = "pre_process_cmrx.py"


@dataclass(kw_only=True)
class CardiacPreprocessOptions(EspiritOptions, ShardOptions):  # ShardOptions: --num_shards/--shard_index
    """Every option of ``pre_process_cmrx.py``."""

    input_dir: Path = option(help="CMRxRecon release root (2023 or 2024 layout)")
    output_dir: Path = option(help="output root: {output_dir}/heart_mvue_{crop}_{split}/ and "
                              "metadata_cardiology_{split}.csv", aliases=("--output_root",))
    split: str = option("train", "output split; reads TrainingSet (train) or ValidationSet (val) when both exist",
                        choices=SPLITS)
    crop_size: int = option(320, "image side after crop/pad", unit="px", aliases=("--resolution",))
    views: list[str] | None = option(None, "views or series names to keep (e.g. sax lax cine_sax T1map)",
                                     default_text="all")
    slices: list[int] | None = option(None, "slice indices to keep", default_text="all")
    frames: list[int] | None = option(None, "frame indices to keep", default_text="all")
    maps_per_frame: bool = option(False, "ESPIRiT per frame (without it: per slice)")
    sense_gamma: float = option(100.0, "SENSE fallback: γ of (I + γAᴴA)x = γAᴴy")
    sense_iters: int = option(30, "SENSE fallback: CG iterations")
    num_workers: int = option(1, "parallel worker processes")
    overwrite: bool = option(False, "recompute slices that already exist")
    no_progress: bool = option(False, "no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`CardiacPreprocessOptions` (with ``--config FILE``)."""
    return cli.build_parser(CardiacPreprocessOptions, prog=PROG, description=__doc__,
                            group_titles={None: "", "ESPIRiT": "ESPIRiT"})


def parse_args(argv: list[str] | None = None) -> CardiacPreprocessOptions:
    """The options of a command line (``--config FILE`` first, then the command line)."""
    return cli.parse(CardiacPreprocessOptions, argv, build_parser())


def _error(message: str, status: int) -> int:
    print(f"pre_process_cmrx.py: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.input_dir.is_dir():
        return _error(f"--input_dir {args.input_dir} is not a folder", 2)
    if shard_problem(args.num_shards, args.shard_index):
        return _error(shard_problem(args.num_shards, args.shard_index), 2)
    if not any(args.input_dir.rglob("*.mat")):
        return _error(f"no .mat files under {args.input_dir}", 1)
    try:
        cfg = _config(args)
    except ValueError as err:
        return _error(str(err), 2)
    try:
        summary = run_cmrx_preprocessing(cfg, show_progress=not args.no_progress)
    except KeyboardInterrupt:  # one process (--num_workers 1): finished slices are on disk
        return _error("interrupted; finished slices are kept, rerun the same command to resume", 130)
    except ValueError as err:  # e.g. an unreadable existing metadata CSV
        return _error(str(err), 1)
    print(summary.format())
    if summary.files_total == 0:
        return _error(f"no CMRxRecon series found under {args.input_dir} for split {args.split!r}", 1)
    return 0 if summary.ok else 1


def _config(args: CardiacPreprocessOptions) -> CardiacConfig:
    return CardiacConfig(
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        split=args.split,
        crop_size=args.crop_size,
        views=args.views,
        slices=args.slices,
        frames=args.frames,
        espirit=espirit_from_args(args),
        maps_per_frame=args.maps_per_frame,
        sense_gamma=args.sense_gamma,
        sense_iters=args.sense_iters,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )


if __name__ == "__main__":
    sys.exit(main())

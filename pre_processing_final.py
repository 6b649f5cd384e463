"""Preprocess fully sampled fastMRI multi-coil h5 files into the ContextMRI layout (ESPIRiT maps, MVUE, 320x320).

Example::

    python pre_processing_final.py --input_dir /data/fastmri/multicoil_train --output_root ./fastmri --train \\
        --num_workers 2 --write_stats
    python pre_processing_final.py --input_dir /data/fastmri/multicoil_val --output_root ./fastmri \\
        --num_workers 2 --fastmri_plus_csv brain.csv

Writes ``{output_root}/{anatomy}_mvue_{crop}_{train|val}/{slice,mps,scale}/...`` and
``{output_root}/metadata_{anatomy}_{train|val}.csv`` (see ``utils/preprocessing/``). Reruns skip finished slices.

Batches: the CSV is the union of every file processed into the root; a run replaces the rows of its own files, keeps
the others, and prints how many rows it added, replaced and kept. ``--write_stats`` (train split only; refused on a
val run) rebuilds ``metadata_stats.json`` from every ``metadata_*_train.csv`` of the root.

Machines: ``--num_shards N --shard_index I`` processes every N-th file of the sorted listing, so N jobs (a SLURM array)
share one folder; each writes only its files' slices and merges its rows into the CSV under the lock, so the CSV is
the union once all are done. Build the stats after the last shard with ``make_metadata_stats.py`` on the train CSVs
(``--write_stats`` is refused with shards: a shard finishing first would see part of the union). docs/cluster.md.

Exit status: 0 all files ok; 1 a file failed (unreadable, or a slice with non-finite / all-zero k-space: reported and
skipped; the others are still processed) or no .h5 file in the folder; 2 bad arguments (e.g. missing folder);
128 + signal when interrupted (workers are stopped; rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import cli
from utils.cli import option
from utils.distributed import ShardOptions, shard_items, shard_problem
from utils.coils import ESPIRIT_DEFAULTS
from utils.preprocessing.fastmri import (
    FASTMRI_ANATOMIES, PreprocessConfig, list_h5_files, load_fastmri_plus, run_preprocessing,
)  # fmt: skip
from utils.preprocessing.slices import ESPIRIT_BACKENDS, EspiritParams
from utils.preprocessing.stats import STATS_TRAIN_ONLY

PROG = "pre_processing_final.py"


@dataclass
class EspiritOptions:
    """The ``--espirit_*`` options shared by the preprocessing scripts (defaults:
    :data:`utils.coils.ESPIRIT_DEFAULTS`)."""

    espirit_calib_width: int = option(ESPIRIT_DEFAULTS["calib_width"], "width of the fully sampled calibration "
                                      "region (per axis)", unit="k-space samples", group="ESPIRiT")
    espirit_thresh: float = option(ESPIRIT_DEFAULTS["thresh"], "singular-value threshold of the calibration matrix",
                                   group="ESPIRiT")
    espirit_kernel_width: int = option(ESPIRIT_DEFAULTS["kernel_width"], "k-space kernel width", unit="samples",
                                       group="ESPIRiT")
    espirit_crop: float = option(ESPIRIT_DEFAULTS["crop"], "eigenvalue threshold below which the maps are set to "
                                 "zero (outside the object)", group="ESPIRiT")
    espirit_backend: str = option("fast", "fast: same maps as sigpy EspiritCalib, computed exactly (eigh) on the kept "
                                  "pixels only; sigpy: EspiritCalib power iteration on the full grid (the reference)",
                                  choices=ESPIRIT_BACKENDS, group="ESPIRiT")
    espirit_max_iter: int = option(ESPIRIT_DEFAULTS["max_iter"], "power iterations of the sigpy backend (e.g. 10-30 "
                                   "for a quick, less exact run)", group="ESPIRiT")


@dataclass(kw_only=True)
class FastMRIPreprocessOptions(EspiritOptions, ShardOptions):  # ShardOptions: --num_shards/--shard_index
    """Every option of ``pre_processing_final.py``."""

    input_dir: Path = option(help="folder of fastMRI multi-coil .h5 files")
    output_root: Path = option(help="output root: {output_root}/{anatomy}_mvue_{crop}_{split}/ and "
                               "metadata_{anatomy}_{split}.csv", aliases=("--output_dir",))
    train: bool = option(False, "write the train split (without it: the val split)")
    crop_size: int = option(320, "image side after crop/pad", unit="px", aliases=("--resolution",))
    num_workers: int = option(1, "parallel worker processes (one thread each)")
    anatomy: str | None = option(None, "force the anatomy", choices=FASTMRI_ANATOMIES,
                                 default_text="from the file name")
    fastmri_plus_csv: Path | None = option(None, "fastMRI+ annotations (file, slice, label)")
    write_stats: bool = option(False, "write {output_root}/metadata_stats.json from all train CSVs of the root "
                               "(with --train only)")
    overwrite: bool = option(False, "recompute slices that already exist")
    no_progress: bool = option(False, "no progress bar")


_GROUPS = {None: "", "ESPIRiT": "ESPIRiT"}  # the main options first, then ESPIRiT


def espirit_from_args(args: Any) -> EspiritParams:
    """ESPIRiT settings from the ``--espirit_*`` options (``ValueError`` for inconsistent ones)."""
    return EspiritParams(
        calib_width=args.espirit_calib_width,
        thresh=args.espirit_thresh,
        kernel_width=args.espirit_kernel_width,
        crop=args.espirit_crop,
        max_iter=args.espirit_max_iter,
        backend=args.espirit_backend,
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`FastMRIPreprocessOptions` (with ``--config FILE``)."""
    return cli.build_parser(FastMRIPreprocessOptions, prog=PROG, description=__doc__, group_titles=_GROUPS)


def parse_args(argv: list[str] | None = None) -> FastMRIPreprocessOptions:
    """The options of a command line (``--config FILE`` first, then the command line)."""
    return cli.parse(FastMRIPreprocessOptions, argv, build_parser())


def _error(message: str, status: int) -> int:
    print(f"pre_processing_final.py: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # every check before any heavy work (and before any worker exists)
    if not args.input_dir.is_dir():
        return _error(f"--input_dir {args.input_dir} is not a folder", 2)
    if args.fastmri_plus_csv is not None:
        if not args.fastmri_plus_csv.is_file():
            return _error(f"--fastmri_plus_csv not found: {args.fastmri_plus_csv}", 2)
        try:
            load_fastmri_plus(args.fastmri_plus_csv)
        except ValueError as err:
            return _error(f"--fastmri_plus_csv: {err}", 2)
    if args.write_stats and not args.train:
        return _error(STATS_TRAIN_ONLY, 2)
    if shard_problem(args.num_shards, args.shard_index):
        return _error(shard_problem(args.num_shards, args.shard_index), 2)
    if args.write_stats and args.num_shards > 1:  # a shard finishing first would see only part of the union
        return _error("--write_stats with --num_shards > 1 would build the stats from the shards finished so far: "
                      "once every shard is done, run make_metadata_stats.py on the train CSVs (docs/cluster.md)", 2)
    try:
        cfg = PreprocessConfig(
            input_dir=args.input_dir,
            output_root=args.output_root,
            split="train" if args.train else "val",
            crop_size=args.crop_size,
            num_workers=args.num_workers,
            anatomy=args.anatomy,
            espirit=espirit_from_args(args),
            fastmri_plus_csv=args.fastmri_plus_csv,
            write_stats=args.write_stats,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        return _error(str(err), 2)
    cfg.files = list_h5_files(cfg.input_dir)
    if not cfg.files:
        return _error(f"no .h5 files in {cfg.input_dir}", 1)
    cfg.files = shard_items(cfg.files, args.num_shards, args.shard_index)  # this machine's files (sorted listing)
    if not cfg.files:  # more shards than files: nothing to do is not a failure
        print(f"shard {args.shard_index} of {args.num_shards}: no files (the folder has fewer files than shards)")
        return 0
    try:
        summary = run_preprocessing(cfg, show_progress=not args.no_progress)
    except KeyboardInterrupt:  # one process (--num_workers 1): finished slices are on disk
        return _error("interrupted; finished slices are kept, rerun the same command to resume", 130)
    except ValueError as err:  # e.g. an unreadable existing metadata CSV: the slices are on disk, a rerun resumes
        return _error(str(err), 1)
    print(summary.format())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())

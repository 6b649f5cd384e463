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

Exit status: 0 all files ok; 1 a file failed (unreadable, or a slice with non-finite / all-zero k-space: reported and
skipped; the others are still processed) or no .h5 file in the folder; 2 bad arguments (e.g. missing folder);
128 + signal when interrupted (workers are stopped; rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.coils import ESPIRIT_DEFAULTS
from utils.preprocessing.fastmri import PreprocessConfig, list_h5_files, load_fastmri_plus, run_preprocessing
from utils.preprocessing.slices import EspiritParams
from utils.preprocessing.stats import STATS_TRAIN_ONLY


def add_espirit_args(parser: argparse.ArgumentParser) -> None:
    """The ``--espirit_*`` options shared by the preprocessing scripts."""
    g = parser.add_argument_group("ESPIRiT")
    g.add_argument("--espirit_calib_width", type=int, default=ESPIRIT_DEFAULTS["calib_width"])
    g.add_argument("--espirit_thresh", type=float, default=ESPIRIT_DEFAULTS["thresh"])
    g.add_argument("--espirit_kernel_width", type=int, default=ESPIRIT_DEFAULTS["kernel_width"])
    g.add_argument("--espirit_crop", type=float, default=ESPIRIT_DEFAULTS["crop"])
    g.add_argument(
        "--espirit_backend",
        choices=("fast", "sigpy"),
        default="fast",
        help="fast: same maps as sigpy EspiritCalib, computed exactly (eigh) on the kept pixels only; "
        "sigpy: EspiritCalib power iteration on the full grid (the reference)",
    )
    g.add_argument(
        "--espirit_max_iter",
        type=int,
        default=ESPIRIT_DEFAULTS["max_iter"],
        help="power iterations of the sigpy backend (e.g. 10-30 for a quick, less exact run)",
    )


def espirit_from_args(args: argparse.Namespace) -> EspiritParams:
    """ESPIRiT settings from the ``--espirit_*`` options (``ValueError`` for inconsistent ones)."""
    return EspiritParams(
        calib_width=args.espirit_calib_width,
        thresh=args.espirit_thresh,
        kernel_width=args.espirit_kernel_width,
        crop=args.espirit_crop,
        max_iter=args.espirit_max_iter,
        backend=args.espirit_backend,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", type=Path, required=True, help="folder of fastMRI multi-coil .h5 files")
    p.add_argument("--output_root", type=Path, required=True)
    p.add_argument("--train", action="store_true", help="write the train split (default: val)")
    p.add_argument("--crop_size", type=int, default=320)
    p.add_argument("--num_workers", type=int, default=1, help="parallel worker processes (one thread each)")
    p.add_argument("--anatomy", choices=("brain", "knee"), default=None, help="default: from the file name")
    p.add_argument("--fastmri_plus_csv", type=Path, default=None, help="fastMRI+ annotations (file, slice, label)")
    p.add_argument("--write_stats", action="store_true",
                   help="write {output_root}/metadata_stats.json from all train CSVs of the root (with --train only)")
    p.add_argument("--overwrite", action="store_true", help="recompute slices that already exist")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_espirit_args(p)
    return p.parse_args(argv)


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

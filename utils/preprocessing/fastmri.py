"""The fastMRI pipeline: a folder of multi-coil ``.h5`` files -> slices, maps, scales and ``metadata_{anatomy}_{split}.csv``.

Header numbers come from :mod:`utils.fastmri_io`; pathology labels from an optional fastMRI+ annotation CSV.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.metadata import ACQUISITION_TO_CONTRAST, is_missing
from utils.preprocessing.layout import SPLITS, dataset_dir, write_slices
from utils.preprocessing.metadata_csv import FASTMRI_CSV_COLUMNS
from utils.preprocessing.slices import EspiritParams, process_kspace_slice
from utils.preprocessing.stats import STATS_TRAIN_ONLY
from utils.preprocessing.summary import FileReport, RunSummary, finish_run
from utils.preprocessing.workers import run_in_pool


@dataclass
class PreprocessConfig:
    """Settings of a fastMRI preprocessing run (``pre_processing_final.py``).

    Attributes:
        input_dir: folder of ``*.h5`` files (searched non-recursively).
        output_root: output root (see module docstring for the layout).
        split: ``"train"`` or ``"val"``.
        crop_size: image side after crop/pad.
        num_workers: worker processes (1 = in this process).
        anatomy: force the anatomy; ``None`` infers it per file (``file_brain_*`` -> brain, else knee).
        espirit: ESPIRiT settings.
        fastmri_plus_csv: optional fastMRI+ annotation CSV (columns ``file``, ``slice``, ``label``) for pathology.
        write_stats: also write ``{output_root}/metadata_stats.json`` from the ``metadata_*_train.csv`` files there
            (train split only: stats built from validation data would leak it into the model's normalisation).
        overwrite: recompute slices that already exist.
        files: explicit list of files (overrides the ``input_dir`` listing).
    """

    input_dir: Path
    output_root: Path
    split: str = "train"
    crop_size: int = 320
    num_workers: int = 1
    anatomy: str | None = None
    espirit: EspiritParams = field(default_factory=EspiritParams)
    fastmri_plus_csv: Path | None = None
    write_stats: bool = False
    overwrite: bool = False
    files: list[Path] | None = None

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        self.output_root = Path(self.output_root)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.write_stats and self.split != "train":
            raise ValueError(STATS_TRAIN_ONLY)

#: The fastMRI anatomies (``--anatomy``); :func:`infer_anatomy` tells them apart by file name.
FASTMRI_ANATOMIES: tuple[str, ...] = ("brain", "knee")


def infer_anatomy(filename: str) -> str:
    """fastMRI naming: ``file_brain_*`` is brain, anything else (``file1000007``) knee."""
    return "brain" if Path(filename).name.startswith("file_brain") else "knee"


def contrast_from_acquisition(acquisition: str | None) -> str | None:
    """Clean contrast label (e.g. ``AXFLAIR`` -> ``FLAIR``); an unknown label is kept as is, a missing one is None."""
    if acquisition is None or is_missing(acquisition):
        return None
    return ACQUISITION_TO_CONTRAST.get(acquisition.strip(), acquisition.strip())


def load_fastmri_plus(path: str | Path) -> dict[tuple[str, int], list[str]]:
    """fastMRI+ annotations: ``(file stem, slice) -> [label, ...]`` (one entry per annotation, duplicates kept).

    Rows without a slice number (study-level labels in some releases) or without a label are ignored.
    """
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    needed = {"file", "slice", "label"}
    if not needed <= set(df.columns):
        raise ValueError(f"{path}: fastMRI+ CSV needs columns {sorted(needed)}, has {list(df.columns)}")
    out: dict[tuple[str, int], list[str]] = defaultdict(list)
    for file, slc, label in zip(df["file"], df["slice"], df["label"]):
        if is_missing(slc) or is_missing(label):
            continue
        try:
            idx = int(float(slc))
        except ValueError:
            continue
        out[(Path(file.strip()).stem, idx)].append(label.strip())
    return dict(out)


def process_fastmri_file(
    path: Path, cfg: PreprocessConfig, pathology: dict[tuple[str, int], list[str]] | None = None
) -> FileReport:
    """Preprocess every slice of one fastMRI h5 file (resumable) and return its metadata rows.

    Never raises for a bad input file: the error is returned in :attr:`FileReport.error`.
    """
    from utils.fastmri_io import FastMRIFile, header_metadata

    stem = Path(path).stem
    report = FileReport(name=stem)
    try:
        with FastMRIFile.open(path) as f:
            anatomy = cfg.anatomy or infer_anatomy(stem)
            ds_dir = dataset_dir(cfg.output_root, anatomy, cfg.crop_size, cfg.split)
            meta = header_metadata(f.header, num_coils=f.num_coils, problems=report.warnings)
            contrast = contrast_from_acquisition(f.attrs.get("acquisition"))
            extra = {
                "source": str(path),
                "source_shape": [f.num_slices, f.num_coils, *f.shape],
                "crop_size": cfg.crop_size,
                "espirit": asdict(cfg.espirit),
            }
            result = write_slices(
                ds_dir,
                stem,
                range(f.num_slices),
                lambda i: process_kspace_slice(f.read_slice(i), cfg.crop_size, cfg.espirit),
                overwrite=cfg.overwrite,
                extra_info=extra,
            )
            report.written, report.skipped = result.written, result.skipped
            report.bad_slices = [(f"slice {idx}", why) for idx, why in result.bad]
            bad = {idx for idx, _ in result.bad}
            for idx in range(f.num_slices):
                if idx in bad:  # not on disk: no row (the file is reported as failed)
                    continue
                labels = (pathology or {}).get((stem, idx), [])
                row = {"anatomy": anatomy, "filename": stem, "slice": idx, "contrast": contrast, "pathology": labels}
                report.rows.append({**row, **meta})
            report.fail_bad_slices()
    except Exception as exc:  # a corrupt/truncated file must not stop the run
        report.rows = []
        report.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if os.environ.get("PREPROCESS_DEBUG"):
            report.error += "\n" + traceback.format_exc()
    return report


def list_h5_files(input_dir: Path) -> list[Path]:
    """Sorted ``*.h5`` files of a folder."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    return sorted(p for p in input_dir.iterdir() if p.suffix == ".h5" and p.is_file())


def run_preprocessing(cfg: PreprocessConfig, show_progress: bool = True) -> RunSummary:
    """Preprocess a folder of fastMRI h5 files and write the metadata CSV(s) (and stats, if asked).

    Files that fail are reported in the summary and left out of the CSV (a file with unusable slices is reported as
    failed but keeps the rows of its good slices); the others are processed. The rows are merged into the root's CSVs
    (:func:`merge_metadata_csv`).

    Raises:
        FileNotFoundError: ``cfg.input_dir`` is not a folder (and ``cfg.files`` is not given).
        ValueError: an unreadable fastMRI+ CSV or existing metadata CSV.
    """
    start = time.perf_counter()
    files = cfg.files if cfg.files is not None else list_h5_files(cfg.input_dir)
    pathology = load_fastmri_plus(cfg.fastmri_plus_csv) if cfg.fastmri_plus_csv else None
    jobs = [(p.stem, process_fastmri_file, (p, cfg, pathology)) for p in files]
    reports = run_in_pool(jobs, cfg.num_workers, desc=f"preprocess {cfg.split}", show_progress=show_progress)
    return finish_run(reports, cfg.output_root, cfg.split, "fastmri", FASTMRI_CSV_COLUMNS, cfg.write_stats, start)

"""Training data: datasets from the run config, pre-flight checks, the batch type and the data loader.

Every check here runs before the first training step, so a bad input stops the run with a message that names the flag
and the file instead of failing an hour in (or, worse, training on the wrong thing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from utils.metadata import MULTI_LABEL_COLUMNS, is_missing, load_metadata_csv, parse_pathology
from utils.preprocessing.fastmri import FASTMRI_ANATOMIES
from utils.training.config import ConfigError, TrainConfig
from utils.training.data_order import MixtureSampler, TaggedConcatDataset, mixture_sources

logger = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One training batch.

    Attributes:
        images: float32 ``[B, 2, H, W]`` (real, imag of the normalised MVUE).
        records: ``B`` metadata records.
        prompts: ``B`` ContextMRI prompts.
        is_ood: bool ``[B]``, True for out-of-distribution (cardiac) samples.
        filenames: ``B`` source file names (for error messages).
        slices: ``B`` slice indices within those files (for error messages).
    """

    images: torch.Tensor
    records: list[dict[str, Any]]
    prompts: list[str]
    is_ood: torch.Tensor
    filenames: list[str]
    slices: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainBatch":
        return TrainBatch(self.images.to(device, non_blocking=non_blocking), self.records, self.prompts,
                          self.is_ood.to(device, non_blocking=non_blocking), self.filenames, self.slices)

    def pin_memory(self) -> "TrainBatch":
        return TrainBatch(self.images.pin_memory(), self.records, self.prompts, self.is_ood.pin_memory(),
                          self.filenames, self.slices)

    def __len__(self) -> int:
        return self.images.shape[0]


class TrainCollate:
    """Collate ``(MRISample, source)`` pairs into a :class:`TrainBatch`, checking every image's size."""

    def __init__(self, resolution: int, ood_sources: Sequence[int] = ()) -> None:
        self.resolution = int(resolution)
        self.ood_sources = set(ood_sources)

    def __call__(self, items: Sequence[tuple[Any, int]]) -> TrainBatch:
        images = []
        for sample, _ in items:
            image = torch.as_tensor(sample.image, dtype=torch.float32)
            if tuple(image.shape) != (2, self.resolution, self.resolution):
                raise ValueError(f"{sample.filename} slice {sample.slice_idx}: image shape {tuple(image.shape)}, "
                                 f"expected (2, {self.resolution}, {self.resolution}) (--resolution)")
            images.append(image)
        return TrainBatch(
            images=torch.stack(images),
            records=[dict(sample.record) for sample, _ in items],
            prompts=[sample.prompt for sample, _ in items],
            is_ood=torch.tensor([src in self.ood_sources for _, src in items], dtype=torch.bool),
            filenames=[sample.filename for sample, _ in items],
            slices=[int(sample.slice_idx) for sample, _ in items],
        )


# ---------------------------------------------------------------------------------------------------------------------
# datasets from the config
# ---------------------------------------------------------------------------------------------------------------------

def _check_csv(path: str, flag: str) -> None:
    try:
        load_metadata_csv(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{flag}: {err}") from err
    except Exception as err:  # pandas parser errors and the like
        raise ConfigError(f"{flag}: cannot read {path}: {err}") from err


def _make_dataset(root: str, csv: str, split: str, resolution: int, load_maps: bool, flag: str,
                  seed: int) -> Dataset:
    """An ``MRISliceDataset``; it checks every row's file and image size (``.npy`` headers) when built."""
    from utils.data import MRISliceDataset

    _check_csv(csv, flag)
    try:
        ds = MRISliceDataset(root, [csv], split=split, crop_size=resolution, load_maps=load_maps, seed=seed)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"{flag} {csv} (data root {root}, --resolution {resolution}): {err}") from err
    return ds


def check_stats_cover(stats: Mapping[str, Any], csvs: Mapping[str, str], warn_only: bool = False) -> None:
    """Check that ``metadata_stats.json`` can embed the training metadata.

    * every stats key must be a column of some training CSV (``slice_number`` is ``slice``), else the embedder would
      see only "missing" for it;
    * every categorical value / pathology label in the CSVs must be in the key's vocabulary, else it would be
      silently embedded as "missing".

    Args:
        stats: the loaded stats.
        csvs: flag -> training CSV path.
        warn_only: log the problems instead of raising (``--allow_unknown_metadata``).

    Raises:
        ConfigError: listing every problem.
    """
    problems = []
    frames = {flag: load_metadata_csv(path) for flag, path in csvs.items()}
    columns = set().union(*(set(df.columns) for df in frames.values()))
    if "slice" in columns:
        columns.add("slice_number")
    for key, entry in stats.items():
        if key not in columns:
            problems.append(f"stats key {key!r} is not a column of any training CSV ({', '.join(csvs.values())})")
            continue
        if not isinstance(entry, list):
            continue
        vocab = {str(v).strip() for v in entry}
        unknown: dict[str, int] = {}
        for df in frames.values():
            if key not in df.columns:
                continue
            for cell in df[key]:
                values = parse_pathology(cell) if key in MULTI_LABEL_COLUMNS else ([] if is_missing(cell) else [cell])
                for value in values:
                    if str(value).strip() not in vocab:
                        unknown[str(value).strip()] = unknown.get(str(value).strip(), 0) + 1
        if unknown:
            shown = ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(unknown.items())[:8])
            problems.append(f"stats key {key!r} does not cover value(s) {shown}{' ...' if len(unknown) > 8 else ''}")
    if problems and warn_only:
        logger.warning("--metadata_stats does not cover the training metadata (embedded as 'missing'):\n  - %s",
                       "\n  - ".join(problems))
    elif problems:
        raise ConfigError("--metadata_stats does not match the training metadata (regenerate it from the training "
                          "CSVs with make_metadata_stats.py, or pass --allow_unknown_metadata):\n  - "
                          + "\n  - ".join(problems))


@dataclass
class TrainingData:
    """Datasets of a run and the sampler that orders them."""

    dataset: TaggedConcatDataset
    sampler: MixtureSampler
    collate: TrainCollate
    source_names: list[str]
    validation_items: list


def build_training_data(config: TrainConfig, stats: Mapping[str, Any] | None = None) -> TrainingData:
    """Datasets, sampler and collate function of a run, after every pre-flight check.

    Raises:
        ConfigError: a missing/empty/unreadable CSV, no slices found, an image of the wrong size, stats that do not
            cover the training metadata.
    """
    datasets, names, ratios, csv_flags = [], [], [], {}
    for anatomy, csv in config.train_csvs.items():
        flag = f"--mri_metadata_dir_{anatomy}"
        datasets.append(_make_dataset(config.data_root, csv, "train", config.resolution, False, flag, config.seed))
        names.append(anatomy)
        csv_flags[flag] = csv
    if len(datasets) > 1:  # brain + knee form one in-distribution source
        datasets = [torch.utils.data.ConcatDataset(datasets)]
        names = ["+".join(names)]
    ratios.append(None)
    ood_sources: list[int] = []
    if config.is_ood:
        root = config.cardio_data_root or config.data_root
        flag = "--mri_metadata_dir_cardio"
        datasets.append(_make_dataset(root, config.mri_metadata_dir_cardio, "train", config.resolution, False, flag,
                                      config.seed))
        names.append("cardiac")
        ratios.append(config.ood_ratio)
        ood_sources.append(len(datasets) - 1)
        csv_flags[flag] = config.mri_metadata_dir_cardio
    if stats is not None:
        check_stats_cover(stats, csv_flags, warn_only=config.allow_unknown_metadata)

    validation_items = []
    if config.validation_steps > 0:
        validation_items = _validation_items(config)

    tagged = TaggedConcatDataset(datasets)
    sources = mixture_sources([len(d) for d in datasets], ratios)
    sampler = MixtureSampler(sources, seed=config.seed)
    per_epoch = len(sampler)
    if per_epoch < config.train_batch_size:
        raise ConfigError(f"only {per_epoch} training slices per epoch, fewer than --train_batch_size "
                          f"{config.train_batch_size}")
    for name, src in zip(names, sources):
        logger.info("source %s: %d slices, %d per epoch", name, src.length, src.per_epoch)
    return TrainingData(tagged, sampler, TrainCollate(config.resolution, ood_sources), names, validation_items)


def _validation_items(config: TrainConfig) -> list:
    csvs = {}
    for anatomy in FASTMRI_ANATOMIES:
        given = getattr(config, f"validation_metadata_{anatomy}")
        default = Path(config.data_root) / f"metadata_{anatomy}_val.csv"
        if given:
            csvs[anatomy] = given
        elif anatomy in config.train_csvs and default.is_file():
            csvs[anatomy] = str(default)
    if not csvs:
        raise ConfigError("--validation_steps needs --validation_metadata_brain/--validation_metadata_knee (or "
                          "{data_root}/metadata_{anatomy}_val.csv)")
    datasets = [_make_dataset(config.data_root, csv, "val", config.resolution, True,
                              f"--validation_metadata_{anatomy}", config.seed) for anatomy, csv in csvs.items()]
    # Evenly spread, fixed choice of slices across the validation sets.
    pool = [(ds, i) for ds in datasets for i in range(len(ds))]
    k = min(config.num_validation_slices, len(pool))
    picks = [pool[int(j)] for j in np.linspace(0, len(pool) - 1, k).round().astype(int)] if k else []
    return [ds[i] for ds, i in picks]


def make_dataloader(data: TrainingData, config: TrainConfig) -> DataLoader:
    """A loader over whole batches (``drop_last``: every step sees ``train_batch_size`` samples per process).

    Its own CPU generator keeps the DataLoader from drawing its worker base seed from the global RNG. Workers are
    not persistent: they are re-created each epoch with the dataset's current epoch (its prompt draws depend on it).
    """
    batches = BatchSampler(data.sampler, batch_size=config.train_batch_size, drop_last=True)
    workers = config.dataloader_num_workers
    return DataLoader(
        data.dataset, batch_sampler=batches, collate_fn=data.collate, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(config.seed),
    )


def updates_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimiser steps per epoch (accelerate also steps on an epoch's last, partial accumulation)."""
    return math.ceil(num_batches / gradient_accumulation_steps)

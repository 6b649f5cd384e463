"""Datasets over the preprocessed slice layout and the metadata CSVs.

Layout (:mod:`utils.preprocessing.layout` is the one place that builds these paths; written by
``pre_processing_final.py`` / ``pre_process_cmrx.py``, and the released ContextMRI data)::

    {data_root}/{anatomy}_mvue_{crop}_{split}/slice/{file}/{idx:03d}.npy   complex64 [crop, crop]
    {data_root}/{anatomy}_mvue_{crop}_{split}/mps/{file}/{idx:03d}.npy     complex64 [C, crop, crop]

One CSV row = one item; ``idx`` is the row's ``file_index`` column when present (cardiac CSVs, where
``idx = slice * num_frames + frame``, see ``pre_process_cmrx.py``), else its ``slice``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.metadata import build_prompt, load_metadata_csv, record_from_row
from utils.preprocessing.layout import SPLITS, dataset_dir, slice_paths
from utils.recon_options import ON_MISSING_POLICIES

logger = logging.getLogger(__name__)


@dataclass
class MRISample:
    """One slice.

    Attributes:
        image: float32 ``[2, H, W]`` (real, imag) of the normalised complex MVUE image.
        record: typed metadata record (``utils.metadata.record_from_row``).
        prompt: the ContextMRI prompt of the record.
        maps: complex64 ``[C, H, W]`` sensitivity maps, or ``None`` when not loaded.
        filename: volume name (``file`` of the layout).
        slice_idx: the ``idx`` of the layout.
        anatomy: e.g. ``"brain"``, ``"knee"``, ``"heart"``.
    """

    image: torch.Tensor
    record: dict[str, Any]
    prompt: str
    maps: torch.Tensor | None
    filename: str
    slice_idx: int
    anatomy: str


@dataclass
class MRIBatch:
    """A collated batch.

    Attributes:
        images: float32 ``[B, 2, H, W]``.
        records, prompts, filenames, anatomies: lists of length ``B``.
        slice_idx: long ``[B]``.
        maps: complex64 ``[B, C, H, W]`` when all samples have the same coil count, else a list of ``[C_i, H, W]``
            tensors; ``None`` when no sample has maps.
    """

    images: torch.Tensor
    records: list[dict[str, Any]]
    prompts: list[str]
    maps: torch.Tensor | list[torch.Tensor] | None
    filenames: list[str]
    slice_idx: torch.Tensor
    anatomies: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def collate_samples(samples: Sequence[MRISample]) -> MRIBatch:
    """Stack images (and maps, when their coil counts agree); keep records/prompts as lists.

    Raises:
        ValueError: empty input, images of different sizes, or only some samples with maps.
    """
    if not samples:
        raise ValueError("collate_samples got no samples")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"cannot batch images of different shapes {sorted(shapes)}")
    with_maps = [s.maps is not None for s in samples]
    if any(with_maps) and not all(with_maps):
        raise ValueError("some samples have maps and some do not")
    maps: torch.Tensor | list[torch.Tensor] | None = None
    if all(with_maps):
        map_list = [s.maps for s in samples]
        maps = torch.stack(map_list) if len({tuple(m.shape) for m in map_list}) == 1 else map_list
    return MRIBatch(
        images=torch.stack([s.image for s in samples]),
        records=[s.record for s in samples],
        prompts=[s.prompt for s in samples],
        maps=maps,
        filenames=[s.filename for s in samples],
        slice_idx=torch.tensor([s.slice_idx for s in samples], dtype=torch.long),
        anatomies=[s.anatomy for s in samples],
    )


@dataclass(frozen=True)
class _Item:
    record: dict[str, Any]
    anatomy: str
    filename: str
    idx: int
    slice_path: Path
    maps_path: Path


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header without reading the data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


class MRISliceDataset(Dataset):
    """Slices of the preprocessed layout, one per metadata CSV row.

    Args:
        data_root: folder holding ``{anatomy}_mvue_{crop}_{split}/``.
        metadata_csvs: one or more metadata CSVs (e.g. brain and knee; either alone is enough). Each row needs
            ``anatomy``, ``filename`` and ``slice``; a ``file_index`` column, if present, gives the file index
            instead (cardiac CSVs).
        split: ``"train"`` or ``"val"``: picks the folder; in ``"val"`` the prompt always has the sequence part.
        crop_size: expected image side (also the folder name).
        load_maps: also return the maps (validation / reconstruction).
        on_missing: ``"error"`` raises on rows without files and on images of the wrong size or dtype;
            ``"skip"`` drops those rows with one warning listing them. Checked when the dataset is built
            (``.npy`` headers only).
        prompt_sequence_prob: in training, probability of keeping the ``Sequence/TR/TE/TI/Flip angle`` part.
        seed: base seed for that draw; item ``i`` in epoch ``e`` uses ``default_rng([seed, e, i])`` so the draw
            does not depend on worker processes or on the order of access. Call :meth:`set_epoch`.

    Raises:
        FileNotFoundError, ValueError: see ``on_missing``; also for an empty dataset.
    """

    def __init__(
        self,
        data_root: str | Path,
        metadata_csvs: Sequence[str | Path] | str | Path,
        split: str = "train",
        crop_size: int = 320,
        load_maps: bool = False,
        on_missing: str = "error",
        prompt_sequence_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if on_missing not in ON_MISSING_POLICIES:
            raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING_POLICIES)}, got {on_missing!r}")
        if not 0.0 <= prompt_sequence_prob <= 1.0:
            raise ValueError(f"prompt_sequence_prob must lie in [0, 1], got {prompt_sequence_prob}")
        if isinstance(metadata_csvs, (str, Path)):
            metadata_csvs = [metadata_csvs]
        if not metadata_csvs:
            raise ValueError("at least one metadata CSV is required")
        self.data_root = Path(data_root)
        self.split = split
        self.crop_size = crop_size
        self.load_maps = load_maps
        self.prompt_sequence_prob = prompt_sequence_prob
        self.seed = seed
        self.epoch = 0

        items: list[_Item] = []
        problems: list[str] = []
        absent: dict[str, int] = {}  # anatomy -> rows whose whole slice folder is missing (one hint, not a row each)
        for csv_path in metadata_csvs:
            df = load_metadata_csv(csv_path)
            if "anatomy" not in df.columns:
                raise ValueError(f"{csv_path}: metadata CSV lacks the 'anatomy' column")
            for row_no, row in enumerate(df.to_dict(orient="records")):
                where = f"{Path(csv_path).name} row {row_no + 2}"
                record = record_from_row(row)
                anatomy, filename = record.get("anatomy"), record.get("filename")
                idx_value = record.get("file_index")
                if idx_value is None:
                    idx_value = record.get("slice")
                try:
                    idx = int(float(idx_value))
                except (TypeError, ValueError):
                    problems.append(f"{where}: no usable slice index ({idx_value!r})")
                    continue
                if not anatomy or not filename:
                    problems.append(f"{where}: missing anatomy or filename")
                    continue
                ds_dir = dataset_dir(self.data_root, anatomy, crop_size, split)
                item = _Item(record, anatomy, filename, idx, *slice_paths(ds_dir, filename, idx))
                problem = self._check(item)
                if problem:
                    problems.append(f"{where} ({filename} slice {idx}): {problem}")
                    if not ds_dir.is_dir():
                        absent[anatomy] = absent.get(anatomy, 0) + 1
                    continue
                items.append(item)
        if problems and sum(absent.values()) == len(problems):  # only whole folders missing: wrong size or split
            from utils.data_hints import slice_folder_hint

            hint = "; ".join(filter(None, (slice_folder_hint(self.data_root, a, crop_size, split) for a in absent)))
            problems = [f"{len(problems)} metadata row(s) have no slice file: {hint}"]
            if on_missing == "error":
                raise FileNotFoundError(problems[0])
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            shown = "\n  ".join(problems[:10]) + more
            if on_missing == "error":
                raise FileNotFoundError(f"{len(problems)} metadata row(s) have no usable slice:\n  {shown}")
            warnings.warn(f"skipping {len(problems)} metadata row(s) without a usable slice:\n  {shown}", stacklevel=2)
        if not items:
            raise ValueError(f"no slices found under {self.data_root} for {list(map(str, metadata_csvs))}")
        self.items = items
        self.num_skipped = len(problems)

    def _check(self, item: _Item) -> str | None:
        if not item.slice_path.is_file():
            return f"image file not found: {item.slice_path}"
        try:
            shape, dtype = _npy_shape(item.slice_path)
        except (OSError, ValueError) as exc:
            return f"unreadable image {item.slice_path}: {exc}"
        if shape != (self.crop_size, self.crop_size):
            return f"image {item.slice_path} has shape {shape}, expected {(self.crop_size, self.crop_size)}"
        if not np.issubdtype(dtype, np.complexfloating):
            return f"image {item.slice_path} has dtype {dtype}, expected complex"
        if self.load_maps:
            if not item.maps_path.is_file():
                return f"maps file not found: {item.maps_path}"
            try:
                mshape, _ = _npy_shape(item.maps_path)
            except (OSError, ValueError) as exc:
                return f"unreadable maps {item.maps_path}: {exc}"
            if len(mshape) != 3 or mshape[1:] != (self.crop_size, self.crop_size):
                return f"maps {item.maps_path} have shape {mshape}, expected [C, {self.crop_size}, {self.crop_size}]"
        return None

    def set_epoch(self, epoch: int) -> None:
        """Change the prompt draws for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def include_sequence(self, index: int) -> bool:
        """Whether item ``index``'s prompt keeps the sequence part (always in validation)."""
        if self.split == "val":
            return True
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return bool(rng.random() < self.prompt_sequence_prob)

    def __getitem__(self, index: int) -> MRISample:
        item = self.items[index]
        image = np.load(item.slice_path)
        if image.shape != (self.crop_size, self.crop_size):  # changed on disk since __init__
            raise ValueError(f"{item.slice_path}: shape {image.shape}, expected {(self.crop_size, self.crop_size)}")
        image_t = torch.from_numpy(np.stack([image.real, image.imag]).astype(np.float32))
        maps = None
        if self.load_maps:
            maps = torch.from_numpy(np.load(item.maps_path).astype(np.complex64))
        return MRISample(
            image=image_t,
            record=dict(item.record),
            prompt=build_prompt(item.record, include_sequence=self.include_sequence(index)),
            maps=maps,
            filename=item.filename,
            slice_idx=item.idx,
            anatomy=item.anatomy,
        )

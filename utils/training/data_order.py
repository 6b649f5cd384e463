"""Deterministic, resumable data order for training, with optional mixing of several sources at a fixed ratio.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a resumed run selects the epoch it stopped in and skips
the batches it had consumed (``accelerator.skip_first_batches``), and sees exactly the batches the uninterrupted run saw.
The epoch is chosen with :meth:`MixtureSampler.select_epoch` (deliberately not ``set_epoch``, which accelerate calls with
its own iteration counter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from utils.training.diffusion import step_generator


@dataclass(frozen=True)
class Source:
    """One source of a :class:`TaggedConcatDataset`: its index range and how many of its items an epoch draws."""

    offset: int
    length: int
    per_epoch: int


class TaggedConcatDataset(Dataset):
    """Concatenation of datasets whose items come back as ``(item, source_index)``.

    The tag travels through the collate function, so the training step knows which samples are out-of-distribution
    without relying on metadata values.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            raise ValueError("no datasets")
        self.datasets = list(datasets)
        self.offsets = []
        total = 0
        for ds in self.datasets:
            self.offsets.append(total)
            total += len(ds)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def select_epoch(self, epoch: int) -> None:
        """Pass the epoch to every dataset that has ``set_epoch`` (e.g. ``MRISliceDataset``'s prompt draws)."""
        stack = list(self.datasets)
        while stack:
            ds = stack.pop()
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
            stack.extend(getattr(ds, "datasets", []))  # torch ConcatDataset

    def __getitem__(self, index: int):
        if not 0 <= index < self.total:
            raise IndexError(index)
        source = max(i for i, off in enumerate(self.offsets) if off <= index)
        return self.datasets[source][index - self.offsets[source]], source


def mixture_sources(lengths: Sequence[int], ratios: Sequence[float | None] | None = None) -> list[Source]:
    """Sources for :class:`MixtureSampler`.

    Args:
        lengths: items per source (the first is the reference set, drawn fully once per epoch).
        ratios: per source, the fraction of an epoch it should make up, or ``None`` for "all its items once". The
            first source must be ``None``. E.g. ``[None, 0.2]``: every in-distribution slice once, plus as many
            OOD slices as make 20 % of the epoch.
    """
    ratios = list(ratios) if ratios is not None else [None] * len(lengths)
    if len(ratios) != len(lengths) or ratios[0] is not None:
        raise ValueError("one ratio per source, and the first source must be drawn fully (ratio None)")
    fixed = sum(n for n, r in zip(lengths, ratios) if r is None)
    frac = sum(r for r in ratios if r is not None)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"source ratios must sum to < 1, got {frac}")
    sources, offset = [], 0
    for n, r in zip(lengths, ratios):
        per_epoch = n if r is None else max(1, round(fixed * r / (1.0 - frac)))
        sources.append(Source(offset, n, per_epoch))
        offset += n
    return sources


class MixtureSampler(Sampler[int]):
    """Shuffled indices over concatenated sources; each epoch draws ``source.per_epoch`` items of each source.

    A source drawn more (fewer) times than its length cycles through fresh permutations (takes a random subset), so
    no item repeats before every item of its source has been seen.
    """

    def __init__(self, sources: Sequence[Source], seed: int) -> None:
        self.sources = list(sources)
        self.seed = int(seed)
        self.epoch = 0

    def select_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(s.per_epoch for s in self.sources)

    def epoch_indices(self, epoch: int) -> list[int]:
        gen = step_generator(self.seed, 0x5A3D, epoch)
        picks = []
        for k, src in enumerate(self.sources):
            # Cycle through permutations; the cycle count depends on the epoch so later epochs continue the stream.
            start = epoch * src.per_epoch
            first_cycle, last = start // src.length, (start + src.per_epoch - 1) // src.length
            stream = torch.cat([torch.randperm(src.length, generator=step_generator(self.seed, 0xC1C1E, k, c))
                                for c in range(first_cycle, last + 1)])
            local = stream[start - first_cycle * src.length: start - first_cycle * src.length + src.per_epoch]
            picks.append(local + src.offset)
        order = torch.cat(picks)
        return order[torch.randperm(len(order), generator=gen)].tolist()

    def __iter__(self):
        return iter(self.epoch_indices(self.epoch))

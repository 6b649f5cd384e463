"""Exponential moving average of the trainable weights.

The EMA is a plain object with ``state_dict``/``load_state_dict`` so ``accelerator.register_for_checkpointing`` saves it
inside every ``checkpoint-{step}`` and ``accelerator.load_state`` restores it on resume (the reference forgot to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class EMA:
    """Shadow copies ``θ̄ ← d·θ̄ + (1 − d)·θ`` of a fixed list of parameters, kept in fp32.

    Args:
        parameters: the trainable parameters, in a fixed order (the same order must be passed to every method).
        decay: ``d``; the reference uses 0.999.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so early averages are not dominated by the
            random/initial weights. Off by default (plain decay, as the reference).
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = [p.detach().to(torch.float32).clone() for p in parameters]
        self._backup: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        """One EMA step towards the current ``parameters``."""
        params = list(parameters)
        self._check(params)
        d = self.current_decay()
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Overwrite ``parameters`` with the averages."""
        params = list(parameters)
        self._check(params)
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def averaged(self, parameters: Iterable[nn.Parameter]) -> Iterator[None]:
        """Temporarily swap the averages into ``parameters`` (e.g. for validation); restores them on exit."""
        params = list(parameters)
        backup = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, params):
                    p.copy_(b)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadow)} tensors, the model has {len(self.shadow)} trainable ones")
        for mine, theirs in zip(self.shadow, shadow):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA tensor shape mismatch: {tuple(theirs.shape)} vs {tuple(mine.shape)}")
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        self.shadow = [t.to(device=device, dtype=torch.float32).clone() for t in shadow]
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])

    def _check(self, params: list[nn.Parameter]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(params)}")

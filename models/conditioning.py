"""Condition assembly: text tokens, metadata tokens, or both (text first), one code path for training and sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.condition_embedder import MetadataConditionEmbedder
from models.text_encoders import TextConditioner


class ConditionBuilder(nn.Module):
    """Build ``encoder_hidden_states`` ``[B, L_text + L_meta, D]`` for the UNet.

    Text tokens (``[B, 77, D]`` for CLIP) come first, then the metadata tokens (``[B, 1 + K, D]``), as the released
    UNet expects (it reads any number of tokens). The unconditional condition for classifier-free guidance is the
    empty prompt ``""`` plus every metadata key dropped (``drop_all=True``). Being an ``nn.Module``, its trainable
    parts (the metadata embedder, the text projection) are found by ``parameters()``; the frozen text encoder has
    ``requires_grad=False``.

    Metadata CFG dropout in training is the embedder's (``cfg_prob``/``cfg_strategy``). ``prompt_drop_prob`` adds the
    ContextMRI text dropout (the whole prompt replaced by ``""``, training mode only); with the ``"joint"`` strategy
    and a text encoder, a sample whose metadata is dropped also gets the empty prompt, so the model sees the very
    unconditional input used at sampling time.

    Args:
        text: a :class:`TextConditioner` or ``None`` (a ``"none"`` conditioner counts as ``None``).
        metadata: a :class:`MetadataConditionEmbedder` or ``None``.
        prompt_drop_prob: probability of replacing a prompt by ``""`` in training mode.
        null_dim: with neither text nor metadata (an *unconditional* model), the width ``D`` of the single constant
            all-zero token the UNet receives (its ``encoder_hid_dim``).
    """

    def __init__(
        self,
        text: TextConditioner | None,
        metadata: MetadataConditionEmbedder | None,
        prompt_drop_prob: float = 0.0,
        null_dim: int | None = None,
    ) -> None:
        super().__init__()
        if text is not None and text.kind == "none":
            text = None
        if text is None and metadata is None and null_dim is None:
            raise ValueError("ConditionBuilder needs a text encoder, a metadata embedder, or null_dim (unconditional)")
        self.null_dim = null_dim
        # A buffer (not a parameter): it follows .to(device) and needs no saving.
        self.register_buffer("null_token", torch.zeros(1, 1, int(null_dim or 1)), persistent=False)
        if text is not None and metadata is not None and text.out_dim != metadata.embed_dim:
            raise ValueError(f"text width {text.out_dim} != metadata width {metadata.embed_dim}")
        if not 0.0 <= prompt_drop_prob <= 1.0:
            raise ValueError(f"prompt_drop_prob must be in [0, 1], got {prompt_drop_prob}")
        self.text = text
        self.metadata = metadata
        self.prompt_drop_prob = float(prompt_drop_prob)

    @property
    def out_dim(self) -> int:
        """Token width ``D``."""
        if self.text is not None:
            return self.text.out_dim
        return self.metadata.embed_dim if self.metadata is not None else int(self.null_dim)

    @property
    def is_unconditional(self) -> bool:
        """True when the model sees no condition at all (one constant zero token)."""
        return self.text is None and self.metadata is None

    def num_tokens(self) -> int:
        """``L``: text tokens plus metadata tokens per sample."""
        n_text = self.text.max_length if self.text is not None else 0
        n_meta = self.metadata.num_tokens if self.metadata is not None else 0
        return n_text + n_meta if not self.is_unconditional else 1

    def _prompts(self, records: Sequence[Mapping[str, Any]] | None, prompts: Sequence[str] | None) -> list[str]:
        if prompts is not None:
            return list(prompts)
        if records is None:
            raise ValueError("a text encoder needs prompts or records to build them from")
        from utils.metadata import build_prompt

        return [build_prompt(r) for r in records]

    def build(
        self,
        records: Sequence[Mapping[str, Any]] | None,
        prompts: Sequence[str] | None = None,
        drop_all: bool = False,
        drop_keys: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Assemble the condition tokens.

        Args:
            records: ``B`` metadata records (needed with a metadata embedder; with text only, used to build the
                ContextMRI prompts when ``prompts`` is None).
            prompts: ``B`` prompts for the text encoder (default: ``build_prompt(record)``).
            drop_all: unconditional: empty prompts and every metadata key dropped.
            drop_keys: metadata keys replaced by their empty embedding (the prompt is unchanged).
            generator: RNG for training-time dropout (metadata CFG dropout and prompt dropout).

        Returns:
            ``encoder_hidden_states`` ``[B, L, D]``.
        """
        batch = len(records) if records is not None else len(prompts or [])
        if batch == 0:
            raise ValueError("empty batch")
        if self.is_unconditional:
            return self.null_token.expand(batch, -1, -1)
        parts: list[torch.Tensor] = []
        meta = None
        if self.metadata is not None:
            if records is None:
                raise ValueError("the metadata embedder needs records")
            meta = self.metadata(records, drop_keys=drop_keys, drop_all=drop_all, generator=generator)
        if self.text is not None:
            texts = [""] * batch if drop_all else self._prompts(records, prompts)
            if len(texts) != batch:
                raise ValueError(f"{len(texts)} prompts for a batch of {batch}")
            if self.training and not drop_all:
                drop = torch.zeros(batch, dtype=torch.bool)
                if self.prompt_drop_prob > 0:
                    gen_device = generator.device if generator is not None else torch.device("cpu")
                    drop = (torch.rand(batch, generator=generator, device=gen_device) < self.prompt_drop_prob).cpu()
                if meta is not None and self.metadata.cfg_strategy == "joint":
                    drop = drop | meta.dropped.all(dim=1).cpu()
                texts = ["" if d else p for d, p in zip(drop.tolist(), texts)]
            parts.append(self.text.encode(texts))
        if meta is not None:
            parts.append(meta.tokens.to(parts[0].device) if parts else meta.tokens)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        records: Sequence[Mapping[str, Any]] | None,
        prompts: Sequence[str] | None = None,
        drop_all: bool = False,
        drop_keys: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Alias of :meth:`build`."""
        return self.build(records, prompts, drop_all=drop_all, drop_keys=drop_keys, generator=generator)

    def unconditional(
        self, records: Sequence[Mapping[str, Any]] | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        """The classifier-free-guidance null condition ``[B, L, D]`` (empty prompt, every metadata key dropped)."""
        if records is None:
            if batch_size is None:
                raise ValueError("give records or batch_size")
            records = [{} for _ in range(batch_size)]
        return self.build(records, [""] * len(records), drop_all=True)

    def build_cfg_pair(
        self,
        records: Sequence[Mapping[str, Any]] | None,
        prompts: Sequence[str] | None = None,
        drop_keys: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional tokens, each ``[B, L, D]`` (same ``L``), for guidance scale > 1.

        Concatenate them along the batch (``torch.cat([uncond, cond])``) together with a duplicated ``x_t`` so the
        batch sizes match (the reference crashed here with ``2B`` images against ``B`` conditions).
        """
        cond = self.build(records, prompts, drop_keys=drop_keys)
        uncond = self.unconditional(records if records is not None else None, batch_size=cond.shape[0])
        return cond, uncond

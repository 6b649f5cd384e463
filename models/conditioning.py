"""Condition assembly: text tokens, metadata tokens, or both (text first), one code path for training and sampling.

Semantics (``docs/conditioning.md``):

* The *null condition* (classifier-free guidance's unconditional input) is the empty prompt ``""`` plus every
  metadata key dropped: :meth:`ConditionBuilder.unconditional`. Training produces exactly these tokens for a sample
  drawn as null (probability ``null_prob``, ``--cfg_null_prob``), on top of the per-key or joint metadata dropout and
  the prompt dropout.
* Dropping an attribute removes it everywhere the model can read it: its metadata token becomes the learned empty
  embedding *and* the prompt is rebuilt from the record without that field. This holds for the CFG dropout in
  training and for ``drop_keys`` at inference, for text-only, metadata-only and text + metadata models alike. A key
  the model cannot read at all is an error, never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from models.condition_embedder import MetadataConditionEmbedder
from models.text_encoders import TextConditioner
from utils.metadata import PROMPT_FIELDS, build_prompt, prompt_field, rebuild_prompt


class Condition(NamedTuple):
    """What :meth:`ConditionBuilder.assemble` returns.

    Attributes:
        tokens: ``encoder_hidden_states`` ``[B, L, D]``.
        prompts: the ``B`` prompts the text encoder read (after field removal and dropout); ``None`` without text.
        dropped: ``[B, K]`` bool, metadata keys replaced by their empty embedding by dropout or request (``None``
            without a metadata embedder; missing values are not counted).
        null: ``[B]`` bool, samples given the null condition on purpose (``drop_all``, or the ``null_prob`` draw).
    """

    tokens: torch.Tensor
    prompts: list[str] | None
    dropped: torch.Tensor | None
    null: torch.Tensor


class ConditionBuilder(nn.Module):
    """Build ``encoder_hidden_states`` ``[B, L_text + L_meta, D]`` for the UNet.

    Text tokens (``[B, 77, D]`` for CLIP) come first, then the metadata tokens (``[B, 1 + K, D]``), as the released
    UNet expects (it reads any number of tokens). Being an ``nn.Module``, its trainable parts (the metadata embedder,
    the text projection) are found by ``parameters()``; the frozen text encoder has ``requires_grad=False``.

    Training-time dropout (training mode only, drawn from the ``generator`` passed to :meth:`build`), in this order:

    1. ``null_prob``: the whole sample becomes the null condition, exactly :meth:`unconditional`'s tokens;
    2. the embedder's metadata dropout (``cfg_prob``; ``"joint"``: one draw drops every key, ``"independent"``: one
       draw per key). Each dropped key is also taken out of that sample's prompt. Under ``"joint"`` a sample whose
       keys are all dropped gets the empty prompt, so a joint drop is a null condition too;
    3. ``prompt_drop_prob``: the ContextMRI prompt dropout (the whole prompt replaced by ``""``).

    :meth:`expected_null_rate` gives the resulting probability of the null condition.

    Args:
        text: a :class:`TextConditioner` or ``None`` (a ``"none"`` conditioner counts as ``None``).
        metadata: a :class:`MetadataConditionEmbedder` or ``None``.
        prompt_drop_prob: probability of replacing a prompt by ``""`` in training mode.
        null_dim: with neither text nor metadata (an *unconditional* model), the width ``D`` of the single constant
            all-zero token the UNet receives (its ``encoder_hid_dim``).
        null_prob: probability that a training sample gets the null condition (``--cfg_null_prob``).
    """

    def __init__(
        self,
        text: TextConditioner | None,
        metadata: MetadataConditionEmbedder | None,
        prompt_drop_prob: float = 0.0,
        null_dim: int | None = None,
        null_prob: float = 0.0,
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
        for name, value in (("prompt_drop_prob", prompt_drop_prob), ("null_prob", null_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.text = text
        self.metadata = metadata
        self.prompt_drop_prob = float(prompt_drop_prob)
        self.null_prob = float(null_prob)

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

    # ------------------------------------------------------------------ which attributes the model can read
    def readable_keys(self) -> list[str]:
        """Metadata keys the model can read: the embedder's keys, plus the prompt's fields when it has a text encoder."""
        keys = list(self.metadata.keys) if self.metadata is not None else []
        if self.text is not None:
            keys += [k for k in PROMPT_FIELDS if k not in keys]
        return keys

    def check_drop_keys(self, drop_keys: Sequence[str] | None) -> list[str]:
        """Validate attributes to drop and return them canonical (``"slice"`` -> ``"slice_number"``), in order.

        Raises:
            ValueError: a key the model cannot read at all (neither in the embedder nor in the prompt template);
                dropping it would silently change nothing.
        """
        if not drop_keys:
            return []
        if isinstance(drop_keys, str):
            raise TypeError("drop_keys must be a list of keys, not a single string")
        readable = self.readable_keys()
        out: list[str] = []
        unknown: list[str] = []
        for key in drop_keys:
            canon = prompt_field(key) or key
            if canon not in readable and key in readable:
                canon = key
            if canon not in readable:
                unknown.append(key)
            elif canon not in out:
                out.append(canon)
        if unknown:
            what = ("an unconditional model reads no metadata" if self.is_unconditional else
                    f"this model reads only {readable}")
            raise ValueError(f"cannot drop {unknown}: {what} (metadata embedder: "
                             f"{'yes' if self.metadata is not None else 'no'}, text prompt: "
                             f"{'yes' if self.text is not None else 'no'})")
        return out

    def expected_null_rate(self) -> float:
        """Probability that a training sample gets exactly the null condition's tokens.

        Exact for records whose prompt fields are all present: ``1 - (1 - null_prob) (1 - q)`` with ``q`` the chance
        that the other dropouts produce it by themselves: ``cfg_prob`` (joint), ``cfg_prob ** K`` (independent; times
        ``prompt_drop_prob`` when the prompt states a field that is no metadata key), or ``prompt_drop_prob`` for a
        text-only model. A record with missing values can only be null more often.
        """
        if self.is_unconditional:
            return 1.0
        q = 1.0
        if self.metadata is not None:
            p, k = self.metadata.cfg_prob, len(self.metadata.keys)
            q = p if self.metadata.cfg_strategy == "joint" else p ** k
        if self.text is not None:
            joint = self.metadata is not None and self.metadata.cfg_strategy == "joint"
            covered = self.metadata is not None and set(PROMPT_FIELDS) <= set(self.metadata.keys)
            # Once every key is dropped the prompt is empty too (joint: forced; independent: all its fields removed),
            # unless it states a field that is no metadata key; then only the prompt dropout empties it.
            q *= 1.0 if (joint or covered) else self.prompt_drop_prob
        return 1.0 - (1.0 - self.null_prob) * (1.0 - q)

    # ------------------------------------------------------------------ assembly
    def _prompts(self, records: Sequence[Mapping[str, Any]] | None, prompts: Sequence[str] | None) -> list[str]:
        if prompts is not None:
            if isinstance(prompts, str):
                raise TypeError("prompts must be a list of strings, not a single string")
            return list(prompts)
        if records is None:
            raise ValueError("a text encoder needs prompts or records to build them from")
        return [build_prompt(r) for r in records]

    def _draw(self, batch: int, prob: float, generator: torch.Generator | None) -> torch.Tensor:
        """``[B]`` bool Bernoulli(prob) on the CPU (drawn on the generator's device; nothing drawn when prob is 0)."""
        if prob <= 0.0:
            return torch.zeros(batch, dtype=torch.bool)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return (torch.rand(batch, generator=generator, device=gen_device) < prob).cpu()

    def assemble(
        self,
        records: Sequence[Mapping[str, Any]] | None,
        prompts: Sequence[str] | None = None,
        drop_all: bool = False,
        drop_keys: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Condition:
        """Assemble the condition tokens and report what was dropped (see :meth:`build`)."""
        batch = len(records) if records is not None else len(prompts or [])
        if batch == 0:
            raise ValueError("empty batch")
        if records is not None and isinstance(records, Mapping):
            raise TypeError("records must be a list of dicts, not a single dict")
        if self.is_unconditional:
            if drop_keys:
                self.check_drop_keys(drop_keys)  # raises: nothing to drop
            return Condition(self.null_token.expand(batch, -1, -1), None, None,
                             torch.full((batch,), bool(drop_all)))
        keys = self.check_drop_keys(drop_keys)
        training = self.training and not drop_all
        null = torch.ones(batch, dtype=torch.bool) if drop_all else (
            self._draw(batch, self.null_prob, generator) if training else torch.zeros(batch, dtype=torch.bool))

        meta = None
        if self.metadata is not None:
            if records is None:
                raise ValueError("the metadata embedder needs records")
            meta_keys = [k for k in keys if k in self.metadata.keys]
            meta = self.metadata(records, drop_keys=meta_keys, drop_all=drop_all, generator=generator,
                                 drop_samples=None if drop_all or not bool(null.any()) else null)

        texts = None
        parts: list[torch.Tensor] = []
        if self.text is not None:
            if drop_all:
                texts = [""] * batch
            else:
                texts = self._prompts(records, prompts)
                if len(texts) != batch:
                    raise ValueError(f"{len(texts)} prompts for a batch of {batch}")
                empty = null.clone()
                if training:
                    empty |= self._draw(batch, self.prompt_drop_prob, generator)
                    if meta is not None and self.metadata.cfg_strategy == "joint":
                        empty |= meta.dropped.all(dim=1).cpu()
                dropped_rows = meta.dropped.cpu().tolist() if meta is not None else [[]] * batch
                meta_key_list = self.metadata.keys if meta is not None else []
                out = []
                for i, text in enumerate(texts):
                    if empty[i]:
                        out.append("")
                        continue
                    omit = set(keys) | {k for k, d in zip(meta_key_list, dropped_rows[i]) if d}
                    omit = {k for k in omit if prompt_field(k) is not None}
                    if omit and text:
                        if records is None:
                            raise ValueError(f"cannot remove {sorted(omit)} from the prompts without their records")
                        text = rebuild_prompt(text, records[i], omit)
                    out.append(text)
                texts = out
            parts.append(self.text.encode(texts))
        if meta is not None:
            parts.append(meta.tokens.to(parts[0].device) if parts else meta.tokens)
        tokens = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return Condition(tokens, texts, meta.dropped if meta is not None else None, null)

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
            records: ``B`` metadata records (needed with a metadata embedder, and to take dropped fields out of the
                prompts; with text only and ``prompts=None``, used to build the ContextMRI prompts).
            prompts: ``B`` prompts for the text encoder (default: ``build_prompt(record)``). To have fields removed
                they must be their record's ContextMRI prompt (with or without the sequence part).
            drop_all: the null condition: empty prompts and every metadata key dropped.
            drop_keys: attributes removed everywhere the model reads them: their metadata token becomes the empty
                embedding and the prompt is rebuilt without them (``"slice"`` = ``"slice_number"``). A key the model
                cannot read raises ``ValueError``.
            generator: RNG for training-time dropout (null, metadata and prompt dropout).

        Returns:
            ``encoder_hidden_states`` ``[B, L, D]``.
        """
        return self.assemble(records, prompts, drop_all=drop_all, drop_keys=drop_keys, generator=generator).tokens

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

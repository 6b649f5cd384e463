"""Frozen text encoders (CLIP, T5, or none) for the ContextMRI prompt, with a trainable width projection.

Only local folders are read (``local_files_only=True``): the released ``MRI_checkpoint/text_encoder`` +
``MRI_checkpoint/tokenizer`` (CLIP ViT-L/14 text tower, 768-d) or any local T5 folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from models.choices import TEXT_ENCODER_KINDS  # re-exported

TextEncoderKind = Literal["clip", "t5", "none"]


class TextConditioner(nn.Module):
    """Prompt -> token sequence ``[B, L, D]`` with a frozen encoder and a trainable projection.

    The encoder is frozen (``requires_grad=False``) and always kept in eval mode; the projection is an
    ``nn.Linear(encoder_width, out_dim)`` when the widths differ, else the identity. Prompts are padded/truncated to
    ``max_length`` tokens (77 for CLIP, as ContextMRI does), and the last hidden state is used. For T5 the (projected)
    tokens of padding positions are zeroed (T5 has no causal mask, so they would otherwise carry content).

    Args:
        kind: ``"clip"``, ``"t5"`` or ``"none"`` (no text: ``encode`` returns ``[B, 0, out_dim]``).
        encoder: ``CLIPTextModel`` / ``T5EncoderModel`` (``None`` for ``"none"``).
        tokenizer: the matching tokenizer (``None`` for ``"none"``).
        out_dim: token width ``D`` (the UNet's ``encoder_hid_dim``).
        max_length: tokens per prompt ``L``.
        trainable_encoder: train the encoder too (for a text baseline whose encoder starts from scratch because no
            pretrained weights exist offline); by default it is frozen as in ContextMRI.
    """

    def __init__(
        self,
        kind: TextEncoderKind,
        encoder: nn.Module | None,
        tokenizer: object | None,
        out_dim: int,
        max_length: int = 77,
        trainable_encoder: bool = False,
    ) -> None:
        super().__init__()
        if kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"text encoder kind must be one of {TEXT_ENCODER_KINDS}, got {kind!r}")
        if (kind == "none") != (encoder is None) or (kind == "none") != (tokenizer is None):
            raise ValueError("encoder and tokenizer must be given for 'clip'/'t5' and omitted for 'none'")
        self.kind = kind
        self.out_dim = int(out_dim)
        self.max_length = int(max_length)
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.trainable_encoder = bool(trainable_encoder) and encoder is not None
        if encoder is not None:
            encoder.requires_grad_(self.trainable_encoder)
            encoder.train(self.trainable_encoder and self.training)
            width = int(encoder.config.hidden_size if kind == "clip" else encoder.config.d_model)
        else:
            width = self.out_dim
        self.width = width
        self.proj: nn.Module = nn.Linear(width, self.out_dim) if width != self.out_dim else nn.Identity()

    def train(self, mode: bool = True) -> TextConditioner:
        """Set training mode; a frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.encoder is not None and not self.trainable_encoder:
            self.encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        module = self.encoder if self.encoder is not None else self.proj
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode prompts.

        Args:
            prompts: ``B`` strings (``""`` is the unconditional prompt).

        Returns:
            ``[B, L, out_dim]`` float tokens (``L = max_length``, or 0 for ``"none"``).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        batch = len(prompts)
        if self.encoder is None:
            return torch.zeros(batch, 0, self.out_dim, device=self.device)
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        with torch.set_grad_enabled(self.trainable_encoder and torch.is_grad_enabled()):
            if self.kind == "clip":
                # ContextMRI feeds the CLIP last hidden state without a mask (causal attention, EOS-padded).
                hidden = self.encoder(input_ids=input_ids).last_hidden_state
            else:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        proj_dtype = next(iter(self.proj.parameters()), hidden).dtype
        tokens = self.proj(hidden.to(proj_dtype))
        if self.kind == "t5":
            tokens = tokens * attention_mask[..., None].to(tokens.dtype)
        return tokens

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Alias of :meth:`encode`."""
        return self.encode(prompts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projection's parameters (empty for the identity), plus the encoder's if it is trainable."""
        params = list(self.proj.parameters())
        if self.trainable_encoder:
            params += list(self.encoder.parameters())
        return params


def _resolve_folders(path: Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """Accept a checkpoint root (``text_encoder/`` + ``tokenizer/``) or the encoder folder itself."""
    encoder_dir = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if tokenizer_path is not None:
        tok_dir = Path(tokenizer_path)
    elif (path / "tokenizer").is_dir():
        tok_dir = path / "tokenizer"
    elif (encoder_dir.parent / "tokenizer").is_dir():
        tok_dir = encoder_dir.parent / "tokenizer"
    else:
        tok_dir = encoder_dir
    return encoder_dir, tok_dir


def load_text_conditioner(
    kind: TextEncoderKind,
    path_or_folder: str | Path | None,
    tokenizer_path: str | Path | None = None,
    out_dim: int = 768,
    max_length: int | None = None,
    torch_dtype: torch.dtype | None = None,
    trainable_encoder: bool = False,
) -> TextConditioner:
    """Load a text encoder + tokenizer from local folders (frozen unless ``trainable_encoder``).

    Args:
        kind: ``"clip"``, ``"t5"`` or ``"none"``.
        path_or_folder: a checkpoint root holding ``text_encoder/`` (+ ``tokenizer/``), e.g. ``MRI_checkpoint``, or the
            encoder folder itself. Ignored for ``"none"``.
        tokenizer_path: tokenizer folder; default ``{root}/tokenizer``, a sibling ``tokenizer/`` folder, or the encoder
            folder (T5 folders usually hold both).
        out_dim: token width ``D`` (the UNet's ``encoder_hid_dim``); a trainable projection is added if it differs.
        max_length: tokens per prompt; default 77 (CLIP's context, also used for T5).
        torch_dtype: dtype of the frozen encoder (default float32).

    Returns:
        A :class:`TextConditioner`.
    """
    if kind == "none":
        return TextConditioner("none", None, None, out_dim)
    if path_or_folder is None:
        raise ValueError(f"text encoder {kind!r} needs a local folder")
    encoder_dir, tok_dir = _resolve_folders(Path(path_or_folder), tokenizer_path)
    dtype_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    if kind == "clip":
        from transformers import CLIPTextModel, CLIPTokenizer

        encoder = CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True, **dtype_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        length = max_length or min(77, int(encoder.config.max_position_embeddings))
    elif kind == "t5":
        from transformers import AutoTokenizer, T5EncoderModel

        encoder = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, **dtype_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        length = max_length or 77
    else:
        raise ValueError(f"text encoder kind must be one of {TEXT_ENCODER_KINDS}, got {kind!r}")
    return TextConditioner(kind, encoder, tokenizer, out_dim, max_length=length, trainable_encoder=trainable_encoder)

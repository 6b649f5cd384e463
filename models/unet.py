"""The diffusion UNet: build from ``configs/unet/*.json`` and load the released ContextMRI checkpoint as is.

The released UNet (``configs/unet/config_mri.json``, DeepFloyd-IF-M layout) uses ``SimpleCrossAttn*`` blocks and
``addition_embed_type="text"`` with ``encoder_hid_dim``: the condition tokens ``[B, L, encoder_hid_dim]`` are (1)
attention-pooled into the timestep embedding and (2) projected to ``cross_attention_dim`` and read by every
attention block's ``add_k_proj``/``add_v_proj``. Any number of tokens ``L`` works, so metadata tokens appended after
the 77 CLIP tokens reach both paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from models.choices import RELEASED_MODEL_TYPES  # re-exported: models.unet.RELEASED_MODEL_TYPES

UNET_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "unet"


def resolve_unet_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Return a UNet config dict.

    Args:
        config: a dict, a path to a JSON file, a folder holding ``config.json``, or the name of a file under
            ``configs/unet/`` (``"tiny"``, ``"small"``, ``"config_mri"``).
    """
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    candidates = [path, path / "config.json", UNET_CONFIG_DIR / path, UNET_CONFIG_DIR / f"{path}.json"]
    for candidate in candidates:
        if candidate.is_file():
            with open(candidate, encoding="utf-8") as f:
                return json.load(f)
    raise FileNotFoundError(f"UNet config {config!r} not found (looked at {[str(c) for c in candidates]})")


def build_unet(config: str | Path | Mapping[str, Any]) -> UNet2DConditionModel:
    """Build a randomly initialised ``UNet2DConditionModel`` from a config (see :func:`resolve_unet_config`)."""
    return UNet2DConditionModel.from_config(resolve_unet_config(config))


def condition_dim(unet: UNet2DConditionModel) -> int:
    """Width ``D`` the condition tokens must have: ``encoder_hid_dim`` if set, else ``cross_attention_dim``."""
    cfg = unet.config
    return int(cfg.encoder_hid_dim if cfg.encoder_hid_dim is not None else cfg.cross_attention_dim)


def check_finite_weights(module: torch.nn.Module, source: str | Path) -> None:
    """Raise if any parameter or buffer of ``module`` holds NaN/inf (one pass over the weights).

    The released checkpoint comes without hashes, so damaged bytes inside its weight files (a header left intact)
    would otherwise load silently and turn every reconstructed pixel into NaN.

    Raises:
        ValueError: naming the folder and the first few non-finite tensors.
    """
    bad = [name for name, tensor in (*module.named_parameters(), *module.named_buffers())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"damaged weights in {source}: non-finite values in {shown} (re-download or restore the "
                         "checkpoint)")


@dataclass
class ReleasedCheckpoint:
    """The parts of a released ``MRI_checkpoint/``.

    Attributes:
        unet: ``UNet2DConditionModel`` from ``{path}/{model_type}``.
        scheduler: ``DDPMScheduler`` from ``{path}/scheduler``.
        text_encoder: ``CLIPTextModel`` from ``{path}/text_encoder`` (frozen, eval).
        tokenizer: ``CLIPTokenizer`` from ``{path}/tokenizer``.
    """

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: Any
    tokenizer: Any


def load_released_checkpoint(
    path: str | Path,
    model_type: str = "fastmri",
    torch_dtype: torch.dtype | None = None,
    load_text_encoder: bool = True,
) -> ReleasedCheckpoint:
    """Load the released ContextMRI checkpoint layout as is (docs/formats.md), from local files only.

    Layout: ``{path}/{fastmri|skm-tea}/`` (UNet, diffusers ``save_pretrained``), ``{path}/scheduler/``,
    ``{path}/text_encoder/`` (CLIPTextModel), ``{path}/tokenizer/`` (CLIPTokenizer).

    Args:
        path: the ``MRI_checkpoint`` folder (``--pretrained_model_name_or_path``).
        model_type: ``"fastmri"`` or ``"skm-tea"`` (``--pretrained_model_type``); any other subfolder name that holds
            a UNet is accepted too.
        torch_dtype: dtype for the UNet and text encoder (default: float32).
        load_text_encoder: set False for metadata-only runs (``text_encoder``/``tokenizer`` are then ``None``).

    Raises:
        FileNotFoundError: no UNet under ``{path}/{model_type}``.
        ValueError: a loaded weight holds NaN/inf (:func:`check_finite_weights`).
    """
    root = Path(path)
    unet_dir = root / model_type
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no UNet at {unet_dir} (expected {root}/{{{'|'.join(RELEASED_MODEL_TYPES)}}}/config.json)"
        )
    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True, torch_dtype=torch_dtype)
    check_finite_weights(unet, unet_dir)
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    text_encoder = tokenizer = None
    if load_text_encoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, **dtype_kwargs)
        check_finite_weights(text_encoder, root / "text_encoder")
        text_encoder.requires_grad_(False)
        text_encoder.eval()
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    return ReleasedCheckpoint(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

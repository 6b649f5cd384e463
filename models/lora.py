"""LoRA fine-tuning of the UNet with peft, including the projections that read the condition tokens.

The reference targeted only ``to_q, to_k, to_v, to_out.0``; in the released UNet's ``SimpleCrossAttn*`` blocks the
condition tokens are read by ``add_k_proj``/``add_v_proj``, so those are targeted too. Adapters are saved as
safetensors (``pytorch_lora_weights.safetensors``, with the LoRA config in the file's metadata).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_wrapped_modules(unet: UNet2DConditionModel) -> list[str]:
    """Qualified names of the modules wrapped by a LoRA (peft tuner) layer."""
    return [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def add_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    adapter_name: str = "default",
) -> UNet2DConditionModel:
    """Freeze the UNet and add a LoRA adapter (B initialised to zero, so the output is unchanged at first).

    Args:
        unet: the UNet (modified in place).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha (scale ``alpha / r``); default ``rank`` (scale 1).
        dropout: dropout on the LoRA branch input.
        target_modules: module-name suffixes to wrap.
        adapter_name: peft adapter name.

    Returns:
        The same UNet; only the LoRA parameters require grad.
    """
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=True,
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    wrapped = lora_wrapped_modules(unet)
    unmatched = [t for t in target_modules if not any(w == t or w.endswith("." + t) for w in wrapped)]
    if unmatched:
        warnings.warn(f"LoRA targets matched no module in this UNet: {unmatched}", stacklevel=2)
    return unet


def save_lora(unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter weights to ``{directory}/pytorch_lora_weights.safetensors``; returns the file path."""
    directory = Path(directory)
    unet.save_lora_adapter(directory, adapter_name=adapter_name, safe_serialization=True, weight_name=LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME


def load_lora(
    unet: UNet2DConditionModel, directory_or_file: str | Path, adapter_name: str = "default"
) -> UNet2DConditionModel:
    """Load an adapter written by :func:`save_lora` into ``unet`` (a base UNet without that adapter).

    Accepts the directory or the ``.safetensors`` file. The rank/alpha/targets come from the file's metadata.
    """
    path = Path(directory_or_file)
    directory, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
    # save_lora_adapter writes keys without a "unet." prefix, hence prefix=None.
    unet.load_lora_adapter(
        directory, prefix=None, weight_name=weight_name, adapter_name=adapter_name, local_files_only=True
    )
    return unet


def merge_lora(unet: UNet2DConditionModel, unload: bool = True) -> UNet2DConditionModel:
    """Fuse the LoRA weights into the base weights for inference.

    Args:
        unet: a UNet with a LoRA adapter.
        unload: also remove the peft wrappers (plain ``nn.Linear`` layers with merged weights remain).
    """
    unet.fuse_lora()
    if unload:
        unet.unload_lora()
    return unet

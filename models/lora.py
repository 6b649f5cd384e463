"""LoRA fine-tuning of the UNet with peft, including the projections that read the condition tokens.

The reference targeted only ``to_q, to_k, to_v, to_out.0``; in the released UNet's ``SimpleCrossAttn*`` blocks the
condition tokens are read by ``add_k_proj``/``add_v_proj``, so those are targeted too.

Saved adapter folder (:func:`save_lora`), readable by the libraries' own loaders, no project code needed::

    pytorch_lora_weights.safetensors   diffusers format: keys ``unet.<module>.lora_{A,B}.weight`` (what a pipeline's
                                       ``load_lora_weights`` reads) and the same tensors again under ``transformer.``
                                       (the default ``prefix`` of ``UNet2DConditionModel.load_lora_adapter``); the
                                       LoRA config in the file's ``lora_adapter_metadata`` header, per prefix
    adapter_config.json                peft format: ``LoraConfig`` (``PeftModel.from_pretrained``)
    adapter_model.safetensors          peft format: keys ``base_model.model.<module>.lora_{A,B}.weight``

Loading calls that work (tested in ``tests/test_lora_formats.py``)::

    unet.load_lora_adapter("lora/pytorch_lora_weights.safetensors")            # diffusers, defaults
    unet.load_lora_adapter("lora", use_safetensors=True)                       # diffusers, the folder
    pipe.load_lora_weights("lora")                                             # any pipeline with a ``unet``
    PeftModel.from_pretrained(unet, "lora")                                    # peft

``unet.load_lora_adapter("lora")`` with every default cannot work: for a folder, diffusers 0.42 looks only for the
pickle file ``pytorch_lora_weights.bin`` unless ``use_safetensors=True`` is passed.

The LoRA scale ``lora_alpha / r`` is folded into ``lora_B`` and the files declare ``lora_alpha = r``: diffusers reads
a LoRA file passed without its header (the file-path call above) as scale 1, so every reader gets the same weights
only when the scale is 1. Adapters written by older versions (keys without prefix, true alpha in the header) are
still read by :func:`load_lora`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from utils.files import atomic_write_bytes, write_json

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
#: diffusers' LoRA file name (pipelines and ``load_lora_adapter`` look for it).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: peft's adapter files.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
#: Key prefixes of the diffusers file: a pipeline's UNet component, and ``load_lora_adapter``'s default.
DIFFUSERS_PREFIXES: tuple[str, ...] = ("unet", "transformer")
PEFT_PREFIX = "base_model.model"
#: Header entry holding the LoRA config in diffusers' LoRA files.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


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


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    """A ``LoraConfig.to_dict()`` with sets as sorted lists (JSON has no sets)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def scale_one_lora_state(unet: UNet2DConditionModel,
                         adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors with the scale folded into ``lora_B``, and the matching config (``lora_alpha = r``).

    The effective weight change ``scaling · B A`` of every wrapped module is unchanged.

    Returns:
        ``(tensors, config)``: keys ``<module>.lora_A.weight`` ``[r, in]`` / ``<module>.lora_B.weight`` ``[out, r]``
        relative to the UNet, and a JSON-ready ``LoraConfig`` dict.

    Raises:
        ValueError: ``adapter_name`` is not on the UNet, or the adapter is not a plain LoRA (DoRA, LoRA bias).
    """
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    config = unet.peft_config[adapter_name]
    if config.use_dora or config.lora_bias:  # their extra tensors do not scale with B
        raise ValueError("only plain LoRA adapters can be saved in the standard formats (no DoRA, no LoRA bias)")
    scaling = {name: float(module.scaling[adapter_name]) for name, module in unet.named_modules()
               if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {})}
    tensors = {}
    for key, value in get_peft_model_state_dict(unet, adapter_name=adapter_name).items():
        module, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"unexpected LoRA tensor {key}")
        value = value.detach().to("cpu", copy=True)
        tensors[key] = (value * scaling[module] if part == "B.weight" else value).contiguous()
    out = _json_ready(config.to_dict())
    # Every module's alpha now equals its rank (scale 1).
    out.update(lora_alpha=out["r"], alpha_pattern=dict(out.get("rank_pattern") or {}), use_rslora=False)
    return tensors, out


def save_lora(unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter in diffusers' and peft's formats (see the module docstring); returns the diffusers file.

    Args:
        unet: a UNet carrying the adapter ``adapter_name``.
        directory: the adapter folder (created).
        adapter_name: peft adapter name.
    """
    directory = Path(directory)
    tensors, config = scale_one_lora_state(unet, adapter_name)
    diffusers_tensors: dict[str, torch.Tensor] = {}
    diffusers_config: dict[str, Any] = {}
    for prefix in DIFFUSERS_PREFIXES:  # safetensors refuses shared storage: each prefix gets its own copy
        diffusers_tensors.update({f"{prefix}.{k}": v.clone() for k, v in tensors.items()})
        diffusers_config.update({f"{prefix}.{k}": v for k, v in config.items()})
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(diffusers_config, sort_keys=True)}
    atomic_write_bytes(directory / LORA_WEIGHT_NAME, safetensors_bytes(diffusers_tensors, metadata=header))
    peft_tensors = {f"{PEFT_PREFIX}.{k}": v for k, v in tensors.items()}
    atomic_write_bytes(directory / PEFT_WEIGHT_NAME, safetensors_bytes(peft_tensors, metadata={"format": "pt"}))
    write_json(directory / PEFT_CONFIG_NAME, config, sort_keys=True)
    return directory / LORA_WEIGHT_NAME


def _key_prefix(path: Path) -> str | None:
    """``"unet"`` for a file written by :func:`save_lora`, None for the older prefix-less layout."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return "unet" if keys and all(k.split(".", 1)[0] in DIFFUSERS_PREFIXES for k in keys) else None


def load_lora(
    unet: UNet2DConditionModel, directory_or_file: str | Path, adapter_name: str = "default"
) -> UNet2DConditionModel:
    """Load an adapter written by :func:`save_lora` (or by an older version) into ``unet`` (a base UNet without it).

    Accepts the folder or its ``pytorch_lora_weights.safetensors``. The rank/alpha/targets come from the file's header.

    Raises:
        FileNotFoundError: no ``pytorch_lora_weights.safetensors`` there.
    """
    path = Path(directory_or_file)
    file = path if path.is_file() else path / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} (expected {LORA_WEIGHT_NAME})")
    # Older files hold keys relative to the UNet and the true alpha in their header: prefix=None reads them as is.
    unet.load_lora_adapter(file.parent, prefix=_key_prefix(file), weight_name=file.name, adapter_name=adapter_name,
                           local_files_only=True)
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

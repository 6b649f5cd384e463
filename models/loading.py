"""Reading a training run's export folder for inference: its layout, its completion record, and the loader.

This module is the one place that knows how a finished run's folder is laid out and how it is turned back into
modules; training (``utils/training/export.py``) writes the folder with the names defined here, and inference
(``utils/diffusion_recon.py``, the scripts, benchmarks) reads it with :func:`load_trained_model` without importing the
training package. Layout of ``{output_dir}`` after training (EMA weights when the run used EMA)::

    unet/                         full UNet, diffusers save_pretrained (config.json + safetensors)   -- or --
    lora/                         LoRA adapter on the released UNet (--use_lora), in diffusers' and peft's formats:
                                  pytorch_lora_weights.safetensors, adapter_config.json + adapter_model.safetensors
                                  (models/lora.py lists the plain diffusers/peft calls that load it)
    condition_embedder/           MetadataConditionEmbedder save_pretrained (--enable_condition_emb)
    text_projection.safetensors   trainable text-width projection (only when the text width != the UNet's)
    text_encoder/, tokenizer/     the text encoder, only when it was trained (--train_text_encoder)
    scheduler/scheduler_config.json
    run_config.json               the resolved training config (JSON object, every field written)
    weights.sha256.json           completion record: sha256 of every file above (written last)

The frozen text encoder is not copied: it is read from the released folder (``base``) or ``text_encoder_path``.
Without the record the folder holds no usable model (training still running, killed, or killed during the export):
:func:`verify_export` refuses it, and refuses any file whose bytes differ from the recorded sha256.

Kept free of torch/diffusers imports at module level, so a reconstruction can verify and fingerprint a folder cheaply
before loading anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.files import sha256_file, sha256_json

RUN_CONFIG_NAME = "run_config.json"
EXPORT_RECORD_NAME = "weights.sha256.json"
EXPORT_TMP_NAME = ".export.tmp"
TEXT_PROJECTION_NAME = "text_projection.safetensors"
#: What a final export may put into the output folder (``run_config.json`` and the record excluded).
EXPORT_ITEMS: tuple[str, ...] = ("unet", "lora", "condition_embedder", TEXT_PROJECTION_NAME, "text_encoder",
                                 "tokenizer", "scheduler")
RECORD_FORMAT = 1
#: Values a run config may lack (configs of older versions): the training defaults of these fields.
DEFAULT_MODEL_TYPE = "fastmri"
DEFAULT_TEXT_ENCODER = "clip"
#: Training's checkpoint folders are ``checkpoint-{step}``; recognised here only to say why a folder has no model yet.
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}\d+$")


class IncompleteExportError(FileNotFoundError):
    """The folder holds no finished export (training unfinished or killed, possibly during the export)."""


class CorruptExportError(ValueError):
    """An exported file no longer has the sha256 recorded when it was written."""


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def hash_export_files(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of an export staged in ``folder`` (relative POSIX path -> hex digest)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != EXPORT_RECORD_NAME}


def read_export_record(folder: str | Path) -> dict[str, Any]:
    """The completion record of a finished export.

    Raises:
        IncompleteExportError: no record (with what the folder does hold and how to finish it).
    """
    folder = Path(folder)
    record = read_json_object(folder / EXPORT_RECORD_NAME)
    if record is not None and isinstance(record.get("files"), dict):
        return record
    partial = [name for name in (*EXPORT_ITEMS, RUN_CONFIG_NAME) if (folder / name).exists()]
    has_checkpoints = folder.is_dir() and any(p.is_dir() and _CHECKPOINT_DIR.match(p.name) for p in folder.iterdir())
    if (folder / EXPORT_RECORD_NAME).exists():
        reason = f"{EXPORT_RECORD_NAME} is unreadable"
    elif partial:
        reason = (f"incomplete export ({', '.join(partial)} present, no {EXPORT_RECORD_NAME}): training was "
                  "interrupted during export")
    elif has_checkpoints:
        reason = "no exported model yet (only checkpoints): training was interrupted or is still running"
    else:
        raise IncompleteExportError(f"{folder} is not a training output folder (no {RUN_CONFIG_NAME})")
    raise IncompleteExportError(f"{folder}: {reason}; rerun the training with --resume_from_checkpoint latest")


def verify_export(folder: str | Path) -> dict[str, Any]:
    """Check every exported file against the completion record; returns the record.

    Raises:
        IncompleteExportError: see :func:`read_export_record`.
        CorruptExportError: one message naming every file that is missing or whose bytes changed.
    """
    folder = Path(folder)
    record = read_export_record(folder)
    bad = []
    for rel, digest in sorted(record["files"].items()):
        path = folder / rel
        if not path.is_file():
            bad.append(f"{path} is missing")
        elif sha256_file(path) != digest:
            bad.append(f"{path} does not match the sha256 recorded at export (corrupted or modified)")
    if bad:
        raise CorruptExportError("trained model damaged: " + "; ".join(bad) + " - retrain, or re-export with "
                                 "--resume_from_checkpoint latest")
    return record


def export_fingerprint(folder: str | Path) -> str:
    """A short content identity of a finished export (sha256 over its files' digests, run config included).

    Reads only the record: call :func:`verify_export` (:func:`load_trained_model` does) to check the files themselves.
    """
    return sha256_json(read_export_record(folder)["files"])


@dataclass
class TrainedModel:
    """A trained model ready for sampling.

    Attributes:
        unet: ``UNet2DConditionModel`` in eval mode (LoRA merged unless ``merge=False``).
        conditioner: :class:`models.conditioning.ConditionBuilder` (eval mode: no dropout) giving ``[B, L, D]``.
        scheduler: the training ``DDPMScheduler`` (``alphas_cumprod`` for the samplers).
        run_config: the run's ``run_config.json`` as a dict (training's ``TrainConfig.from_dict`` reads it back).
    """

    unet: Any
    conditioner: Any
    scheduler: Any
    run_config: dict[str, Any] = field(default_factory=dict)


def load_trained_model(
    finetune_folder: str | Path,
    base: str | Path | None = None,
    model_type: str | None = None,
    text_encoder_path: str | Path | None = None,
    device: Any = "cpu",
    torch_dtype: Any = None,
    merge: bool = True,
) -> TrainedModel:
    """Load what training's ``save_inference_snapshot`` wrote (the layout in the module docstring).

    Args:
        finetune_folder: the training run's output folder (``--finetune_folder`` of the reconstruction script).
        base: the released ``MRI_checkpoint`` folder: the base UNet of a LoRA run and the CLIP text encoder
            (default: the run's ``pretrained_model_name_or_path``).
        model_type: released UNet subfolder for LoRA runs (default: the run's ``pretrained_model_type``).
        text_encoder_path: text encoder folder (default: the run's ``text_encoder_path``, else ``base``).
        device: where the modules go.
        torch_dtype: dtype of the UNet (default float32); the condition modules stay float32.
        merge: fuse LoRA weights into the base UNet (faster sampling).

    Raises:
        FileNotFoundError: the folder is not a training output folder, or a needed base folder is missing.
        IncompleteExportError (a ``FileNotFoundError``): training (or its export) did not finish.
        CorruptExportError (a ``ValueError``): a file's bytes differ from the sha256 recorded at export.
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from models.condition_embedder import MetadataConditionEmbedder
    from models.conditioning import ConditionBuilder
    from models.lora import load_lora, merge_lora
    from models.text_encoders import load_text_conditioner
    from models.unet import condition_dim, load_released_checkpoint

    folder = Path(finetune_folder)
    verify_export(folder)  # refuses an unfinished export and damaged files before anything is built
    run_config = json.loads((folder / RUN_CONFIG_NAME).read_text())
    base = base if base is not None else run_config.get("pretrained_model_name_or_path")
    model_type = model_type or run_config.get("pretrained_model_type") or DEFAULT_MODEL_TYPE

    if (folder / "unet" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=torch_dtype)
    elif (folder / "lora").is_dir():
        if base is None:
            raise FileNotFoundError(f"{folder} holds a LoRA adapter: pass base= (the released MRI_checkpoint folder)")
        unet = load_released_checkpoint(base, model_type, torch_dtype=torch_dtype, load_text_encoder=False).unet
        load_lora(unet, folder / "lora")
        if merge:
            merge_lora(unet)
    else:
        raise FileNotFoundError(f"{folder} has neither unet/ nor lora/")

    dim = condition_dim(unet)
    text = None
    text_type = run_config.get("text_encoder_type") or DEFAULT_TEXT_ENCODER
    if text_type != "none":
        trained_here = (folder / "text_encoder" / "config.json").is_file()
        source = folder if trained_here else (text_encoder_path or run_config.get("text_encoder_path") or base)
        text = load_text_conditioner(text_type, source, out_dim=dim)
        proj_file = folder / TEXT_PROJECTION_NAME
        if isinstance(text.proj, torch.nn.Linear):
            if not proj_file.is_file():
                raise FileNotFoundError(f"{proj_file} missing: the text encoder width needs the trained projection")
            text.proj.load_state_dict(load_file(str(proj_file)))
    metadata = None
    if (folder / "condition_embedder").is_dir():
        metadata = MetadataConditionEmbedder.from_pretrained(folder / "condition_embedder")
    conditioner = ConditionBuilder(text, metadata, null_dim=dim if run_config.get("unconditional") else None)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet.to(device).eval().requires_grad_(False)
    conditioner.to(device).eval().requires_grad_(False)
    return TrainedModel(unet=unet, conditioner=conditioner, scheduler=scheduler, run_config=run_config)

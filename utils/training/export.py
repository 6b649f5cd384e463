"""The inference snapshot of a run (what ``recon_complex_multi.py --finetune_folder`` loads) and its loader.

Layout of ``{output_dir}`` after training (EMA weights when the run used EMA)::

    unet/                         full UNet, diffusers save_pretrained (config.json + safetensors)   -- or --
    lora/                         LoRA adapter on the released UNet (--use_lora), in diffusers' and peft's formats:
                                  pytorch_lora_weights.safetensors, adapter_config.json + adapter_model.safetensors
                                  (models/lora.py lists the plain diffusers/peft calls that load it)
    condition_embedder/           MetadataConditionEmbedder save_pretrained (--enable_condition_emb)
    text_projection.safetensors   trainable text-width projection (only when the text width != the UNet's)
    text_encoder/, tokenizer/     the text encoder, only when it was trained (--train_text_encoder)
    scheduler/scheduler_config.json
    run_config.json               the resolved TrainConfig
    weights.sha256.json           completion record: sha256 of every file above (written last)

The frozen text encoder is not copied: it is read from the released folder (``base``) or ``text_encoder_path``.

The export is atomic: everything is written into ``{output_dir}/.export.tmp/`` and hashed there, then the old record
is removed, each item is renamed into place, and the new record is written last. A run killed at any point leaves
either the previous complete model or a folder without a record, which :func:`load_trained_model` refuses
("incomplete export"). Loading checks every file against the record, so flipped bytes give one clear error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from models.condition_embedder import MetadataConditionEmbedder
from models.conditioning import ConditionBuilder
from models.lora import load_lora, merge_lora, save_lora
from models.text_encoders import load_text_conditioner
from models.unet import condition_dim, load_released_checkpoint
from utils.files import write_json
from utils.training.config import OODTrainConfig, TrainConfig
from utils.training.run_folder import (
    EXPORT_ITEMS,
    EXPORT_RECORD_NAME,
    EXPORT_TMP_NAME,
    RECORD_FORMAT,
    RUN_CONFIG_NAME,
    TEXT_PROJECTION_NAME,
    hash_export_files,
    verify_export,
)

logger = logging.getLogger(__name__)


def _write_model_files(model, scheduler: DDPMScheduler, config: TrainConfig, out: Path) -> None:
    """The export's files, written into ``out`` (the staging folder)."""
    unet = model.unet
    if config.use_lora:
        save_lora(unet, out / "lora")
    else:
        unet.save_pretrained(out / "unet", safe_serialization=True)
    conditioner = model.conditioner
    if conditioner.metadata is not None:
        conditioner.metadata.save_pretrained(out / "condition_embedder", safe_serialization=True)
    text = conditioner.text
    if text is not None and isinstance(text.proj, torch.nn.Linear):
        save_file({k: v.detach().cpu().contiguous() for k, v in text.proj.state_dict().items()},
                  str(out / TEXT_PROJECTION_NAME), metadata={"in_features": str(text.proj.in_features),
                                                             "out_features": str(text.proj.out_features)})
    if text is not None and getattr(text, "trainable_encoder", False):
        text.encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        text.tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    config.save(out / RUN_CONFIG_NAME)


def _move_into_place(staged: Path, out: Path, name: str) -> None:
    """Replace ``out/name`` by ``staged/name`` (a rename within one file system)."""
    target = out / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(staged / name, target)


def save_inference_snapshot(model, scheduler: DDPMScheduler, config: TrainConfig, output_dir: str | Path,
                            global_step: int | None = None) -> Path:
    """Write the final model of a run atomically (call with the EMA weights swapped in, on the main process).

    Args:
        model: the unwrapped :class:`utils.training.model.ConditionedDenoiser`.
        scheduler: the training noise scheduler (its config is what samplers read ᾱ from).
        config: the run config (written as ``run_config.json``).
        output_dir: the run's output folder.
        global_step: optimiser steps behind these weights (stored in the record).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    staged = out / EXPORT_TMP_NAME
    if staged.exists():  # left by an export that was killed
        shutil.rmtree(staged)
    staged.mkdir()
    _write_model_files(model, scheduler, config, staged)
    files = hash_export_files(staged)
    record = {"format": RECORD_FORMAT, "global_step": global_step, "files": files}

    (out / EXPORT_RECORD_NAME).unlink(missing_ok=True)  # from here the old model (if any) no longer counts as one
    new_items = [name for name in EXPORT_ITEMS if (staged / name).exists()]
    for name in EXPORT_ITEMS:  # items of an older export that this one does not have
        stale = out / name
        if name not in new_items and stale.is_dir():
            shutil.rmtree(stale)
        elif name not in new_items and stale.exists():
            stale.unlink()
    for name in [*new_items, RUN_CONFIG_NAME]:
        _move_into_place(staged, out, name)
    write_json(out / EXPORT_RECORD_NAME, record, sort_keys=True)
    shutil.rmtree(staged, ignore_errors=True)
    return out


@dataclass
class TrainedModel:
    """A trained model ready for sampling.

    Attributes:
        unet: ``UNet2DConditionModel`` in eval mode (LoRA merged unless ``merge_lora=False``).
        conditioner: :class:`models.conditioning.ConditionBuilder` (eval mode: no dropout) giving ``[B, L, D]``.
        scheduler: the training ``DDPMScheduler`` (``alphas_cumprod`` for the samplers).
        config: the run's :class:`TrainConfig` (or :class:`OODTrainConfig`).
    """

    unet: UNet2DConditionModel
    conditioner: ConditionBuilder
    scheduler: DDPMScheduler
    config: TrainConfig


def load_trained_model(
    finetune_folder: str | Path,
    base: str | Path | None = None,
    model_type: str | None = None,
    text_encoder_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype | None = None,
    merge: bool = True,
) -> TrainedModel:
    """Load what :func:`save_inference_snapshot` wrote.

    Args:
        finetune_folder: the training run's output folder (``--finetune_folder`` of the reconstruction script).
        base: the released ``MRI_checkpoint`` folder: the base UNet of a LoRA run and the CLIP text encoder
            (default: the run's ``--pretrained_model_name_or_path``).
        model_type: released UNet subfolder for LoRA runs (default: the run's ``--pretrained_model_type``).
        text_encoder_path: text encoder folder (default: the run's ``--text_encoder_path``, else ``base``).
        device: where the modules go.
        torch_dtype: dtype of the UNet (default float32); the condition modules stay float32.
        merge: fuse LoRA weights into the base UNet (faster sampling).

    Raises:
        FileNotFoundError: the folder is not a training output folder, or a needed base folder is missing.
        IncompleteExportError (a ``FileNotFoundError``): training (or its export) did not finish.
        CorruptExportError (a ``ValueError``): a file's bytes differ from the sha256 recorded at export.
    """
    folder = Path(finetune_folder)
    verify_export(folder)  # refuses an unfinished export and damaged files before anything is built
    config_path = folder / RUN_CONFIG_NAME
    raw = json.loads(config_path.read_text())
    config = (OODTrainConfig if "use_ood" in raw else TrainConfig).from_dict(raw)
    base = base if base is not None else config.pretrained_model_name_or_path
    model_type = model_type or config.pretrained_model_type

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
    if config.text_encoder_type != "none":
        trained_here = (folder / "text_encoder" / "config.json").is_file()
        source = folder if trained_here else (text_encoder_path or config.text_encoder_path or base)
        text = load_text_conditioner(config.text_encoder_type, source, out_dim=dim)
        proj_file = folder / TEXT_PROJECTION_NAME
        if isinstance(text.proj, torch.nn.Linear):
            if not proj_file.is_file():
                raise FileNotFoundError(f"{proj_file} missing: the text encoder width needs the trained projection")
            text.proj.load_state_dict(load_file(str(proj_file)))
    metadata = None
    if (folder / "condition_embedder").is_dir():
        metadata = MetadataConditionEmbedder.from_pretrained(folder / "condition_embedder")
    conditioner = ConditionBuilder(text, metadata, null_dim=dim if getattr(config, "unconditional", False) else None)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet.to(device).eval().requires_grad_(False)
    conditioner.to(device).eval().requires_grad_(False)
    return TrainedModel(unet=unet, conditioner=conditioner, scheduler=scheduler, config=config)

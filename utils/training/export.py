"""The inference snapshot of a run (what ``recon_complex_multi.py --finetune_folder`` loads), written atomically.

The folder's layout, its completion record and the loader live in :mod:`models.loading` (inference reads a run
without importing training); this module writes that layout.

The export is atomic: everything is written into ``{output_dir}/.export.tmp/`` and hashed there, then the old record
is removed, each item is renamed into place, and the new record is written last. A run killed at any point leaves
either the previous complete model or a folder without a record, which :func:`models.loading.load_trained_model`
refuses ("incomplete export"). Loading checks every file against the record, so flipped bytes give one clear error.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from models.loading import (
    EXPORT_ITEMS,
    EXPORT_RECORD_NAME,
    EXPORT_TMP_NAME,
    RECORD_FORMAT,
    RUN_CONFIG_NAME,
    TEXT_PROJECTION_NAME,
    hash_export_files,
)
from models.lora import save_lora
from utils.files import write_json
from utils.training.config import TrainConfig

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

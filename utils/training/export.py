"""The inference snapshot of a run (what ``recon_complex_multi.py --finetune_folder`` loads) and its loader.

Layout of ``{output_dir}`` after training (EMA weights when the run used EMA)::

    unet/                         full UNet, diffusers save_pretrained (config.json + safetensors)   -- or --
    lora/pytorch_lora_weights.safetensors   LoRA adapter on the released UNet (--use_lora)
    condition_embedder/           MetadataConditionEmbedder save_pretrained (--enable_condition_emb)
    text_projection.safetensors   trainable text-width projection (only when the text width != the UNet's)
    text_encoder/, tokenizer/     the text encoder, only when it was trained (--train_text_encoder)
    scheduler/scheduler_config.json
    run_config.json               the resolved TrainConfig

The frozen text encoder is not copied: it is read from the released folder (``base``) or ``text_encoder_path``.
"""

from __future__ import annotations

import json
import logging
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
from utils.training.config import OODTrainConfig, TrainConfig

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
TEXT_PROJECTION_NAME = "text_projection.safetensors"


def save_inference_snapshot(model, scheduler: DDPMScheduler, config: TrainConfig, output_dir: str | Path) -> Path:
    """Write the final model of a run (call with the EMA weights already swapped in, on the main process).

    Args:
        model: the unwrapped :class:`utils.training.model.ConditionedDenoiser`.
        scheduler: the training noise scheduler (its config is what samplers read ᾱ from).
        config: the run config (written as ``run_config.json``).
        output_dir: the run's output folder.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        FileNotFoundError: the folder is not a finished training run, or a needed base folder is missing.
    """
    folder = Path(finetune_folder)
    config_path = folder / RUN_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a training output folder (no {RUN_CONFIG_NAME})")
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

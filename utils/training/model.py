"""The trained model: UNet (or LoRA adapters on it) + condition builder, built from a run config.

:class:`ConditionedDenoiser` is the one ``nn.Module`` handed to ``accelerator.prepare`` (one DDP wrapper, one
gradient sync), and its forward is the training noise predictor ``ε_θ(x_t, t, c)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from models.condition_embedder import MetadataConditionEmbedder
from models.conditioning import ConditionBuilder
from models.lora import add_lora
from models.text_encoders import load_text_conditioner
from models.unet import build_unet, condition_dim, load_released_checkpoint
from utils.metadata import load_metadata_stats
from utils.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


class ConditionedDenoiser(nn.Module):
    """``ε_θ(x_t, t, c)`` with ``c`` built from prompts and metadata records.

    Args:
        unet: ``UNet2DConditionModel`` (possibly with a LoRA adapter).
        conditioner: builds ``encoder_hidden_states`` ``[B, L, D]`` (text tokens, then metadata tokens).
    """

    def __init__(self, unet: UNet2DConditionModel, conditioner: ConditionBuilder) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        records: Sequence[Mapping[str, Any]],
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict the noise.

        Args:
            x_t: ``[B, 2, H, W]`` noisy images (real, imag channels).
            timesteps: ``[B]`` int64.
            records, prompts: ``B`` metadata records and prompts.
            generator: RNG of the training-time condition dropout (prompt and metadata CFG dropout).

        Returns:
            ``[B, 2, H, W]`` predicted ε.
        """
        tokens = self.conditioner.build(records, prompts, generator=generator)
        return self.unet(x_t, timesteps, encoder_hidden_states=tokens.to(x_t.dtype)).sample

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimiser and EMA see, in a fixed order (names as in ``state_dict``)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


@dataclass
class Components:
    """What :func:`build_components` returns."""

    model: ConditionedDenoiser
    scheduler: DDPMScheduler
    metadata_stats: dict[str, Any] | None


def build_components(config: TrainConfig) -> Components:
    """Build the UNet, text conditioner, metadata embedder and noise scheduler of a run.

    Frozen: the text encoder (unless ``--train_text_encoder``), and the base UNet under LoRA. Trainable: the UNet (or
    its adapters), the metadata embedder, the text projection.

    Raises:
        ConfigError: missing folders/files, or a metadata stats file the embedder cannot use.
    """
    if config.pretrained_model_name_or_path:
        try:
            released = load_released_checkpoint(config.pretrained_model_name_or_path, config.pretrained_model_type,
                                                load_text_encoder=False)
        except (FileNotFoundError, OSError, ValueError) as err:  # ValueError: non-finite weights
            raise ConfigError(f"--pretrained_model_name_or_path: {err}") from err
        unet, scheduler = released.unet, released.scheduler
    else:
        try:
            unet = build_unet(config.unet_config)
        except FileNotFoundError as err:
            raise ConfigError(f"--unet_config: {err}") from err
        # The released model's schedule: DDPM, 1000 steps, linear betas 1e-4 .. 0.02 (diffusers' defaults).
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  prediction_type=config.prediction_type, clip_sample=False)
    dim = condition_dim(unet)
    levels = 2 ** (len(unet.config.block_out_channels) - 1)
    if config.resolution % levels:
        raise ConfigError(f"--resolution {config.resolution} must be divisible by {levels} for this UNet")

    text_source = config.text_encoder_path or config.pretrained_model_name_or_path
    try:
        text = load_text_conditioner(config.text_encoder_type, text_source, out_dim=dim,
                                     trainable_encoder=config.train_text_encoder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the {config.text_encoder_type} text encoder from {text_source}: {err}") from err

    metadata = None
    stats = None
    if config.enable_condition_emb:
        try:
            stats = load_metadata_stats(config.metadata_stats)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--metadata_stats: {err}") from err
        metadata = MetadataConditionEmbedder.from_stats(stats, embed_dim=dim, cfg_prob=config.cfg_prob,
                                                        cfg_strategy=config.cfg_strategy)
    conditioner = ConditionBuilder(text if config.text_encoder_type != "none" else None, metadata,
                                   prompt_drop_prob=config.prompt_cfg_prob if config.text_encoder_type != "none" else 0,
                                   null_dim=dim if config.unconditional else None,
                                   null_prob=0.0 if config.unconditional else config.cfg_null_prob)

    if config.use_lora:
        add_lora(unet, rank=config.lora_rank, alpha=config.lora_alpha)
    else:
        unet.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Components(ConditionedDenoiser(unet, conditioner), scheduler, stats)

"""Typed run configuration of the training scripts, and the command line built from it.

The dataclass is the single source of truth: every flag, its type, default, choices and help text are read from the
fields, so the parser cannot drift from the config (the reference's hand-copied argparse defaults did).
``train_mri.py`` uses :class:`TrainConfig`; ``train_mri_ood.py`` uses :class:`OODTrainConfig`, which only adds fields.
The parser is the project's one command-line idiom (:mod:`utils.cli`): ``--config run_config.json`` starts from a
saved run's settings (options given on the command line override them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.choices import CFG_STRATEGIES, PREDICTION_TYPES, RELEASED_MODEL_TYPES, TEXT_ENCODER_KINDS
from utils import cli
from utils.cli import option
from utils.files import write_json
from utils.recon_options import PRECISIONS

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _opt(default: Any, help: str, choices: tuple | None = None, group: str = "run", **kwargs: Any) -> Any:
    """A dataclass field that carries its command-line help (and choices, aliases: :func:`utils.cli.option`)."""
    return option(default, help, choices=choices, group=group, **kwargs)


@dataclass
class TrainConfig:
    """Resolved configuration of one ``train_mri.py`` run (written to ``run_config.json``)."""

    # --- model ---------------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _opt(
        None, "Released checkpoint folder (fastmri/, skm-tea/, scheduler/, text_encoder/, tokenizer/). Leave out and "
        "give --unet_config to train from scratch.", group="model")
    pretrained_model_type: str = _opt("fastmri", "Which UNet of the released folder to start from.",
                                      RELEASED_MODEL_TYPES, group="model")
    unet_config: str | None = _opt(None, "UNet config JSON for training from scratch (e.g. configs/unet/small.json).",
                                   group="model")
    text_encoder_type: str = _opt("clip", "Text encoder of the prompt (frozen); 'none' = metadata tokens only.",
                                  TEXT_ENCODER_KINDS, group="model")
    text_encoder_path: str | None = _opt(
        None, "Folder with the text encoder (and tokenizer); default: the released folder's text_encoder/ + "
        "tokenizer/.",
        group="model")
    train_text_encoder: bool = _opt(False, "Train the text encoder with the UNet instead of freezing it (for a text "
                                    "encoder that starts from scratch; saved with the model).", group="model")
    unconditional: bool = _opt(False, "No condition at all (one constant token): the unconditioned baseline. Needs "
                               "--text_encoder_type none and no --enable_condition_emb.", group="model")
    enable_condition_emb: bool = _opt(False, "Append typed metadata tokens (Metadata Matters) after the text tokens.",
                                      group="model")
    metadata_stats: str | None = _opt(None, "metadata_stats.json for the condition embedder (needed with "
                                      "--enable_condition_emb).", group="model")
    allow_unknown_metadata: bool = _opt(False, "Only warn (instead of stopping) when the training CSVs hold metadata "
                                        "values or columns that --metadata_stats does not cover.", group="model")
    use_lora: bool = _opt(False, "Train LoRA adapters instead of the full UNet.", group="model")
    lora_rank: int = _opt(4, "LoRA rank.", group="model")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank, i.e. scale 1).", group="model")
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass to save memory.",
                                        group="model")
    prediction_type: str = _opt(
        "epsilon", "What the UNet predicts when trained from scratch: 'epsilon' (the released model, Ho et al. 2020) "
        "or 'v_prediction' (Salimans & Ho 2022; a far better x0 estimate at high noise, though on the demo's CPU "
        "budget its final samples were not better). Saved in scheduler/scheduler_config.json and read by the samplers. Fine-tuning keeps the released "
        "model's type.", PREDICTION_TYPES, group="model")

    # --- data ----------------------------------------------------------------------------------------------------
    data_root: str = _opt("./fastmri", "Root of the preprocessed slices ({anatomy}_mvue_{crop}_{split}/...).",
                          group="data")
    mri_metadata_dir_brain: str | None = _opt(None, "Brain metadata CSV (train split).", group="data",
                                              aliases=("--metadata_csv_brain",))
    mri_metadata_dir_knee: str | None = _opt(None, "Knee metadata CSV (train split).", group="data",
                                             aliases=("--metadata_csv_knee",))
    resolution: int = _opt(320, "Crop size of the preprocessed slices; every image must be resolution x resolution.",
                           group="data", aliases=("--crop_size",), unit="px")
    train_batch_size: int = _opt(4, "Batch size per device.", group="data")
    dataloader_num_workers: int = _opt(2, "Data loader worker processes.", group="data")
    prompt_cfg_prob: float = _opt(0.1, "ContextMRI classifier-free dropout: probability of an empty prompt.",
                                  group="data")

    # --- optimisation --------------------------------------------------------------------------------------------
    learning_rate: float = _opt(1e-4, "AdamW learning rate (the reference fine-tunes at 5e-5).", group="optim")
    text_encoder_lr: float | None = _opt(
        None, "Learning rate of the text encoder's own weights under --train_text_encoder (default: --learning_rate). "
        "A from-scratch encoder can need a higher one than the UNet to learn to tell prompts apart; the text "
        "projection keeps --learning_rate.", group="optim")
    lr_scheduler: str = _opt("constant", "Learning-rate schedule.", LR_SCHEDULERS, group="optim")
    lr_warmup_steps: int = _opt(0, "Linear warm-up steps of the schedule.", group="optim")
    adam_beta1: float = _opt(0.9, "AdamW beta1.", group="optim")
    adam_beta2: float = _opt(0.999, "AdamW beta2.", group="optim")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay.", group="optim")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", group="optim")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", group="optim")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimiser step.", group="optim")
    mixed_precision: str | None = _opt(None, "Autocast precision; default: accelerate's config.",
                                       PRECISIONS, group="optim")
    seed: int = _opt(42, "Seed of model init, data order, noise and timesteps.", group="optim")
    max_train_steps: int | None = _opt(None, "Optimiser steps to run (overrides --num_train_epochs).", group="optim")
    num_train_epochs: int = _opt(100, "Epochs to run when --max_train_steps is not given.", group="optim")
    cfg_prob: float = _opt(0.5, "Metadata dropout probability of the condition embedder (classifier-free training).",
                           group="optim")
    cfg_strategy: str = _opt("joint", "'joint': one draw per sample drops every attribute; 'independent': one draw "
                             "per attribute.", CFG_STRATEGIES, group="optim")
    cfg_null_prob: float = _opt(
        0.1, "Probability that a training sample gets the null condition (empty prompt + every attribute dropped), "
        "exactly the unconditional input of --guidance_scale > 1, on top of the --cfg_strategy / --prompt_cfg_prob "
        "dropout (without it, 'independent' drops all K attributes at once only with probability "
        "cfg_prob^K). Total null rate: 1 - (1 - cfg_null_prob)(1 - q), q = cfg_prob (joint), cfg_prob^K (independent) "
        "or prompt_cfg_prob (text only); see docs/conditioning.md.", group="optim")
    use_ema: bool = _opt(False, "Keep an exponential moving average of the trainable weights (saved as the model).",
                         group="optim")
    ema_decay: float = _opt(0.999, "EMA decay.", group="optim")

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    output_dir: str = _opt("./output", "Where checkpoints, logs and the final model go.", group="run")
    logging_dir: str = _opt("logs", "Tracker folder, relative to --output_dir.", group="run")
    report_to: str = _opt("tensorboard", "accelerate tracker ('tensorboard', 'wandb', 'all' or 'none').", group="run")
    checkpointing_steps: int = _opt(500, "Save the resume state (checkpoint-{step}) every N optimiser steps.",
                                    group="run")
    checkpoints_total_limit: int | None = _opt(None, "Keep at most this many checkpoint-* folders.", group="run")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint-{step} folder to continue from "
                                              "(only a checkpoint of the same run: see docs/CONTRACTS.md).",
                                              group="run")
    overwrite_output_dir: bool = _opt(False, "--output_dir holds another run (different settings): remove its "
                                      "checkpoints, model, logs and validation images and start this run there. "
                                      "Without it such a folder is refused.", group="run")
    validation_steps: int = _opt(0, "Reconstruct validation slices every N optimiser steps (0 = off).", group="run")
    validation_metadata_brain: str | None = _opt(None, "Brain validation CSV.", group="run",
                                                 aliases=("--val_metadata_csv_brain",),
                                                 default_text="{data_root}/metadata_brain_val.csv when validating")
    validation_metadata_knee: str | None = _opt(None, "Knee validation CSV.", group="run",
                                                aliases=("--val_metadata_csv_knee",),
                                                default_text="{data_root}/metadata_knee_val.csv when validating")
    num_validation_slices: int = _opt(4, "Validation slices reconstructed each time.", group="run")
    validation_inference_steps: int = _opt(20, "DDS steps of the validation reconstructions.", group="run")
    validation_mask_type: str = _opt("uniform1d", "Mask of the validation reconstructions.", group="run")
    validation_acc_factor: float = _opt(4.0, "Acceleration of the validation masks.", group="run")
    dry_run: bool = _opt(False, "Build everything, check the inputs, print the resolved config and exit.",
                         group="run")

    # ---------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as strict JSON (sorted keys), atomically."""
        write_json(path, self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring unknown keys (e.g. an OOD run config read by the base class)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def is_ood(self) -> bool:
        return False

    @property
    def train_csvs(self) -> dict[str, str]:
        """In-distribution training CSVs by anatomy (either one alone is enough)."""
        csvs = {"brain": self.mri_metadata_dir_brain, "knee": self.mri_metadata_dir_knee}
        return {k: v for k, v in csvs.items() if v}


@dataclass
class OODTrainConfig(TrainConfig):
    """``train_mri_ood.py``: ``train_mri.py`` plus cardiac out-of-distribution samples with restricted timesteps."""

    cardio_data_root: str | None = _opt(None, "Root of the preprocessed cardiac slices (default: --data_root).",
                                        group="ood")
    mri_metadata_dir_cardio: str | None = _opt(None, "Cardiac metadata CSV (train split).", group="ood",
                                               aliases=("--metadata_csv_cardio",))
    use_ood: bool = _opt(False, "Mix the cardiac set into training (off: identical to train_mri.py).", group="ood")
    ood_ratio: float | None = _opt(None, "Fraction of cardiac samples per epoch, in (0, 1); default: the natural "
                                   "proportion (all slices of both sets once per epoch).", group="ood")
    ood_t_min: int = _opt(750, "Cardiac samples draw timesteps only from [ood_t_min, num_train_timesteps).",
                          group="ood")

    @property
    def is_ood(self) -> bool:
        return self.use_ood


# ---------------------------------------------------------------------------------------------------------------------
# run identity: which settings make two runs different runs
# ---------------------------------------------------------------------------------------------------------------------

#: Fields that do not change the weights a run computes: where/how often it logs, checkpoints and validates, how it
#: is launched or resumed, and switches that trade memory or speed for identical results. Every other field (model,
#: data, optimisation, seed, OOD mixing, and any field added later) is part of the run's identity.
NON_IDENTITY_FIELDS: frozenset[str] = frozenset({
    "output_dir", "logging_dir", "report_to", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "overwrite_output_dir", "dry_run", "dataloader_num_workers", "gradient_checkpointing",
    "allow_unknown_metadata", "validation_steps", "validation_metadata_brain", "validation_metadata_knee",
    "num_validation_slices", "validation_inference_steps", "validation_mask_type", "validation_acc_factor",
})
#: The run length sets the shape of these learning-rate schedules; under the others ("constant",
#: "constant_with_warmup") a finished run may be continued with a larger --max_train_steps / --num_train_epochs.
LENGTH_DEPENDENT_SCHEDULES: frozenset[str] = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial"})
_LENGTH_FIELDS = ("max_train_steps", "num_train_epochs")


def run_identity_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of the identity fields in which two run configs (``to_dict()`` / ``run_config.json``) differ.

    A key missing on one side (a config written before the field existed, or a ``train_mri.py`` config compared
    with a ``train_mri_ood.py`` one) counts as the field's default.

    Returns:
        sorted field names; empty when both configs describe the same run.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(OODTrainConfig)}
    ignore = set(NON_IDENTITY_FIELDS)
    schedules = {stored.get("lr_scheduler", defaults["lr_scheduler"]),
                 current.get("lr_scheduler", defaults["lr_scheduler"])}
    if not schedules & LENGTH_DEPENDENT_SCHEDULES:
        ignore.update(_LENGTH_FIELDS)
    differing = []
    for name in sorted((set(stored) | set(current)) - ignore):
        a = stored.get(name, defaults.get(name))
        b = current.get(name, defaults.get(name))
        if a != b:
            differing.append(name)
    return differing


def describe_differences(stored: Mapping[str, Any], current: Mapping[str, Any], names: list[str]) -> str:
    """``"--seed 1 (there: 0), --cfg_prob 0.2 (there: 0.5)"`` for an error message."""
    defaults = {f.name: f.default for f in dataclasses.fields(OODTrainConfig)}
    return ", ".join(f"--{n} {current.get(n, defaults.get(n))!r} (there: {stored.get(n, defaults.get(n))!r})"
                     for n in names)


# ---------------------------------------------------------------------------------------------------------------------
# argparse built from the dataclass
# ---------------------------------------------------------------------------------------------------------------------

_GROUP_TITLES = {"model": "model", "data": "data", "optim": "optimisation", "run": "run / bookkeeping",
                 "ood": "out-of-distribution (cardiac)"}


def build_parser(config_cls: type[TrainConfig] = TrainConfig,
                 description: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one ``--flag`` per field of ``config_cls`` (and ``--config run_config.json``)."""
    return cli.build_parser(config_cls, description=description or config_cls.__doc__, group_titles=_GROUP_TITLES,
                            config_help="a run's run_config.json (or any JSON of these settings): its settings, "
                            "with the options given here overriding them")


def parse_config(argv: list[str] | None = None, config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Parse a command line (and ``--config FILE``) into a ``config_cls`` and check the values that need no file
    access."""
    config = cli.parse(config_cls, argv, build_parser(config_cls))
    check_config(config)
    return config


class ConfigError(ValueError):
    """A run configuration that cannot work; raised before anything is built."""


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient norm and stopped (nothing exported from that state).

    Attributes:
        report: print the message (True on the main process only, so a multi-process run says it once).
    """

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


def check_config(config: TrainConfig) -> None:
    """Validate the values of a config (the files they name: ``utils.training.data_loading.build_training_data``).

    Raises:
        ConfigError: with a message that names the offending flag.
    """
    problems: list[str] = []
    if not config.pretrained_model_name_or_path and not config.unet_config:
        problems.append("give --pretrained_model_name_or_path (released checkpoint) or --unet_config (from scratch)")
    if not config.train_csvs:
        problems.append("give at least one of --mri_metadata_dir_brain / --mri_metadata_dir_knee")
    if config.use_lora and not config.pretrained_model_name_or_path:
        problems.append("--use_lora adapts the released UNet: give --pretrained_model_name_or_path")
    if config.pretrained_model_name_or_path and config.prediction_type != "epsilon":
        problems.append("--prediction_type applies to training from scratch; the released model predicts epsilon")
    if config.enable_condition_emb and not config.metadata_stats:
        problems.append("--enable_condition_emb needs --metadata_stats")
    if config.unconditional and (config.text_encoder_type != "none" or config.enable_condition_emb):
        problems.append("--unconditional needs --text_encoder_type none and no --enable_condition_emb")
    if config.text_encoder_type == "none" and not config.enable_condition_emb and not config.unconditional:
        problems.append("--text_encoder_type none leaves the model unconditioned: add --enable_condition_emb "
                        "(or say --unconditional)")
    if config.train_text_encoder and config.text_encoder_type == "none":
        problems.append("--train_text_encoder needs a text encoder (--text_encoder_type clip|t5)")
    if config.text_encoder_type != "none" and not (config.text_encoder_path or config.pretrained_model_name_or_path):
        problems.append(f"--text_encoder_type {config.text_encoder_type} needs --text_encoder_path (or a released "
                        "folder with text_encoder/)")
    for f in dataclasses.fields(config):  # nan/inf pass every range check below: refuse them first
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name} must be a finite number, got {value}")
    for name in ("cfg_prob", "prompt_cfg_prob", "cfg_null_prob"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"--{name} must lie in [0, 1], got {value}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "resolution", "lora_rank", "checkpointing_steps",
                 "num_train_epochs"):
        if getattr(config, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(config, name)}")
    if config.max_train_steps is not None and config.max_train_steps < 1:
        problems.append(f"--max_train_steps must be >= 1, got {config.max_train_steps}")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        problems.append(f"--checkpoints_total_limit must be >= 1, got {config.checkpoints_total_limit}")
    if not 0.0 < config.ema_decay < 1.0:
        problems.append(f"--ema_decay must lie in (0, 1), got {config.ema_decay}")
    if config.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {config.learning_rate}")
    te_lr = config.text_encoder_lr
    if te_lr is not None and not (te_lr > 0 and math.isfinite(te_lr)):
        problems.append(f"--text_encoder_lr must be > 0, got {config.text_encoder_lr}")
    if config.text_encoder_lr is not None and not config.train_text_encoder:
        problems.append("--text_encoder_lr needs --train_text_encoder (a frozen encoder has no weights to train)")
    if config.dataloader_num_workers < 0 or config.validation_steps < 0 or config.lr_warmup_steps < 0:
        problems.append("--dataloader_num_workers, --validation_steps and --lr_warmup_steps must be >= 0")
    if config.resume_from_checkpoint not in (None, "latest") and not Path(config.resume_from_checkpoint).is_dir():
        problems.append(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder (or use 'latest')")
    if config.is_ood:
        if not config.mri_metadata_dir_cardio:
            problems.append("--use_ood needs --mri_metadata_dir_cardio")
        if config.ood_ratio is not None and not 0.0 < config.ood_ratio < 1.0:
            problems.append(f"--ood_ratio must lie in (0, 1), got {config.ood_ratio}")
        if not 0 <= config.ood_t_min:
            problems.append(f"--ood_t_min must be >= 0, got {config.ood_t_min}")
    if problems:
        raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(problems))

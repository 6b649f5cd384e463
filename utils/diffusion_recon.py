"""A trained conditional diffusion model packaged as a reconstructor: condition tokens -> guided ε -> DDS or DPS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from utils.samplers import DiffusionSchedule, SamplerStats, dds_sample, dps_sample, make_cfg_eps_fn


class DiffusionReconstructor:
    """Callable ``(y, op, records, prompts, generators) -> (x [B, H, W] complex, nfe per sample)`` used by
    :func:`utils.reconstruction.run_reconstruction`.

    Args:
        unet: diffusers ``UNet2DConditionModel`` (eval mode).
        conditioner: :class:`models.conditioning.ConditionBuilder`.
        schedule: the diffusion schedule (``alphas_cumprod``) the model was trained with.
        sampler: ``"dds"`` or ``"dps"``.
        num_steps, eta, gamma, cg_iter: DDS settings (defaults 100, 0.8, 5, 5, as the reference). ``eta`` is the
            DDIM η of DPS's update too (the DPS paper's ancestral sampler is ``eta=1``).
        dps_step: DPS step size ζ'.
        guidance_scale: CFG scale ``w`` (``w <= 1``: conditional only).
        drop_metadata_keys: attributes removed at inference, everywhere the model reads them (metadata token -> its
            learned empty embedding, prompt rebuilt without the field).
        uncond_drop_keys: for ``w > 1``, the attributes the unconditional branch drops (None: the null condition,
            empty prompt and every key dropped); dropping only some gives per-attribute guidance, for text,
            metadata and text + metadata models alike.
        autocast_dtype: run the network in this dtype (e.g. ``torch.bfloat16``); data consistency stays fp32.
        clip_x0: limit ``|x̂₀|`` to this value (off by default, as the reference): before data consistency in DDS,
            in the DDIM update of DPS.

    Raises:
        ValueError: a drop key the model cannot read at all (neither a metadata token nor a prompt field).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioner: torch.nn.Module,
        schedule: DiffusionSchedule,
        sampler: str = "dds",
        num_steps: int = 100,
        eta: float = 0.8,
        gamma: float = 5.0,
        cg_iter: int = 5,
        dps_step: float = 1.0,
        guidance_scale: float = 1.0,
        drop_metadata_keys: Sequence[str] | None = None,
        uncond_drop_keys: Sequence[str] | None = None,
        autocast_dtype: torch.dtype | None = None,
        clip_x0: float | None = None,
    ) -> None:
        if sampler not in ("dds", "dps"):
            raise ValueError(f"unknown sampler {sampler!r}")
        self.unet = unet.eval()
        self.conditioner = conditioner.eval()
        self.schedule = schedule
        self.sampler = sampler
        self.num_steps = num_steps
        self.eta = eta
        self.gamma = gamma
        self.cg_iter = cg_iter
        self.dps_step = dps_step
        self.guidance_scale = guidance_scale
        # A key the model cannot read would make an ablation or per-attribute guidance a silent no-op: refuse it.
        check = getattr(conditioner, "check_drop_keys", None)
        self.drop_metadata_keys = check(drop_metadata_keys) if check else list(drop_metadata_keys or [])
        if uncond_drop_keys is None:
            self.uncond_drop_keys = None
        else:
            self.uncond_drop_keys = check(uncond_drop_keys) if check else list(uncond_drop_keys)
        self.autocast_dtype = autocast_dtype
        self.clip_x0 = clip_x0

    @torch.no_grad()
    def condition(
        self, records: Sequence[Mapping[str, Any]], prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional and (for ``w > 1``) unconditional tokens ``[B, L, D]``."""
        drop = self.drop_metadata_keys or None
        cond = self.conditioner.build(records, prompts, drop_keys=drop)
        uncond = None
        if self.guidance_scale > 1.0:
            if self.uncond_drop_keys is None:
                uncond = self.conditioner.unconditional(records)
            else:
                keys = list(dict.fromkeys([*self.uncond_drop_keys, *self.drop_metadata_keys]))
                uncond = self.conditioner.build(records, prompts, drop_keys=keys)
        return cond, uncond

    def __call__(
        self,
        y: torch.Tensor,
        op: Any,
        records: Sequence[Mapping[str, Any]],
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, int]:
        cond, uncond = self.condition(records, prompts)
        eps_fn = make_cfg_eps_fn(self.unet, cond, uncond, self.guidance_scale, autocast_dtype=self.autocast_dtype,
                                 alphas_cumprod=self.schedule)
        stats = SamplerStats()
        if self.sampler == "dds":
            x = dds_sample(
                eps_fn, op, y, self.schedule, num_steps=self.num_steps, eta=self.eta, gamma=self.gamma,
                cg_iter=self.cg_iter, generators=list(generators), stats=stats, clip_x0=self.clip_x0,
            )
        else:
            x = dps_sample(
                eps_fn, op, y, self.schedule, num_steps=self.num_steps, step_size=self.dps_step, eta=self.eta,
                generators=list(generators), stats=stats, clip_x0=self.clip_x0,
            )
        return x, stats.nfe


def check_embedder_matches_stats(embedder: Any, stats_path: str | None) -> None:
    """Raise ``ValueError`` if a trained embedder was built from a different ``metadata_stats.json``.

    Vocabularies and numerical ranges decide what each embedding row means; a different stats file would silently
    feed the model wrong indices and normalisations.
    """
    if embedder is None or stats_path is None:
        return
    from models.condition_embedder import MetadataConditionEmbedder

    fresh = MetadataConditionEmbedder.from_stats(
        stats_path, embed_dim=embedder.config.embed_dim, include_keys=list(embedder.config.key_order), sort_keys=False,
    ) if set(embedder.config.key_order) <= set(_stats_keys(stats_path)) else None
    if fresh is None:
        missing = sorted(set(embedder.config.key_order) - set(_stats_keys(stats_path)))
        raise ValueError(f"{stats_path} lacks key(s) {missing} that the trained condition embedder uses")
    problems = []
    for field_name in ("categorical", "multi_label", "numerical"):
        trained = {k: list(v) for k, v in (getattr(embedder.config, field_name) or {}).items()}
        given = {k: list(v) for k, v in (getattr(fresh.config, field_name) or {}).items()}
        for key in sorted(set(trained) | set(given)):
            if trained.get(key) != given.get(key):
                problems.append(f"{key}: trained with {trained.get(key)!r}, stats file has {given.get(key)!r}")
    if problems:
        raise ValueError(
            f"the condition embedder in the checkpoint does not match {stats_path}:\n  " + "\n  ".join(problems[:10])
            + "\nUse the metadata_stats.json the model was trained with."
        )


def _stats_keys(stats_path: str) -> list[str]:
    from utils.metadata import load_metadata_stats

    return list(load_metadata_stats(stats_path))


def load_reconstruction_model(
    pretrained_model_name_or_path: str | None,
    pretrained_model_type: str = "fastmri",
    finetune_folder: str | None = None,
    enable_condition_emb: bool = False,
    metadata_stats: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module, DiffusionSchedule]:
    """The UNet, condition builder and schedule to sample with.

    With ``finetune_folder`` (a ``train_mri.py`` output) the trained UNet/LoRA, condition embedder and scheduler are
    loaded (the released folder supplies the base UNet of a LoRA run and the CLIP text encoder); without it, the
    released ContextMRI model with its CLIP prompt conditioning.

    Raises:
        ValueError: ``--enable_condition_emb`` without an embedder in the folder, or a stats file that does not match.
    """
    if finetune_folder is not None:
        from utils.training import load_trained_model

        trained = load_trained_model(finetune_folder, base=pretrained_model_name_or_path,
                                     model_type=pretrained_model_type, device=device)
        embedder = trained.conditioner.metadata
        if enable_condition_emb and embedder is None:
            raise ValueError(f"--enable_condition_emb given but {finetune_folder} has no condition_embedder/")
        if embedder is not None and not enable_condition_emb:
            raise ValueError(f"{finetune_folder} was trained with metadata embeddings: pass --enable_condition_emb "
                             "and its --metadata_stats")
        if embedder is not None:
            if metadata_stats is None:
                raise ValueError("--metadata_stats is required with --enable_condition_emb")
            check_embedder_matches_stats(embedder, metadata_stats)
        return trained.unet, trained.conditioner, DiffusionSchedule.from_scheduler(trained.scheduler)
    if pretrained_model_name_or_path is None:
        raise ValueError("give --pretrained_model_name_or_path (the released MRI_checkpoint) and/or --finetune_folder")
    if enable_condition_emb:
        raise ValueError("--enable_condition_emb needs --finetune_folder: the released model has no metadata embedder")
    from models.conditioning import ConditionBuilder
    from models.text_encoders import TextConditioner
    from models.unet import condition_dim, load_released_checkpoint

    released = load_released_checkpoint(pretrained_model_name_or_path, pretrained_model_type)
    text = TextConditioner("clip", released.text_encoder, released.tokenizer, condition_dim(released.unet))
    conditioner = ConditionBuilder(text, None)
    unet = released.unet.to(device).eval().requires_grad_(False)
    conditioner.to(device).eval().requires_grad_(False)
    return unet, conditioner, DiffusionSchedule.from_scheduler(released.scheduler)

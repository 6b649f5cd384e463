"""A trained conditional diffusion model packaged as a reconstructor: condition tokens -> guided ε -> DDS or DPS."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.loading import DEFAULT_MODEL_TYPE, DEFAULT_TEXT_ENCODER, EXPORT_ITEMS, RUN_CONFIG_NAME
from utils.recon_options import RECON_SAMPLERS, SAMPLER_DEFAULTS, reconstructor_kwargs
from utils.samplers import DiffusionSchedule, SamplerStats, dds_sample, dps_sample, make_cfg_eps_fn
from utils.samplers.dps import PRIOR_ERROR_STD


class DiffusionReconstructor:
    """Callable ``(y, op, records, prompts, generators) -> (x [B, H, W] complex, nfe per sample)`` used by
    :func:`utils.reconstruction.run_reconstruction`.

    Args:
        unet: diffusers ``UNet2DConditionModel`` (eval mode).
        conditioner: :class:`models.conditioning.ConditionBuilder`.
        schedule: the diffusion schedule (``alphas_cumprod``) the model was trained with.
        sampler: ``"dds"`` or ``"dps"``.
        num_steps, eta, gamma, cg_iter: DDS settings (defaults: :data:`utils.recon_options.SAMPLER_DEFAULTS`, the
            reference's 100, 0.8, 5, 5). ``eta`` is the
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
        sampler: str = SAMPLER_DEFAULTS.sampler,
        num_steps: int = SAMPLER_DEFAULTS.num_steps,
        eta: float = SAMPLER_DEFAULTS.eta,
        gamma: float = SAMPLER_DEFAULTS.gamma,
        cg_iter: int = SAMPLER_DEFAULTS.cg_iter,
        dps_step: float = SAMPLER_DEFAULTS.dps_step,
        guidance_scale: float = SAMPLER_DEFAULTS.guidance_scale,
        drop_metadata_keys: Sequence[str] | None = None,
        uncond_drop_keys: Sequence[str] | None = SAMPLER_DEFAULTS.uncond_drop_keys,
        autocast_dtype: torch.dtype | None = None,
        clip_x0: float | None = SAMPLER_DEFAULTS.clip_x0,
    ) -> None:
        if sampler not in RECON_SAMPLERS:
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
        noise_sigma: float | torch.Tensor | None = None,
        prior_error_std: float = PRIOR_ERROR_STD,
    ) -> tuple[torch.Tensor, int]:
        """Reconstruct a batch.

        Args:
            y: measured k-space ``[B, C, H, W]`` complex (on the prior's normalised scale).
            op: the forward model of the batch.
            records, prompts: ``B`` metadata records and prompts.
            generators: one generator per slice.
            noise_sigma: the measurement's noise σ per real/imaginary part on ``y``'s scale (scalar or ``[B]``), when
                known: DPS's step then follows it (:func:`utils.samplers.dps_noise_weight`); DDS ignores it (its γ
                rule is the caller's, :func:`utils.raw_data.noise_aware_gamma`).
            prior_error_std: s of DPS's σ-aware step.

        Returns:
            ``(x, nfe)``: complex ``[B, H, W]`` and network evaluations per slice.
        """
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
                generators=list(generators), stats=stats, clip_x0=self.clip_x0, noise_sigma=noise_sigma,
                prior_error_std=prior_error_std,
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
    pretrained_model_type: str | None = None,
    finetune_folder: str | None = None,
    enable_condition_emb: bool = False,
    metadata_stats: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module, DiffusionSchedule]:
    """The UNet, condition builder and schedule to sample with.

    With ``finetune_folder`` (a ``train_mri.py`` output) the trained UNet/LoRA, condition embedder and scheduler are
    loaded (the released folder supplies the base UNet of a LoRA run and the CLIP text encoder); without it, the
    released ContextMRI model with its CLIP prompt conditioning. ``pretrained_model_type=None`` means the run's own
    ``run_config.json`` value (a LoRA is applied to the base UNet it was trained on), else ``"fastmri"``; call
    :func:`resolve_model_plan` first to have contradictions reported.

    Raises:
        ValueError: ``--enable_condition_emb`` without an embedder in the folder, or a stats file that does not match.
    """
    if finetune_folder is not None:
        from models.loading import load_trained_model

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

    released = load_released_checkpoint(pretrained_model_name_or_path, pretrained_model_type or DEFAULT_MODEL_TYPE)
    text = TextConditioner("clip", released.text_encoder, released.tokenizer, condition_dim(released.unet))
    conditioner = ConditionBuilder(text, None)
    unet = released.unet.to(device).eval().requires_grad_(False)
    conditioner.to(device).eval().requires_grad_(False)
    return unet, conditioner, DiffusionSchedule.from_scheduler(released.scheduler)


# ----------------------------------------------------------------------------------------------------------------------
# what a reconstruction will load, resolved and identified without loading it (cheap: JSON files and hashes)
# ----------------------------------------------------------------------------------------------------------------------

# What a training output folder holds for inference (models/loading.py); checkpoints and logs are not part.
FINETUNE_ENTRIES = (*EXPORT_ITEMS, RUN_CONFIG_NAME)


@dataclass
class ModelPlan:
    """The model a reconstruction will load, resolved from the flags and the run's ``run_config.json``.

    Attributes:
        base: the released ``MRI_checkpoint`` folder used (LoRA base, text encoder, released model), or None.
        model_type: the released UNet subfolder (``fastmri`` / ``skm-tea``).
        finetune_folder: the training output folder, or None for the released model.
        is_lora: the folder holds a LoRA adapter (applied to ``base/model_type``).
        text_encoder_type: ``clip`` / ``t5`` / ``none``.
        text_source: the folder the frozen text encoder is read from (None when it was trained, or no text).
        metadata_stats: the stats file (the flag, else the run's own when that file exists).
        train_size: the image side the model was trained at (``run_config.json`` ``resolution``, else the UNet's
            ``sample_size``); None when unknown.
        notes: what was resolved from the run and any ignored flag, one line each (printed by the script).
    """

    base: str | None
    model_type: str
    finetune_folder: str | None
    is_lora: bool
    text_encoder_type: str
    text_source: str | None
    metadata_stats: str | None
    train_size: int | None
    notes: list[str] = field(default_factory=list)


def read_run_config(finetune_folder: str | Path) -> dict[str, Any]:
    """The ``run_config.json`` of a training output folder.

    Raises:
        ValueError: the folder is missing, is not a finished training run, or its config is not valid JSON.
    """
    folder = Path(finetune_folder)
    if not folder.is_dir():
        raise ValueError(f"--finetune_folder {folder} is not a folder")
    path = folder / "run_config.json"
    if not path.is_file():
        raise ValueError(f"--finetune_folder {folder} is not a finished training run (no run_config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _sample_size(unet_dir: Path) -> int | None:
    try:
        value = json.loads((unet_dir / "config.json").read_text()).get("sample_size")
    except (OSError, ValueError):
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if len(set(value)) == 1 else None
    return int(value) if value is not None else None


def resolve_model_plan(
    pretrained_model_name_or_path: str | None = None,
    pretrained_model_type: str | None = None,
    finetune_folder: str | None = None,
    metadata_stats: str | None = None,
) -> ModelPlan:
    """Resolve what will be loaded: the run's own ``run_config.json`` values win unless a flag is given.

    ``pretrained_model_type`` (None = not given) comes from the run config, else ``"fastmri"``. A given value that
    contradicts the run's is refused for a LoRA run (the adapter would be applied to another base UNet) and noted as
    ignored for a full UNet (the base is not read). The released folder defaults to the run's
    ``pretrained_model_name_or_path``, the stats file to the run's ``metadata_stats`` when that file exists.

    Raises:
        ValueError: a contradiction that would load a wrong model, or a folder the model needs that is missing.
    """
    notes: list[str] = []
    if finetune_folder is None:
        if pretrained_model_name_or_path is None:
            raise ValueError("method 'diffusion' needs --finetune_folder and/or --pretrained_model_name_or_path")
        base = Path(pretrained_model_name_or_path)
        model_type = pretrained_model_type or DEFAULT_MODEL_TYPE
        if not (base / model_type / "config.json").is_file():
            raise ValueError(f"--pretrained_model_name_or_path {base}: no UNet at {base / model_type}")
        return ModelPlan(str(base), model_type, None, False, "clip", str(base), metadata_stats,
                         _sample_size(base / model_type), notes)

    cfg = read_run_config(finetune_folder)
    folder = Path(finetune_folder)
    run_type = cfg.get("pretrained_model_type")
    is_lora = not (folder / "unet" / "config.json").is_file() and (folder / "lora").is_dir()
    if not is_lora and not (folder / "unet" / "config.json").is_file():
        raise ValueError(f"--finetune_folder {folder} has neither unet/ nor lora/ (an unfinished export?)")
    if pretrained_model_type is None:
        model_type = run_type or DEFAULT_MODEL_TYPE
        if run_type and is_lora:
            notes.append(f"base UNet type {run_type!r} from {folder / 'run_config.json'}")
    else:
        model_type = pretrained_model_type
        if run_type and run_type != pretrained_model_type:
            if is_lora:
                raise ValueError(
                    f"--pretrained_model_type {pretrained_model_type} contradicts {folder / 'run_config.json'}: the "
                    f"LoRA adapter was trained on the {run_type!r} base UNet; leave the flag out (or pass {run_type})")
            notes.append(f"--pretrained_model_type {pretrained_model_type} ignored: {folder} holds a full UNet "
                         f"(trained from {run_type!r})")
    base = pretrained_model_name_or_path or cfg.get("pretrained_model_name_or_path")
    if pretrained_model_name_or_path is None and base:
        notes.append(f"released folder {base} from run_config.json")
    if is_lora:
        if not base:
            raise ValueError(f"{folder} holds a LoRA adapter: pass --pretrained_model_name_or_path (its base)")
        if not (Path(base) / model_type / "config.json").is_file():
            raise ValueError(f"the LoRA base UNet {Path(base) / model_type} is missing (--pretrained_model_name_or_path)")
    text_type = cfg.get("text_encoder_type") or DEFAULT_TEXT_ENCODER
    text_source = None
    if text_type != "none" and not (folder / "text_encoder" / "config.json").is_file():
        text_source = cfg.get("text_encoder_path") or base
        if text_source is None or not Path(text_source).is_dir():
            raise ValueError(f"{folder} needs its {text_type} text encoder from {text_source} (not found): pass "
                             "--pretrained_model_name_or_path")
    stats = metadata_stats
    run_stats = cfg.get("metadata_stats")
    if stats is None and run_stats and cfg.get("enable_condition_emb") and Path(run_stats).is_file():
        stats = run_stats
        notes.append(f"metadata stats {run_stats} from run_config.json")
    train_size = cfg.get("resolution")
    if train_size is None:
        train_size = _sample_size(Path(base) / model_type) if is_lora else _sample_size(folder / "unet")
    return ModelPlan(None if base is None else str(base), model_type, str(folder), is_lora, text_type,
                     None if text_source is None else str(text_source), stats,
                     None if train_size is None else int(train_size), notes)


def model_identity(plan: ModelPlan) -> dict[str, Any]:
    """Content hashes of every file the planned model is built from (the fingerprint's ``model`` entry).

    A training folder contributes its inference entries (:data:`FINETUNE_ENTRIES`: weights, embedder, scheduler,
    ``run_config.json``; not checkpoints or logs); a LoRA run adds its base UNet folder, a frozen text encoder its
    folder; the released model contributes its UNet, scheduler, text encoder and tokenizer folders. Names carry the
    role (``finetune/…``, ``base/skm-tea/…``, ``text/…``) rather than the path, so moving a folder keeps the identity.

    Returns:
        ``{"kind", "model_type", "files": {name: sha256}}``.
    """
    from utils.run_identity import folder_files, hash_files

    files: dict[str, Path] = {}
    if plan.finetune_folder is not None:
        folder = Path(plan.finetune_folder)
        for entry in FINETUNE_ENTRIES:
            path = folder / entry
            if path.is_file():
                files[f"finetune/{entry}"] = path
            else:
                files.update(folder_files(path, f"finetune/{entry}"))
        if plan.is_lora:
            files.update(folder_files(Path(plan.base) / plan.model_type, f"base/{plan.model_type}"))
        kind = "finetune-lora" if plan.is_lora else "finetune-unet"
    else:
        base = Path(plan.base)
        for entry in (plan.model_type, "scheduler"):
            files.update(folder_files(base / entry, f"base/{entry}"))
        kind = "released"
    if plan.text_source is not None:
        src = Path(plan.text_source)
        parts = [e for e in ("text_encoder", "tokenizer") if (src / e).is_dir()]
        for entry in parts:
            files.update(folder_files(src / entry, f"text/{entry}"))
        if not parts:
            files.update(folder_files(src, "text"))
    return {"kind": kind, "model_type": plan.model_type if (plan.is_lora or plan.finetune_folder is None) else None,
            "files": hash_files(files)}


AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def reconstructor_from_args(plan: ModelPlan, args: Any, device: torch.device | str) -> DiffusionReconstructor:
    """Load the model of ``plan`` and wrap it with the sampler settings of the parsed command line ``args``
    (the ``--data_root`` and ``--raw_dir`` paths of ``recon_complex_multi.py`` share this).

    Raises:
        ValueError: the model does not load as planned (flags, stats, damaged export), or a drop key is one the model
            cannot read; the first line of the message is meant for the user.
    """
    unet, conditioner, schedule = load_reconstruction_model(
        plan.base, plan.model_type, plan.finetune_folder, args.enable_condition_emb, plan.metadata_stats, device=device,
    )
    return DiffusionReconstructor(unet, conditioner, schedule, **reconstructor_kwargs(args),
                                  autocast_dtype=AUTOCAST_DTYPES[args.mixed_precision])

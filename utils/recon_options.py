"""The reconstruction settings that more than one place needs, written once: the sampler's (and the CS baseline's)
settings with their defaults, and the model options shared by ``recon_complex_multi.py`` and ``metadata_report.py``.

:class:`SamplerSettings` is the base of :class:`utils.recon_settings.ReconSettings` (``--data_root``),
:class:`utils.raw_reconstruction.RawReconSettings` (``--raw_dir``) and of the command line of
``recon_complex_multi.py``; :class:`utils.diffusion_recon.DiffusionReconstructor` takes its defaults from
:data:`SAMPLER_DEFAULTS`. The named presets (``--preset``, :data:`utils.samplers.PRESETS`) override these fields.
Only standard-library imports here (and :mod:`models.choices`, itself standard library only), so every script's
``--help`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from collections.abc import Sequence
from typing import Any

from models.choices import RELEASED_MODEL_TYPES
from utils.cli import option

#: Reconstruction methods: the diffusion prior and the two baselines.
RECON_METHODS = ("diffusion", "zero_filled", "cs")
#: Diffusion samplers with data consistency that the reconstructor runs.
RECON_SAMPLERS = ("dds", "dps")
#: accelerate's ``mixed_precision`` values: the network's precision in reconstruction (data consistency always stays
#: fp32 / complex64) and in training.
PRECISIONS = ("no", "fp16", "bf16")
#: What a run does with metadata-CSV rows whose slice files are missing (:class:`utils.data.MRISliceDataset`'s
#: ``on_missing``): stop with the list, or drop them with one warning.
ON_MISSING_POLICIES = ("error", "skip")
#: ``--raw_dir``'s DDS γ rule (:class:`utils.raw_reconstruction.RawReconSettings` ``gamma_rule``): γ as given, or
#: lowered per slice from the estimated noise σ.
GAMMA_RULES = ("fixed", "noise")
#: ``--raw_dir``'s field of view outside the prior's window (``RawReconSettings.outside``): a regularised
#: least-squares estimate held fixed, or empty.
OUTSIDE_MODES = ("lsq", "zero")


@dataclass
class SamplerSettings:
    """The settings of the reconstruction method: the diffusion sampler (DDS / DPS with classifier-free guidance) and
    the compressed-sensing baseline. Defaults are the reference's (DDS: 100 steps, η 0.8, γ 5, 5 CG iterations)."""

    sampler: str = option("dds", "diffusion sampler: DDS (DDIM step + CG data consistency on x̂₀) or DPS (gradient "
                          "step on ‖y − A x̂₀‖)", choices=RECON_SAMPLERS, group="method")
    num_steps: int = option(100, "sampler steps (the network runs once per step, twice with guidance w > 1)",
                            group="method")
    eta: float = option(0.8, "DDIM η of the sampler's update (0: deterministic, 1: ancestral)", group="method")
    gamma: float = option(5.0, "DDS data-consistency weight γ of (I + γ AᴴA) x = x̂₀ + γ Aᴴy (higher: closer to "
                          "the measurement)", group="method")
    cg_iter: int = option(5, "DDS conjugate-gradient iterations per step (0: no data consistency)", group="method")
    dps_step: float = option(1.0, "DPS step size ζ' of the normalised step ζ = ζ'/‖y − A x̂₀‖ (Chung et al. 2023, "
                             "Algorithm 1)", group="method")
    guidance_scale: float = option(1.0, "classifier-free guidance w: w <= 1 conditional only; w > 1 "
                                   "eps_u + w (eps_c − eps_u)", aliases=("--cfg_scale",), group="method")
    clip_x0: float | None = option(None, "limit |x̂₀| to this value (DDS: before data consistency; DPS: in the DDIM "
                                   "update)", group="method", default_text="off, as the reference")
    drop_metadata_keys: list[str] = option([], "attributes removed at inference (metadata token -> its learned empty "
                                           "embedding, prompt rebuilt without the field)", allow_empty=True,
                                           metavar="KEY", group="method")
    uncond_drop_keys: list[str] | None = option(
        None, "with w > 1, the attributes the unconditional branch drops (per-attribute guidance)", allow_empty=True,
        metavar="KEY", group="method", default_text="all, with an empty prompt")
    cs_lambda: float = option(0.005, "CS baseline: L1 weight λ of the wavelet sparsity term", group="method")
    cs_iter: int = option(100, "CS baseline: iterations", group="method")


#: The defaults, as an instance (``SAMPLER_DEFAULTS.num_steps``...).
SAMPLER_DEFAULTS = SamplerSettings()

#: The fields of :class:`SamplerSettings` that the diffusion reconstructor takes as keywords.
_RECONSTRUCTOR_KEYS = ("sampler", "num_steps", "eta", "gamma", "cg_iter", "dps_step", "guidance_scale",
                       "drop_metadata_keys", "uncond_drop_keys", "clip_x0")


def require_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """The settings classes' check of a choice: ``ValueError("unknown {what} {value!r}: choose a, b")`` unless
    ``value`` is one of ``choices`` (the same constant the command line offers)."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose {', '.join(choices)}")


def reconstructor_kwargs(settings: Any) -> dict[str, Any]:
    """The keywords of :class:`utils.diffusion_recon.DiffusionReconstructor` from any object with the sampler
    fields (a :class:`SamplerSettings`, a reconstruction's settings, a parsed command line)."""
    return {name: getattr(settings, name) for name in _RECONSTRUCTOR_KEYS}


def sampler_field_names() -> tuple[str, ...]:
    """Names of the sampler settings (the keys a preset may set)."""
    return tuple(f.name for f in fields(SamplerSettings))


def sampler_values(settings: Any) -> dict[str, Any]:
    """Every :class:`SamplerSettings` field of ``settings`` (lists copied): the keywords that hand a parsed command
    line's sampler settings to a reconstruction's settings."""
    out = {}
    for name in sampler_field_names():
        value = getattr(settings, name)
        out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


@dataclass
class ModelOptions:
    """Which model to load: the released checkpoint and/or a training run's output folder."""

    pretrained_model_name_or_path: str | None = option(None, "released MRI_checkpoint folder (local)", group="model")
    pretrained_model_type: str | None = option(
        None, "released UNet subfolder; a value contradicting a LoRA run's base is refused",
        choices=RELEASED_MODEL_TYPES, group="model",
        default_text="the --finetune_folder run's own (run_config.json), else fastmri")
    finetune_folder: str | None = option(None, "output folder of train_mri.py / train_mri_ood.py", group="model")
    enable_condition_emb: bool = option(False, "the model uses fine-grained metadata tokens", group="model")
    metadata_stats: str | None = option(None, "metadata_stats.json the model was trained with", group="model")

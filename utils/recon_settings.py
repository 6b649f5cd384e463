"""The settings of a ``--data_root`` reconstruction run (:class:`ReconSettings`) and the part of them that can change
a result (:func:`result_settings`, the fingerprint's ``settings``; :mod:`utils.run_identity` hashes it).

Only light imports here: the run identity, the measurement and the run loop all read these settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from utils.masks import default_center_fraction
from utils.recon_options import RECON_METHODS, RECON_SAMPLERS, SamplerSettings, require_choice


@dataclass
class ReconSettings(SamplerSettings):
    """Everything that defines a reconstruction run (written to ``settings.json`` when the folder is created).

    The sampler's (and the CS baseline's) settings and their defaults are inherited from
    :class:`utils.recon_options.SamplerSettings`. Only :func:`result_settings` of these enter the fingerprint;
    ``batch_size``, ``save_png`` and ``tag`` do not.
    """

    method: str = "diffusion"  # zero_filled | cs | diffusion
    mask_type: str = "uniform1d"
    acc_factor: float = 4.0
    center_fraction: float | None = None
    noise_sigma: float = 0.0  # complex Gaussian k-space noise std σ (E|n|² = σ²), see utils.measurement
    metadata_override: dict[str, Any] = field(default_factory=dict)  # replace these values in every record
    mismatch_metadata: bool = False  # give each slice the protocol of another contrast (metadata-sensitivity check)
    num_samples: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # network precision of the diffusion model (no | fp16 | bf16)
    batch_size: int = 1
    save_png: bool = True
    tag: str | None = None

    def __post_init__(self) -> None:
        require_choice("method", self.method, RECON_METHODS)
        require_choice("sampler", self.sampler, RECON_SAMPLERS)
        if self.num_samples < 1 or self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("num_samples, batch_size and num_steps must be >= 1")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {self.noise_sigma}")
        if not (math.isfinite(self.acc_factor) and self.acc_factor >= 1):
            raise ValueError(f"acc_factor must be a finite number >= 1, got {self.acc_factor}")

    @property
    def run_tag(self) -> str:
        """The readable part of the folder name (the explicit ``tag`` when given)."""
        return self.tag if self.tag else readable_tag(self)

    @property
    def resolved_center_fraction(self) -> float:
        """The centre fraction the masks use (the default for R when None)."""
        if self.center_fraction is None:
            return default_center_fraction(float(self.acc_factor))
        return float(self.center_fraction)


def readable_tag(settings: SamplerSettings) -> str:
    """``zero_filled``, ``cs`` or ``{sampler}_steps{N}_w{w}_n{samples}`` (the hash suffix tells the rest apart).

    Reads ``method``, ``num_samples`` and the sampler's fields only, so a raw run's settings
    (:class:`utils.raw_reconstruction.RawReconSettings`) name their folders the same way.
    """
    if settings.method != "diffusion":
        return settings.method
    return f"{settings.sampler}_steps{settings.num_steps}_w{settings.guidance_scale:g}_n{settings.num_samples}"


def result_settings(settings: ReconSettings) -> dict[str, Any]:
    """The settings that change a result, and only those (the sampler's settings only for its method).

    ``center_fraction`` is resolved (None and the explicit default are the same run); key lists are sorted (their
    order does not matter). Batch size is left out: every slice has its own seeded generators and per-sample CG, so
    its result does not depend on which slices share a batch (up to float rounding in batched convolutions).
    """
    s = settings
    out: dict[str, Any] = {
        "method": s.method, "mask_type": s.mask_type, "acc_factor": float(s.acc_factor),
        "center_fraction": s.resolved_center_fraction, "noise_sigma": float(s.noise_sigma),
    }
    if s.method == "cs":
        out.update(cs_lambda=float(s.cs_lambda), cs_iter=int(s.cs_iter))
    elif s.method == "diffusion":
        out.update(
            sampler=s.sampler, num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
            drop_metadata_keys=sorted(s.drop_metadata_keys),
            uncond_drop_keys=None if s.uncond_drop_keys is None or s.guidance_scale <= 1 else sorted(s.uncond_drop_keys),
            metadata_override=dict(sorted((s.metadata_override or {}).items())),
            mismatch_metadata=bool(s.mismatch_metadata), num_samples=int(s.num_samples), seed=int(s.seed),
            mixed_precision=s.mixed_precision,
        )
        if s.sampler == "dds":
            out.update(eta=float(s.eta), gamma=float(s.gamma), cg_iter=int(s.cg_iter),
                       clip_x0=None if s.clip_x0 is None else float(s.clip_x0))
        else:
            out.update(dps_step=float(s.dps_step))
    return out

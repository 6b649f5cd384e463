"""The demo's settings: :class:`DemoConfig` (one run of the demo, see :mod:`utils.demo`) and its choice constants."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The text baselines of ``DemoConfig.text_encoder`` (``demo.py --text_encoder``).
TEXT_ENCODERS: tuple[str, ...] = ("frozen", "scratch", "scratch_lr")


@dataclass
class DemoConfig:
    """Every setting of the demo (sizes, training budget, reconstruction and report settings); ``demo.py``'s
    command line sets some of them (``demo.DemoOptions``), the study (``utils.study.StudyConfig``) others."""

    output_dir: Path = Path("demo_output")
    contrasts: tuple[str, ...] = ("AXT1", "AXT2", "AXFLAIR", "AXT1POST")  # balanced: 1 series type per subject
    volumes_per_contrast: int = 8  # subjects per contrast; one of each is held out for validation
    num_slices: int = 5
    matrix: str = "96x48"  # oversampled readout x phase encode -> 48 x 48 images (CPU budget)
    num_coils: str = "4"
    crop_size: int = 48
    cardiac_volumes: int = 2
    unet_config: str = "compact"  # configs/unet/{name}.json: ~0.9 M parameters, 2.6x cheaper per step than small.json
    train_steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # after 20 warm-up steps
    cfg_prob: float = 0.1
    # Null-condition rate. Under --cfg_strategy joint a metadata drop (cfg_prob) and, for the text model, an emptied
    # prompt (prompt_cfg_prob = cfg_prob) already *are* the sampler's null condition bit for bit
    # (docs/conditioning.md), so every conditioned model sees the null input in 10 % of its samples, as ContextMRI
    # and the earlier demo runs did. The training default --cfg_null_prob 0.1 would add a second draw on top (19 %).
    cfg_null_prob: float = 0.0
    # The text baseline: "frozen" = random CLIP tower frozen, projection trained (the demo's); "scratch" = encoder
    # trained with the UNet at the UNet's learning rate (the demo before issue 13); "scratch_lr" = trained at
    # text_encoder_lr.
    text_encoder: str = "frozen"
    text_encoder_lr: float = 1e-2
    recon_steps: int = 50
    gamma: float = 50.0  # DDS data-consistency weight; the data are noiseless (y = A x_true), so weigh them strongly
    clip_x0: float | None = 1.5  # |x0_hat| limit in DDS for every diffusion model (see utils/samplers.py)
    ensemble_size: int = 4
    accelerations: tuple[float, ...] = (4.0, 8.0)
    mask_type: str = "uniform1d"
    center_fraction: float | None = None  # None: the script's default (0.08 at 4x, 0.04 at 8x)
    # Noisy measurements (y = M(F S x + n), complex noise of std noise_sigma relative to the normalised image): extra
    # rows at noise_accelerations, reconstructed with the weaker data weight noise_gamma (noisy data must not be
    # trusted as strongly as exact ones). None: no noisy rows.
    noise_sigma: float | None = 0.05
    noise_gamma: float = 5.0
    noise_accelerations: tuple[float, ...] = (8.0,)
    # Raw-data rows (issue 14): the held-out volumes reconstructed from the simulator's raw, noisy k-space through
    # recon_complex_multi.py --raw_dir (ESPIRiT maps from the ACS lines only, scale and σ estimated from the data, DDS
    # γ lowered from σ by the raw path's noise rule) and scored against reconstruction_rss, beside the re-simulated
    # --data_root path on the same slices and line patterns. Empty raw_accelerations: no raw rows.
    raw_accelerations: tuple[float, ...] = (4.0,)
    # 6 of the 48 phase-encode lines (4 in --quick's 32). The default centre fractions leave 4 ACS lines at 4x (maps
    # from them made CS fall to 15 dB on a held-out volume, below zero-filling) and 2 at 8x (< 4: ESPIRiT refuses);
    # a 48-line matrix has no 8x mask with a usable ACS block beside outer lines (8x = 6 lines in all).
    raw_center_fraction: float = 0.125
    raw_methods: tuple[str, ...] = ("unconditioned", "text", "fine-grained")  # the diffusion models on the raw path
    raw_gamma_rule: str = "noise"
    # Information report (metadata_report.py) of each conditioned model: paired denoising-loss gaps on held-out slices.
    report_slices: int = 20
    report_noise: int = 4
    report_timesteps: tuple[int, ...] = (50, 200, 500, 800)
    report_keys: tuple[str, ...] | None = ("contrast", "TR", "TE")  # None: every attribute the model reads
    max_val_slices: int = 20
    seed: int = 0
    parallel: int = 3  # scripts side by side: small models scale poorly over threads; 3 x 1 thread beat 1 x 2
    threads: int = 1
    methods: tuple[str, ...] = ("unconditioned", "text", "fine-grained")

#!/usr/bin/env python
"""The main job on physics-simulated data, end to end on a CPU (~20 min expected on 2 idle cores; 58.5 min measured
on a shared, loaded 2-core machine).

Simulates a small brain set (fastMRI h5, split by subject) and a small cardiac set (CMRxRecon .mat), preprocesses them
with the real scripts, trains an unconditioned, a text-conditioned (ContextMRI-style, random frozen CLIP tower) and a
fine-grained metadata model at equal budget, measures how much each conditioned model reads its condition
(metadata_report.py), reconstructs held-out slices at 4x and 8x (and 8x with noisy measurements) with the same masks
for every method, reconstructs the held-out volumes once more from their raw, noisy k-space (recon_complex_multi.py
--raw_dir: ACS-only coil maps, measured scale and noise, scored against reconstruction_rss) beside the re-simulated
path on the same slices (how much the inverse crime flatters the numbers), and prints the results table with an
information line per model, a metadata-sensitivity check, a paired per-slice comparison and an uncertainty-calibration
check. Interrupted runs resume.

    python demo.py --output_dir demo_output
    python demo.py --output_dir /tmp/quick --quick      # a 3-minute smoke run (numbers meaningless)
    python demo.py --study                              # the multi-seed study (utils/study.py), ~75-90 min
    python demo.py --study --quick --seeds 0 1 --output_dir /tmp/study_quick   # its smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.demo import DemoConfig, run_demo
from utils.study import StudyConfig, run_study


def parse_args(argv: list[str] | None = None) -> DemoConfig | StudyConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DemoConfig()
    p.add_argument("--output_dir", type=Path, default=d.output_dir)
    p.add_argument("--train_steps", type=int, default=d.train_steps)
    p.add_argument("--volumes_per_contrast", type=int, default=d.volumes_per_contrast)
    p.add_argument("--num_slices", type=int, default=d.num_slices)
    p.add_argument("--recon_steps", type=int, default=d.recon_steps)
    p.add_argument("--ensemble_size", type=int, default=d.ensemble_size)
    p.add_argument("--max_val_slices", type=int, default=d.max_val_slices)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--with_ood", action="store_true",
                   help="also train the fine-grained model with the cardiac set (train_mri_ood.py); adds ~1/3 time")
    p.add_argument("--text_encoder", choices=("frozen", "scratch", "scratch_lr"), default=d.text_encoder,
                   help="text baseline: random CLIP tower frozen + projection trained (default), trained from scratch "
                        "with the UNet, or trained from scratch at --text_encoder_lr")
    p.add_argument("--text_encoder_lr", type=float, default=d.text_encoder_lr)
    p.add_argument("--no_noise", action="store_true", help="leave out the noisy-measurement rows")
    p.add_argument("--raw_accelerations", type=float, nargs="*", default=list(d.raw_accelerations),
                   help="rates of the raw-k-space rows (held-out volumes through recon_complex_multi.py --raw_dir, "
                        "beside the re-simulated path on the same slices); none: no raw rows")
    p.add_argument("--raw_center_fraction", type=float, default=d.raw_center_fraction,
                   help="centre fraction of the raw-vs-re-simulated rows (their ACS lines give the coil maps)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the claim")
    p.add_argument("--study", action="store_true",
                   help="the powered study instead of the demo (utils/study.py): 5 models x --seeds, noisy 8x with a "
                        "small centre fraction, pooled paired differences with 95 %% intervals and verdicts; default "
                        "--output_dir study_output; expected ~75-90 min on 2 idle cores (not yet run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--study: seeds (>= 2 for an interval)")
    a = p.parse_args(argv)
    cfg = DemoConfig(output_dir=a.output_dir, train_steps=a.train_steps, volumes_per_contrast=a.volumes_per_contrast,
                     num_slices=a.num_slices, recon_steps=a.recon_steps, ensemble_size=a.ensemble_size,
                     max_val_slices=a.max_val_slices, seed=a.seed, text_encoder=a.text_encoder,
                     text_encoder_lr=a.text_encoder_lr)
    if a.no_noise:
        cfg.noise_sigma = None
    if any(r <= 1 for r in a.raw_accelerations) or not 0 < a.raw_center_fraction < 1:
        p.error("--raw_accelerations must be > 1 and --raw_center_fraction in (0, 1)")
    cfg.raw_accelerations, cfg.raw_center_fraction = tuple(a.raw_accelerations), a.raw_center_fraction
    if a.with_ood:
        cfg.methods = (*cfg.methods, "fine-grained+ood")
    if a.quick:
        cfg.volumes_per_contrast, cfg.num_slices, cfg.train_steps, cfg.recon_steps = 2, 2, 4, 5
        cfg.contrasts = ("AXT1", "AXT2")
        cfg.ensemble_size, cfg.max_val_slices, cfg.batch_size = 2, 2, 2
        cfg.matrix, cfg.crop_size = "64x32", 32
        cfg.report_slices, cfg.report_noise, cfg.report_timesteps = 2, 1, (50, 500)
    if cfg.train_steps < 1 or cfg.volumes_per_contrast < 2:
        p.error("need --train_steps >= 1 and --volumes_per_contrast >= 2 (one subject per contrast is held out)")
    if a.study:
        if len(set(a.seeds)) != len(a.seeds) or not a.seeds:
            p.error("--seeds must be distinct")
        cfg.report_keys = None  # the study reports every attribute a model reads
        out = a.output_dir if "--output_dir" in (argv if argv is not None else sys.argv) else Path("study_output")
        return StudyConfig(output_dir=out, seeds=tuple(a.seeds), demo=cfg)
    return cfg


if __name__ == "__main__":
    config = parse_args()
    if isinstance(config, StudyConfig):
        run_study(config)
    else:
        run_demo(config)
    sys.exit(0)

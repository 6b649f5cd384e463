"""PSNR of DDS on raw simulated k-space against γ and against the noise level (``--raw_dir`` path, no inverse crime).

For each SNR a small simulated fastMRI dataset is written (same anatomy and protocol for every SNR: only the noise
changes), undersampled retrospectively, and reconstructed with zero-filling, CS and DDS at several fixed γ and with
the noise-aware rule (``--gamma_rule noise``). Prints one table row per (SNR, method): the fastMRI PSNR/SSIM against
``reconstruction_rss`` (the file's own noisy RSS target) and the mean estimated σ.

Usage::

    python benchmarks/bench_raw_gamma_noise.py --finetune_folder ./tiny_model --matrix 96x48 --snrs 10 40 160 \\
        --gammas 1 5 50 --num_steps 50 --center_fraction 0.17

The model must have been trained at the prior size the files' ``reconstruction_rss`` has (48 for ``96x48``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune_folder", required=True, help="train_mri.py output (an unconditional tiny model works)")
    p.add_argument("--matrix", default="96x48")
    p.add_argument("--num_volumes", type=int, default=2)
    p.add_argument("--num_slices", type=int, default=2)
    p.add_argument("--num_coils", type=int, default=4)
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--snrs", type=float, nargs="+", default=[10.0, 40.0, 160.0])
    p.add_argument("--gammas", type=float, nargs="+", default=[1.0, 5.0, 50.0])
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--mask_type", default="random")
    p.add_argument("--acc_factor", type=float, default=4.0)
    p.add_argument("--center_fraction", type=float, default=0.17)
    p.add_argument("--prior_error_std", type=float, default=0.1)
    args = p.parse_args()

    import torch

    from utils.diffusion_recon import DiffusionReconstructor, load_reconstruction_model, resolve_model_plan
    from utils.raw_data import list_raw_files, open_raw_volume
    from utils.raw_reconstruction import RawReconSettings, run_raw_reconstruction, summarize_raw
    from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

    torch.set_num_threads(1)
    plan = resolve_model_plan(None, None, args.finetune_folder, None)
    unet, conditioner, schedule = load_reconstruction_model(plan.base, plan.model_type, plan.finetune_folder)
    size = (plan.train_size, plan.train_size)
    h, w = (int(v) for v in args.matrix.split("x"))
    common = dict(mask_type=args.mask_type, acc_factor=args.acc_factor, center_fraction=args.center_fraction)
    print(f"{'SNR':>6} {'method':24s} {'PSNR':>7} {'SSIM':>7} {'sigma':>10} {'gamma used':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for snr in args.snrs:
            data = Path(tmp) / f"snr{snr:g}"
            generate_fastmri_dataset(FastMRIConfig(output_dir=data, num_volumes=args.num_volumes,
                                                   num_slices=args.num_slices, matrix=(h, w),
                                                   num_coils=(args.num_coils,), snr=snr, seed=args.seed), log=None)
            volumes = [open_raw_volume(f) for f in list_raw_files(data)]
            runs: list[tuple[str, RawReconSettings, object]] = [
                ("zero_filled", RawReconSettings(method="zero_filled", **common), None),
                ("cs", RawReconSettings(method="cs", cs_iter=50, **common), None),
            ]
            for rule, gammas in (("fixed", args.gammas), ("noise", args.gammas)):
                for gamma in gammas:
                    recon = DiffusionReconstructor(unet, conditioner, schedule, num_steps=args.num_steps, gamma=gamma)
                    s = RawReconSettings(method="diffusion", gamma=gamma, gamma_rule=rule, num_steps=args.num_steps,
                                         prior_error_std=args.prior_error_std, image_size=size, batch_size=4, **common)
                    runs.append((f"dds gamma={gamma:g} {rule}", s, recon))
            for name, settings, recon in runs:
                out = Path(tmp) / "out" / f"snr{snr:g}" / name.replace(" ", "_")
                run_raw_reconstruction(volumes, settings, out, diffusion=recon, progress=False)
                sm = summarize_raw(out, volumes)
                g = sm.get("gamma")
                print(f"{snr:6g} {name:24s} {sm['fastmri_psnr']['mean']:7.2f} {sm['fastmri_ssim']['mean']:7.4f} "
                      f"{sm['sigma']['mean']:10.3g} {'' if g is None else format(g['mean'], '11.3g')}", flush=True)


if __name__ == "__main__":
    main()

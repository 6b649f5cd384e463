#!/usr/bin/env python
"""Does a model read its metadata? Paired denoising-loss gaps and an information estimate per attribute.

On held-out slices, the denoising loss ‖ε − ε̂(x_t, t, c)‖² with the same image, noise and t is compared between the
correct metadata, the null condition, each attribute dropped and each attribute replaced by another slice's value.
Writes report.json, report.csv, loss_gap.png and counterfactual_{key}.png to --output_dir and prints a table and a
verdict. See docs/metadata_report.md.

Example:
    python metadata_report.py --finetune_folder ./trained_model --data_root ./fastmri \
        --load_dir_meta_brain ./fastmri/metadata_brain_val.csv --enable_condition_emb \
        --metadata_stats ./metadata_stats.json --output_dir ./report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (as recon_complex_multi.py)")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="released MRI_checkpoint folder (local)")
    g.add_argument("--pretrained_model_type", default=None, choices=["fastmri", "skm-tea"],
                   help="released UNet (default: the run's own for --finetune_folder, else fastmri)")
    g.add_argument("--finetune_folder", default=None, help="output folder of train_mri.py / train_mri_ood.py")
    g.add_argument("--enable_condition_emb", action="store_true", help="the model uses fine-grained metadata tokens")
    g.add_argument("--metadata_stats", default=None, help="metadata_stats.json the model was trained with")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g = p.add_argument_group("data (as recon_complex_multi.py)")
    g.add_argument("--data_root", required=True, help="root holding {anatomy}_mvue_{crop}_{split}/")
    g.add_argument("--load_dir_meta_brain", default=None, help="brain metadata CSV (held-out slices)")
    g.add_argument("--load_dir_meta_knee", default=None, help="knee metadata CSV")
    g.add_argument("--load_dir_meta_cardio", default=None, help="cardiac metadata CSV")
    g.add_argument("--split", default="val", choices=["train", "val"])
    g.add_argument("--crop_size", type=int, default=320)
    g.add_argument("--on_missing", default="error", choices=["error", "skip"],
                   help="rows without slice files: stop with an error, or skip them with a warning")
    g = p.add_argument_group("measurement")
    g.add_argument("--num_slices", type=int, default=20, help="held-out slices, spread evenly over the dataset")
    g.add_argument("--num_noise", type=int, default=8, help="paired noise draws per slice (each at every timestep)")
    g.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="timestep grid (default: --num_timesteps points evenly spaced in log-SNR)")
    g.add_argument("--num_timesteps", type=int, default=16, help="size of the default timestep grid")
    g.add_argument("--t_bands", type=int, nargs="+", default=[0, 100, 300, 600, 1000],
                   help="band edges in t for the table")
    g.add_argument("--keys", nargs="+", default=None,
                   help="attributes to drop / mismatch (default: the model's metadata keys, else the prompt fields)")
    g.add_argument("--seed", type=int, default=0, help="base seed of the noise draws")
    g.add_argument("--batch_size", type=int, default=64, help="images per network forward")
    g.add_argument("--z_threshold", type=float, default=3.0, help="|z| counted as a detected gap in the verdicts")
    g = p.add_argument_group("counterfactual strips")
    g.add_argument("--counterfactual_t", type=int, default=500)
    g.add_argument("--counterfactual_values", type=int, default=7)
    g.add_argument("--counterfactual_index", type=int, default=0, help="which selected slice the strips show")
    g.add_argument("--counterfactual_keys", nargs="*", default=None,
                   help="numerical attributes to sweep (default: TE, TR, TI where the model reads them)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="report.json, report.csv, loss_gap.png, counterfactual_*.png")
    g.add_argument("--no_png", action="store_true")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    csvs = [c for c in (args.load_dir_meta_brain, args.load_dir_meta_knee, args.load_dir_meta_cardio) if c]
    if not csvs:
        return _fail("give at least one of --load_dir_meta_brain / --load_dir_meta_knee / --load_dir_meta_cardio")
    for c in csvs:
        if not Path(c).is_file():
            return _fail(f"metadata CSV not found: {c}")
    if not (args.finetune_folder or args.pretrained_model_name_or_path):
        return _fail("give --finetune_folder and/or --pretrained_model_name_or_path")
    if args.enable_condition_emb and not args.metadata_stats:
        return _fail("--enable_condition_emb needs --metadata_stats")
    if args.metadata_stats and not Path(args.metadata_stats).is_file():
        return _fail(f"metadata stats file not found: {args.metadata_stats}")

    import torch

    from utils.data import MRISliceDataset
    from utils.diffusion_recon import load_reconstruction_model
    from utils.metadata import load_metadata_stats
    from utils.metadata_report import ReportError, ReportSettings, run_metadata_report

    settings = ReportSettings(
        num_slices=args.num_slices, num_noise=args.num_noise, timesteps=args.timesteps,
        num_timesteps=args.num_timesteps, t_bands=list(args.t_bands), keys=args.keys, seed=args.seed,
        batch_size=args.batch_size, counterfactual_t=args.counterfactual_t,
        counterfactual_values=args.counterfactual_values, counterfactual_index=args.counterfactual_index,
        counterfactual_keys=args.counterfactual_keys, z_threshold=args.z_threshold, save_png=not args.no_png,
    )
    try:
        settings.check()
        stats = load_metadata_stats(args.metadata_stats) if args.metadata_stats else None
        dataset = MRISliceDataset(args.data_root, csvs, split=args.split, crop_size=args.crop_size, load_maps=False,
                                  on_missing=args.on_missing)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        unet, conditioner, schedule = load_reconstruction_model(
            args.pretrained_model_name_or_path, args.pretrained_model_type, args.finetune_folder,
            args.enable_condition_emb, args.metadata_stats, device=device,
        )
        model_info = {"finetune_folder": args.finetune_folder,
                      "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                      "pretrained_model_type": args.pretrained_model_type,
                      "enable_condition_emb": args.enable_condition_emb, "metadata_stats": args.metadata_stats,
                      "data_root": args.data_root, "metadata_csvs": csvs, "split": args.split, "device": str(device),
                      "argv": sys.argv if argv is None else ["metadata_report.py", *argv]}
        run_metadata_report(unet, conditioner, schedule, dataset, settings, args.output_dir, model_info=model_info,
                            stats=stats, device=device, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as err:
        return _fail(str(err).strip("'\""))
    except ReportError as err:
        return _fail(str(err), code=1)
    print(f"report: {Path(args.output_dir) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

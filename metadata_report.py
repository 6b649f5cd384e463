#!/usr/bin/env python
"""Does a model read its metadata? Paired denoising-loss gaps and an information estimate per attribute.

On held-out slices, the denoising loss ‖ε − ε̂(x_t, t, c)‖² with the same image, noise and t is compared between the
correct metadata, the null condition, each attribute dropped and each attribute replaced by another slice's value.
Writes report.json, report.csv, loss_gap.png and counterfactual_{key}.png to --output_dir and prints a table and a
verdict. See docs/metadata_report.md.

Example:
    python metadata_report.py --finetune_folder ./output/metadata --data_root ./fastmri \\
        --load_dir_meta_brain ./fastmri/metadata_brain_val.csv --enable_condition_emb \\
        --metadata_stats ./metadata_stats.json --output_dir ./report
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from utils import cli
from utils.cli import option
from utils.preprocessing.names import SPLITS
from utils.recon_options import ON_MISSING_POLICIES, ModelOptions

PROG = "metadata_report.py"
_GROUPS = {"model": "model (as recon_complex_multi.py)", "data": "data (as recon_complex_multi.py)",
           "measurement": "measurement", "counterfactual": "counterfactual strips", "output": "output"}


@dataclass(kw_only=True)  # required options (no default) after the base class's defaulted ones
class ReportOptions(ModelOptions):
    """Every option of ``metadata_report.py``."""

    device: str | None = option(None, "torch device", group="model", default_text="cuda if available, else cpu")
    data_root: str = option(help="root holding {anatomy}_mvue_{crop}_{split}/", group="data")
    load_dir_meta_brain: str | None = option(None, "brain metadata CSV (held-out slices)",
                                             aliases=("--metadata_csv_brain",), group="data")
    load_dir_meta_knee: str | None = option(None, "knee metadata CSV", aliases=("--metadata_csv_knee",), group="data")
    load_dir_meta_cardio: str | None = option(None, "cardiac metadata CSV", aliases=("--metadata_csv_cardio",),
                                              group="data")
    split: str = option("val", "split folder of the slices", choices=SPLITS, group="data")
    crop_size: int = option(320, "image side of the data (the size the model was trained at)", unit="px",
                            aliases=("--resolution",), group="data")
    on_missing: str = option("error", "rows without slice files: stop with an error, or skip them with a warning",
                             choices=ON_MISSING_POLICIES, group="data")
    num_slices: int = option(20, "held-out slices, spread evenly over the dataset", group="measurement")
    num_noise: int = option(8, "paired noise draws per slice (each at every timestep)", group="measurement")
    timesteps: list[int] | None = option(None, "timestep grid", group="measurement",
                                         default_text="--num_timesteps points evenly spaced in log-SNR")
    num_timesteps: int = option(16, "size of the default timestep grid", group="measurement")
    t_bands: list[int] = option([0, 100, 300, 600, 1000], "band edges in t for the table", group="measurement")
    keys: list[str] | None = option(None, "attributes to drop / mismatch", group="measurement",
                                    default_text="the model's metadata keys, else the prompt fields")
    seed: int = option(0, "base seed of the noise draws", group="measurement")
    batch_size: int = option(64, "images per network forward", group="measurement")
    z_threshold: float = option(3.0, "|z| counted as a detected gap in the verdicts", group="measurement")
    counterfactual_t: int = option(500, "diffusion timestep of the counterfactual strips", group="counterfactual")
    counterfactual_values: int = option(7, "values swept per attribute", group="counterfactual")
    counterfactual_index: int = option(0, "which selected slice the strips show", group="counterfactual")
    counterfactual_keys: list[str] | None = option(None, "numerical attributes to sweep", allow_empty=True,
                                                   group="counterfactual",
                                                   default_text="TE, TR, TI where the model reads them")
    output_dir: str = option(help="report.json, report.csv, loss_gap.png, counterfactual_*.png", group="output")
    no_png: bool = option(False, "write no PNG figures", group="output")
    no_progress: bool = option(False, "no tqdm bar", group="output")


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`ReportOptions` (with ``--config FILE``)."""
    return cli.build_parser(ReportOptions, prog=PROG, description=__doc__, group_titles=_GROUPS)


def parse_args(argv: list[str] | None = None) -> ReportOptions:
    """The options of a command line (``--config FILE`` first, then the command line)."""
    return cli.parse(ReportOptions, argv, build_parser())


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

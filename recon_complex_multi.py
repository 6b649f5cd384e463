#!/usr/bin/env python
"""Reconstruct undersampled validation slices with a (metadata-)conditioned diffusion prior or a baseline.

Example (REFERENCE.md §0):
    python recon_complex_multi.py --pretrained_model_name_or_path ./MRI_checkpoint --load_dir_meta_brain ./metadata_val.csv \
        --data_root ./fastmri --enable_condition_emb --finetune_folder ./trained_model \
        --metadata_stats ./metadata_stats.json --mask_type uniform1d --acc_factor 4

Shard a set over processes/GPUs with ``accelerate launch recon_complex_multi.py ...``: each process takes every n-th
slice and the main process merges the summary. Finished slices are skipped when a run is repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.masks import MASK_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="released MRI_checkpoint folder (local)")
    g.add_argument("--pretrained_model_type", default="fastmri", choices=["fastmri", "skm-tea"])
    g.add_argument("--finetune_folder", default=None, help="output folder of train_mri.py / train_mri_ood.py")
    g.add_argument("--enable_condition_emb", action="store_true", help="the model uses fine-grained metadata tokens")
    g.add_argument("--metadata_stats", default=None, help="metadata_stats.json the model was trained with")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="network precision; data consistency always runs in fp32/complex64")
    g = p.add_argument_group("data")
    g.add_argument("--data_root", required=True, help="root holding {anatomy}_mvue_{crop}_val/")
    g.add_argument("--load_dir_meta_brain", default=None, help="brain metadata CSV")
    g.add_argument("--load_dir_meta_knee", default=None, help="knee metadata CSV")
    g.add_argument("--load_dir_meta_cardio", default=None, help="cardiac metadata CSV")
    g.add_argument("--split", default="val", choices=["train", "val"])
    g.add_argument("--crop_size", type=int, default=320)
    g.add_argument("--start_idx", type=int, default=0, help="first dataset index to reconstruct")
    g.add_argument("--end_idx", type=int, default=None, help="one past the last dataset index")
    g.add_argument("--on_missing", default="error", choices=["error", "skip"],
                   help="rows without slice/map files: stop with an error, or skip them with a warning")
    g = p.add_argument_group("measurement")
    g.add_argument("--mask_type", default="uniform1d", choices=list(MASK_TYPES))
    g.add_argument("--acc_factor", type=float, default=4.0)
    g.add_argument("--center_fraction", type=float, default=None)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="diffusion", choices=["diffusion", "zero_filled", "cs"])
    g.add_argument("--sampler", default="dds", choices=["dds", "dps"])
    g.add_argument("--num_steps", type=int, default=100)
    g.add_argument("--eta", type=float, default=0.8)
    g.add_argument("--gamma", type=float, default=5.0)
    g.add_argument("--cg_iter", type=int, default=5)
    g.add_argument("--dps_step", type=float, default=1.0)
    g.add_argument("--clip_x0", type=float, default=None,
                   help="DDS: limit |x0_hat| to this value before data consistency (off by default, as the reference)")
    g.add_argument("--guidance_scale", "--cfg_scale", type=float, default=1.0,
                   help="w <= 1: conditional only; w > 1: eps_u + w (eps_c - eps_u)")
    g.add_argument("--drop_metadata_keys", nargs="*", default=[], help="attributes removed at inference")
    g.add_argument("--uncond_drop_keys", nargs="*", default=None,
                   help="with w > 1, attributes the unconditional branch drops (default: all, empty prompt)")
    g.add_argument("--metadata_override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="replace metadata values (e.g. a mismatched contrast) to test metadata sensitivity")
    g.add_argument("--mismatch_metadata", action="store_true",
                   help="give every slice the protocol of another contrast (does the model use its metadata?)")
    g.add_argument("--num_samples", type=int, default=1, help="ensemble size (complex mean scored, std map saved)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=1, help="slices per network forward")
    g.add_argument("--cs_lambda", type=float, default=0.005)
    g.add_argument("--cs_iter", type=int, default=100)
    g = p.add_argument_group("output")
    g.add_argument("--save_dir", default="./results")
    g.add_argument("--tag", default=None, help="name of the method's output folder (default: from the settings)")
    g.add_argument("--no_png", action="store_true")
    return p.parse_args(argv)


def _overrides(items: list[str]) -> dict:
    from utils.metadata import record_from_row

    raw = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--metadata_override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        raw[key] = value
    typed = record_from_row(raw)
    typed.pop("pathology", None) if "pathology" not in raw else None
    return typed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    csvs = [c for c in (args.load_dir_meta_brain, args.load_dir_meta_knee, args.load_dir_meta_cardio) if c]
    if not csvs:
        raise SystemExit("give at least one of --load_dir_meta_brain / --load_dir_meta_knee / --load_dir_meta_cardio")
    for c in csvs:
        if not Path(c).is_file():
            raise SystemExit(f"metadata CSV not found: {c}")
    if args.method == "diffusion" and not (args.finetune_folder or args.pretrained_model_name_or_path):
        raise SystemExit("method 'diffusion' needs --finetune_folder and/or --pretrained_model_name_or_path")
    if args.enable_condition_emb and not args.metadata_stats:
        raise SystemExit("--enable_condition_emb needs --metadata_stats")

    import torch
    from accelerate import PartialState

    from utils.data import MRISliceDataset
    from utils.reconstruction import ReconSettings, run_reconstruction, summarize

    state = PartialState()
    settings = ReconSettings(
        method=args.method, sampler=args.sampler, mask_type=args.mask_type, acc_factor=args.acc_factor,
        center_fraction=args.center_fraction, num_steps=args.num_steps, eta=args.eta, gamma=args.gamma,
        cg_iter=args.cg_iter, dps_step=args.dps_step, guidance_scale=args.guidance_scale, clip_x0=args.clip_x0,
        drop_metadata_keys=list(args.drop_metadata_keys), uncond_drop_keys=args.uncond_drop_keys,
        metadata_override=_overrides(args.metadata_override), mismatch_metadata=args.mismatch_metadata,
        num_samples=args.num_samples, seed=args.seed,
        batch_size=args.batch_size, cs_lambda=args.cs_lambda, cs_iter=args.cs_iter, save_png=not args.no_png,
        tag=args.tag,
    )
    dataset = MRISliceDataset(args.data_root, csvs, split=args.split, crop_size=args.crop_size, load_maps=True,
                              on_missing=args.on_missing)
    end = len(dataset) if args.end_idx is None else min(args.end_idx, len(dataset))
    indices = list(range(max(0, args.start_idx), end))
    if not indices:
        raise SystemExit(f"no slices in [{args.start_idx}, {end}) (dataset has {len(dataset)})")

    diffusion = None
    if args.method == "diffusion":
        from utils.diffusion_recon import DiffusionReconstructor, load_reconstruction_model

        unet, conditioner, schedule = load_reconstruction_model(
            args.pretrained_model_name_or_path, args.pretrained_model_type, args.finetune_folder,
            args.enable_condition_emb, args.metadata_stats, device=state.device,
        )
        autocast = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        diffusion = DiffusionReconstructor(
            unet, conditioner, schedule, sampler=args.sampler, num_steps=args.num_steps, eta=args.eta,
            gamma=args.gamma, cg_iter=args.cg_iter, dps_step=args.dps_step, guidance_scale=args.guidance_scale,
            drop_metadata_keys=args.drop_metadata_keys, uncond_drop_keys=args.uncond_drop_keys,
            autocast_dtype=autocast, clip_x0=args.clip_x0,
        )

    out = run_reconstruction(dataset, settings, args.save_dir, diffusion=diffusion, device=state.device,
                             process_index=state.process_index, num_processes=state.num_processes, indices=indices)
    state.wait_for_everyone()
    if state.is_main_process:
        summary = summarize(out, dataset, indices)
        keys = ["fastmri_psnr", "fastmri_ssim", "fastmri_nmse", "contextmri_psnr", "contextmri_ssim", "time_s",
                "nfe", "acceleration"]
        print(f"{settings.run_tag}  {settings.mask_type} x{settings.acc_factor:g}  "
              f"({summary['num_volumes']} volumes, {summary['num_slices']} slices)")
        for k in keys:
            print(f"  {k:16s} {summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}")
        print(f"results: {out}")
        (out / "command.json").write_text(json.dumps({"argv": sys.argv}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training throughput: the real ``train_mri.py`` step path vs a bare forward/backward loop on the same model and data.

Both run in one process, on the same model config, batch size, resolution and thread count:

* ``script``: :func:`utils.training.loop.train` (accelerate, DataLoader with workers, per-step seeded noise, condition
  dropout, grad clipping, EMA, loss reduction/logging, progress bar), timed between micro-steps after a warm-up via
  its ``step_callback``; setup and the final export are excluded.
* ``bare``: a fixed batch already in memory; per step ``conditioner.build`` + UNet forward + MSE + backward + AdamW
  step, nothing else (the floor the script can reach).
* ``bare (UNet only)``: as ``bare`` with the condition tokens computed once (for reference).

Prints samples/s of each and ``script / bare`` (target >= 0.9: data loading and bookkeeping must not be the
bottleneck). Example::

    python benchmarks/bench_training.py --unet_config small --resolution 64 --batch 4 --steps 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.recon_options import PRECISIONS  # noqa: E402

#: ``--text``: the text encoders this benchmark builds offline (a tiny random CLIP; T5 would need its weights).
TEXT_ENCODERS = ("none", "clip")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_config", default="small", help="configs/unet/{tiny,small,config_mri} or a JSON path")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the script run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--text", default="none", choices=TEXT_ENCODERS,
                   help="'clip': a tiny random CLIP as text encoder")
    p.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mixed_precision", default="no", choices=PRECISIONS)
    return p.parse_args(argv)


def _config(args, root: Path, csv: Path, stats: Path, ckpt: Path | None, steps: int, out: Path):
    from utils.training.config import parse_config

    argv = ["--data_root", str(root), "--mri_metadata_dir_brain", str(csv), "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch), "--dataloader_num_workers", str(args.workers),
            "--enable_condition_emb", "--metadata_stats", str(stats), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10**9), "--report_to", "none", "--output_dir", str(out),
            "--mixed_precision", args.mixed_precision, "--text_encoder_type", args.text]
    argv += ["--pretrained_model_name_or_path", str(ckpt)] if ckpt else ["--unet_config", args.unet_config]
    if args.use_ema:
        argv.append("--use_ema")
    return parse_config(argv)


def bare_loop(config, batch, steps: int, warmup: int, device: torch.device, conditioner_each_step: bool) -> float:
    """Samples/s of forward + backward + AdamW on one in-memory batch."""
    from utils.training.diffusion import add_noise
    from utils.training.model import build_components

    torch.manual_seed(config.seed)
    comp = build_components(config)
    model = comp.model.to(device).train()
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=config.learning_rate)
    acp = comp.scheduler.alphas_cumprod.to(device, torch.float32)
    x0 = batch.images.to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = None if conditioner_each_step else model.conditioner.build(batch.records, batch.prompts).detach()
    times = []
    for _ in range(warmup + steps):
        t = torch.randint(0, acp.shape[0], (x0.shape[0],), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = add_noise(x0, noise, t, acp)
        cond = model.conditioner.build(batch.records, batch.prompts) if conditioner_each_step else tokens
        eps = model.unet(x_t, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return steps * x0.shape[0] / (times[-1] - times[warmup - 1])


def script_run(config, steps: int, warmup: int) -> float:
    """Samples/s of ``utils.training.loop.train`` between micro-steps ``warmup`` and ``warmup + steps``."""
    from utils.training.loop import train

    stamps = []

    def cb(info):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    train(config, step_callback=cb)
    return steps * config.train_batch_size / (stamps[warmup + steps - 1] - stamps[warmup - 1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tests.training_helpers import write_tiny_dataset
    from utils.preprocessing.stats import write_stats_from_csvs
    from utils.training.data_loading import build_training_data, make_dataloader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_slices = args.batch * (args.warmup + args.steps + 2)
        csv = write_tiny_dataset(root, "brain", num_files=max(1, n_slices // 8), slices_per_file=8,
                                 crop=args.resolution, coils=2)
        stats = root / "stats.json"
        write_stats_from_csvs([csv], stats)
        ckpt = None
        if args.text == "clip":
            from models.tiny_assets import make_fake_released_checkpoint

            ckpt = make_fake_released_checkpoint(root / "ckpt", unet_config=args.unet_config)
        total = args.warmup + args.steps
        config = _config(args, root, csv, stats, ckpt, total, root / "out")
        data = build_training_data(config)
        batch = next(iter(make_dataloader(data, _config(args, root, csv, stats, ckpt, total, root / "o2"))))

        bare = bare_loop(config, batch, args.steps, args.warmup, device, conditioner_each_step=True)
        bare_unet = bare_loop(config, batch, args.steps, args.warmup, device, conditioner_each_step=False)
        script = script_run(config, args.steps, args.warmup)
        # second bare measurement after the script, to bracket drift from other load on the machine
        bare2 = bare_loop(config, batch, args.steps, args.warmup, device, conditioner_each_step=True)

    ref = 0.5 * (bare + bare2)
    print(f"device {device}, torch threads {torch.get_num_threads()}, UNet {args.unet_config}, "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, {args.steps} timed steps, text {args.text}, "
          f"EMA {args.use_ema}, workers {args.workers}, precision {args.mixed_precision}")
    print(f"bare (conditioner + UNet fwd/bwd + AdamW): {bare:8.2f} / {bare2:8.2f} samples/s (before / after)")
    print(f"bare (UNet only, fixed tokens):            {bare_unet:8.2f} samples/s")
    print(f"script step path (train_mri loop):         {script:8.2f} samples/s")
    print(f"script / bare = {script / ref:.3f}   (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

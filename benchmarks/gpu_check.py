#!/usr/bin/env python
"""GPU check: a few training steps of the released-size UNet in bf16, one 320x320 DDS reconstruction, the fast preset,
and a DDS batch sweep (slices/s and peak memory per slice at batch 1, 2, 4, 8).

One prepared run for a session that has a GPU (it needs no data and no weights: the UNet is built from the released
config with random weights, which is all a speed and memory check needs). Prints times and peak memory; ``--json``
writes every figure the README's GPU numbers need.

    python benchmarks/gpu_check.py --json gpu.json     # CUDA: 318 M UNet, 320x320, bf16, DDS 100 steps, preset, sweep
    python benchmarks/gpu_check.py --tiny --device cpu # the same code path on a CPU in seconds (used by the tests)

The batch sweep (``benchmarks/bench_throughput.py``'s timing) measures ``--sweep_steps`` DDS steps per batch size and
extrapolates slices/s to a 100-step run (the per-step cost is constant); the fast preset
(``utils.samplers.PRESETS["fast"]``) is run in full on one slice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import NETWORK_PRECISIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet at 32x32 (checks the code path, not the speed)")
    p.add_argument("--train_steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dds_steps", type=int, default=100)
    p.add_argument("--coils", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=NETWORK_PRECISIONS)
    p.add_argument("--sweep_batches", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="batch sizes of the DDS throughput sweep (none: skip it)")
    p.add_argument("--sweep_steps", type=int, default=10, help="DDS steps measured per batch size in the sweep")
    p.add_argument("--preset", default="fast", help="a utils.samplers.PRESETS name run on one slice ('none': skip)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from models.conditioning import ConditionBuilder
    from models.condition_embedder import MetadataConditionEmbedder
    from models.unet import build_unet, condition_dim
    from utils.masks import get_mask
    from utils.operators import SenseOperator
    from utils.samplers import DiffusionSchedule, SamplerStats, dds_sample, make_cfg_eps_fn

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    size = 32 if args.tiny else 320
    unet = build_unet("tiny" if args.tiny else "config_mri").to(device)
    dim = condition_dim(unet)
    stats = json.loads((REPO / "tests" / "data" / "metadata_stats_brain_knee.json").read_text())
    embedder = MetadataConditionEmbedder.from_stats(stats, embed_dim=dim, cfg_prob=0.5, cfg_strategy="independent")
    conditioner = ConditionBuilder(None, embedder).to(device)
    records = [{"anatomy": "brain", "contrast": "AX T2_FBB", "sequence": "TurboSpinEcho", "TR": 5000.0, "TE": 100.0,
                "TI": 100.0, "flip_angle": 150.0, "slice_number": 5.0, "pathology": []}] * args.batch
    params = sum(p.numel() for p in unet.parameters())
    figures: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     "unet_parameters": params, "image": size, "batch": args.batch, "precision": args.precision}
    print(f"device {figures['gpu'] or device}; UNet {params / 1e6:.1f} M parameters; {size}x{size}; {args.precision}")

    # --- training steps (bf16 autocast, AdamW, grad clip) -----------------------------------------------------------
    opt = torch.optim.AdamW(list(unet.parameters()) + list(conditioner.parameters()), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, 2, size, size, device=device, generator=gen)
    acp = DiffusionSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                         "beta_schedule": "linear"})
    a = acp.alphas_cumprod.to(device=device, dtype=torch.float32)
    unet.train()
    conditioner.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.train_steps + 1):
        _sync(device)
        start = time.perf_counter()
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        xt = a[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[t]).sqrt().view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            tokens = conditioner.build(records, generator=gen)
            loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=tokens).sample.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step > 0:  # the first step includes one-off kernel selection
            times.append(time.perf_counter() - start)
    figures["train_s_per_step"] = sum(times) / len(times)
    figures["train_samples_per_s"] = args.batch / figures["train_s_per_step"]
    figures["train_peak_mib"] = _peak_mib(device)
    print(f"training: {figures['train_s_per_step']:.3f} s/step (batch {args.batch}), "
          f"{figures['train_samples_per_s']:.1f} samples/s, peak {figures['train_peak_mib'] or float('nan'):.0f} MiB")

    # --- one DDS reconstruction ---------------------------------------------------------------------------------------
    del opt
    unet.eval()
    conditioner.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    maps = torch.randn(1, args.coils, size, size, dtype=torch.complex64, device=device, generator=gen)
    maps = maps / (maps.abs() ** 2).sum(1, keepdim=True).sqrt()
    mask = get_mask("uniform1d", (size, size), 4, seed=0).mask.to(device)
    op = SenseOperator(maps, mask)
    truth = torch.randn(1, size, size, dtype=torch.complex64, device=device, generator=gen)
    y = op.forward(truth)
    with torch.no_grad():
        cond = conditioner.build(records[:1])
    eps_fn = make_cfg_eps_fn(unet, cond, None, 1.0, autocast_dtype=dtype)
    stats = SamplerStats()
    _sync(device)
    start = time.perf_counter()
    dds_sample(eps_fn, op, y, acp, num_steps=args.dds_steps, generators=[torch.Generator(device=device).manual_seed(1)],
               stats=stats)
    _sync(device)
    figures["dds_s"] = time.perf_counter() - start
    figures["dds_nfe"] = stats.nfe
    figures["dds_peak_mib"] = _peak_mib(device)
    print(f"DDS {args.dds_steps} steps ({stats.nfe} NFE), {size}x{size}, {args.coils} coils: {figures['dds_s']:.2f} s, "
          f"peak {figures['dds_peak_mib'] or float('nan'):.0f} MiB")

    # --- the fast preset, in full, on the same slice ----------------------------------------------------------------
    if args.preset != "none":
        from utils.samplers import PRESETS, dc_sample
        from utils.samplers.presets import RAW_ONLY_PRESET_KEYS, sampler_kwargs

        # The preset's raw-only γ rule needs a σ estimated from raw k-space (recorded as not applied); it changes a
        # scalar, not the work per step.
        preset = PRESETS[args.preset]
        sampler, steps = preset["sampler"], preset["num_steps"]
        stats = SamplerStats()
        _sync(device)
        start = time.perf_counter()
        dc_sample(sampler, eps_fn, op, y, acp, num_steps=steps, stats=stats,
                  generators=[torch.Generator(device=device).manual_seed(1)], **sampler_kwargs(preset))
        _sync(device)
        wall = time.perf_counter() - start
        figures["preset"] = {"name": args.preset, "sampler": sampler, "num_steps": steps, **sampler_kwargs(preset),
                             "not_applied": {k: preset[k] for k in preset if k in RAW_ONLY_PRESET_KEYS},
                             "s_per_slice": wall, "nfe": stats.nfe,
                             "speedup_vs_dds": figures["dds_s"] / wall}
        print(f"preset {args.preset} ({sampler}, {steps} steps, {stats.nfe} NFE): {wall:.2f} s per slice "
              f"({figures['preset']['speedup_vs_dds']:.1f}x faster than DDS {args.dds_steps} steps)")

    # --- DDS batch sweep: slices/s and peak memory per slice --------------------------------------------------------
    if args.sweep_batches:
        from benchmarks.bench_throughput import time_dds

        sweep_args = argparse.Namespace(steps=args.sweep_steps, extrapolate_to=100, cg_iter=5, precision=args.precision,
                                        size=size, coils=args.coils, seed=0)
        figures["batch_sweep"] = []
        for b in args.sweep_batches:
            row = time_dds(unet, cond[:1], b, sweep_args, device)
            figures["batch_sweep"].append(row)
            print(f"sweep batch {b}: {row['slices_per_s_at_100_steps']:.3f} slices/s at 100 steps, "
                  f"peak {row['peak_mib_per_slice']:.0f} MiB/slice")
    if args.json:
        from utils.files import write_json

        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

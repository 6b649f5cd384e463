"""Sampler overhead of DDS: wall time ÷ (network calls × time of one network forward at the same batch).

Everything DDS adds around the network — FFTs, CG data consistency, noise, bookkeeping — shows up as the ratio's excess
over 1. Target: ≤ 1.10 on CPU with a small model. Both timings are taken in one process, one after the other, with the
same threads and the same batch; the network is a small diffusers ``UNet2DConditionModel`` in the released model's
layout (SimpleCrossAttn blocks, ``addition_embed_type="text"``) at 64×64.

Usage::

    .venv/bin/python benchmarks/bench_sampler_overhead.py --batch 2 --steps 50

CPU note: on a machine whose cores are shared, OpenMP threads that spin while waiting make small FFTs and convolutions
up to 100× slower; this script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see the module docstring)

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.operators import SenseOperator  # noqa: E402
from utils.samplers import DiffusionSchedule, SamplerStats, dds_sample, make_cfg_eps_fn, make_generators  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    batch: int
    steps: int
    size: int
    coils: int
    guidance: float
    cg_iter: int
    repeats: int
    rounds: int
    threads: int
    device: str
    seed: int


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2, help="slices per forward pass")
    p.add_argument("--steps", type=int, default=50, help="DDS steps")
    p.add_argument("--size", type=int, default=64, help="image height = width")
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale; > 1 batches 2B per forward")
    p.add_argument("--cg_iter", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed network calls for the per-call time, half before and half after the run (default: "
                        "as many as the run makes)")
    p.add_argument("--rounds", type=int, default=5, help="(calls, reconstruction, calls) rounds; the median is "
                   "reported")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.repeats is None:
        a.repeats = a.steps
    if min(a.batch, a.steps, a.size, a.coils, a.repeats, a.rounds, a.threads) < 1 or a.cg_iter < 0:
        p.error("batch, steps, size, coils, repeats, rounds and threads must be positive; cg_iter non-negative")
    return BenchConfig(a.batch, a.steps, a.size, a.coils, a.guidance, a.cg_iter, a.repeats, a.rounds, a.threads,
                       a.device, a.seed)


def small_unet(size: int, token_dim: int):
    """~2 M-parameter UNet in the layout of the released ContextMRI UNet (DeepFloyd-IF-M style)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=32, cross_attention_dim=token_dim,
        encoder_hid_dim=token_dim, addition_embed_type="text", addition_embed_type_num_heads=2,
        resnet_time_scale_shift="scale_shift", norm_num_groups=32,
    ).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run(cfg: BenchConfig) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the UNet's random init only; the sampler itself uses explicit generators
    token_dim, n_text, n_meta = 64, 6, 4
    unet = small_unet(cfg.size, token_dim).to(device)
    n_params = sum(p.numel() for p in unet.parameters())
    cond = torch.randn(cfg.batch, n_text + n_meta, token_dim, generator=gen).to(device)
    uncond = torch.cat([cond[:, :n_text], torch.zeros_like(cond[:, n_text:])], dim=1)
    eps_fn = make_cfg_eps_fn(unet, cond, uncond, cfg.guidance)

    # A random multi-coil problem: unit-norm birdcage maps, 1-D mask at ~4x with 8 centre lines.
    import sigpy.mri

    b, n = cfg.batch, cfg.size
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((cfg.coils, n, n))).to(torch.complex64)
    maps = maps / maps.abs().square().sum(0, keepdim=True).sqrt()
    mask = torch.zeros(1, n)
    mask[:, torch.randperm(n, generator=gen)[: n // 4 - 8]] = 1
    mask[:, n // 2 - 4 : n // 2 + 4] = 1
    op = SenseOperator(maps.expand(b, -1, -1, -1).clone(), mask).to(device)
    x_true = torch.complex(torch.randn(b, n, n, generator=gen), torch.randn(b, n, n, generator=gen)).to(device)
    y = op(x_true)
    schedule = DiffusionSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})

    # Network calls alone, timed before and after the reconstruction (half each) so that load drift on a shared
    # machine hits both sides of the ratio alike; the ratio uses the mean, the quantity a sum of calls scales with.
    x_ch = torch.randn(b, 2, n, n, generator=gen).to(device)
    t = torch.full((b,), 500, dtype=torch.long, device=device)

    def time_calls(k: int) -> list[float]:
        out = []
        with torch.no_grad():
            for _ in range(k):
                _sync(device)
                start = time.perf_counter()
                eps_fn(x_ch, t)
                _sync(device)
                out.append(time.perf_counter() - start)
        return out

    time_calls(3)  # warm-up
    half = max(1, cfg.repeats // 2)
    rss_before = _max_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Rounds of (calls, reconstruction, calls): each round gives one ratio; the median over rounds resists the bursts of
    # load a shared machine has.
    ratios, in_network, outside_ms, walls, times = [], [], [], [], []
    for r in range(cfg.rounds):
        round_times = time_calls(half)
        stats = SamplerStats()
        _sync(device)
        start = time.perf_counter()
        dds_sample(eps_fn, op, y, schedule, num_steps=cfg.steps, cg_iter=cfg.cg_iter,
                   generators=make_generators(range(cfg.seed, cfg.seed + b), device), stats=stats)
        _sync(device)
        wall = time.perf_counter() - start
        round_times += time_calls(half)
        ratios.append(wall / (stats.eps_calls * statistics.fmean(round_times)))
        in_network.append(wall / stats.eps_s)
        outside_ms.append((wall - stats.eps_s) / stats.num_steps * 1e3)
        walls.append(wall)
        times += round_times
        print(f"  round {r + 1}/{cfg.rounds}: wall {wall:.2f} s, ratio {ratios[-1]:.3f}, "
              f"wall / time in network {in_network[-1]:.3f}", flush=True)
    peak_rss = _max_rss_mib()
    t_fwd = statistics.fmean(times)
    wall = statistics.median(walls)

    out = {
        "params_M": n_params / 1e6,
        "t_forward_ms": t_fwd * 1e3,
        "t_forward_median_ms": statistics.median(times) * 1e3,
        "t_forward_iqr_ms": float(np.subtract(*np.percentile(times, [75, 25]))) * 1e3,
        "nfe": stats.nfe,
        "network_calls": stats.eps_calls,
        "wall_s": wall,
        "overhead_ratio": statistics.median(ratios),
        "overhead_ratio_min": min(ratios),
        "overhead_ratio_max": max(ratios),
        "wall_over_time_in_network": statistics.median(in_network),
        "non_network_ms_per_step": statistics.median(outside_ms),
        "peak_rss_MiB": peak_rss,
        "rss_growth_during_sampling_MiB": peak_rss - rss_before,
    }
    if device.type == "cuda":
        out["peak_cuda_MiB_per_slice"] = torch.cuda.max_memory_allocated(device) / 2**20 / b
    return out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    print(f"config: {cfg}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  torch {torch.__version__}")
    res = run(cfg)
    print(f"UNet: {res['params_M']:.2f} M parameters, {cfg.size}x{cfg.size}, batch {cfg.batch}, CFG {cfg.guidance}")
    print(f"one network call: mean {res['t_forward_ms']:.1f} ms, median {res['t_forward_median_ms']:.1f} ms, "
          f"IQR {res['t_forward_iqr_ms']:.1f} ms ({cfg.repeats} calls per round, half before and half after the run)")
    print(f"DDS {cfg.steps} steps, {cfg.coils} coils, CG {cfg.cg_iter}: median wall {res['wall_s']:.2f} s, "
          f"NFE {res['nfe']} ({res['network_calls']} network calls)")
    print(f"overhead ratio wall / (calls x forward) = {res['overhead_ratio']:.3f}  (target <= 1.10; median of "
          f"{cfg.rounds} rounds, range {res['overhead_ratio_min']:.3f}-{res['overhead_ratio_max']:.3f})")
    print(f"cross-check wall / time inside the network = {res['wall_over_time_in_network']:.3f}; "
          f"outside the network {res['non_network_ms_per_step']:.2f} ms/step")
    print(f"peak RSS {res['peak_rss_MiB']:.0f} MiB (process); growth during sampling "
          f"{res['rss_growth_during_sampling_MiB']:.1f} MiB for {cfg.batch} slices")
    if "peak_cuda_MiB_per_slice" in res:
        print(f"peak CUDA memory per slice {res['peak_cuda_MiB_per_slice']:.1f} MiB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""DDS throughput: slices per second and peak memory per slice against batch size (random-weight UNet, no data).

Every batch size runs the same DDS reconstruction (``utils.samplers.dds_sample``: one network forward per step, CG
data consistency, per-slice generators) on a random multi-coil problem, after one untimed warm-up step. The figure is
per *step*: ``s/step`` is the measured wall time divided by the steps run, and ``slices/s at N steps`` extrapolates it
to an N-step reconstruction (``--extrapolate_to``, default 100, the reference; the per-step cost is constant over a
DDS run, so this is a multiplication, not a model). ``--released_size`` measures only ``--steps`` steps (default 2 in
that mode) of the 318 M-parameter UNet at 320x320 and extrapolates the same way: a full 100-step run per batch size
takes hours on 2 CPU cores.

Peak memory per slice: on CUDA ``torch.cuda.max_memory_allocated`` during the run minus what was allocated before,
divided by the batch; on CPU the process's resident set size (RSS, sampled every 2 ms from ``/proc/self/statm`` by a
thread) above its level before the run (taken after ``gc`` and glibc's ``malloc_trim``, so memory freed by an earlier
batch size does not hide this one's), divided by the batch (``tracemalloc`` does not see torch's allocator). The model
and the problem's maps and k-space are allocated before the baseline, so this is the sampler's working memory.

``--compile`` additionally times ``torch.compile(unet)`` (the compile time is reported separately; steady state after a
warm-up). On a CPU without a working C++ toolchain, or where compilation fails, the error is recorded and the eager
numbers stand.

    python benchmarks/bench_throughput.py                          # compact UNet, 48x48, 4 coils, 5 steps, CPU
    python benchmarks/bench_throughput.py --released_size --batches 1 2  # 318 M UNet, 320x320, 16 coils, 2 steps
    python benchmarks/bench_throughput.py --device cuda --precision bf16 --released_size --steps 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow small kernels on shared cores

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import NETWORK_PRECISIONS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--released_size", action="store_true",
                   help="configs/unet/config_mri.json (318 M parameters) at 320x320 with 16 coils")
    p.add_argument("--unet", default=None, help="UNet config name or file (default: compact, or config_mri with "
                                                "--released_size)")
    p.add_argument("--size", type=int, default=None, help="image side (default 48, or 320 with --released_size)")
    p.add_argument("--coils", type=int, default=None, help="coils (default 4, or 16 with --released_size)")
    p.add_argument("--steps", type=int, default=None, help="DDS steps measured (default 5, or 2 with --released_size)")
    p.add_argument("--extrapolate_to", type=int, default=100, help="report slices/s for a run of this many steps")
    p.add_argument("--cg_iter", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=NETWORK_PRECISIONS,
                   help="network autocast dtype (data consistency stays fp32)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(unet)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here (strict JSON)")
    a = p.parse_args(argv)
    a.unet = a.unet or ("config_mri" if a.released_size else "compact")
    a.size = a.size or (320 if a.released_size else 48)
    a.coils = a.coils or (16 if a.released_size else 4)
    a.steps = a.steps or (2 if a.released_size else 5)
    if min(a.batches + [a.size, a.coils, a.steps, a.extrapolate_to, a.threads]) < 1 or a.cg_iter < 0:
        p.error("batches, size, coils, steps, extrapolate_to and threads must be >= 1, cg_iter >= 0")
    return a


class PeakRSS:
    """Peak resident set size above the level at entry (bytes), sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except OSError:  # not Linux: fall back to the (monotonic) max RSS
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def make_problem(batch: int, size: int, coils: int, device: torch.device, seed: int):
    """A random SENSE problem: unit-norm random maps, a 4x 1-D mask, y = A x for a random complex image."""
    from utils.masks import get_mask
    from utils.operators import SenseOperator

    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, coils, size, size, dtype=torch.complex64, generator=gen)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = get_mask("uniform1d", (size, size), 4, seed=seed).mask
    op = SenseOperator(maps.to(device), mask.to(device))
    truth = torch.randn(batch, size, size, dtype=torch.complex64, generator=gen).to(device)
    return op, op.forward(truth)


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)`` where available (freed memory otherwise stays in the RSS); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device: torch.device, seed: int):
    """Random-weight UNet and a constant condition token ``[1, 1, D]`` (what a speed check needs)."""
    from models.unet import build_unet, condition_dim

    torch.manual_seed(seed)  # weights only; samplers use explicit generators
    unet = build_unet(name).to(device).eval().requires_grad_(False)
    cond = torch.randn(1, 1, condition_dim(unet), generator=torch.Generator().manual_seed(seed)).to(device)
    return unet, cond


def time_dds(unet, cond, batch: int, a: argparse.Namespace, device: torch.device, steps: int | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time one DC-sampler run of ``steps`` steps at ``batch`` slices (after a one-step warm-up) and its peak memory.

    ``settings`` (a :data:`utils.samplers.PRESETS` entry) chooses the sampler, η, γ and CG iterations; default DDS
    with η 0.8, γ 5.
    """
    from utils.samplers import DiffusionSchedule, SamplerStats, dc_sample, make_cfg_eps_fn
    from utils.samplers.presets import sampler_kwargs

    preset = settings or {"sampler": "dds", "eta": 0.8, "gamma": 5.0, "cg_iter": a.cg_iter}
    sampler, settings = preset["sampler"], sampler_kwargs(preset)
    steps = int(steps or a.steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[a.precision]
    schedule = DiffusionSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                              "beta_start": 1e-4, "beta_end": 0.02})
    op, y = make_problem(batch, a.size, a.coils, device, a.seed)
    eps_fn = make_cfg_eps_fn(unet, cond, None, 1.0, autocast_dtype=dtype)
    timesteps = schedule.timesteps(a.extrapolate_to)[:steps]  # the first steps of the extrapolated run

    def run(ts) -> SamplerStats:
        stats = SamplerStats()
        gens = [torch.Generator(device=device).manual_seed(a.seed + b) for b in range(batch)]
        dc_sample(sampler, eps_fn, op, y, schedule, timesteps=ts, generators=gens, stats=stats, **settings)
        return stats

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _malloc_trim()  # hand freed heap pages back, so the RSS baseline is live memory only
    with PeakRSS() as rss:  # the warm-up is inside: its memory is the same per-step working set
        run(timesteps[:1])  # warm-up: one-off allocations, kernel selection, lazy imports
        _sync(device)
        start = time.perf_counter()
        stats = run(timesteps)
        _sync(device)
        wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else rss.above_base
    per_step = wall / steps
    return {
        "batch": batch, "steps_measured": steps, "nfe_measured": stats.nfe, "wall_s": wall, "s_per_step": per_step,
        "eps_share": stats.eps_s / wall if wall > 0 else None,
        "slices_per_s_per_step": batch / per_step,
        f"slices_per_s_at_{a.extrapolate_to}_steps": batch / (per_step * a.extrapolate_to),
        "peak_mib_per_slice": peak / 2**20 / batch,
        "peak_kind": "cuda max_memory_allocated above the pre-run level" if device.type == "cuda"
        else "RSS above the pre-run level (sampled every 2 ms)",
    }


def sweep(unet, cond, a: argparse.Namespace, device: torch.device, label: str,
          figures: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every batch size of ``a.batches``, after one discarded run (process-wide one-off allocations). With
    ``figures`` and ``--json``, the file is rewritten after each batch size (a slow sweep keeps what it measured)."""
    time_dds(unet, cond, min(a.batches), a, device, steps=1)
    rows: list[dict[str, Any]] = []
    for b in a.batches:
        row = time_dds(unet, cond, b, a, device)
        row["model"] = label
        rows.append(row)
        if figures is not None and a.json:
            from utils.files import write_json

            write_json(a.json, {**figures, label: rows, "complete": False})
        print(f"  {label:8s} batch {b:2d}: {row['s_per_step'] * 1e3:9.1f} ms/step, "
              f"{row['slices_per_s_per_step']:8.2f} slice-steps/s, "
              f"{row[f'slices_per_s_at_{a.extrapolate_to}_steps']:.4f} slices/s at {a.extrapolate_to} steps, "
              f"peak {row['peak_mib_per_slice']:.1f} MiB/slice", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    unet, cond = build_model(a.unet, device, a.seed)
    params = sum(p.numel() for p in unet.parameters())
    print(f"{a.device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}: UNet {a.unet} "
          f"({params / 1e6:.1f} M parameters), {a.size}x{a.size}, {a.coils} coils, {a.precision}, {a.steps} steps "
          f"measured per batch size (extrapolated to {a.extrapolate_to}), {a.threads} thread(s)", flush=True)
    figures: dict[str, Any] = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": a.threads, "unet": a.unet, "unet_parameters": params, "image": a.size, "coils": a.coils,
        "precision": a.precision, "cg_iter": a.cg_iter, "steps_measured": a.steps,
        "extrapolated_to_steps": a.extrapolate_to,
        "note": "slices/s at N steps = batch / (measured s per step x N); the per-step cost is constant over a run",
    }
    figures["eager"] = sweep(unet, cond, a, device, "eager", figures)
    if a.compile:
        try:
            start = time.perf_counter()
            compiled = torch.compile(unet)
            time_dds(compiled, cond, a.batches[0], a, device, steps=1)  # triggers compilation
            figures["compile_s"] = time.perf_counter() - start
            figures["compiled"] = sweep(compiled, cond, a, device, "compiled", figures)
            eager = {r["batch"]: r["s_per_step"] for r in figures["eager"]}
            figures["compile_speedup"] = {str(r["batch"]): eager[r["batch"]] / r["s_per_step"]
                                          for r in figures["compiled"]}
        except Exception as err:  # noqa: BLE001 - any compiler failure is a measured outcome, not a crash
            figures["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(f"torch.compile failed: {figures['compile_error']}", flush=True)
    figures["complete"] = True
    if a.json:
        from utils.files import write_json

        write_json(a.json, figures)
        print(f"wrote {a.json}")
    return figures


if __name__ == "__main__":
    main()

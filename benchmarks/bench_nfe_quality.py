#!/usr/bin/env python
"""Reconstruction quality against network evaluations (NFE): DDS at 10-100 steps and alternatives, and the fast preset.

On a trained model (default: the demo's fine-grained model, ``demo_output/models/fine-grained``) and held-out slices
(default: the demo's 20 validation slices), every sampler that shares DDS's CG data-consistency step is run at several
step budgets:

* ``dds``: DDS (DDIM + CG), η and γ re-tuned per budget over a grid (default η ∈ {0, 0.5, 0.8, 1}, γ ∈ {5, 20, 50});
* ``ddim0``: DDS with η = 0 (deterministic DDIM), γ re-tuned (the η = 0 column of the same grid);
* ``dpmpp2m``: DPM-Solver++(2M) in x̂₀ space with the same CG step (``utils.samplers.dpmpp2m_sample``), γ re-tuned.

Tuning uses a *separate* split (default: slices of the training CSV, one per training subject, spread over the
contrasts), never the reported slices: the best mean PSNR on it picks (η, γ) per (sampler, budget). The reported
slices are then reconstructed once per tuned setting, with the same masks, the same noisy measurements and the same
per-slice seeds for every setting. Every point is mean ± standard error over slices, and the per-slice PSNR/SSIM
difference to tuned 100-step DDS (the reference) is given as a paired mean ± SE.

The *fast preset* is the setting with the fewest NFE (≤ ``--fast_max_nfe``, default 25) whose paired mean PSNR is
within 0.2 dB of the reference (ties: the higher paired mean); if none is, the best setting with ≤ 25 NFE, and the JSON
says ``reached: false``. ``utils.samplers.PRESETS["fast"]`` must hold what this benchmark chose (a test checks the
committed JSON against it).

Measurements: ``utils.reconstruction.simulate_measurement`` (the reconstruction library's own), with complex Gaussian
k-space noise of std ``--noise_sigma`` (default 0.02 relative to the normalised images) seeded per (file, slice).
Metrics per slice on magnitudes: PSNR with data_range = the slice's max |ground truth|, SSIM likewise (fastMRI's
definitions applied to one slice).

Usage (≈ 10-15 min on 2 CPU cores at the demo's size, 48x48 and 20 slices)::

    python benchmarks/bench_nfe_quality.py --demo_dir demo_output
    python benchmarks/bench_nfe_quality.py --finetune_folder M --data_root R --csv val.csv --tune_csv train.csv \\
        --metadata_stats stats.json

Writes ``--json`` (default ``benchmarks/results/nfe_quality.json``) and ``--png`` (the curve) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow small convolutions on shared cores

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_STEPS = (10, 15, 20, 25, 50, 100)
SAMPLER_LABELS = {"dds": "DDS (η, γ tuned)", "ddim0": "DDIM η=0 + CG (γ tuned)",
                  "dpmpp2m": "DPM-Solver++(2M) + CG (γ tuned)"}
WITHIN_DB = 0.2


class BenchError(Exception):
    """A bad argument or missing input: one line, exit 2."""


@dataclass
class Problem:
    """A batch of slices with their measurements, condition tokens and per-slice seeds."""

    names: list[str]
    x_true: Any  # complex [B, H, W]
    op: Any
    y: Any
    cond: Any
    seeds: list[int]
    acceleration: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", type=Path, default=REPO / "demo_output",
                   help="a demo output folder: supplies every default below (models/fine-grained, fastmri/, "
                        "metadata_stats.json)")
    p.add_argument("--finetune_folder", type=Path, default=None, help="default: {demo_dir}/models/fine-grained")
    p.add_argument("--data_root", type=Path, default=None, help="default: {demo_dir}/fastmri")
    p.add_argument("--csv", type=Path, default=None,
                   help="reported slices (default: {data_root}/metadata_brain_val.csv)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split folder of --csv")
    p.add_argument("--tune_csv", type=Path, default=None,
                   help="tuning slices (default: {data_root}/metadata_brain_train.csv), never the reported ones")
    p.add_argument("--tune_split", default="train", choices=["train", "val"])
    p.add_argument("--metadata_stats", type=Path, default=None,
                   help="the model's stats (default: {demo_dir}/metadata_stats.json when the model has an embedder)")
    p.add_argument("--num_slices", type=int, default=20, help="reported slices: the first N of --csv (the demo's 20)")
    p.add_argument("--num_tune", type=int, default=4, help="tuning slices, one per subject, spread over the CSV")
    p.add_argument("--mask_type", default="uniform1d")
    p.add_argument("--acc_factor", type=float, default=4.0)
    p.add_argument("--noise_sigma", type=float, default=0.02,
                   help="k-space noise std (utils/reconstruction.py convention); 0 = noiseless")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="DDS step budgets")
    p.add_argument("--alt_steps", type=int, nargs="+", default=[10, 15, 20, 25],
                   help="step budgets of the alternatives")
    p.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.5, 0.8, 1.0])
    p.add_argument("--gammas", type=float, nargs="+", default=[5.0, 20.0, 50.0])
    p.add_argument("--samplers", nargs="+", default=["dds", "ddim0", "dpmpp2m"], choices=list(SAMPLER_LABELS))
    p.add_argument("--reference_steps", type=int, default=100, help="the DDS budget everything is paired against")
    p.add_argument("--fast_max_nfe", type=int, default=25)
    p.add_argument("--cg_iter", type=int, default=5)
    p.add_argument("--clip_x0", type=float, default=1.5, help="|x0_hat| limit (the demo's setting); <= 0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "nfe_quality.json")
    p.add_argument("--png", type=Path, default=REPO / "benchmarks" / "results" / "nfe_quality.png")
    a = p.parse_args(argv)
    d = a.demo_dir
    a.finetune_folder = a.finetune_folder or d / "models" / "fine-grained"
    a.data_root = a.data_root or d / "fastmri"
    a.csv = a.csv or a.data_root / "metadata_brain_val.csv"
    a.tune_csv = a.tune_csv or a.data_root / "metadata_brain_train.csv"
    if a.reference_steps not in a.steps:
        a.steps = sorted({*a.steps, a.reference_steps})
    return a


def check_args(a: argparse.Namespace) -> None:
    for flag in ("finetune_folder", "data_root"):
        if not getattr(a, flag).is_dir():
            raise BenchError(f"--{flag} {getattr(a, flag)} is not a folder (run `make demo`, or pass the paths)")
    for flag in ("csv", "tune_csv"):
        if not getattr(a, flag).is_file():
            raise BenchError(f"--{flag} {getattr(a, flag)} not found")
    if a.csv.resolve() == a.tune_csv.resolve() and a.split == a.tune_split:
        raise BenchError("--tune_csv is the reported --csv: tune on a separate split")
    if min(a.num_slices, a.num_tune, a.cg_iter + 1, a.threads, a.fast_max_nfe) < 1:
        raise BenchError("--num_slices, --num_tune, --threads and --fast_max_nfe must be >= 1, --cg_iter >= 0")
    if min(a.steps + a.alt_steps) < 1:
        raise BenchError("step budgets must be >= 1")
    if not (math.isfinite(a.noise_sigma) and a.noise_sigma >= 0):
        raise BenchError(f"--noise_sigma must be a finite number >= 0, got {a.noise_sigma}")
    if not all(math.isfinite(v) and v >= 0 for v in a.etas + a.gammas):
        raise BenchError("--etas and --gammas must be finite and >= 0")


# ----------------------------------------------------------------------------------------------------------------------
# problems


def spread(n_total: int, n: int, groups: list[str]) -> list[int]:
    """Up to ``n`` indices out of ``n_total``: the middle slice of distinct groups (files) evenly spread over the list
    (the demo's CSVs list the contrasts one after the other, so 4 picks cover all 4), then other slices if needed."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = [m[len(m) // 2] for m in members.values()]
    if len(order) < n:
        order += [i for i in range(n_total) if i not in set(order)]
    pick = np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)
    return sorted({order[k] for k in pick})


def build_problem(dataset, indices: list[int], model, settings, seed: int, device) -> Problem:
    """Measurements, condition tokens and per-slice seeds of ``dataset[indices]`` (seeds as the library's runner)."""
    from utils.masks import seed_from_name
    from utils.reconstruction import simulate_measurement

    items = [dataset[i] for i in indices]
    meas = simulate_measurement(items, settings, device)
    cond, _ = model.condition([item.record for item in items], [item.prompt for item in items])
    seeds = [(seed_from_name(it.filename, it.slice_idx) + 1_000_003 * seed) % 2**63 for it in items]
    acc = float(np.mean([m.acceleration for m in meas.masks]))
    return Problem([f"{it.filename}:{it.slice_idx}" for it in items], meas.x_true, meas.op, meas.y, cond, seeds, acc)


def reconstruct(problem: Problem, model, sampler: str, steps: int, eta: float, gamma: float, cg_iter: int,
                clip_x0: float | None):
    """One reconstruction of the whole batch; returns (complex [B, H, W], NFE per slice)."""
    import torch

    from utils.samplers import SamplerStats, dc_sample, make_cfg_eps_fn

    name = "dds" if sampler == "ddim0" else sampler
    eps_fn = make_cfg_eps_fn(model.unet, problem.cond, None, 1.0, alphas_cumprod=model.schedule)
    gens = [torch.Generator(device=problem.y.device).manual_seed(s) for s in problem.seeds]
    stats = SamplerStats()
    x = dc_sample(name, eps_fn, problem.op, problem.y, model.schedule, num_steps=steps, eta=eta, gamma=gamma,
                  cg_iter=cg_iter, generators=gens, stats=stats, clip_x0=clip_x0)
    return x, stats.nfe


def slice_metrics(x_true, x) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice PSNR and SSIM on magnitudes, data_range = max |ground truth| of the slice."""
    from utils.metrics import psnr, ssim

    gt, rec = x_true.detach().cpu().numpy(), x.detach().cpu().numpy()
    return (np.array([psnr(gt[b], rec[b]) for b in range(len(gt))]),
            np.array([ssim(gt[b], rec[b]) for b in range(len(gt))]))


def mean_se(values: np.ndarray) -> dict[str, float]:
    """Mean and standard error (sample std / √n; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se}


# ----------------------------------------------------------------------------------------------------------------------
# tuning, evaluation, preset


def grid_for(sampler: str, etas: list[float], gammas: list[float]) -> list[tuple[float, float]]:
    if sampler == "dds":
        return [(e, g) for e in etas for g in gammas]
    return [(0.0, g) for g in gammas]  # ddim0: η = 0 by definition; dpmpp2m: deterministic ODE solver


def tune(problem: Problem, model, plan: list[tuple[str, int]], a: argparse.Namespace, clip) -> dict:
    """Best (η, γ) per (sampler, steps) by mean PSNR on the tuning slices; every grid point is kept."""
    cache: dict[tuple, float] = {}
    out = {}
    for sampler, steps in plan:
        rows = []
        for eta, gamma in grid_for(sampler, a.etas, a.gammas):
            key = ("dds" if sampler == "ddim0" else sampler, steps, eta, gamma)
            if key not in cache:  # ddim0 is the η = 0 column of the DDS grid: run once
                x, _ = reconstruct(problem, model, sampler, steps, eta, gamma, a.cg_iter, clip)
                cache[key] = float(np.mean(slice_metrics(problem.x_true, x)[0]))
            rows.append({"eta": eta, "gamma": gamma, "tune_psnr": cache[key]})
        finite = [r for r in rows if math.isfinite(r["tune_psnr"])]
        if not finite:
            raise RuntimeError(f"{sampler} at {steps} steps gave no finite reconstruction on the tuning slices")
        best = max(finite, key=lambda r: r["tune_psnr"])
        out[f"{sampler}@{steps}"] = {"sampler": sampler, "steps": steps, "eta": best["eta"], "gamma": best["gamma"],
                                     "tune_psnr": best["tune_psnr"], "grid": rows}
        print(f"  tuned {sampler:8s} {steps:4d} steps: eta {best['eta']:g} gamma {best['gamma']:g} "
              f"(tuning PSNR {best['tune_psnr']:.2f} dB)", flush=True)
    return out


def evaluate(problem: Problem, model, tuned: dict, a: argparse.Namespace, clip) -> list[dict]:
    """Each tuned setting on the reported slices, paired against the reference (tuned DDS at reference_steps)."""
    per: dict[str, tuple[np.ndarray, np.ndarray, int, float]] = {}
    for key, t in tuned.items():
        start = time.perf_counter()
        x, nfe = reconstruct(problem, model, t["sampler"], t["steps"], t["eta"], t["gamma"], a.cg_iter, clip)
        p, s = slice_metrics(problem.x_true, x)
        if not (np.isfinite(p).all() and np.isfinite(s).all()):
            raise RuntimeError(f"{key}: non-finite reconstruction or metric on a reported slice")
        per[key] = (p, s, nfe, time.perf_counter() - start)
    ref_p, ref_s, _, _ = per[f"dds@{a.reference_steps}"]
    points = []
    for key, t in tuned.items():
        p, s, nfe, wall = per[key]
        dp, ds = p - ref_p, s - ref_s
        points.append({
            "sampler": t["sampler"], "label": SAMPLER_LABELS[t["sampler"]], "steps": t["steps"], "nfe": nfe,
            "eta": t["eta"], "gamma": t["gamma"], "cg_iter": a.cg_iter, "psnr": mean_se(p), "ssim": mean_se(s),
            "paired_psnr_diff": mean_se(dp), "paired_ssim_diff": mean_se(ds),
            "wins_or_ties": int((dp >= 0).sum()), "num_slices": int(len(p)), "wall_s": wall,
            "per_slice_psnr": p.tolist(), "per_slice_ssim": s.tolist(),
        })
    return points


def choose_fast(points: list[dict], max_nfe: int, within_db: float = WITHIN_DB) -> dict:
    """The fewest-NFE point within ``within_db`` (paired mean PSNR) of the reference at ≤ ``max_nfe``; else the best
    paired mean at ≤ ``max_nfe``. Ties on NFE: the higher paired mean."""
    cheap = [p for p in points if p["nfe"] <= max_nfe]
    if not cheap:
        raise RuntimeError(f"no benchmarked setting has <= {max_nfe} NFE")
    ok = [p for p in cheap if p["paired_psnr_diff"]["mean"] >= -within_db]
    if ok:
        best = min(ok, key=lambda p: (p["nfe"], -p["paired_psnr_diff"]["mean"]))
    else:
        best = max(cheap, key=lambda p: p["paired_psnr_diff"]["mean"])
    return {"reached": bool(ok), "within_db": within_db, "max_nfe": max_nfe,
            "preset": preset_of(best), "nfe": best["nfe"],
            "paired_psnr_diff": best["paired_psnr_diff"], "psnr": best["psnr"], "ssim": best["ssim"]}


def preset_of(point: dict) -> dict:
    """The ``utils.samplers.PRESETS`` entry of a benchmark point (ddim0 is DDS with η = 0)."""
    sampler = "dds" if point["sampler"] == "ddim0" else point["sampler"]
    return {"sampler": sampler, "num_steps": int(point["steps"]), "eta": float(point["eta"]),
            "gamma": float(point["gamma"]), "cg_iter": int(point["cg_iter"])}


# ----------------------------------------------------------------------------------------------------------------------
# output


def table(points: list[dict], ref_steps: int) -> str:
    lines = [f"| sampler | steps | NFE | η | γ | PSNR [dB] | SSIM | ΔPSNR vs DDS-{ref_steps} (paired) | "
             "ΔSSIM (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda q: (list(SAMPLER_LABELS).index(q["sampler"]), q["nfe"])):
        lines.append(
            f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {p['eta']:g} | {p['gamma']:g} | "
            f"{p['psnr']['mean']:.2f} ± {p['psnr']['se']:.2f} | {p['ssim']['mean']:.4f} ± {p['ssim']['se']:.4f} | "
            f"{p['paired_psnr_diff']['mean']:+.2f} ± {p['paired_psnr_diff']['se']:.2f} | "
            f"{p['paired_ssim_diff']['mean']:+.4f} ± {p['paired_ssim_diff']['se']:.4f} |")
    return "\n".join(lines)


def plot(points: list[dict], fast: dict, ref_steps: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for sampler, style in zip(SAMPLER_LABELS, ("o-", "s--", "^-.")):
        pts = sorted((p for p in points if p["sampler"] == sampler), key=lambda q: q["nfe"])
        if not pts:
            continue
        nfe = [p["nfe"] for p in pts]
        for ax, key in zip(axes, ("paired_psnr_diff", "psnr", "ssim")):
            ax.errorbar(nfe, [p[key]["mean"] for p in pts], yerr=[p[key]["se"] for p in pts], fmt=style,
                        capsize=3, label=SAMPLER_LABELS[sampler])
    axes[0].axhline(0.0, color="k", lw=0.8)
    axes[0].axhline(-WITHIN_DB, color="grey", ls=":", lw=1, label=f"−{WITHIN_DB} dB")
    axes[0].axvline(fast["max_nfe"], color="grey", ls="--", lw=0.8)
    axes[0].plot([fast["nfe"]], [fast["paired_psnr_diff"]["mean"]], "r*", ms=14, label="fast preset")
    axes[0].set_ylabel(f"PSNR − DDS {ref_steps} steps [dB] (paired, ± SE)")
    axes[1].set_ylabel("PSNR [dB] (mean ± SE)")
    axes[2].set_ylabel("SSIM (mean ± SE)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks([10, 15, 20, 25, 50, 100])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("network evaluations per slice")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    check_args(a)
    import torch

    from utils.data import MRISliceDataset
    from utils.diffusion_recon import DiffusionReconstructor, load_reconstruction_model, resolve_model_plan
    from utils.files import write_json
    from utils.reconstruction import ReconSettings, mask_problem

    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    device = torch.device("cpu")
    try:
        plan = resolve_model_plan(None, None, str(a.finetune_folder), None)
    except ValueError as err:
        raise BenchError(str(err)) from None
    has_embedder = (a.finetune_folder / "condition_embedder").is_dir()
    # the explicit file, else the run's own (run_config.json), else the demo folder's
    stats = a.metadata_stats or (Path(plan.metadata_stats) if plan.metadata_stats else None)
    stats = stats or (a.demo_dir / "metadata_stats.json")
    if has_embedder and (stats is None or not Path(stats).is_file()):
        raise BenchError(f"the model has a metadata embedder: pass --metadata_stats (not found: {stats})")
    try:
        unet, conditioner, schedule = load_reconstruction_model(
            plan.base, plan.model_type, plan.finetune_folder, has_embedder, str(stats) if has_embedder else None,
            device=device)
    except ValueError as err:
        raise BenchError(str(err).splitlines()[0]) from None
    model = DiffusionReconstructor(unet, conditioner, schedule)
    crop = int(plan.train_size or 320)
    problem_text = mask_problem(a.mask_type, a.acc_factor, None, (crop, crop))
    if problem_text:
        raise BenchError(problem_text)
    settings = ReconSettings(mask_type=a.mask_type, acc_factor=a.acc_factor, noise_sigma=a.noise_sigma)
    report = MRISliceDataset(a.data_root, [a.csv], split=a.split, crop_size=crop, load_maps=True)
    tune_ds = MRISliceDataset(a.data_root, [a.tune_csv], split=a.tune_split, crop_size=crop, load_maps=True)
    report_idx = list(range(min(a.num_slices, len(report))))
    tune_idx = spread(len(tune_ds), a.num_tune, [it.filename for it in tune_ds.items])
    report_p = build_problem(report, report_idx, model, settings, a.seed, device)
    tune_p = build_problem(tune_ds, tune_idx, model, settings, a.seed, device)
    overlap = sorted(set(report_p.names) & set(tune_p.names))
    if overlap:
        raise BenchError(f"tuning and reported slices overlap ({overlap[:3]}): use another --tune_csv")
    clip = a.clip_x0 if a.clip_x0 and a.clip_x0 > 0 else None
    plan_runs = [("dds", s) for s in a.steps]
    plan_runs += [(smp, s) for smp in a.samplers if smp != "dds" for s in a.alt_steps]
    print(f"model {a.finetune_folder} ({crop}x{crop}); reported: {len(report_idx)} slices of {a.csv.name}; tuning: "
          f"{len(tune_idx)} slices of {a.tune_csv.name} ({a.tune_split}); {a.mask_type} x{a.acc_factor:g} "
          f"(achieved {report_p.acceleration:.2f}), noise σ {a.noise_sigma:g}", flush=True)

    t0 = time.perf_counter()
    tuned = tune(tune_p, model, plan_runs, a, clip)
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    points = evaluate(report_p, model, tuned, a, clip)
    eval_s = time.perf_counter() - t0
    fast = choose_fast(points, a.fast_max_nfe)
    text = table(points, a.reference_steps)
    ref = next(p for p in points if p["sampler"] == "dds" and p["steps"] == a.reference_steps)
    verdict = (f"fast preset: {fast['preset']} -> {fast['nfe']} NFE, paired ΔPSNR "
               f"{fast['paired_psnr_diff']['mean']:+.2f} ± {fast['paired_psnr_diff']['se']:.2f} dB vs DDS "
               f"{a.reference_steps} steps ({ref['nfe']} NFE, {ref['psnr']['mean']:.2f} dB); "
               + ("within" if fast["reached"] else "NOT within") + f" {WITHIN_DB} dB; "
               f"{ref['nfe'] / fast['nfe']:.1f}x fewer evaluations")
    print("\n" + text + "\n\n" + verdict)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} CPU fp32, " \
              f"{a.threads} thread(s)"
    result = {
        "description": "PSNR/SSIM against network evaluations; (eta, gamma) tuned per (sampler, steps) on the tuning "
                       "split; mean ± SE over reported slices; paired differences against tuned DDS at "
                       f"{a.reference_steps} steps",
        "command": "python benchmarks/bench_nfe_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "finetune_folder": str(a.finetune_folder), "data_root": str(a.data_root), "csv": str(a.csv),
            "split": a.split, "tune_csv": str(a.tune_csv), "tune_split": a.tune_split, "image_size": crop,
            "mask_type": a.mask_type, "acc_factor": a.acc_factor, "achieved_acceleration": report_p.acceleration,
            "noise_sigma": a.noise_sigma, "measurements": "utils.reconstruction.simulate_measurement: "
            + ("noisy, complex Gaussian k-space noise" if a.noise_sigma > 0 else "noiseless"),
            "cg_iter": a.cg_iter, "clip_x0": clip, "seed": a.seed, "etas": a.etas, "gammas": a.gammas,
            "steps": a.steps, "alt_steps": a.alt_steps, "samplers": a.samplers, "reference_steps": a.reference_steps,
            "guidance_scale": 1.0, "metric": "per-slice magnitude PSNR/SSIM, data_range = max |ground truth| of "
            "the slice",
        },
        "reported_slices": report_p.names,
        "tuning_slices": tune_p.names,
        "tuning": tuned,
        "points": points,
        "reference": {"sampler": "dds", "steps": a.reference_steps, "nfe": ref["nfe"], "eta": ref["eta"],
                      "gamma": ref["gamma"], "psnr": ref["psnr"], "ssim": ref["ssim"]},
        "fast_preset": fast,
        "table_markdown": text,
        "verdict": verdict,
        "timing_s": {"tuning": tune_s, "evaluation": eval_s, "total": time.perf_counter() - t_all},
        "machine": machine,
    }
    write_json(a.json, result)
    plot(points, fast, a.reference_steps, a.png,
         f"{crop}x{crop}, {len(report_idx)} held-out slices, {a.mask_type} x{a.acc_factor:g}, noise σ "
         f"{a.noise_sigma:g}; (η, γ) tuned per point on {len(tune_idx)} other slices")
    print(f"wrote {a.json} and {a.png} ({result['timing_s']['total'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"bench_nfe_quality.py: error: {err}", file=sys.stderr)
        sys.exit(2)

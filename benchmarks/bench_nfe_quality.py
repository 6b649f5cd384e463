#!/usr/bin/env python
"""Reconstruction quality against network evaluations (NFE): DDS at 10-100 steps and alternatives, and the fast preset.

On a trained model (default: the demo's fine-grained model, ``demo_output/models/fine-grained``) and held-out slices,
every sampler that shares DDS's CG data-consistency step is run at several step budgets:

* ``dds``: DDS (DDIM + CG), its settings re-tuned per budget (η, γ; on the raw path also CG iterations and the γ rule);
* ``ddim0``: DDS with η = 0 (deterministic DDIM), the other settings re-tuned likewise;
* ``dpmpp2m``: DPM-Solver++(2M) in x̂₀ space with the same CG step (``utils.samplers.dpmpp2m_sample``), re-tuned.

Two data paths:

* **default** (``--data_root``, the re-simulated path): the preprocessed slices of a CSV (default: the demo's 20
  validation slices), measurements by ``utils.measurement.simulate_measurement`` (the reconstruction library's own)
  with complex Gaussian k-space noise of std ``--noise_sigma`` (default 0.02 relative to the normalised images) seeded
  per (file, slice), the preprocessed maps. Tuning slices: another CSV (default: the training CSV, one slice per
  subject, spread over the contrasts; the model has seen those images). Writes ``benchmarks/results/nfe_quality.*``.
* **raw** (``--raw_dir``, the real-acquisition path of ``recon_complex_multi.py --raw_dir``): held-out raw noisy
  fastMRI-format files (default: ``{demo_dir}/raw/brain/val``, the demo simulator's 4 held-out subjects), every
  setting run through :func:`utils.raw_reconstruction.run_raw_reconstruction` itself (retrospective mask over the raw
  width, noise σ estimated from the data, ESPIRiT maps from the ACS lines, measured scale, the outside-the-window
  estimate, :class:`utils.raw_operator.RawGridOperator`, the ``--gamma_rule`` γ from σ, per-slice seeds), scored on
  the magnitude against the file's ``reconstruction_rss`` (default centre fraction :data:`RAW_CENTER_FRACTION`, so
  that the ACS-only maps have enough lines at the demo's width). Tuning files: ``--tune_raw_dir``, or (default) fresh
  subjects written by the project's simulator (``utils.simulation.generate_fastmri_dataset``, the engine of
  ``make_synthetic_data.py``) into a temporary folder with seeds and ids no demo subject has, one volume per contrast of
  the reported files and with their matrix, coils and slice count: never trained on, never reported. Writes
  ``benchmarks/results/nfe_quality_raw.*``.

Tuning (per (sampler, budget), best mean PSNR on the tuning slices, every run kept in the JSON), in stages so the
search stays affordable: (A) η × γ (``--etas`` × ``--gammas``; η = 0 for ``ddim0``/``dpmpp2m``) at the first of
``--cg_iters`` with γ fixed; (B) the other ``--cg_iters`` × the best γ and its grid neighbours, at the best η; (C, raw
only) the γ rule ``noise`` (``1/γ_eff = 1/γ + 2σ²/s²``, ``utils.raw_data.noise_aware_gamma``) for each
``--prior_error_stds`` s, at the best (η, γ, CG iterations). The reported slices are then reconstructed once per tuned
setting, with the same masks, the same measurements and the same per-slice seeds for every setting. Every point is
mean ± standard error over slices, and the per-slice PSNR/SSIM difference to tuned 100-step DDS (the reference) is
given as a paired mean ± SE. The JSON lists exactly which slices tuned and which were reported.

The *fast preset* is the setting with the fewest NFE (≤ ``--fast_max_nfe``, default 25) whose paired mean PSNR is
within 0.2 dB of the reference (ties: the higher paired mean); if none is, the best setting with ≤ 25 NFE, and the JSON
says ``reached: false``. ``utils.samplers.PRESETS["fast"]`` must hold what the committed benchmark chose
(:data:`PRESET_SOURCE` names which result; a test checks it).

Metrics per slice on magnitudes: PSNR with data_range = the slice's max |ground truth|, SSIM likewise (fastMRI's
definitions applied to one slice); the ground truth is the normalised MVUE (default path) or ``reconstruction_rss``
(raw path).

Usage (default path ≈ 10-15 min on 2 CPU cores at the demo's size, 48x48 and 20 slices; the raw path's tuning search
is larger, see the README)::

    python benchmarks/bench_nfe_quality.py --demo_dir demo_output
    python benchmarks/bench_nfe_quality.py --demo_dir demo_output --raw_dir demo_output/raw/brain/val
    python benchmarks/bench_nfe_quality.py --finetune_folder M --data_root R --csv val.csv --tune_csv train.csv \\
        --metadata_stats stats.json

Writes ``--json`` and ``--png`` (the curve) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow small convolutions on shared cores

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.preprocessing.names import SPLITS  # noqa: E402
from utils.recon_options import OUTSIDE_MODES  # noqa: E402

DEFAULT_STEPS = (10, 15, 20, 25, 50, 100)
SAMPLER_LABELS = {"dds": "DDS (tuned)", "ddim0": "DDIM η=0 + CG (tuned)", "dpmpp2m": "DPM-Solver++(2M) + CG (tuned)"}
WITHIN_DB = 0.2
RESULTS = REPO / "benchmarks" / "results"
#: The committed result ``utils.samplers.PRESETS["fast"]`` was derived from (the README's preset quotes it; a test
#: checks all three agree): the raw path's second run (the files' own noisy k-space, no inverse crime), which widened
#: γ and the CG iterations at 20 and 25 steps after the first (``nfe_quality_raw.json``) chose the tops of its grids.
PRESET_SOURCE = RESULTS / "nfe_quality_raw_wide.json"
#: Grid defaults per path: the default path keeps the committed run's grid; the raw path widens γ (50, the top of the
#: old grid, won at most budgets) and also tunes CG iterations and the γ rule.
GRID_DEFAULTS = {
    "default": {"gammas": [5.0, 20.0, 50.0], "cg_iters": None, "prior_error_stds": []},
    "raw": {"gammas": [5.0, 20.0, 50.0, 100.0, 200.0], "cg_iters": [5, 10, 20], "prior_error_stds": [0.05, 0.1, 0.2]},
}
#: The raw path's default centre fraction: 8 of the demo's 48 phase-encode lines. fastMRI's 0.08 at 4x leaves 4 ACS
#: lines, too few for ESPIRiT maps at this width (docs/raw_reconstruction.md: map correlation ~0.8 with 4 lines);
#: measured on the demo's held-out raw files: with 0.08, DDS at 10-20 steps gave 13.5 dB against 18.9 dB for
#: zero-filling; with 0.17, DDS at 25 steps gave 19.3 dB against 18.0 dB on the 5 slices of one file.
RAW_CENTER_FRACTION = 0.17
#: Simulated tuning subjects: ids and seeds no demo subject has (the demo's ids start at 2010000, its seeds are
#: ``seed + 1000 * contrast`` with seed 0).
TUNE_ID_OFFSET = 2_090_000
TUNE_SEED = 90_000


class BenchError(Exception):
    """A bad argument or missing input: one line, exit 2."""


@dataclass
class Problem:
    """A batch of slices with their measurements, condition tokens and per-slice seeds (default path)."""

    names: list[str]
    x_true: Any  # complex [B, H, W]
    op: Any
    y: Any
    cond: Any
    seeds: list[int]
    acceleration: float


@dataclass
class RawSet:
    """Raw slices to reconstruct: the volumes (cut to the slices used: the first ``num_slices`` of each) and their
    ``reconstruction_rss`` targets ``{(stem, slice): float32 [h, w]}``."""

    volumes: list[Any]
    targets: dict[tuple[str, int], np.ndarray]

    @property
    def names(self) -> list[str]:
        return [f"{v.stem}:{i}" for v in self.volumes for i in range(v.num_slices)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", type=Path, default=REPO / "demo_output",
                   help="a demo output folder: supplies every default below (models/fine-grained, fastmri/, "
                        "metadata_stats.json)")
    p.add_argument("--finetune_folder", type=Path, default=None, help="default: {demo_dir}/models/fine-grained")
    p.add_argument("--data_root", type=Path, default=None, help="default: {demo_dir}/fastmri")
    p.add_argument("--csv", type=Path, default=None,
                   help="reported slices (default: {data_root}/metadata_brain_val.csv)")
    p.add_argument("--split", default="val", choices=SPLITS, help="split folder of --csv")
    p.add_argument("--tune_csv", type=Path, default=None,
                   help="tuning slices (default: {data_root}/metadata_brain_train.csv), never the reported ones")
    p.add_argument("--tune_split", default="train", choices=SPLITS)
    g = p.add_argument_group("raw path (instead of --data_root)")
    g.add_argument("--raw_dir", type=Path, nargs="?", const=Path(""), default=None,
                   help="held-out raw fastMRI multi-coil files (full k-space with reconstruction_rss), reconstructed "
                        "through recon_complex_multi.py --raw_dir's own code (no value: {demo_dir}/raw/brain/val, "
                        "the demo's held-out subjects)")
    g.add_argument("--tune_raw_dir", type=Path, default=None,
                   help="raw tuning files (default: fresh simulated subjects, see --tune_seed)")
    g.add_argument("--tune_seed", type=int, default=TUNE_SEED,
                   help="seed of the simulated tuning subjects (contrast i: seed + 1000 i)")
    g.add_argument("--tune_subjects_per_contrast", type=int, default=1)
    g.add_argument("--work_dir", type=Path, default=None,
                   help="where simulated tuning files and per-setting run folders go (default: a temporary folder, "
                        "removed at the end)")
    g.add_argument("--center_fraction", type=float, default=None,
                   help=f"fully sampled centre (default {RAW_CENTER_FRACTION}: enough ACS lines for the maps, see "
                        "RAW_CENTER_FRACTION)")
    g.add_argument("--outside", default="lsq", choices=OUTSIDE_MODES, help="as recon_complex_multi.py --outside")
    g.add_argument("--prior_error_stds", type=float, nargs="*", default=None,
                   help="s values of the 'noise' γ rule tried in tuning stage C (default 0.05 0.1 0.2; none: γ fixed)")
    p.add_argument("--metadata_stats", type=Path, default=None,
                   help="the model's stats (default: {demo_dir}/metadata_stats.json when the model has an embedder)")
    p.add_argument("--num_slices", type=int, default=20,
                   help="reported slices: the first N of --csv; raw: N slices spread over the files (the demo's 20)")
    p.add_argument("--num_tune", type=int, default=None,
                   help="tuning slices: one per subject, spread over the CSV (default 4); raw: spread over the tuning "
                        "files (default 8)")
    p.add_argument("--mask_type", default="uniform1d")
    p.add_argument("--acc_factor", type=float, default=4.0)
    p.add_argument("--noise_sigma", type=float, default=0.02,
                   help="k-space noise std (utils/measurement.py convention); 0 = noiseless; default path only "
                        "(raw files carry their own noise)")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="DDS step budgets")
    p.add_argument("--alt_steps", type=int, nargs="+", default=[10, 15, 20, 25],
                   help="step budgets of the alternatives")
    p.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.5, 0.8, 1.0])
    p.add_argument("--gammas", type=float, nargs="+", default=None,
                   help="default 5 20 50 (raw: 5 20 50 100 200)")
    p.add_argument("--cg_iters", type=int, nargs="+", default=None,
                   help="CG iterations tried in tuning stage B; the first is stage A's (default: --cg_iter; "
                        "raw: 5 10 20)")
    p.add_argument("--samplers", nargs="+", default=["dds", "ddim0", "dpmpp2m"], choices=list(SAMPLER_LABELS))
    p.add_argument("--reference_steps", type=int, default=100, help="the DDS budget everything is paired against")
    p.add_argument("--fast_max_nfe", type=int, default=25)
    p.add_argument("--cg_iter", type=int, default=5, help="CG iterations when --cg_iters is not given (default path)")
    p.add_argument("--clip_x0", type=float, default=1.5, help="|x0_hat| limit (the demo's setting); <= 0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", type=Path, default=None,
                   help="default: benchmarks/results/nfe_quality.json (raw: nfe_quality_raw.json)")
    p.add_argument("--png", type=Path, default=None, help="default: the --json path with .png")
    a = p.parse_args(argv)
    d = a.demo_dir
    a.mode = "raw" if a.raw_dir is not None else "default"
    if a.raw_dir == Path(""):
        a.raw_dir = d / "raw" / "brain" / "val"
    grid = GRID_DEFAULTS[a.mode]
    a.finetune_folder = a.finetune_folder or d / "models" / "fine-grained"
    a.gammas = a.gammas if a.gammas is not None else list(grid["gammas"])
    a.cg_iters = a.cg_iters if a.cg_iters is not None else list(grid["cg_iters"] or [a.cg_iter])
    a.prior_error_stds = a.prior_error_stds if a.prior_error_stds is not None else list(grid["prior_error_stds"])
    a.num_tune = a.num_tune if a.num_tune is not None else (8 if a.mode == "raw" else 4)
    if a.mode == "raw" and a.center_fraction is None:
        a.center_fraction = RAW_CENTER_FRACTION
    if a.mode == "default":
        a.data_root = a.data_root or d / "fastmri"
        a.csv = a.csv or a.data_root / "metadata_brain_val.csv"
        a.tune_csv = a.tune_csv or a.data_root / "metadata_brain_train.csv"
    stem = "nfe_quality_raw" if a.mode == "raw" else "nfe_quality"
    a.json = a.json or RESULTS / f"{stem}.json"
    a.png = a.png or a.json.with_suffix(".png")
    if a.reference_steps not in a.steps:
        a.steps = sorted({*a.steps, a.reference_steps})
    return a


def check_args(a: argparse.Namespace) -> None:
    if not a.finetune_folder.is_dir():
        raise BenchError(f"--finetune_folder {a.finetune_folder} is not a folder (run `make demo`, or pass the paths)")
    if a.mode == "default":
        if a.prior_error_stds:
            raise BenchError("--prior_error_stds (the γ rule) exists on the raw path only: add --raw_dir")
        if not a.data_root.is_dir():
            raise BenchError(f"--data_root {a.data_root} is not a folder (run `make demo`, or pass the paths)")
        for flag in ("csv", "tune_csv"):
            if not getattr(a, flag).is_file():
                raise BenchError(f"--{flag} {getattr(a, flag)} not found")
        if a.csv.resolve() == a.tune_csv.resolve() and a.split == a.tune_split:
            raise BenchError("--tune_csv is the reported --csv: tune on a separate split")
    else:
        if a.data_root is not None:
            raise BenchError("give --raw_dir or --data_root, not both")
        for flag in ("raw_dir", "tune_raw_dir"):
            path = getattr(a, flag)
            if path is not None and not path.exists():
                raise BenchError(f"--{flag} {path} not found")
        if a.tune_raw_dir is not None and a.tune_raw_dir.resolve() == a.raw_dir.resolve():
            raise BenchError("--tune_raw_dir is the reported --raw_dir: tune on other files")
        if a.tune_subjects_per_contrast < 1:
            raise BenchError("--tune_subjects_per_contrast must be >= 1")
        if a.center_fraction is not None and not 0 < a.center_fraction < 1:
            raise BenchError(f"--center_fraction must lie in (0, 1), got {a.center_fraction}")
        if not all(math.isfinite(v) and v > 0 for v in a.prior_error_stds):
            raise BenchError("--prior_error_stds must be finite and > 0")
    if min(a.num_slices, a.num_tune, a.threads, a.fast_max_nfe) < 1 or min(a.cg_iters) < 0:
        raise BenchError("--num_slices, --num_tune, --threads and --fast_max_nfe must be >= 1, --cg_iters >= 0")
    if min(a.steps + a.alt_steps) < 1:
        raise BenchError("step budgets must be >= 1")
    if not (math.isfinite(a.acc_factor) and a.acc_factor > 1):
        raise BenchError(f"--acc_factor must be a finite number > 1, got {a.acc_factor}")
    if not (math.isfinite(a.noise_sigma) and a.noise_sigma >= 0):
        raise BenchError(f"--noise_sigma must be a finite number >= 0, got {a.noise_sigma}")
    if not all(math.isfinite(v) and v >= 0 for v in a.etas + a.gammas):
        raise BenchError("--etas and --gammas must be finite and >= 0")


# ----------------------------------------------------------------------------------------------------------------------
# settings


def setting(sampler: str, steps: int, eta: float, gamma: float, cg_iter: int, gamma_rule: str = "fixed",
            prior_error_std: float | None = None) -> dict[str, Any]:
    """One point of the search: the sampler settings (``ddim0`` is DDS with η = 0; ``prior_error_std`` only with the
    ``noise`` γ rule)."""
    return {"sampler": sampler, "steps": int(steps), "eta": float(eta), "gamma": float(gamma), "cg_iter": int(cg_iter),
            "gamma_rule": gamma_rule, "prior_error_std": None if gamma_rule == "fixed" else float(prior_error_std)}


def run_key(s: dict[str, Any]) -> tuple:
    """Settings that give the same reconstruction share a key (ddim0 = DDS at η = 0: run once)."""
    name = "dds" if s["sampler"] == "ddim0" else s["sampler"]
    return (name, s["steps"], s["eta"], s["gamma"], s["cg_iter"], s["gamma_rule"], s["prior_error_std"])


# ----------------------------------------------------------------------------------------------------------------------
# default path: problems


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
    from utils.measurement import simulate_measurement

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


def default_runner(problem: Problem, model, clip) -> Callable[[dict], dict]:
    """``run(setting) -> {"psnr", "ssim" [B], "nfe"}`` on a default-path problem (γ fixed)."""
    def run(s: dict[str, Any]) -> dict[str, Any]:
        if s["gamma_rule"] != "fixed":
            raise ValueError("the default path has no γ rule")
        x, nfe = reconstruct(problem, model, s["sampler"], s["steps"], s["eta"], s["gamma"], s["cg_iter"], clip)
        p, q = slice_metrics(problem.x_true, x)
        return {"psnr": p, "ssim": q, "nfe": nfe}

    run.num_slices = len(problem.names)  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------------------------------------------------
# raw path: files, tuning subjects, one setting through the raw reconstruction


def raw_set(paths: list[Path], num_slices: int) -> RawSet:
    """``num_slices`` slices of the raw files, dealt round-robin over the files (the first slices of each file)."""
    from utils.raw_data import open_raw_volume

    volumes = []
    for path in paths:
        try:
            vol = open_raw_volume(path)
        except (OSError, ValueError) as err:
            raise BenchError(f"{path}: not a readable fastMRI multi-coil file ({str(err).splitlines()[0]})") from None
        if vol.kind != "validation" or not vol.has_target:
            raise BenchError(f"{path.name}: the benchmark needs full k-space with reconstruction_rss (a validation "
                             "file), to undersample it and to score against its target")
        volumes.append(vol)
    counts = [0] * len(volumes)
    left = num_slices
    while left > 0 and any(c < v.num_slices for c, v in zip(counts, volumes)):
        for i, v in enumerate(volumes):
            if left > 0 and counts[i] < v.num_slices:
                counts[i] += 1
                left -= 1
    cut = [dataclasses.replace(v, num_slices=c) for v, c in zip(volumes, counts) if c > 0]
    targets = {}
    for v in cut:
        rss = v.read_target()
        for i in range(v.num_slices):
            targets[(v.stem, i)] = rss[i]
    return RawSet(cut, targets)


def simulate_tuning_files(reported: RawSet, out_dir: Path, seed: int, per_contrast: int) -> tuple[list[Path], dict]:
    """Fresh simulated subjects for tuning: one call of the project's simulator per contrast of the reported files
    (seed ``seed + 1000 i``, ids from :data:`TUNE_ID_OFFSET`), with the reported files' matrix, coil counts and slice
    count and the simulator's default SNR (the demo's). Returns the files and what was simulated."""
    from utils.raw_data import open_raw_volume
    from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

    vols = reported.volumes
    contrasts = sorted({str(v.attrs.get("acquisition", "")) for v in vols})
    if "" in contrasts:
        raise BenchError("a reported file has no 'acquisition' attribute: pass --tune_raw_dir")
    matrices = sorted({tuple(v.grid_shape) for v in vols})
    if len(matrices) != 1:
        raise BenchError(f"the reported files have several matrices {matrices}: pass --tune_raw_dir")
    coils = tuple(sorted({int(v.num_coils) for v in vols}))
    num_slices = max(open_raw_volume(v.path).num_slices for v in vols)  # the files' own count (the set is cut)
    info = {"source": "simulated", "simulator": "utils.simulation.fastmri_writer.generate_fastmri_dataset "
            "(make_synthetic_data.py --format fastmri)", "contrasts": contrasts, "matrix": list(matrices[0]),
            "num_coils": list(coils), "num_slices": num_slices, "subjects_per_contrast": per_contrast,
            "seeds": {c: seed + 1000 * i for i, c in enumerate(contrasts)}, "id_offset": TUNE_ID_OFFSET,
            "snr": FastMRIConfig.snr}
    paths: list[Path] = []
    for i, acq in enumerate(contrasts):
        cfg = FastMRIConfig(output_dir=out_dir / acq, num_volumes=per_contrast, num_slices=num_slices,
                            matrix=matrices[0], num_coils=coils, seed=seed + 1000 * i, acquisitions=(acq,),
                            id_offset=TUNE_ID_OFFSET + 1000 * i, ground_truth=False)
        paths += [r.path for r in generate_fastmri_dataset(cfg, log=None)]
    return sorted(paths, key=lambda q: q.name), info


def _interleave(paths: list[Path]) -> list[Path]:
    """Files ordered so that the first ones cover every contrast (``file_brain_{ACQ}_...``)."""
    groups: dict[str, list[Path]] = {}
    for q in paths:
        groups.setdefault(q.name.split("_")[2] if q.name.count("_") >= 3 else "", []).append(q)
    out = []
    while any(groups.values()):
        for g in sorted(groups):
            if groups[g]:
                out.append(groups[g].pop(0))
    return out


def raw_reconstructor(model, s: dict[str, Any], clip):
    """The raw path's diffusion callable for one setting: ``DiffusionReconstructor`` itself for DDS (what
    ``recon_complex_multi.py --raw_dir`` runs), the same with :func:`utils.samplers.dc_sample` for the others."""
    from utils.diffusion_recon import DiffusionReconstructor
    from utils.samplers import SamplerStats, dc_sample, make_cfg_eps_fn

    name = "dds" if s["sampler"] == "ddim0" else s["sampler"]
    kw = dict(sampler="dds", num_steps=s["steps"], eta=s["eta"], gamma=s["gamma"], cg_iter=s["cg_iter"], clip_x0=clip)
    if name == "dds":
        return DiffusionReconstructor(model.unet, model.conditioner, model.schedule, **kw)

    class DCReconstructor(DiffusionReconstructor):
        def __call__(self, y, op, records, prompts, generators):
            cond, uncond = self.condition(records, prompts)
            eps_fn = make_cfg_eps_fn(self.unet, cond, uncond, self.guidance_scale, alphas_cumprod=self.schedule)
            stats = SamplerStats()
            x = dc_sample(name, eps_fn, op, y, self.schedule, num_steps=self.num_steps, eta=self.eta,
                          gamma=self.gamma, cg_iter=self.cg_iter, generators=list(generators), stats=stats,
                          clip_x0=self.clip_x0)
            return x, stats.nfe

    return DCReconstructor(model.unet, model.conditioner, model.schedule, **kw)


def raw_runner(rset: RawSet, model, a: argparse.Namespace, crop: int, clip, work: Path) -> Callable[[dict], dict]:
    """``run(setting) -> {"psnr", "ssim" [N], "nfe", "rows"}``: every slice of ``rset`` through
    :func:`utils.raw_reconstruction.run_raw_reconstruction` (one batch per file), scored against
    ``reconstruction_rss``; the run folder is removed afterwards."""
    from utils.metrics import psnr, ssim
    from utils.raw_reconstruction import RawReconSettings, run_raw_reconstruction
    from utils.recon_outputs import row_path

    counter = {"n": 0}

    def run(s: dict[str, Any]) -> dict[str, Any]:
        settings = RawReconSettings(
            method="diffusion", sampler="dds", mask_type=a.mask_type, acc_factor=a.acc_factor,
            center_fraction=a.center_fraction, num_steps=s["steps"], eta=s["eta"], gamma=s["gamma"],
            gamma_rule=s["gamma_rule"], prior_error_std=s["prior_error_std"] or 0.1, cg_iter=s["cg_iter"],
            clip_x0=clip, seed=a.seed, batch_size=max(v.num_slices for v in rset.volumes), outside=a.outside,
            image_size=(crop, crop))  # fmt: skip
        counter["n"] += 1
        out = work / f"run_{counter['n']:04d}"
        run_raw_reconstruction(rset.volumes, settings, out, diffusion=raw_reconstructor(model, s, clip),
                               progress=False)
        rows, p, q = [], [], []
        for v in rset.volumes:  # the run folder's documented layout (utils/raw_reconstruction.py)
            for i in range(v.num_slices):
                row = json.loads(row_path(out, v.stem, i).read_text())
                with np.load(out / "slices" / v.stem / f"{i:03d}.npz") as z:
                    mag = z["magnitude"]
                target = rset.targets[(v.stem, i)]
                ok = row["status"] == "ok" and np.isfinite(mag).all()
                p.append(psnr(target, mag) if ok else math.nan)
                q.append(ssim(target, mag) if ok else math.nan)
                rows.append(row)
        shutil.rmtree(out)
        return {"psnr": np.array(p), "ssim": np.array(q), "nfe": int(rows[0]["nfe"]), "rows": rows}

    run.num_slices = len(rset.names)  # type: ignore[attr-defined]
    return run


def row_summary(rows: list[dict]) -> dict[str, Any]:
    """What the raw path measured per slice (σ, scale, acceleration, ACS lines, effective γ), as mean ± SE."""
    out: dict[str, Any] = {}
    for key in ("sigma_normalized", "scale", "acceleration", "num_center_lines", "gamma"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {**mean_se(np.array(vals, dtype=np.float64)), "min": float(min(vals)), "max": float(max(vals))}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# statistics, tuning, evaluation, preset


def mean_se(values: np.ndarray) -> dict[str, float]:
    """Mean and standard error (sample std / √n; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se}


def grid_for(sampler: str, etas: list[float], gammas: list[float]) -> list[tuple[float, float]]:
    """Stage A's (η, γ) pairs."""
    if sampler == "dds":
        return [(e, g) for e in etas for g in gammas]
    return [(0.0, g) for g in gammas]  # ddim0: η = 0 by definition; dpmpp2m: deterministic ODE solver


def _neighbours(values: list[float], v: float) -> list[float]:
    """``v`` and its neighbours in the sorted grid."""
    grid = sorted(set(values))
    i = grid.index(v)
    return grid[max(i - 1, 0) : i + 2]


class Tuner:
    """Staged search per (sampler, steps) by mean PSNR on the tuning slices; runs are cached across samplers
    (ddim0 = the η = 0 runs of DDS) and counted (slice-steps, for run-time estimates)."""

    def __init__(self, run: Callable[[dict], dict], a: argparse.Namespace) -> None:
        self.run, self.a = run, a
        self.cache: dict[tuple, tuple[float, float]] = {}  # key -> (mean tuning PSNR, wall seconds)
        self.slice_steps = 0
        self.first_rows: list[dict] | None = None

    def score(self, s: dict[str, Any]) -> tuple[float, float]:
        """(mean PSNR on the tuning slices, NaN if any slice failed; wall seconds of the run, 0 when cached)."""
        key = run_key(s)
        if key in self.cache:
            return self.cache[key][0], 0.0
        start = time.perf_counter()
        r = self.run(s)
        self.slice_steps += s["steps"] * self.run.num_slices  # type: ignore[attr-defined]
        if self.first_rows is None and "rows" in r:
            self.first_rows = r["rows"]
        vals = r["psnr"]
        self.cache[key] = (float(np.mean(vals)) if np.isfinite(vals).all() else math.nan,
                           time.perf_counter() - start)
        return self.cache[key]

    def tune(self, sampler: str, steps: int) -> dict[str, Any]:
        a = self.a
        rows: list[dict] = []

        def trial(stage: str, s: dict[str, Any]) -> None:
            if any(run_key(r["setting"]) == run_key(s) for r in rows):
                return
            score, wall = self.score(s)
            rows.append({"stage": stage, "setting": s, "tune_psnr": score, "wall_s": wall})

        def best() -> dict[str, Any]:
            finite = [r for r in rows if math.isfinite(r["tune_psnr"])]
            if not finite:
                raise RuntimeError(f"{sampler} at {steps} steps gave no finite reconstruction on the tuning slices")
            return max(finite, key=lambda r: r["tune_psnr"])["setting"]

        cg0 = a.cg_iters[0]
        for eta, gamma in grid_for(sampler, a.etas, a.gammas):
            trial("A", setting(sampler, steps, eta, gamma, cg0))
        b = best()
        for cg in a.cg_iters[1:]:
            for gamma in _neighbours(a.gammas, b["gamma"]):
                trial("B", setting(sampler, steps, b["eta"], gamma, cg))
        b = best()
        for s_err in a.prior_error_stds:
            trial("C", setting(sampler, steps, b["eta"], b["gamma"], b["cg_iter"], "noise", s_err))
        b = best()
        score = next(r["tune_psnr"] for r in rows if r["setting"] is b)
        grid = [{"stage": r["stage"], "eta": r["setting"]["eta"], "gamma": r["setting"]["gamma"],
                 "cg_iter": r["setting"]["cg_iter"], "gamma_rule": r["setting"]["gamma_rule"],
                 "prior_error_std": r["setting"]["prior_error_std"], "tune_psnr": r["tune_psnr"],
                 "wall_s": r["wall_s"]} for r in rows]
        rule = "" if b["gamma_rule"] == "fixed" else f" rule noise s {b['prior_error_std']:g}"
        print(f"  tuned {sampler:8s} {steps:4d} steps: eta {b['eta']:g} gamma {b['gamma']:g} cg {b['cg_iter']}{rule} "
              f"(tuning PSNR {score:.2f} dB, {len(rows)} runs)", flush=True)
        return {**b, "tune_psnr": score, "grid": grid}


def tune(run: Callable[[dict], dict], plan: list[tuple[str, int]], a: argparse.Namespace) -> tuple[dict, Tuner]:
    """Best settings per (sampler, steps) on the tuning slices; every run is kept."""
    tuner = Tuner(run, a)
    return {f"{sampler}@{steps}": tuner.tune(sampler, steps) for sampler, steps in plan}, tuner


def evaluate(run: Callable[[dict], dict], tuned: dict, a: argparse.Namespace) -> tuple[list[dict], int, list[dict]]:
    """Each tuned setting on the reported slices, paired against the reference (tuned DDS at reference_steps).
    Returns the points, the slice-steps run and the reference's per-slice rows (raw path; else empty)."""
    per: dict[str, dict[str, Any]] = {}
    slice_steps = 0
    for key, t in tuned.items():
        start = time.perf_counter()
        r = run({k: t[k] for k in ("sampler", "steps", "eta", "gamma", "cg_iter", "gamma_rule", "prior_error_std")})
        p, s = r["psnr"], r["ssim"]
        if not (np.isfinite(p).all() and np.isfinite(s).all()):
            raise RuntimeError(f"{key}: non-finite reconstruction or metric on a reported slice")
        per[key] = {**r, "wall": time.perf_counter() - start}
        slice_steps += t["steps"] * len(p)
    ref = per[f"dds@{a.reference_steps}"]
    points = []
    for key, t in tuned.items():
        r = per[key]
        p, s = r["psnr"], r["ssim"]
        dp, ds = p - ref["psnr"], s - ref["ssim"]
        point = {
            "sampler": t["sampler"], "label": SAMPLER_LABELS[t["sampler"]], "steps": t["steps"], "nfe": r["nfe"],
            "eta": t["eta"], "gamma": t["gamma"], "cg_iter": t["cg_iter"], "psnr": mean_se(p), "ssim": mean_se(s),
            "paired_psnr_diff": mean_se(dp), "paired_ssim_diff": mean_se(ds),
            "wins_or_ties": int((dp >= 0).sum()), "num_slices": int(len(p)), "wall_s": r["wall"],
            "per_slice_psnr": p.tolist(), "per_slice_ssim": s.tolist(),
        }
        if a.mode == "raw":
            point["gamma_rule"], point["prior_error_std"] = t["gamma_rule"], t["prior_error_std"]
            point["gamma_effective"] = row_summary(r["rows"]).get("gamma")
        points.append(point)
    return points, slice_steps, ref.get("rows", [])


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
    """The ``utils.samplers.PRESETS`` entry of a benchmark point (ddim0 is DDS with η = 0); the γ rule's keys (flags
    of ``recon_complex_multi.py --raw_dir``) only where the point used the ``noise`` rule."""
    sampler = "dds" if point["sampler"] == "ddim0" else point["sampler"]
    preset = {"sampler": sampler, "num_steps": int(point["steps"]), "eta": float(point["eta"]),
              "gamma": float(point["gamma"]), "cg_iter": int(point["cg_iter"])}
    if point.get("gamma_rule", "fixed") != "fixed":
        preset.update(gamma_rule=point["gamma_rule"], prior_error_std=float(point["prior_error_std"]))
    return preset


# ----------------------------------------------------------------------------------------------------------------------
# output


def _rule_text(p: dict) -> str:
    if p.get("gamma_rule", "fixed") == "fixed":
        return "fixed"
    g = p.get("gamma_effective") or {}
    eff = f" (γ_eff {g['mean']:.3g})" if g else ""
    return f"noise, s {p['prior_error_std']:g}{eff}"


def table(points: list[dict], ref_steps: int) -> str:
    raw = any("gamma_rule" in p for p in points)
    extra_head, extra_rule = (" CG | γ rule |", "---|---|") if raw else ("", "")
    lines = [f"| sampler | steps | NFE | η | γ |{extra_head} PSNR [dB] | SSIM | ΔPSNR vs DDS-{ref_steps} (paired) | "
             "ΔSSIM (paired) |", f"|---|---|---|---|---|{extra_rule}---|---|---|---|"]
    for p in sorted(points, key=lambda q: (list(SAMPLER_LABELS).index(q["sampler"]), q["nfe"])):
        extra = f" {p['cg_iter']} | {_rule_text(p)} |" if raw else ""
        lines.append(
            f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {p['eta']:g} | {p['gamma']:g} |{extra} "
            f"{p['psnr']['mean']:.2f} ± {p['psnr']['se']:.2f} | {p['ssim']['mean']:.4f} ± {p['ssim']['se']:.4f} | "
            f"{p['paired_psnr_diff']['mean']:+.2f} ± {p['paired_psnr_diff']['se']:.2f} | "
            f"{p['paired_ssim_diff']['mean']:+.4f} ± {p['paired_ssim_diff']['se']:.4f} |")
    return "\n".join(lines)


def plot(points: list[dict], fast: dict, ref_steps: int, path: Path, title: str) -> None:
    import matplotlib

    from utils.figures import pyplot, save_figure

    plt = pyplot()
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
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------------
# main


def load_model(a: argparse.Namespace, device) -> tuple[Any, int]:
    """The benchmarked model (a ``DiffusionReconstructor`` holding UNet, conditioner and schedule), its image size."""
    from utils.diffusion_recon import DiffusionReconstructor, load_reconstruction_model, resolve_model_plan

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
    return DiffusionReconstructor(unet, conditioner, schedule), int(plan.train_size or 320)


def prepare_default(a: argparse.Namespace, model, crop: int, clip, device) -> dict[str, Any]:
    """Runners, slice names and the description of the default (re-simulated) path."""
    from utils.data import MRISliceDataset
    from utils.measurement import mask_problem
    from utils.recon_settings import ReconSettings

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
    print(f"model {a.finetune_folder} ({crop}x{crop}); reported: {len(report_idx)} slices of {a.csv.name}; tuning: "
          f"{len(tune_idx)} slices of {a.tune_csv.name} ({a.tune_split}); {a.mask_type} x{a.acc_factor:g} "
          f"(achieved {report_p.acceleration:.2f}), noise σ {a.noise_sigma:g}", flush=True)
    config = {
        "finetune_folder": str(a.finetune_folder), "data_root": str(a.data_root), "csv": str(a.csv),
        "split": a.split, "tune_csv": str(a.tune_csv), "tune_split": a.tune_split, "image_size": crop,
        "mask_type": a.mask_type, "acc_factor": a.acc_factor, "achieved_acceleration": report_p.acceleration,
        "noise_sigma": a.noise_sigma, "measurements": "utils.measurement.simulate_measurement: "
        + ("noisy, complex Gaussian k-space noise" if a.noise_sigma > 0 else "noiseless"),
    }
    title = (f"{crop}x{crop}, {len(report_idx)} held-out slices, {a.mask_type} x{a.acc_factor:g}, noise σ "
             f"{a.noise_sigma:g}; settings tuned per point on {len(tune_idx)} other slices")
    return {"report": default_runner(report_p, model, clip), "tune": default_runner(tune_p, model, clip),
            "report_names": report_p.names, "tune_names": tune_p.names, "config": config, "title": title,
            "tuning_set": {"source": f"{a.tune_csv} ({a.tune_split} split)"}}


def prepare_raw(a: argparse.Namespace, model, crop: int, clip, work: Path) -> dict[str, Any]:
    """Runners, slice names and the description of the raw (real-acquisition) path."""
    from utils.raw_data import list_raw_files

    try:
        report_files = list_raw_files(a.raw_dir)
        tune_files = list_raw_files(a.tune_raw_dir) if a.tune_raw_dir is not None else None
    except (FileNotFoundError, ValueError) as err:
        raise BenchError(str(err).splitlines()[0]) from None
    report = raw_set(_interleave(report_files), a.num_slices)
    if tune_files is None:
        tune_files, tuning_set = simulate_tuning_files(report, work / "tuning_files", a.tune_seed,
                                                       a.tune_subjects_per_contrast)
        tuning_set["folder"] = "(temporary)" if a.work_dir is None else str(work / "tuning_files")
    else:
        tuning_set = {"source": str(a.tune_raw_dir)}
    tune_set = raw_set(_interleave(tune_files), a.num_tune)
    shared = sorted({v.stem for v in report.volumes} & {v.stem for v in tune_set.volumes})
    if shared:
        raise BenchError(f"tuning and reported files share subjects ({shared[:3]}): tune on other files")
    tuning_set["files"] = [v.path.name for v in tune_set.volumes]
    print(f"model {a.finetune_folder} ({crop}x{crop}); raw path; reported: {len(report.names)} slices of "
          f"{len(report.volumes)} files in {a.raw_dir}; tuning: {len(tune_set.names)} slices of "
          f"{len(tune_set.volumes)} {tuning_set['source']} files; {a.mask_type} x{a.acc_factor:g}", flush=True)
    config = {
        "finetune_folder": str(a.finetune_folder), "raw_dir": str(a.raw_dir), "image_size": crop,
        "mask_type": a.mask_type, "acc_factor": a.acc_factor, "center_fraction": a.center_fraction,
        "outside": a.outside, "measurements": "the files' own noisy k-space, retrospectively undersampled over the "
        "raw width (utils.raw_data.slice_measurement); σ, ESPIRiT maps from the ACS lines and the scale estimated "
        "from the measurement (utils.raw_reconstruction.run_raw_reconstruction)",
        "target": "reconstruction_rss of each file",
        "prior_error_stds": a.prior_error_stds,
    }
    n_files = len(report.volumes)
    title = (f"raw path: {len(report.names)} held-out slices of {n_files} raw noisy files, {a.mask_type} "
             f"x{a.acc_factor:g}, ACS maps, estimated scale and σ; settings tuned per point on "
             f"{len(tune_set.names)} slice(s) of {len(tune_set.volumes)} other subject(s)")
    return {"report": raw_runner(report, model, a, crop, clip, work / "runs_report"),
            "tune": raw_runner(tune_set, model, a, crop, clip, work / "runs_tune"),
            "report_names": report.names, "tune_names": tune_set.names, "config": config, "title": title,
            "tuning_set": tuning_set}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    check_args(a)
    import torch

    from utils.files import write_json

    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    device = torch.device("cpu")
    model, crop = load_model(a, device)
    clip = a.clip_x0 if a.clip_x0 and a.clip_x0 > 0 else None
    tmp = None
    if a.mode == "raw":
        if a.work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench_nfe_raw_")
        work = Path(tmp.name) if tmp is not None else a.work_dir
        work.mkdir(parents=True, exist_ok=True)
    try:
        prep = prepare_raw(a, model, crop, clip, work) if a.mode == "raw" else prepare_default(a, model, crop, clip,
                                                                                                 device)
        overlap = sorted(set(prep["report_names"]) & set(prep["tune_names"]))
        if overlap:
            raise BenchError(f"tuning and reported slices overlap ({overlap[:3]}): use another tuning split")
        plan_runs = [("dds", s) for s in a.steps]
        plan_runs += [(smp, s) for smp in a.samplers if smp != "dds" for s in a.alt_steps]
        # CPU seconds too: on a shared machine the wall clock says little about what a free one would take
        t0, c0 = time.perf_counter(), time.process_time()
        tuned, tuner = tune(prep["tune"], plan_runs, a)
        tune_s, tune_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        points, eval_slice_steps, ref_rows = evaluate(prep["report"], tuned, a)
        eval_s, eval_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if tmp is not None:
            tmp.cleanup()
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
    config = {
        **prep["config"], "cg_iters": a.cg_iters, "clip_x0": clip, "seed": a.seed, "etas": a.etas,
        "gammas": a.gammas, "steps": a.steps, "alt_steps": a.alt_steps, "samplers": a.samplers,
        "reference_steps": a.reference_steps, "guidance_scale": 1.0,
        "metric": "per-slice magnitude PSNR/SSIM, data_range = max |ground truth| of the slice",
        "tuning_search": "stage A: eta x gamma at cg_iters[0], gamma fixed; B: other cg_iters x (best gamma and its "
                         "grid neighbours) at the best eta; C: gamma rule 'noise' per prior_error_std at the best "
                         "(eta, gamma, cg_iter); best mean PSNR on the tuning slices",
    }
    if a.mode == "default":
        config["cg_iter"] = a.cg_iters[0]
    total_s = time.perf_counter() - t_all
    steps_all = tuner.slice_steps + eval_slice_steps
    result = {
        "description": "PSNR/SSIM against network evaluations; sampler settings tuned per (sampler, steps) on the "
                       "tuning slices; mean ± SE over reported slices; paired differences against tuned DDS at "
                       f"{a.reference_steps} steps",
        "mode": a.mode,
        "command": "python benchmarks/bench_nfe_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config,
        "reported_slices": prep["report_names"],
        "tuning_slices": prep["tune_names"],
        "tuning_set": prep["tuning_set"],
        "tuning": tuned,
        "points": points,
        "reference": {"sampler": "dds", "steps": a.reference_steps, "nfe": ref["nfe"], "eta": ref["eta"],
                      "gamma": ref["gamma"], "psnr": ref["psnr"], "ssim": ref["ssim"]},
        "fast_preset": fast,
        "table_markdown": text,
        "verdict": verdict,
        "timing_s": {"tuning": tune_s, "evaluation": eval_s, "total": total_s,
                     "cpu_s_tuning": tune_cpu, "cpu_s_evaluation": eval_cpu,
                     "slice_steps_tuning": tuner.slice_steps, "slice_steps_evaluation": eval_slice_steps,
                     "s_per_slice_step": (tune_s + eval_s) / steps_all if steps_all else None,
                     "cpu_s_per_slice_step": (tune_cpu + eval_cpu) / steps_all if steps_all else None},
        "machine": machine,
    }
    if a.mode == "raw":
        result["measured"] = {"reported": row_summary(ref_rows), "tuning": row_summary(tuner.first_rows or [])}
    write_json(a.json, result)
    plot(points, fast, a.reference_steps, a.png, prep["title"])
    print(f"wrote {a.json} and {a.png} ({total_s / 60:.1f} min; {steps_all} slice-steps, "
          f"{result['timing_s']['s_per_slice_step'] or 0:.3f} s each)")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"bench_nfe_quality.py: error: {err}", file=sys.stderr)
        sys.exit(2)

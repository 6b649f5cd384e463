"""The powered experiment the demo cannot be: does metadata help, over several seeds, where it can?

``python demo.py --study`` runs, for each seed (other simulated subjects *and* other initialisations), the demo's own
stages (:mod:`utils.demo_stages`) into ``{output_dir}/seed_{s}/``:

1. simulate + preprocess the brain and cardiac sets;
2. train, at equal budget (same UNet, steps, batch, learning rate, null-condition rate), the unconditioned model, the
   text model (CLIP tower random + frozen, projection trained, the demo's baseline), a tiny T5 encoder (random +
   frozen, projection trained: no pretrained T5 offline either), the fine-grained metadata model and the
   fine-grained model with the cardiac OOD set (``train_mri_ood.py``);
3. the information report (``metadata_report.py``, every attribute the model reads) of every conditioned model;
4. reconstruct the held-out slices with *noisy* measurements at 8x with a small centre fraction (where the
   measurement lacks what the metadata could supply): zero-filled, CS, every model, the fine-grained model with
   mismatched metadata.

Then, per comparison, the paired per-slice PSNR difference (ContextMRI per-slice protocol) of every seed is pooled
(:func:`pool_paired`) with a 95 % interval and a plain verdict, and the reports' information estimates are set side
by side (OOD vs. plain fine-grained included). Every stage resumes: finished models are reused only when their run
config matches, reconstructions only when their fingerprint matches, reports only when made from the same model
export with the same settings, so no stale result can enter the table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from utils.demo_config import DemoConfig
from utils.demo_stages import SHORT, Stage, prepare_and_train, reconstruct_all, report_all

#: (first, second, what it tests): the first minus the second, per slice.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("fine-grained", "unconditioned", "fine-grained metadata beats no conditioning"),
    ("fine-grained", "text", "fine-grained metadata beats the CLIP prompt"),
    ("fine-grained", "t5", "fine-grained metadata beats the T5 prompt"),
    ("text", "unconditioned", "the CLIP prompt beats no conditioning"),
    ("t5", "unconditioned", "the T5 prompt beats no conditioning"),
    ("fine-grained+ood", "fine-grained", "OOD cardiac training helps the fine-grained model"),
    ("fine-grained", "fine-grained_mismatch", "correct metadata beats another sequence's metadata"),
)


@dataclass
class StudyConfig:
    """What the study runs (every field is written to ``study.json``)."""

    output_dir: Path = Path("study_output")
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("unconditioned", "text", "t5", "fine-grained", "fine-grained+ood")
    acceleration: float = 8.0
    center_fraction: float = 0.04  # 2 of 48 phase-encode lines at 48x48: the measurement holds little contrast
    noise_sigma: float = 0.05
    gamma: float = 5.0
    demo: DemoConfig = field(default_factory=DemoConfig)  # sizes, budget, report settings (report_keys: all)

    def seed_config(self, seed: int) -> DemoConfig:
        return replace(self.demo, output_dir=Path(self.output_dir) / f"seed_{seed}", seed=seed, methods=self.methods,
                       accelerations=(self.acceleration,), center_fraction=self.center_fraction,
                       noise_sigma=self.noise_sigma, noise_gamma=self.gamma)


def t_quantile_975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (normal for df > 30)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df)) if df <= 30 else 1.959963984540054


def pool_paired(per_seed: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Pool paired per-slice differences over seeds.

    The seed is the unit of replication for the verdict: each seed's mean difference already averages its slices, and
    the spread of those means over seeds carries both the slice-to-slice noise and the retraining (initialisation,
    subjects) variance. The interval is ``mean ± t_{0.975, n−1} · sd / √n`` over the ``n`` seed means. The
    slice-pooled interval (all slices of all seeds as independent pairs, normal quantile) is given beside it; it
    ignores the retraining variance, so it is narrower and is *not* used for the verdict.

    Args:
        per_seed: for each seed, the per-slice differences (first − second), failed slices left out.

    Returns:
        ``mean``, ``ci95`` ``[lo, hi]`` and ``n_seeds`` (seed level), ``slice_mean``, ``slice_ci95``, ``n_slices``,
        ``seed_means``, and ``verdict``: ``"established (first higher)"`` / ``"established (second higher)"`` when
        the seed-level interval excludes 0, else ``"not established"`` (always so with fewer than 2 seeds).
    """
    seeds = [np.asarray(d, dtype=float) for d in per_seed if len(d)]
    means = np.array([d.mean() for d in seeds])
    allv = np.concatenate(seeds) if seeds else np.zeros(0)
    out: dict[str, Any] = {"n_seeds": int(means.size), "n_slices": int(allv.size), "seed_means": means.tolist()}
    if means.size >= 2:
        half = t_quantile_975(means.size - 1) * means.std(ddof=1) / math.sqrt(means.size)
        out["mean"], out["ci95"] = float(means.mean()), [float(means.mean() - half), float(means.mean() + half)]
    else:
        out["mean"] = float(means.mean()) if means.size else None
        out["ci95"] = None
    if allv.size >= 2:
        half = 1.959963984540054 * allv.std(ddof=1) / math.sqrt(allv.size)
        out["slice_mean"], out["slice_ci95"] = float(allv.mean()), [float(allv.mean() - half),
                                                                   float(allv.mean() + half)]
    else:
        out["slice_mean"], out["slice_ci95"] = None, None
    ci = out["ci95"]
    if ci is not None and ci[0] > 0:
        out["verdict"] = "established (first higher)"
    elif ci is not None and ci[1] < 0:
        out["verdict"] = "established (second higher)"
    else:
        out["verdict"] = "not established" + ("" if means.size >= 2 else f" ({means.size} seed)")
    return out


def paired_differences(dir_a: Path, dir_b: Path, metric: str = "contextmri_psnr") -> list[float]:
    """Per-slice ``a − b`` over the slices both runs reconstructed (same slices and masks required)."""
    from utils.report import _slice_rows

    a, b = _slice_rows(dir_a, metric), _slice_rows(dir_b, metric)
    if not a or a.keys() != b.keys():
        raise ValueError(f"{dir_a} and {dir_b} do not hold the same slices ({len(a)} vs {len(b)} rows)")
    return [a[k] - b[k] for k in sorted(a) if a[k] is not None and b[k] is not None]


def _ci(entry: Mapping[str, Any], mean: str = "mean", ci: str = "ci95") -> str:
    if entry.get(ci) is None:
        return "n/a" if entry.get(mean) is None else f"{entry[mean]:+.2f} (no interval)"
    lo, hi = entry[ci]
    return f"{entry[mean]:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def run_study(cfg: StudyConfig) -> Path:
    """Run (or resume) every seed, pool, and write ``study.md`` and ``study.json``."""
    from utils.files import atomic_write_text, write_json
    from utils.report import load_result

    cfg.output_dir = Path(cfg.output_dir).resolve()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in cfg.seeds:
        scfg = cfg.seed_config(seed)
        scfg.output_dir = Path(scfg.output_dir).resolve()
        scfg.output_dir.mkdir(parents=True, exist_ok=True)
        seed_times: dict[str, float] = {}
        with Stage(f"seed {seed}", timings):
            models = prepare_and_train(scfg, seed_times)
            reports = report_all(scfg, models, seed_times)
            with Stage(f"5. reconstruct x{cfg.acceleration:g} noisy σ {cfg.noise_sigma:g}", seed_times):
                rows, dirs = reconstruct_all(scfg, cfg.acceleration, models, cfg.noise_sigma, ensemble=False)
        per_seed[seed] = {"dirs": {k.removesuffix("_noisy"): v for k, v in dirs.items()}, "rows": rows,
                          "reports": reports, "timings_s": seed_times}

    comparisons = {}
    for first, second, claim in COMPARISONS:
        diffs = [paired_differences(s["dirs"][first], s["dirs"][second]) for s in per_seed.values()
                 if first in s["dirs"] and second in s["dirs"]]
        if diffs:
            comparisons[f"{first} − {second}"] = {"claim": claim, **pool_paired(diffs)}

    psnr: dict[str, list[float | None]] = {}
    for s in per_seed.values():
        for label, tag in s["rows"]:
            summary = load_result(label, cfg.acceleration, s["dirs"][tag.removesuffix("_noisy")]).summary
            psnr.setdefault(tag.removesuffix("_noisy"), []).append(summary["fastmri_psnr"]["mean"])

    info: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        if method == "unconditioned":
            continue
        nats = [s["reports"][method]["conditions"]["null"]["information"]["nats"] for s in per_seed.values()]
        reads = [bool(s["reports"][method]["reads_metadata"]) for s in per_seed.values()]
        best_z = []
        for s in per_seed.values():
            zs = [b["z"] for b in s["reports"][method]["conditions"]["null"]["bands"] if b["z"] is not None]
            best_z.append(max(zs) if zs else None)
        info[method] = {"nats_per_seed": nats, "reads_per_seed": reads, "max_null_z_per_seed": best_z,
                        **{k: v for k, v in pool_paired([[n] for n in nats if n is not None]).items()
                           if k in ("mean", "ci95", "n_seeds")}}
    if "fine-grained+ood" in info and "fine-grained" in info:
        ood, plain = info["fine-grained+ood"]["nats_per_seed"], info["fine-grained"]["nats_per_seed"]
        pairs = [[a - b] for a, b in zip(ood, plain) if a is not None and b is not None]
        info["OOD − plain fine-grained"] = pool_paired(pairs)

    total = time.perf_counter() - t_all
    lines = [
        f"Study: seeds {', '.join(map(str, cfg.seeds))}; per seed {len(cfg.demo.contrasts)} contrasts x "
        f"{cfg.demo.volumes_per_contrast} subjects x {cfg.demo.num_slices} slices ({cfg.demo.max_val_slices} held-out "
        f"slices), {cfg.demo.crop_size}x{cfg.demo.crop_size}; every model configs/unet/{cfg.demo.unet_config}.json, "
        f"{cfg.demo.train_steps} steps x batch {cfg.demo.batch_size}, lr {cfg.demo.learning_rate:g}, null condition "
        f"in {cfg.demo.cfg_prob:g} of the samples. Reconstruction: {cfg.demo.mask_type} x{cfg.acceleration:g}, centre "
        f"fraction {cfg.center_fraction:g}, complex noise σ {cfg.noise_sigma:g}, DDS {cfg.demo.recon_steps} steps, "
        f"gamma {cfg.gamma:g}.",
        "",
        "Volume PSNR [dB] (fastMRI protocol) per seed:", "",
        "| method | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |",
        "|---|" + "---|" * len(cfg.seeds),
        *[f"| {tag} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in vals) + " |"
          for tag, vals in psnr.items()],
        "",
        "Paired per-slice PSNR difference (first − second, ContextMRI per-slice protocol) pooled over seeds: mean of "
        "the seed means with its 95 % interval (t over seeds; the verdict), and all slices pooled (normal, ignores "
        "retraining variance):", "",
        "| comparison | claim | seed level [dB] | slices pooled [dB] | seeds / slices | verdict |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {v['claim']} | {_ci(v)} | {_ci(v, 'slice_mean', 'slice_ci95')} | {v['n_seeds']} / "
          f"{v['n_slices']} | {v['verdict']} |" for k, v in comparisons.items()],
        "",
        "Information report (metadata_report.py, null condition vs correct metadata; nats per image, I-MMSE estimate "
        "over the report's t grid), mean over seeds with a 95 % interval:", "",
        "| model | nats per seed | mean [95 % CI] | reads its condition (z ≥ 3) per seed "
        "| largest null-gap z per seed |",
        "|---|---|---|---|---|",
        *[f"| {SHORT.get(m, m)} | {', '.join('n/a' if n is None else f'{n:+.2f}' for n in v['nats_per_seed'])} | "
          f"{_ci(v)} | {', '.join('yes' if r else 'no' for r in v['reads_per_seed'])} | "
          f"{', '.join('n/a' if z is None else f'{z:.1f}' for z in v['max_null_z_per_seed'])} |"
          for m, v in info.items() if "nats_per_seed" in v],
    ]
    if "OOD − plain fine-grained" in info:
        lines += ["", f"OOD − plain fine-grained information: {_ci(info['OOD − plain fine-grained'])} nats/image, "
                      f"{info['OOD − plain fine-grained']['verdict']}."]
    lines += ["", f"Total wall time {total / 60:.1f} min (" +
              ", ".join(f"{k}: {v / 60:.1f} min" for k, v in timings.items()) + ")."]
    text = "\n".join(lines)
    atomic_write_text(cfg.output_dir / "study.md", text + "\n")
    cfg_dict = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "demo"}
    cfg_dict["demo"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg.demo).items()
                        if k != "output_dir"}
    write_json(cfg.output_dir / "study.json",
               {"config": cfg_dict, "comparisons": comparisons, "information": info, "volume_psnr": psnr,
                "per_seed": {str(s): {"dirs": {k: str(v) for k, v in d["dirs"].items()}, "timings_s": d["timings_s"]}
                             for s, d in per_seed.items()},
                "timings_s": timings})
    print("\n" + text)
    print(f"\nstudy: {cfg.output_dir / 'study.md'} (+ study.json, seed_*/)")
    return cfg.output_dir

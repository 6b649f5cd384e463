"""Stage 6 of the demo: raw k-space vs. the re-simulated path on the same slices (issue 14: how much the inverse
crime flatters the numbers).

The held-out volumes are reconstructed from the simulator's raw, noisy k-space (``recon_complex_multi.py --raw_dir``)
and, on exactly the same slices and line patterns, through the re-simulated ``--data_root`` path
(:func:`utils.demo_stages.reconstruct`); :func:`paired_volume_difference` pairs them per volume,
:func:`raw_comparison_lines` / :func:`raw_comparison_rows` are the section of ``results.md`` / ``results_raw.csv``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from utils.demo_config import DemoConfig
from utils.demo_results import number
from utils.demo_stages import LABELS, Stage, model_args, reconstruct, run_script

#: What each path measures and scores against (the table says it on every row).
RAW_PATH = "raw: noisy raw k-space (--raw_dir) → reconstruction_rss"
RESIM_PATH = "re-simulated: y = M F(S x), noise-free (--data_root) → MVUE"


def heldout_raw_files(cfg: DemoConfig, val_items: Sequence) -> tuple[list[Path], int]:
    """The held-out raw files the comparison reconstructs, and how many dataset slices they make.

    The raw path reconstructs whole files; the re-simulated path takes the first ``end`` dataset slices. So the
    comparison uses the longest prefix of ``val_items`` (the demo's held-out slices) made only of complete volumes:
    both paths then see exactly the same slices.

    Args:
        val_items: the demo's held-out slices in dataset order (``filename``, ``slice_idx``).

    Returns:
        ``(files, end)``: the raw ``.h5`` files (``raw/brain/val/{filename}.h5``) and the number of dataset slices
        they cover (``--end_idx`` of the matched re-simulated runs); ``([], 0)`` when no volume is complete.
    """
    import h5py

    val_dir = cfg.output_dir / "raw" / "brain" / "val"
    counts: dict[str, int] = {}
    for item in val_items:
        counts.setdefault(item.filename, 0)
        counts[item.filename] += 1
    files, end = [], 0
    for name, n in counts.items():  # dataset order: the slices of a file are contiguous
        path = val_dir / f"{name}.h5"
        if not path.is_file():
            break
        with h5py.File(path, "r") as f:
            total = int(f["kspace"].shape[0])
        if n != total:
            break
        files.append(path)
        end += n
    return files, end


def reconstruct_raw(cfg: DemoConfig, acc: float, tag: str, extra: list, raw_dir: Path) -> Path:
    """Run ``recon_complex_multi.py --raw_dir`` into ``recon/raw/{mask}/acc_{R}/{tag}`` (resumed by fingerprint)."""
    save = cfg.output_dir / "recon"
    run_script(["recon_complex_multi.py", "--raw_dir", raw_dir, "--mask_type", cfg.mask_type, "--acc_factor", acc,
          "--center_fraction", cfg.raw_center_fraction, "--save_dir", save, "--tag", tag,
          "--batch_size", cfg.num_slices, "--num_steps", cfg.recon_steps, "--gamma", cfg.gamma,
          "--gamma_rule", cfg.raw_gamma_rule, "--seed", cfg.seed, *extra], cfg, f"recon_raw_{tag}_x{acc:g}")
    return save / "raw" / cfg.mask_type / f"acc_{acc:g}" / tag


def _row_keys(folder: Path) -> set[tuple[str, int]]:
    """``(file, slice)`` of every per-slice row of a run folder (both paths write ``rows/{file}/{idx:03d}.json``)."""
    return {(p.parent.name, int(p.stem)) for p in (folder / "rows").glob("*/*.json")}


def paired_volume_difference(raw_summary: dict, resim_summary: dict) -> dict[str, Any]:
    """Per-volume paired difference raw − re-simulated of the fastMRI PSNR / SSIM / NMSE.

    Both summaries hold ``volumes`` rows (``filename``, ``fastmri_*``); the fastMRI protocol is volume-wise, so the
    volume is the unit of pairing.

    Returns:
        ``{"num_volumes", "psnr"|"ssim"|"nmse": {"raw", "resim": mean ± std over the paired volumes, "mean_diff",
        "se" (of the mean difference; None for one volume), "raw_lower" (volumes where raw is lower)}}``.

    Raises:
        ValueError: the runs do not score the same volumes (a comparison on other slices would mislead).
    """
    def scored(summary: dict) -> dict[str, dict]:  # --data_root marks a scored volume "scored", --raw_dir "done"
        return {v["filename"]: v for v in summary["volumes"]
                if v.get("fastmri_psnr") is not None and not v.get("failed_slices")
                and v.get("status", "scored") in ("scored", "done")}

    raw, resim = scored(raw_summary), scored(resim_summary)
    if not raw or raw.keys() != resim.keys():
        raise ValueError(f"raw and re-simulated runs score different volumes: {sorted(raw)} vs {sorted(resim)}")
    names = sorted(raw)
    out: dict[str, Any] = {"num_volumes": len(names), "volumes": names}
    for metric in ("psnr", "ssim", "nmse"):
        a = np.array([raw[n][f"fastmri_{metric}"] for n in names], dtype=float)
        b = np.array([resim[n][f"fastmri_{metric}"] for n in names], dtype=float)
        d = a - b
        out[metric] = {"raw": {"mean": float(a.mean()), "std": float(a.std())},
                       "resim": {"mean": float(b.mean()), "std": float(b.std())},
                       "mean_diff": float(d.mean()),
                       "se": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None,
                       "raw_lower": int((d < 0).sum())}
    return out


def raw_vs_resimulated(cfg: DemoConfig, models: dict[str, Path], val_items: Sequence,
                       timings: dict[str, float]) -> list[dict[str, Any]]:
    """Reconstruct the held-out volumes from their raw k-space and, on the same slices and line patterns, through the
    re-simulated path; returns one comparison entry per (R, method).

    The line pattern of a slice is drawn from (file, slice) on both paths over the same 48 (``W``) columns, so the two
    paths use the same pattern; on the raw path the zero-padded columns outside the acquired band are not measured
    (they hold no data), which is part of what the re-simulation hides.

    Returns:
        ``[{"method", "label", "acc_factor", "raw_dir", "resim_dir", "raw_acceleration", "resim_acceleration",
        "raw_gamma", "paired": paired_volume_difference(...)}]`` (empty without complete held-out volumes).
    """
    if not cfg.raw_accelerations:
        return []
    files, end = heldout_raw_files(cfg, val_items)
    if not files:
        print("raw rows skipped: the held-out slices hold no complete volume", flush=True)
        return []
    raw_dir = cfg.output_dir / "raw" / "heldout_compared"  # exactly the compared volumes (symlinks)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob("*.h5"):
        if stale.name not in {f.name for f in files} or not stale.exists():  # not compared, or a broken link
            stale.unlink()
    for f in files:
        link = raw_dir / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    margs = model_args(cfg, models)
    methods = [m for m in cfg.raw_methods if m in models]
    runs = [("zero_filled", "zero-filled", ["--method", "zero_filled"]), ("cs", "CS L1-wavelet", ["--method", "cs"])]
    runs += [(m, LABELS[m], margs[m]) for m in methods]
    same_as_main = cfg.raw_center_fraction == cfg.center_fraction and end == min(len(val_items), cfg.max_val_slices)
    entries = []
    for acc in cfg.raw_accelerations:
        name = f"6. raw k-space vs re-simulated x{acc:g} (centre fraction {cfg.raw_center_fraction:g})"
        with Stage(name, timings):
            with ThreadPoolExecutor(cfg.parallel) as pool:
                # the slow (diffusion) runs first, so the cheap ones fill the gaps
                order = sorted(runs, key=lambda r: r[0] in ("zero_filled", "cs"))
                raw_f = {tag: pool.submit(reconstruct_raw, cfg, acc, tag, extra, raw_dir) for tag, _, extra in order}
                resim_tag = {tag: tag if same_as_main else f"{tag}_cf{cfg.raw_center_fraction:g}" for tag, _, _ in runs}
                resim_f = {tag: pool.submit(reconstruct, cfg, acc, resim_tag[tag], extra, cfg.raw_center_fraction, end)
                           for tag, _, extra in order}
                raw_dirs = {tag: fut.result() for tag, fut in raw_f.items()}
                resim_dirs = {tag: fut.result() for tag, fut in resim_f.items()}
        for tag, label, _ in runs:
            rd, sd = raw_dirs[tag], resim_dirs[tag]
            if _row_keys(rd) != _row_keys(sd):
                raise RuntimeError(f"{rd} and {sd} hold different slices; the raw-vs-re-simulated rows would compare "
                                   "other data")
            raw_s = json.loads((rd / "summary.json").read_text())
            resim_s = json.loads((sd / "summary.json").read_text())
            entries.append({
                "method": tag, "label": label, "acc_factor": acc, "raw_dir": str(rd), "resim_dir": str(sd),
                "num_slices": raw_s["num_slices"],
                "raw_acceleration": (raw_s.get("acceleration") or {}).get("mean"),
                "resim_acceleration": (resim_s.get("acceleration") or {}).get("mean"),
                "raw_gamma": (raw_s.get("gamma") or {}).get("mean") if tag not in ("zero_filled", "cs") else None,
                "raw_sigma": (raw_s.get("sigma") or {}).get("mean"),
                "raw_time_s": (raw_s.get("time_s") or {}).get("mean"),
                "resim_time_s": (resim_s.get("time_s") or {}).get("mean"),
                "paired": paired_volume_difference(raw_s, resim_s),
            })
    return entries


def raw_comparison_lines(cfg: DemoConfig, entries: Sequence[dict[str, Any]]) -> list[str]:
    """The results section of :func:`raw_vs_resimulated`: two labelled rows per method and the paired difference."""
    if not entries:
        return []
    first = entries[0]
    p = first["paired"]
    gamma_text = (f"DDS γ {cfg.gamma:g} lowered per slice from the estimated σ (--gamma_rule noise)"
                  if cfg.raw_gamma_rule == "noise" else f"DDS γ {cfg.gamma:g}")
    lines = [
        f"**Raw k-space vs. the re-simulated path (inverse crime)**: the same {p['num_volumes']} held-out volumes "
        f"({first['num_slices']} slices) and the same {cfg.mask_type} line patterns (seeded from file and slice; "
        f"centre fraction {cfg.raw_center_fraction:g}, so ESPIRiT has ACS lines to work with). *Raw*: "
        "recon_complex_multi.py --raw_dir on the simulator's noisy k-space (2x readout oversampling, zero-padded "
        "phase-encode columns outside the acquired band, which are never measured), coil maps from the ACS lines "
        f"only, scale and σ estimated from "
        f"the data, {gamma_text}; target: the file's reconstruction_rss. *Re-simulated*: --data_root, y = M F(S x) "
        f"from the preprocessed MVUE slice with its fully sampled maps, noise-free, DDS γ {cfg.gamma:g}; target: the "
        "MVUE magnitude. Both: fastMRI protocol (magnitude, volume-wise, data_range = max of the target volume), "
        "mean ± std over volumes; Δ = raw − re-simulated per volume (mean ± standard error; 'raw lower' counts the "
        "volumes where the raw path scores lower). R (achieved): raw over the acquired columns, re-simulated over "
        "all columns.",
        "",
        "| method | path: measurement → target | R (achieved) | PSNR [dB] | SSIM | NMSE | Δ PSNR [dB] | Δ SSIM | "
        "raw lower (PSNR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        q = e["paired"]
        n = q["num_volumes"]

        def cells(side: str) -> str:
            return " | ".join(f"{q[m][side]['mean']:{f}} ± {q[m][side]['std']:{f}}"
                              for m, f in (("psnr", ".2f"), ("ssim", ".4f"), ("nmse", ".4f")))

        def delta(metric: str, fmt: str) -> str:
            se = q[metric]["se"]
            return f"{q[metric]['mean_diff']:{fmt}}" + ("" if se is None else f" ± {se:{fmt[1:]}}")

        lines.append(f"| {e['label']} | {RESIM_PATH} | {e['acc_factor']:g} ({number(e['resim_acceleration'])}) | "
                     f"{cells('resim')} | | | |")
        lines.append(f"| {e['label']} | {RAW_PATH} | {e['acc_factor']:g} ({number(e['raw_acceleration'])}) | "
                     f"{cells('raw')} | {delta('psnr', '+.2f')} | {delta('ssim', '+.4f')} | "
                     f"{q['psnr']['raw_lower']}/{n} |")
    gammas = [e["raw_gamma"] for e in entries if e["raw_gamma"] is not None]
    sigma = entries[0]["raw_sigma"]
    if gammas or sigma is not None:
        lines += ["", f"Raw path: estimated noise σ {number(sigma, '.3g')} (per real/imaginary part, raw k-space units)"
                      + (f"; mean DDS γ after the noise rule {min(gammas):.1f}–{max(gammas):.1f}" if gammas else "")
                      + "."]
    return lines


def raw_comparison_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison as flat rows (``results_raw.csv``): one per (R, method, path)."""
    rows = []
    for e in entries:
        q = e["paired"]
        for side, path in (("resim", RESIM_PATH), ("raw", RAW_PATH)):
            rows.append({
                "method": e["label"], "path": path, "acc_factor": e["acc_factor"],
                "achieved_acceleration": e[f"{side}_acceleration"], "num_volumes": q["num_volumes"],
                "num_slices": e["num_slices"],
                **{f"fastmri_{m}_{k}": q[m][side][k] for m in ("psnr", "ssim", "nmse") for k in ("mean", "std")},
                **({f"delta_{m}_{k}": q[m][k] for m in ("psnr", "ssim", "nmse") for k in ("mean_diff", "se")}
                   if side == "raw" else {}),
                "raw_lower_psnr": q["psnr"]["raw_lower"] if side == "raw" else None,
                "time_per_slice_s": e[f"{side}_time_s"],
            })
    return rows

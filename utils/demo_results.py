"""The demo's results: ``results.md`` (the table and its sections), ``results.csv``, ``results_raw.csv`` and
``results.json`` from what the stages measured (:func:`write_results`), and the information line of each model."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from utils.demo_config import DemoConfig
from utils.files import atomic_write_text, write_json


def number(value: float | None, fmt: str = ".2f") -> str:
    """``value`` formatted with ``fmt``, or ``n/a`` for a missing one."""
    return "n/a" if value is None else f"{value:{fmt}}"


def information_line(method: str, report: dict) -> str:
    """One line per model: the null-vs-correct loss gap per t band (z), the information estimate and the verdict."""
    null = report["conditions"]["null"]
    bands = [b for b in null["bands"] if b["band"] != "all"]

    def cell(b: dict) -> str:
        if b["z"] is None or b["rel_diff_pct"] is None:
            return f"t {b['band']}: n/a"
        return f"t {b['band']}: {b['rel_diff_pct']:+.2f} % (z {b['z']:.1f})"

    info = null["information"]
    nats = "n/a" if info["nats"] is None else f"{info['nats']:+.2f} ± {info['se'] or float('nan'):.2f} nats/image"
    attrs = []
    for key, v in report.get("attribute_verdicts", {}).items():
        m = v.get("mismatch") or v.get("drop")
        if m is not None and m["z"] is not None:
            attrs.append(f"{key} {'mismatch' if v.get('mismatch') else 'drop'} z {m['z']:.1f}")
    return (f"{method}: null − correct loss {'; '.join(cell(b) for b in bands)}; information {nats}; "
            f"strongest per attribute: {', '.join(attrs) or 'n/a'} — {report['verdict']}")


def write_results(cfg: DemoConfig, results: Sequence, reports: Mapping[str, dict], sensitivity: Mapping[str, dict],
                  paired: Mapping[str, dict], calibration: Mapping[str, dict], raw_entries: Sequence[dict[str, Any]],
                  raw_lines: Sequence[str], raw_rows: Sequence[dict[str, Any]], timings: Mapping[str, float],
                  t_all: float) -> None:
    """Write ``results.md``, ``results.csv``, ``results.json`` and (with raw entries) ``results_raw.csv``; print the
    report.

    Args:
        results: the table rows (``utils.report.MethodResult``), in table order.
        reports: ``report.json`` of each conditioned model (``metadata_report.py``).
        sensitivity: per model and stage, PSNR with correct vs. mismatched metadata.
        paired: paired per-slice comparisons (``utils.report.paired_comparison``).
        calibration: the ensemble's uncertainty calibration per R.
        raw_entries: :func:`utils.demo_raw.raw_vs_resimulated`'s entries, with their ``results.md`` section
            (``raw_lines``) and ``results_raw.csv`` rows (``raw_rows``).
        timings: seconds per stage.
        t_all: ``time.perf_counter()`` at the start of the demo (the report states the total wall time).
    """
    import pandas as pd

    from utils.report import results_table

    table, rows = results_table(results)
    info_lines = [information_line(m, r) for m, r in reports.items()]
    stage_times = ", ".join(f"{name.split(' (')[0]}: {secs:.0f} s" for name, secs in timings.items())
    total = time.perf_counter() - t_all
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, torch CPU, fp32"
    try:
        load = ", load average at the end {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg())
    except OSError:
        load = ""
    text_how = {"frozen": "random CLIP text tower frozen, projection trained",
                "scratch": "CLIP text tower trained from scratch with the UNet",
                "scratch_lr": f"CLIP text tower trained from scratch at lr {cfg.text_encoder_lr:g}"}[cfg.text_encoder]
    noise_text = ("" if cfg.noise_sigma is None else
                  f" Noisy rows: complex k-space noise σ {cfg.noise_sigma:g} (relative to the normalised image), "
                  f"DDS gamma {cfg.noise_gamma:g}, at x{', x'.join(f'{a:g}' for a in cfg.noise_accelerations)}.")
    lines = [
        f"Demo on simulated brain data ({len(cfg.contrasts)} contrasts x {cfg.volumes_per_contrast} subjects x "
        f"{cfg.num_slices} slices, one subject per contrast held out, {cfg.crop_size}x"
        f"{cfg.crop_size}, {cfg.max_val_slices} held-out slices), {cfg.mask_type} masks, DDS {cfg.recon_steps} steps "
        f"(eta 0.8, gamma {cfg.gamma:g}, 5 CG, |x0_hat| clipped at {cfg.clip_x0}), every model: "
        f"configs/unet/{cfg.unet_config}.json, {cfg.train_steps} steps x batch {cfg.batch_size}, "
        f"lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), seed {cfg.seed}, null condition in {cfg.cfg_prob:g} of the "
        f"samples (cfg_prob / prompt_cfg_prob {cfg.cfg_prob:g}, joint; cfg_null_prob {cfg.cfg_null_prob:g}); "
        f"text model: {text_how}.{noise_text}",
        "Metrics: fastMRI protocol (magnitude, volume-wise, data_range = max of the volume), mean ± std over volumes.",
        "", table, "",
        *raw_lines, *([""] if raw_entries else []),
        f"**Information report** (metadata_report.py on {cfg.report_slices} held-out slices x {cfg.report_noise} "
        f"noise draws at t = {', '.join(str(t) for t in cfg.report_timesteps)}: paired denoising loss with the null "
        f"condition minus with the correct metadata, % of the loss, z = gap / SE over slices; information = I-MMSE "
        f"estimate over those t; per attribute ({', '.join(cfg.report_keys or ('all',))}) the largest z of "
        "replacing it with another slice's value; the unconditioned model has no condition input):", "",
        *[f"- {line}" for line in info_lines],
        "",
        "**Metadata sensitivity** (PSNR with correct vs. mismatched contrast/sequence/TR/TE/TI/flip angle):", "",
        "| model | correct [dB] | mismatched [dB] | drop [dB] |", "|---|---|---|---|",
        *[f"| {k} | {number(v['correct_psnr'])} | {number(v['mismatched_psnr'])} | {number(v['drop_db'], '+.2f')} |"
          for k, v in sensitivity.items()],
        "",
        "**Paired per-slice comparison** (fine-grained minus the other method unless named, PSNR under the ContextMRI "
        "per-slice protocol on the same slices and masks; mean ± standard error, and the slices where the first is "
        "higher):",
        "", "| comparison | mean difference [dB] | first higher |", "|---|---|---|",
        *[f"| {k} | {v['mean_diff']:+.2f} ± {v['se']:.2f} | {v['wins']}/{v['num_slices']} |"
          for k, v in paired.items()],
        "",
        "**Uncertainty calibration** (Spearman rank correlation of the ensemble's per-pixel std with the per-pixel "
        "absolute error, inside the object, mean ± std over slices):", "",
        *[f"- {k}: {v['spearman_mean']:.3f} ± {v['spearman_std']:.3f} ({v['num_slices']} slices)"
          for k, v in calibration.items()],
        "", f"Machine: {machine}{load}. Total wall time {total / 60:.1f} min ({stage_times}); scripts ran "
            f"{cfg.parallel} at a time with {cfg.threads} thread(s) each, so the s / slice column includes that "
            "sharing.",
    ]
    report = "\n".join(lines)
    atomic_write_text(cfg.output_dir / "results.md", report + "\n")
    atomic_write_text(cfg.output_dir / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    if raw_entries:
        atomic_write_text(cfg.output_dir / "results_raw.csv", pd.DataFrame(raw_rows).to_csv(index=False))
    write_json(cfg.output_dir / "results.json",
               {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "rows": rows,
                "information": {m: {"line": information_line(m, r), "verdict": r["verdict"],
                                    "reads_metadata": r["reads_metadata"], "null": r["conditions"]["null"]}
                                for m, r in reports.items()},
                "sensitivity": sensitivity, "paired": paired, "calibration": calibration,
                "raw_vs_resimulated": raw_entries, "timings_s": timings,
                "machine": machine})
    print("\n" + report)
    print(f"\nresults: {cfg.output_dir / 'results.md'} (+ results.csv, results.json, "
          f"{'results_raw.csv, ' if raw_entries else ''}figure_x*.png, reports/)")

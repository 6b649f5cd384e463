"""The main job on the embedded default: simulate -> preprocess -> train -> information report -> reconstruct -> report.

Every stage runs the project's real command-line scripts as subprocesses (exactly what a user types), so the demo
exercises the same code paths as real use. Stages whose outputs exist are skipped, so an interrupted demo resumes
(reconstructions resume only when their run fingerprint matches, see :func:`utils.demo_stages.reconstruct`).

The models share the UNet (``configs/unet/compact.json``), the number of steps, the batch size, the learning rate,
the seed and the null-condition rate (10 %, see ``DemoConfig.cfg_null_prob``); they differ only in what conditions
them:

* ``unconditioned``: one constant token (no metadata);
* ``text``: the ContextMRI prompt through a CLIP text transformer. No pretrained CLIP weights exist offline; the
  encoder is a small, randomly initialised CLIP text tower (width 128) that stays *frozen*; its tokens enter the UNet
  through the UNet's own input projection (``encoder_hid_proj``, 128 -> 128), which trains with the UNet
  (``DemoConfig.text_encoder``; the README gives the measurement behind this choice: an encoder trained from scratch
  with the UNet learnt to map every prompt to nearly the same tokens);
* ``t5`` (study only): the same prompt through a tiny T5 encoder (width 48), frozen at random initialisation; the
  48 -> 128 text projection trains;
* ``fine-grained``: typed metadata tokens (Metadata Matters), no text;
* ``fine-grained+ood`` (``--with_ood``, study): the same, trained with the cardiac set (``train_mri_ood.py``).

Where the pieces live: the settings in :mod:`utils.demo_config` (``DemoConfig``), stages 1-5 (the scripts' command
lines, resumable) in :mod:`utils.demo_stages`, stage 6 (raw k-space vs. the re-simulated path) in
:mod:`utils.demo_raw`, the results files in :mod:`utils.demo_results`; :func:`run_demo` runs them in order. The command
line is ``demo.py`` (``DemoOptions``).
"""

from __future__ import annotations

import time
from pathlib import Path

from utils.demo_config import DemoConfig
from utils.demo_raw import raw_comparison_lines, raw_comparison_rows, raw_vs_resimulated
from utils.demo_results import write_results
from utils.demo_stages import MISMATCH, SHORT, Stage, prepare_and_train, reconstruct_all, report_all


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage and write ``results.md``, ``results.csv``, ``results.json``, ``results_raw.csv`` (the raw vs
    re-simulated comparison, :func:`raw_vs_resimulated`) and ``figure_x{R}.png``."""
    from utils.data import MRISliceDataset
    from utils.report import figure_grid, load_result, paired_comparison, uncertainty_calibration

    cfg.output_dir = Path(cfg.output_dir).resolve()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    models = prepare_and_train(cfg, timings)
    reports = report_all(cfg, models, timings)

    results, sensitivity, calibration, paired = [], {}, {}, {}
    val = MRISliceDataset(cfg.output_dir / "fastmri", [cfg.output_dir / "fastmri" / "metadata_brain_val.csv"],
                          split="val", crop_size=cfg.crop_size)
    val_items = [val[i] for i in range(min(len(val), cfg.max_val_slices))]
    stages = [(acc, None) for acc in cfg.accelerations]
    if cfg.noise_sigma is not None:
        stages += [(acc, cfg.noise_sigma) for acc in cfg.noise_accelerations]
    for acc, sigma in stages:
        noisy = sigma is not None
        name = f"x{acc:g}" + (f" noisy σ {sigma:g}" if noisy else "")
        with Stage(f"5. reconstruct {name}" + (f" (gamma {cfg.noise_gamma:g})" if noisy else ""), timings):
            rows, dirs = reconstruct_all(cfg, acc, models, sigma, ensemble=not noisy)
        sfx = "_noisy" if noisy else ""
        for label, tag in rows:
            results.append(load_result(label, acc, dirs[tag]))
        for model in MISMATCH:
            if model + sfx in dirs and f"{model}_mismatch{sfx}" in dirs:
                good = load_result(model, acc, dirs[model + sfx]).summary["fastmri_psnr"]["mean"]
                bad = load_result(model, acc, dirs[f"{model}_mismatch{sfx}"]).summary["fastmri_psnr"]["mean"]
                sensitivity[f"{model} {name}"] = {"correct_psnr": good, "mismatched_psnr": bad,
                                                  "drop_db": None if good is None or bad is None else good - bad}
        if "fine-grained" + sfx in dirs:
            for other, label in (("unconditioned", "unconditioned"), ("text", "text"), ("t5", "T5"), ("cs", "CS"),
                                 ("fine-grained_mismatch", "itself with mismatched metadata")):
                if other + sfx in dirs:
                    paired[f"{name} vs {label}"] = paired_comparison(dirs["fine-grained" + sfx], dirs[other + sfx])
        if "text" + sfx in dirs and "unconditioned" + sfx in dirs:
            paired[f"{name}: text vs unconditioned"] = paired_comparison(dirs["text" + sfx],
                                                                         dirs["unconditioned" + sfx])
        if noisy:
            continue
        if "fine-grained_ens" in dirs:
            calibration[f"x{acc:g}"] = uncertainty_calibration(dirs["fine-grained_ens"], val_items)
        shown = {SHORT[m]: dirs[m] for m in models}
        if "fine-grained_ens" in dirs:
            shown["fg ensemble"] = dirs["fine-grained_ens"]
        shown["CS"] = dirs["cs"]
        item = val_items[len(val_items) // 2]
        figure_grid(cfg.output_dir / f"figure_x{acc:g}.png", item, dirs["zero_filled"], shown,
                    std_dir=dirs.get("fine-grained_ens"),
                    title=f"{item.filename} slice {item.slice_idx} ({item.record.get('contrast')}), "
                          f"{cfg.mask_type} x{acc:g}")

    raw_entries = raw_vs_resimulated(cfg, models, val_items, timings)
    write_results(cfg, results, reports, sensitivity, paired, calibration, raw_entries,
                  raw_comparison_lines(cfg, raw_entries), raw_comparison_rows(raw_entries), timings, t_all)
    return cfg.output_dir

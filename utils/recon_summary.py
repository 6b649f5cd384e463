"""Summaries of a ``--data_root`` reconstruction run, rebuilt from the per-slice rows on disk (so shards and resumed
runs summarise the same way): ``summary.json`` + ``summary.csv`` (per volume) + ``slices.csv`` (per slice), and the
lines a command line prints about what the summary covers. :func:`mean_std` is also the raw path's
(:func:`utils.raw_reconstruction.summarize_raw`) per-volume statistic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import atomic_write_text, write_json
from utils.recon_outputs import recon_path, row_path
from utils.run_identity import dataset_slices, read_fingerprint


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean ± std over the finite values, and how many there were (``n``); None when there are none."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarize(out_dir: str | Path, dataset: Sequence, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Rebuild the summary of an output folder from the per-slice rows on disk.

    A volume (file) is *complete* when every slice the dataset lists for it has a row; it is *scored* when it is
    complete and no slice failed. Incomplete volumes (a shard still running or never run) and volumes with failed
    slices are listed with their counts but kept out of the means, and the top-level counts say so.

    fastMRI-protocol metrics are computed per scored volume (magnitudes, ``data_range = max`` of the volume's
    ground truth) from the saved reconstructions; ContextMRI-protocol metrics (and time, NFE, acceleration) are the
    per-slice values of the scored volumes. Overall figures are mean ± std over volumes (fastMRI) and over slices
    (ContextMRI), each with its count ``n``.

    Args:
        out_dir: the run's folder.
        dataset: the run's whole dataset (it defines which slices each volume has).
        indices: restrict the expected slices to these dataset indices (default: all).

    Returns:
        The summary dict (also written as strict-JSON ``summary.json``; per-volume rows go to ``summary.csv``,
        per-slice rows to ``slices.csv``).
    """
    import pandas as pd

    from utils.channels import channels_to_complex
    from utils.metrics import evaluate_volume

    out = Path(out_dir)
    slices = dataset_slices(dataset)
    idx = list(range(len(slices))) if indices is None else list(indices)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i in idx:
        by_file.setdefault(slices[i][1], []).append((slices[i][2], i))
    slice_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    scored_slice_rows: list[dict[str, Any]] = []
    for filename, entries in sorted(by_file.items()):
        entries.sort()
        rows, missing = [], 0
        for slice_idx, i in entries:
            path = row_path(out, filename, slice_idx)
            if not path.is_file():
                missing += 1
                continue
            row = json.loads(path.read_text())
            row.setdefault("status", "ok")  # rows of older runs had no status and only finite outputs
            rows.append((row, i))
        slice_rows.extend(r for r, _ in rows)
        bad = [r for r, _ in rows if r["status"] != "ok"]
        failed.extend({"filename": r["filename"], "slice": r["slice"], "failure": r.get("failure"),
                       "reason": r.get("reason")} for r in bad)
        complete = missing == 0
        vol: dict[str, Any] = {"filename": filename, "num_slices": len(entries), "num_rows": len(rows),
                               "num_missing": missing, "num_failed": len(bad), "complete": complete}
        if not rows:
            vol["status"] = "not started"
        elif not complete:
            vol["status"] = "incomplete"
        elif bad:
            vol["status"] = "failed"
        else:
            vol["status"] = "scored"
            gts = [channels_to_complex(torch.as_tensor(dataset[i].image)[None])[0].numpy() for _, i in rows]
            recs = [np.load(recon_path(out, filename, r["slice"])) for r, _ in rows]
            m = evaluate_volume(np.stack(gts), np.stack(recs), protocol="fastmri")
            vol.update({f"fastmri_{k}": m[k] for k in ("psnr", "ssim", "nmse")})
            scored_slice_rows.extend(r for r, _ in rows)
        volume_rows.append(vol)
    scored = [v for v in volume_rows if v["status"] == "scored"]
    counts = {status: sum(v["status"] == status for v in volume_rows)
              for status in ("scored", "incomplete", "failed", "not started")}
    summary: dict[str, Any] = {
        "complete": counts["incomplete"] == 0 and counts["not started"] == 0,
        "num_volumes": len(scored),
        "num_slices": len(scored_slice_rows),
        "num_volumes_expected": len(volume_rows),
        "num_volumes_incomplete": counts["incomplete"],
        "num_volumes_not_started": counts["not started"],
        "num_volumes_failed": counts["failed"],
        "num_slices_expected": len(idx),
        "num_slices_done": len(slice_rows),
        "num_slices_missing": sum(v["num_missing"] for v in volume_rows),
        "num_slices_failed": len(failed),
        "failed": failed,
    }
    fp = read_fingerprint(out)
    if fp is not None:
        summary["fingerprint"] = fp["hash"]
        summary["run_settings"] = fp.get("settings")
    if (out / "settings.json").is_file():
        summary["settings"] = json.loads((out / "settings.json").read_text())
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse"):
        summary[key] = mean_std([v[key] for v in scored])
    for key in ("contextmri_psnr", "contextmri_ssim", "contextmri_nmse", "time_s", "nfe", "acceleration"):
        summary[key] = mean_std([r.get(key) for r in scored_slice_rows])
    summary["protocols"] = {
        "fastmri": "magnitude, volume-wise, data_range = max(ground-truth volume); mean ± std over scored volumes",
        "contextmri": "per-slice min-max normalised magnitudes, data_range = 1; mean ± std over the slices of the "
                      "scored volumes",
        "scored": "a volume is scored when every slice of it has a row and none failed",
    }
    summary["volumes"] = volume_rows
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.csv", pd.DataFrame(volume_rows).to_csv(index=False))
    atomic_write_text(out / "slices.csv", pd.DataFrame(slice_rows).to_csv(index=False))
    return summary


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What the summary covers, in words: scored/expected volumes and slices, incomplete, failed."""
    lines = [f"scored {summary['num_volumes']} of {summary['num_volumes_expected']} volumes "
             f"({summary['num_slices']} slices); {summary['num_slices_done']} of {summary['num_slices_expected']} "
             f"slices done, {summary['num_slices_failed']} failed"]
    if summary["num_volumes_incomplete"]:
        lines.append(f"INCOMPLETE: {summary['num_volumes_incomplete']} volume(s) lack rows for "
                     f"{summary['num_slices_missing']} slice(s) (a shard not run yet?); they are not in the means")
    if summary["num_volumes_not_started"]:
        lines.append(f"{summary['num_volumes_not_started']} volume(s) of the dataset have no rows yet")
    if summary["num_slices_failed"]:
        lines.append(f"FAILED: {summary['num_slices_failed']} slice(s) in {summary['num_volumes_failed']} volume(s), "
                     "not scored:")
        lines += [f"  {f['filename']} slice {f['slice']}: {f['reason']}" for f in summary["failed"][:10]]
    return lines
